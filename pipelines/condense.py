"""Condense a dataset with SRe2L on Ray Data: recover images from a BatchNorm teacher, relabel them with
its soft labels, write the condensed set as Parquet and log it to MLflow.

    python -m pipelines.condense --config pipelines/configs/condense_fashion.yaml          # IPC 10
    python -m pipelines.condense --config pipelines/configs/condense_fashion.yaml ipc=50 output=runs/c50
    python -m pipelines.condense --config pipelines/configs/condense_fashion.yaml --smoke  # what CI runs
    python -m pipelines.condense --config pipelines/configs/condense_fashion.yaml source=random_real \
        output=runs/real10                      # the fair baseline: real images, the same relabel

Squeeze is the train job (a model with BatchNorm, e.g. ``squeezenet-fashion@current``). The work is
cut into SRe2L's recovery batches (tasks.sre2l.plan_batches: one image per class, per IPC index and
class block); Ray Data hands them to an actor pool (``actors`` x ``cpus_per_actor``), each actor holding
the teacher. An actor recovers its batch (CE + BN-statistics matching, Adam, jitter), relabels the
images (``relabel_epochs`` stored views with fp16 teacher logits, FKD-style) and writes one Parquet part:

    <output>/part-ipc<i>-block<b>.parquet   image (uint8 bytes), shape, label, ipc_index, block,
                                            teacher diagnostics (ce, confidence, predicted, bn_loss and
                                            their start values), soft labels (boxes, flips, logits per
                                            epoch), provenance (teacher URI, seed, settings)

A part that exists is not redone, so a re-run with the same output resumes where an interrupted one
stopped (by recovery batch: IPC index x class block). The run logs images/s, the teacher's accuracy
and confidence on the recovered images, their BN loss before and after, a grid of them, and the Parquet
set itself as the run's ``condensed/`` artifact.

``source: random_real`` makes the fair baseline in the same form: per class the seeded random real
training images (the train job's split for ``seed``) instead of recovered ones, relabelled identically.
Images of IPC index i do not depend on the set's size, so one IPC-50 set holds the IPC-1 and IPC-10
sets too (the train job's ``data.condensed_ipc`` takes that prefix).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipelines.core import tracking
from pipelines.core.config import ConfigError, JobConfig, Section, run_cli


class RecoverConfig(Section):
    """tasks.sre2l.recover_pairs; defaults: the official recover scripts (lr, r_bn, first-BN x10) and the
    brief's 28-px CPU settings (500 iterations, +-1 px jitter, no crop, no flip)."""
    iterations: int = Field(500, ge=1)
    lr: float = Field(0.25, gt=0)
    r_bn: float = Field(0.01, ge=0)
    first_bn_multiplier: float = Field(10.0, ge=0)
    jitter: int = Field(1, ge=0)
    classes_per_batch: int | None = Field(None, ge=2)  # None: every class in one batch (the official chunks)


class RelabelConfig(Section):
    epochs: int = Field(300, ge=1)  # stored views per image: one per student epoch (official: 300)
    seed: int = 42                  # official --fkd-seed
    scale: tuple[float, float] = (0.5, 1.0)  # random-resized-crop area at 28 px


class CondenseConfig(JobConfig):
    experiment: str = "condense"
    run_name: str | None = None
    teacher: str = "models:/squeezenet-fashion@current"  # a BatchNorm model the train job logged
    # recover: SRe2L's synthetic images; random_real: the fair baseline, real training images of the
    # teacher's dataset drawn per class by ``seed`` (tasks.sre2l.real_pairs), relabelled the same way
    source: Literal["recover", "random_real"] = "recover"
    ipc: int = Field(10, ge=1)  # images per class
    seed: int = 0
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    relabel: RelabelConfig = Field(default_factory=RelabelConfig)
    output: str = "runs/condensed"  # a folder; parts already there are kept (resume)
    actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    log_artifact: bool = True  # log the Parquet set to MLflow as condensed/

    SMOKE: ClassVar[dict[str, Any]] = {"ipc": 2, "recover.iterations": 5, "relabel.epochs": 2}


