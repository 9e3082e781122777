"""Turn a trained model into a Deep-Compression artifact: prune -> retrain -> share weights -> retrain
centroids -> Huffman-coded file; log accuracy next to bytes for every stage.

    python -m pipelines.compress --config pipelines/configs/compress_squeezenet.yaml
    python -m pipelines.compress --config pipelines/configs/compress_squeezenet.yaml source=runs:/<run id> \\
        'bits={"*": 4}'
    python -m pipelines.compress --config pipelines/configs/compress_squeezenet.yaml --smoke   # what CI runs
    ray job submit --working-dir . --runtime-env-json \\
        '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/path/mlflow/mlflow.db"}}' \\
        -- python -m pipelines.compress --config pipelines/configs/compress_squeezenet.yaml

The source is any model a job logged (``runs:/<id>`` or ``models:/<name>@<alias>``); it is compressed
in this process on ``threads`` CPUs (tasks/deep_compression.py): per-layer magnitude pruning to the
``density`` of the first matching name pattern, ``prune_epochs`` of retraining with the pruned
weights held at zero, k-means weight sharing with ``bits`` per layer, ``share_epochs`` of centroid
retraining (the paper's gradient-sum rule), then the file: relative 4-bit indices with filler entries
and Huffman-coded code and index streams. The artifact (``model.sqdc`` + ``model.json``) is logged as the
run's model, so ``pipelines.serve`` serves it like any other (``register_as`` names it in the registry).

Logged per stage (``dense``, ``pruned``, ``shared``, ``file``): test accuracy and bytes. ``dense`` and
``file`` bytes are the artifacts' real sizes on disk; ``pruned`` (float32 values + 4-bit relative
indices) and ``shared`` (fixed-width codes + indices + codebooks, no Huffman) are computed from the
same masks and codes, the sizes those stages would take in the same container. The decoded file is
checked to predict exactly what the shared model predicts, and its 1-image latency is measured next
to the source's.
"""
from __future__ import annotations

import fnmatch
import math
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from pipelines.core import tracking
from pipelines.core.config import ConfigError, JobConfig, Section, run_cli


class CompressDataConfig(Section):
    name: str | None = None  # default: the dataset the source model was trained on (its model.json)
    val_fraction: float = Field(0.1, gt=0, lt=1)  # the split the train job used
    limit_train: int | None = Field(None, gt=0)   # retrain on the first N training images (smoke)
    limit_eval: int | None = Field(None, gt=0)    # ... and score on N test images


class CompressConfig(JobConfig):
    experiment: str = "compression"
    run_name: str | None = None
    source: str  # runs:/<run id> or models:/<name>@<alias> of a model logged by train / distill / fit
    seed: int = 0  # the data split (as the source's training), batch order
    data: CompressDataConfig = Field(default_factory=CompressDataConfig)
    # kept fraction per layer: {name pattern: density}, the first matching pattern wins (fnmatch on the
    # weight's parameter name, e.g. "*expand3x3*"); layers that match nothing stay dense
    density: dict[str, float] = Field(default_factory=lambda: {"*": 0.33})
    bits: dict[str, int] = Field(default_factory=lambda: {"*": 6})  # codebook of 2^bits per layer, same matching
    init: Literal["linear", "random", "density"] = "linear"  # k-means initialisation (the paper: linear)
    prune_epochs: int = Field(1, ge=0)   # retraining with the pruned weights held at zero
    prune_lr: float = Field(0.01, gt=0)
    share_epochs: int = Field(1, ge=0)   # retraining of the centroids (and biases, norms)
    share_lr: float = Field(0.001, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(128, ge=1)
    register_as: str | None = None  # register the artifact under this name, alias "current"
    threads: int = Field(2, ge=1)

    SMOKE: ClassVar[dict[str, Any]] = {"data.limit_train": 512, "data.limit_eval": 256, "register_as": None}

    @field_validator("density")
    @classmethod
    def _densities(cls, v: dict[str, float]) -> dict[str, float]:
        for pattern, d in v.items():
            if not 0 < d <= 1:
                raise ValueError(f"{pattern!r}: a kept fraction in (0, 1], got {d}")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: dict[str, int]) -> dict[str, int]:
        for pattern, b in v.items():
            if not 1 <= b <= 8:
                raise ValueError(f"{pattern!r}: 1 to 8 bits per code, got {b}")
        return v