def settings(cfg: CondenseConfig) -> dict[str, Any]:
    """What determines every image: a part made under other settings must not be mixed in."""
    return {"teacher": cfg.teacher, "source": cfg.source, "seed": cfg.seed,
            "recover": cfg.recover.model_dump(mode="json"), "relabel": cfg.relabel.model_dump(mode="json")}


class Condenser:
    """A Ray Data actor holding the teacher: one recovery batch per call -> one Parquet part."""

    def __init__(self, files: dict[str, bytes], spec: dict[str, Any], cfg: dict[str, Any]):
        import torch

        from tasks.common.model_io import load_model

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            for name, blob in files.items():
                (Path(tmp) / name).write_bytes(blob)
            self.teacher, _ = load_model(tmp)
        # NHWC: recovery's forward + backward passes run ~1.8x faster on CPU (measured: 500 iterations
        # of a 10-image batch through the BN SqueezeNet, 31 s -> 17.7 s on one thread)
        self.teacher = self.teacher.eval().to(memory_format=torch.channels_last)
        self.spec, self.cfg = spec, CondenseConfig.model_validate(cfg)
        self.real = None
        if self.cfg.source == "random_real":  # the training split the train job would carve with this seed
            from tasks.common.datasets import load_dataset

            d = load_dataset(spec["input"]["dataset"], seed=self.cfg.seed)
            self.real = (d.train_x, d.train_y)

    def __call__(self, units):
        import pandas as pd

        from tasks import sre2l

        cfg, inp = self.cfg, self.spec["input"]
        out = []
        for ipc_index, block, classes in zip(units["ipc_index"], units["block"], units["classes"]):
            t0 = time.perf_counter()
            pairs = [(int(c), int(ipc_index)) for c in classes]
            r = cfg.recover
            if self.real is not None:
                rec = sre2l.real_pairs(self.teacher, *self.real, pairs, seed=cfg.seed, batch_size=r.classes_per_batch,
                                       first_bn_multiplier=r.first_bn_multiplier, mean=inp["mean"], std=inp["std"])
            else:
                rec = sre2l.recover_pairs(self.teacher, pairs, seed=cfg.seed, num_classes=len(inp["classes"]),
                                          batch_size=r.classes_per_batch, iterations=r.iterations, lr=r.lr,
                                          r_bn=r.r_bn, first_bn_multiplier=r.first_bn_multiplier, jitter=r.jitter,
                                          mean=inp["mean"], std=inp["std"], image_shape=tuple(inp["shape"]))
            ids = rec.ipc_index * len(inp["classes"]) + rec.labels  # a stable id per (class, IPC index)
            soft = sre2l.relabel(self.teacher, rec.images, epochs=cfg.relabel.epochs, seed=cfg.relabel.seed,
                                 scale=tuple(cfg.relabel.scale), mean=inp["mean"], std=inp["std"], image_ids=ids)
            seconds = time.perf_counter() - t0
            write_part(Path(cfg.output) / part_name(int(ipc_index), int(block)), rec, soft, ids, settings(cfg))
            out.append({"ipc_index": int(ipc_index), "block": int(block), "images": len(rec), "seconds": seconds,
                        "correct": int((rec.predicted == rec.labels).sum()),
                        "confidence": float(rec.confidence.sum()), "bn_loss": float(rec.bn_loss.mean()),
                        "bn_loss_start": float(rec.bn_loss_start.mean())})
        return pd.DataFrame(out)


def part_name(ipc_index: int, block: int) -> str:
    return f"part-ipc{ipc_index:04d}-block{block:03d}.parquet"


def write_part(path: Path, rec, soft, ids: np.ndarray, provenance: dict[str, Any]) -> None:
    """One recovery batch as Parquet rows, written to a temporary name and renamed (a crash never
    leaves a half part that a resume would take for done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.sre2l import to_uint8

    images = to_uint8(rec.images)
    n = len(images)
    table = pa.table({
        "image_id": ids.astype(np.int64), "image": [img.tobytes() for img in images],
        "shape": [list(images.shape[1:])] * n, "label": rec.labels.astype(np.int64),
        "ipc_index": rec.ipc_index.astype(np.int64), "block": rec.block.astype(np.int64),
        "teacher_ce": rec.ce, "teacher_confidence": rec.confidence, "teacher_predicted": rec.predicted,
        "bn_loss": rec.bn_loss, "bn_loss_start": rec.bn_loss_start, "ce_start": rec.ce_start,
        # soft labels per relabel epoch: the crop the teacher saw and its fp16 logits (FKD-style)
        "soft_boxes": [soft.boxes[:, k].astype(np.int16).tobytes() for k in range(n)],
        "soft_flips": [soft.flips[:, k].astype(np.uint8).tobytes() for k in range(n)],
        "soft_logits": [soft.logits[:, k].astype(np.float16).tobytes() for k in range(n)],
        "soft_shape": [list(soft.logits[:, 0].shape)] * n,  # (epochs, classes)
    })
    table = table.replace_schema_metadata({"squeezelab.provenance": json.dumps(provenance),
                                           "squeezelab.relabel": json.dumps({"seed": soft.seed, "scale": soft.scale,
                                                                             "ratio": soft.ratio, "flip": soft.flip})})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.rename(path)


def read_condensed(folder: str | Path, ipc: int | None = None):
    """(images uint8 (N, C, H, W), labels, SoftLabels, provenance) of a condensed set, rows by image id;
    ``ipc``: only the first ``ipc`` images per class (IPC indices below it). An image does not depend on
    how many others were made with it, so the IPC-k subset of a larger set is the IPC-k set itself."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tasks.sre2l import SoftLabels

    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no condensed parts in {folder}")
    table = pq.read_table(parts)
    if ipc is not None:
        have = pc.max(table.column("ipc_index")).as_py() + 1
        if ipc > have:
            raise ValueError(f"{folder} holds IPC {have}, fewer than the {ipc} images per class asked for")
        table = table.filter(pc.less(table.column("ipc_index"), ipc))
    order = np.argsort(table.column("image_id").to_numpy())
    shape = table.column("shape")[0].as_py()
    images = np.stack([np.frombuffer(b, np.uint8).reshape(shape) for b in table.column("image").to_pylist()])
    e, c = table.column("soft_shape")[0].as_py()
    boxes = np.stack([np.frombuffer(b, np.int16).reshape(e, 4) for b in table.column("soft_boxes").to_pylist()], 1)
    flips = np.stack([np.frombuffer(b, np.uint8).reshape(e) for b in table.column("soft_flips").to_pylist()], 1)
    logits = np.stack([np.frombuffer(b, np.float16).reshape(e, c) for b in table.column("soft_logits").to_pylist()], 1)
    meta = pq.read_schema(parts[0]).metadata
    view = json.loads(meta[b"squeezelab.relabel"])
    soft = SoftLabels(table.column("image_id").to_numpy(), boxes, flips.astype(bool), logits, int(view["seed"]),
                      None if view["scale"] is None else tuple(view["scale"]), tuple(view["ratio"]), bool(view["flip"]))
    return (images[order], table.column("label").to_numpy()[order], soft.take(order),
            json.loads(meta[b"squeezelab.provenance"]))