def per_layer(patterns: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """{layer: value of the first pattern that matches it}; layers no pattern matches are left out."""
    out = {}
    for name in names:
        for pattern, value in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                out[name] = value
                break
    return out


def _finetune(model, data, epochs: int, lr: float, cfg: CompressConfig, masks=None) -> None:
    """SGD with momentum over the trainable parameters; pruned weights held at exactly zero."""
    import torch
    import torch.nn.functional as F

    from tasks.deep_compression import enforce, mask_gradients

    params = [p for p in model.parameters() if p.requires_grad]
    if not epochs or not params:
        return
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)
    hooks = mask_gradients(model, masks) if masks else []
    n = len(data.train_x)
    batch = min(cfg.batch_size, n)
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(np.random.default_rng([cfg.seed, epoch]).permutation(n))
        t0, total = time.perf_counter(), 0.0
        for step in range(n // batch):
            idx = perm[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if masks:
                enforce(model, masks)  # momentum would otherwise revive pruned weights
            total += loss.item()
        print(f"[compress]   epoch {epoch + 1}/{epochs}: train loss {total / max(1, n // batch):.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for h in hooks:
        h.remove()
    model.eval()


def _accuracy(model, x, y, batch: int = 512) -> tuple[float, Any]:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean()), pred


def _latency_ms(model, x, repeats: int = 100) -> float:
    """Median wall time of a 1-image forward on the current threads."""
    import torch

    model.eval()
    one = x[:1]
    with torch.no_grad():
        for _ in range(10):
            model(one)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(one)
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def stage_bytes(masks: dict[str, Any], bits: dict[str, int], rest_bytes: int, gap_bits: int = 4) -> tuple[int, int]:
    """(pruned, shared) sizes in the same container without Huffman: every stored entry (fillers
    included) as a float32 value (pruned) or a ``bits``-wide code plus a 2^bits float32 codebook
    (shared), each with its ``gap_bits`` relative index; ``rest_bytes`` for everything else."""
    from tasks.deep_compression import relative_indices

    pruned = shared = 0.0
    for name, mask in masks.items():
        gaps, _ = relative_indices(mask.reshape(-1).cpu().numpy(), gap_bits)
        entries = len(gaps)
        pruned += entries * (32 + gap_bits) / 8
        shared += entries * (bits[name] + gap_bits) / 8 + 4 * 2 ** bits[name]
    return math.ceil(pruned) + rest_bytes, math.ceil(shared) + rest_bytes


def frontier_plot(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    xs, ys = [r["bytes"] / 1e3 for r in rows], [r["acc"] for r in rows]
    ax.plot(xs, ys, "-o", color="C0")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"{r['stage']}\n{r['bytes']:,} B", (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("kB on disk (dense and file: real; pruned and shared: computed)", fontsize=8)
    ax.set_ylabel("test accuracy", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(cfg: CompressConfig, parent_run_id: str | None = None, report=None) -> str:
    import mlflow
    import torch

    from pipelines.fit import FitData, FitDataConfig
    from tasks import deep_compression as dc
    from tasks.common.model_io import artifact_bytes, load_model

    tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    source_dir = tracking.download_configured_model(cfg.source, "source")
    model, spec = load_model(source_dir)
    if spec.get("format") == "deep_compression":
        raise ConfigError(f"source: {cfg.source} is already a Deep-Compression artifact")
    dataset = cfg.data.name or spec.get("input", {}).get("dataset")
    if not dataset:
        raise ConfigError("data.name: the source's model.json names no dataset; set data.name")
    data = FitData.load(FitDataConfig(name=dataset, val_fraction=cfg.data.val_fraction,
                                      limit_train=cfg.data.limit_train, limit_eval=cfg.data.limit_eval), cfg.seed)
    layers = list(dc.prunable(model))
    density = per_layer(cfg.density, layers)
    if not density:
        raise ConfigError(f"density: no pattern matches a layer of {spec['model']} ({', '.join(layers[:4])}, ...)")
    bits = per_layer(cfg.bits, list(density))
    missing = sorted(set(density) - set(bits))
    if missing:
        raise ConfigError(f"bits: no pattern matches the pruned layer {missing[0]!r}")

    name = cfg.run_name or time.strftime(f"compress-{spec['model']}-%Y%m%d-%H%M%S")
    tags = {"model": spec["model"], "dataset": dataset, "source": cfg.source,
            "data.synthetic": str(data.synthetic)}
    with tracking.job_run(cfg, "compress", cfg.experiment, name, parent_run_id=parent_run_id, tags=tags) as run:
        print(f"[compress] {name}: {spec['model']} from {cfg.source} on {dataset} "
              f"({len(data.train_x)} train / {len(data.test_x)} test), MLflow run {run.info.run_id}", flush=True)
        rows: list[dict[str, Any]] = []

        def stage(label: str, acc: float, size: int, **extra) -> None:
            rows.append({"stage": label, "acc": acc, "bytes": size, **extra})
            mlflow.log_metrics({f"{label}/acc": acc, f"{label}/bytes": size, **{f"{label}/{k}": v for k, v in extra.items()}},
                               step=len(rows))
            print(f"[compress] {label:>7}: test acc {acc:.4f}  {size:>10,} bytes", flush=True)

        dense_acc, _ = _accuracy(model, data.test_x, data.test_y)
        stage("dense", dense_acc, artifact_bytes(source_dir))
        source_latency = _latency_ms(model, data.test_x)

        masks = dc.magnitude_masks(model, density)
        dc.apply_masks(model, masks)
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        print(f"[compress] pruned to {kept:.1%} of the {len(masks)} pruned layers' weights; retraining", flush=True)
        _finetune(model, data, cfg.prune_epochs, cfg.prune_lr, cfg, masks)
        pruned_acc, _ = _accuracy(model, data.test_x, data.test_y)

        dc.share_weights(model, masks, bits, init=cfg.init, generator=torch.Generator().manual_seed(cfg.seed))
        print("[compress] weights shared; retraining the centroids", flush=True)
        _finetune(model, data, cfg.share_epochs, cfg.share_lr, cfg)
        shared_acc, shared_pred = _accuracy(model, data.test_x, data.test_y)

        with tempfile.TemporaryDirectory() as tmp:
            meta = {k: v for k, v in spec.items() if k not in ("model", "kwargs", "format")}
            out = dc.save_compressed(model, masks, Path(tmp) / "model", spec["model"], spec["kwargs"],
                                     **{**meta, "test_acc": shared_acc, "source": cfg.source})
            blob = (out / dc.COMPRESSED).read_bytes()
            parts = dc.size_breakdown(blob)
            pruned_size, shared_size = stage_bytes(masks, bits, parts["rest"] + parts["header"])
            stage("pruned", pruned_acc, pruned_size, density=kept)
            stage("shared", shared_acc, shared_size)
            decoded, _ = load_model(out)
            file_acc, file_pred = _accuracy(decoded, data.test_x, data.test_y)
            if not torch.equal(file_pred, shared_pred):
                raise RuntimeError("the decoded artifact predicts differently from the model it encodes")
            size = artifact_bytes(out)
            stage("file", file_acc, size, **{f"bytes_{k}": v for k, v in parts.items()})
            latency = _latency_ms(decoded, data.test_x)
            summary = {"compression/ratio": rows[0]["bytes"] / size, "compression/acc_change": file_acc - dense_acc,
                       "compression/density": kept, "latency/source_ms": source_latency, "latency/file_ms": latency}
            mlflow.log_metrics(summary)
            mlflow.log_artifacts(str(out), tracking.MODEL_DIR)
            title = f"{spec['model']} on {dataset}: Deep Compression stages"
            mlflow.log_artifact(str(frontier_plot(rows, Path(tmp) / "frontier.png", title)))
            table = ["| stage | test acc | bytes | vs dense |", "|---|---|---|---|"] + [
                f"| {r['stage']} | {r['acc']:.4f} | {r['bytes']:,} | {rows[0]['bytes'] / r['bytes']:.1f}x |" for r in rows]
            mlflow.log_text("\n".join(table) + "\n", "stages.md")
        print("\n".join(table), flush=True)
        print(f"[compress] {summary['compression/ratio']:.1f}x smaller, accuracy {summary['compression/acc_change']:+.4f}; "
              f"1-image latency {latency:.2f} ms (source {source_latency:.2f} ms)", flush=True)
        if report:
            report({**{f"{r['stage']}/acc": r["acc"] for r in rows}, **summary})
    return tracking.finish("compress", run.info.run_id, cfg.register_as)


if __name__ == "__main__":
    run_cli(CompressConfig, main)