def _grid_plot(images: np.ndarray, labels: np.ndarray, classes: list[str], out: Path, title: str,
               per_class: int = 8) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    cols = min(per_class, max(int(np.bincount(labels, minlength=k).max()), 1))
    fig, axes = plt.subplots(k, cols, figsize=(cols * 0.9, k * 0.9), squeeze=False)
    for c in range(k):
        mine = np.flatnonzero(labels == c)[:cols]
        for j in range(cols):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(mine):
                ax.imshow(images[mine[j], 0], cmap="gray", vmin=0, vmax=255)
        axes[c, 0].set_title(classes[c], fontsize=6, loc="left")
    fig.suptitle(f"{title} (one row per class)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(cfg: CondenseConfig) -> str:
    import mlflow
    import ray

    from pipelines.core.ray_session import ensure_ray, require_cpus
    from tasks import sre2l
    from tasks.common.model_io import load_model

    tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    teacher_dir = tracking.download_configured_model(cfg.teacher, "teacher")
    teacher, spec = load_model(teacher_dir)
    import torch

    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules()):
        raise ConfigError(f"teacher: {cfg.teacher} ({spec['model']}) has no BatchNorm2d layer; SRe2L recovers from "
                          "BN statistics (train one with model.kwargs.batch_norm=true)")
    inp = spec.get("input", {})
    if "mean" not in inp or "classes" not in inp:
        raise ConfigError(f"teacher: {cfg.teacher} has no image input spec (mean/std/classes) in its model.json")
    units = sre2l.plan_batches(len(inp["classes"]), cfg.ipc, cfg.recover.classes_per_batch)
    out = Path(cfg.output)
    done = {p.name for p in out.glob("part-*.parquet")} if out.exists() else set()
    if done:
        import pyarrow.parquet as pq

        prov = json.loads(pq.read_schema(out / sorted(done)[0]).metadata[b"squeezelab.provenance"])
        if prov != settings(cfg):
            raise ConfigError(f"output: {out} holds a condensed set made with other settings; choose a new folder")
    todo = [u for u in units if part_name(u.ipc_index, u.block) not in done]

    ensure_ray()
    require_cpus(cfg.actors * cfg.cpus_per_actor, "actors")
    what = "" if cfg.source == "recover" else "-random_real"
    name = cfg.run_name or time.strftime(f"condense-{inp.get('dataset', 'data')}{what}-ipc{cfg.ipc}-%Y%m%d-%H%M%S")
    tags = {"teacher": cfg.teacher, "dataset": str(inp.get("dataset")), "ipc": str(cfg.ipc), "source": cfg.source,
            "data.synthetic": str(inp.get("synthetic", False))}
    with tracking.job_run(cfg, "condense", cfg.experiment, name, tags=tags) as run:
        n_img = sum(len(u.classes) for u in todo)
        print(f"[condense] {name}: {len(inp['classes'])} classes x IPC {cfg.ipc} from {cfg.teacher}: "
              f"{len(units)} recovery batches, {len(units) - len(todo)} already in {out}, {len(todo)} to do "
              f"({n_img} images) on {cfg.actors} actors; MLflow run {run.info.run_id}", flush=True)
        t0 = time.perf_counter()
        if todo:
            files = {f.name: f.read_bytes() for f in teacher_dir.iterdir() if f.is_file()}
            items = [{"ipc_index": u.ipc_index, "block": u.block, "classes": list(u.classes)} for u in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                Condenser, fn_constructor_kwargs={"files": files, "spec": spec, "cfg": cfg.model_dump(mode="json")},
                batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                num_cpus=cfg.cpus_per_actor)
            made = 0
            for part in ds.iter_batches(batch_size=None, batch_format="pandas"):
                made += int(part["images"].sum())
                elapsed = time.perf_counter() - t0
                print(f"[condense] {made}/{n_img} images ({made / elapsed:.2f} images/s)", flush=True)
        seconds = time.perf_counter() - t0
        images, labels, soft, _ = read_condensed(out)
        x = torch.from_numpy((images.astype(np.float32) / 255 - np.float32(inp["mean"])) / np.float32(inp["std"]))
        with torch.no_grad():
            prob = torch.softmax(teacher.eval()(x), 1).numpy()
        metrics = {"images": len(images), "images_made": n_img, "seconds": seconds,
                   "images_per_s": n_img / seconds if n_img else 0.0,
                   "teacher_acc": float((prob.argmax(1) == labels).mean()),
                   "teacher_confidence": float(prob[np.arange(len(labels)), labels].mean()),
                   "parquet_bytes": sum(p.stat().st_size for p in out.glob("part-*.parquet")),
                   "soft_label_epochs": soft.epochs}
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            title = "SRe2L recovered images" if cfg.source == "recover" else "random real images (baseline)"
            mlflow.log_artifact(str(_grid_plot(images, labels, list(inp["classes"]), Path(tmp) / "recovered.png", title)))
        if cfg.log_artifact:
            mlflow.log_artifacts(str(out), "condensed")
        print(f"[condense] {len(images)} images in {out} ({metrics['parquet_bytes']:,} bytes with "
              f"{soft.epochs} soft-label epochs); teacher accuracy on them {metrics['teacher_acc']:.3f}, "
              f"confidence {metrics['teacher_confidence']:.3f}; {metrics['images_per_s']:.2f} images/s", flush=True)
    print(f"[condense] done: MLflow run {run.info.run_id}", flush=True)
    return run.info.run_id


if __name__ == "__main__":
    run_cli(CondenseConfig, main)
