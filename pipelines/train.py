"""Train an image classifier on Ray Train workers with DeepSpeed, tracked in MLflow.

    python -m pipelines.train --config pipelines/configs/squeezenet_fashion.yaml
    python -m pipelines.train --config pipelines/configs/squeezenet_fashion.yaml --smoke   # what CI runs
    python -m pipelines.train --config ... scaling.zero_stage=3 train.epochs=2           # overrides
    ray job submit --working-dir . --runtime-env-json \
        '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/path/mlflow/mlflow.db"}}' \
        -- python -m pipelines.train --config pipelines/configs/squeezenet_fashion.yaml

Each of ``scaling.num_workers`` workers builds the model from the registry, wraps it with
``deepspeed.initialize`` (ZeRO stage 0-3, gloo on CPU), trains on its shard of every epoch's
permutation, validates its shard of the validation set, and reports a DeepSpeed checkpoint from every
rank after every epoch. Re-running with the same ``run_name`` resumes from the last checkpoint (and
reopens the same MLflow run); ``scaling.max_failures`` restarts a failed worker group from it.
Rank 0 logs metrics per epoch and, at the end, the consolidated model (safetensors + model.json).
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.core import tracking
from pipelines.core.config import JobConfig, Section, require_registered, run_cli


class DataConfig(Section):
    name: str = "fashion_mnist"  # a tasks.common.datasets registry name
    val_fraction: float = Field(0.1, gt=0, lt=1)  # carved from the training split, stratified
    limit_train: int | None = Field(None, gt=0)  # use only the first N training images (smoke runs)
    limit_eval: int | None = Field(None, gt=0)  # ... and N validation / test images


class ModelConfig(Section):
    name: str = "squeezenet1_1"  # a tasks registry name
    # constructor kwargs; num_classes and in_channels come from the dataset
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"stem": "small"})


class OptimConfig(Section):
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=1)  # global: split evenly over the workers
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)  # peak LR of the one-cycle schedule
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD (Nesterov); ignored by AdamW
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = Field(0.15, ge=0, lt=1)  # of all steps, linear warm-up
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    stop_after_epochs: int | None = Field(None, ge=1)  # end the job early (a deliberate interruption)


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)  # Ray Train workers, one DeepSpeed rank each
    threads_per_worker: int = Field(1, ge=1)  # torch threads = CPUs reserved per worker
    zero_stage: int = Field(2, ge=0, le=3)  # DeepSpeed ZeRO stage
    max_failures: int = Field(1, ge=-1)  # worker-group restarts from the last checkpoint (-1: forever)
    storage_path: str | None = None  # Ray Train storage (checkpoints); shared storage on multi-node
    keep_checkpoints: int = Field(2, ge=1)
    # fault drill: the last rank raises once right after this epoch's checkpoint, so that
    # FailureConfig restarts the worker group from it (tests and cluster checks use it)
    inject_failure_after_epoch: int | None = Field(None, ge=1)
    # NHWC activations and weights: CPU convs, BN and max-pools run ~1.6x faster. Only with ZeRO-0:
    # ZeRO 1-3 keep parameters as views of flat NCHW buffers.
    channels_last: bool = False


class TrainConfig(JobConfig):
    experiment: str = "squeezelab"  # MLflow experiment
    run_name: str | None = None  # Ray Train run name; re-run with the same name to resume
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    register_as: str | None = None  # register the final model under this name (alias "current")

    SMOKE: ClassVar[dict[str, Any]] = {
        "data.limit_train": 512, "data.limit_eval": 256, "train.epochs": 2, "train.batch_size": 64,
        "register_as": None,  # a smoke model must never take over the registry alias
    }

    @model_validator(mode="after")
    def _global_batch_splits(self) -> "TrainConfig":
        if self.train.batch_size % self.scaling.num_workers:
            raise ValueError(f"train.batch_size={self.train.batch_size} must be a multiple of "
                             f"scaling.num_workers={self.scaling.num_workers}")
        if self.train.stop_after_epochs and self.train.stop_after_epochs >= self.train.epochs:
            raise ValueError("train.stop_after_epochs must be smaller than train.epochs")
        if self.scaling.channels_last and self.scaling.zero_stage != 0:
            raise ValueError("scaling.channels_last needs scaling.zero_stage=0 (ZeRO 1-3 partition flat "
                             "NCHW buffers that NHWC parameters would no longer alias)")
        for key in ("num_classes", "in_channels"):
            if key in self.model.kwargs:
                raise ValueError(f"model.kwargs.{key} comes from the dataset; remove it")
        return self


# ---------------------------------------------------------------------------------------------
# worker side


def _ds_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.batch_size // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.scaling.zero_stage},
        # our own torch optimizer: DeepSpeed's ZeRO wrappers partition its state like Adam's
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def _lr_lambda(cfg: OptimConfig, total_steps: int):
    warm = max(1, int(cfg.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warm and cfg.schedule == "onecycle":
            return (step + 1) / warm
        start = warm if cfg.schedule == "onecycle" else 0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _optimizer(cfg: OptimConfig, model):
    import torch

    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_checkpoint(engine, epoch: int, metrics: dict[str, float]) -> None:
    """Every rank writes its DeepSpeed shard and reports (a barrier); Ray merges them per epoch."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ds", client_state={"epoch": epoch})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch={epoch + 1:04d}")


def _load_checkpoint(engine) -> int:
    """Restore the latest reported checkpoint, if any; returns the first epoch still to run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag="ds")
    return client["epoch"] + 1


def _all_sum(*values: float) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _average_buffers(module, world: int) -> None:
    """BatchNorm statistics differ per shard: average them so every rank holds the same model."""
    import torch.distributed as dist

    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker = one DeepSpeed rank."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from tasks.common.batches import EvalShard, epoch_shard, normalise
    from tasks.common.datasets import load_dataset
    from tasks.common.registry import get_model
    from tasks.common.seeding import hash_seed, seed_everything

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    log = tracking.RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None

    data = load_dataset(cfg.data.name, seed=cfg.seed, val_fraction=cfg.data.val_fraction)
    train_x, train_y = data.train_x[: cfg.data.limit_train], data.train_y[: cfg.data.limit_train]
    val_x, val_y = data.val_x[: cfg.data.limit_eval], data.val_y[: cfg.data.limit_eval]
    kwargs = {**cfg.model.kwargs, "num_classes": data.num_classes, "in_channels": data.input_shape[0]}
    fmt = torch.channels_last if cfg.scaling.channels_last else torch.contiguous_format
    as_input = lambda x: normalise(x, data.mean, data.std).contiguous(memory_format=fmt)  # noqa: E731

    micro = cfg.train.batch_size // world
    steps = len(train_x) // cfg.train.batch_size
    if steps == 0:
        raise ValueError(f"{len(train_x)} training images make no full batch of {cfg.train.batch_size}")
    model = get_model(cfg.model.name, **kwargs)
    opt = _optimizer(cfg.train, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.train, cfg.train.epochs * steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=_ds_config(cfg, world))
    # after initialize: DeepSpeed's CPU broadcast of the initial weights needs NCHW tensors. Under
    # ZeRO-0 the optimizer holds the Parameter objects themselves, so re-laying their data is safe.
    engine.module.to(memory_format=fmt)

    start_epoch = _load_checkpoint(engine)
    if start_epoch and log:
        print(f"[train] resumed from epoch {start_epoch} checkpoint (global step {engine.global_steps})",
              flush=True)

    val_shard = EvalShard(len(val_x), rank, world, micro)
    for epoch in range(start_epoch, cfg.train.epochs):
        # per-epoch seeds (dropout): a resumed run replays exactly what an uninterrupted one does
        torch.manual_seed(hash_seed(cfg.seed, epoch, rank))
        engine.train()
        idx = epoch_shard(len(train_x), epoch, cfg.seed, rank, world, micro, steps)
        loss_sum = correct = 0.0
        t0 = time.perf_counter()
        for step in range(steps):
            b = idx[step * micro:(step + 1) * micro]
            x, y = as_input(train_x[b]), torch.from_numpy(train_y[b])
            logits = engine(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item() * len(b)
            correct += (logits.argmax(1) == y).sum().item()
        seconds = time.perf_counter() - t0
        _average_buffers(engine.module, world)

        engine.eval()
        v_loss = v_correct = 0.0
        with torch.no_grad():
            for b, weight in val_shard.batches():  # the same number of forwards on every rank (ZeRO-3)
                logits, y, w = engine(as_input(val_x[b])), torch.from_numpy(val_y[b]), torch.from_numpy(weight)
                v_loss += (F.cross_entropy(logits, y, reduction="none") * w).sum().item()
                v_correct += ((logits.argmax(1) == y).float() * w).sum().item()
        n_train = steps * cfg.train.batch_size
        tl, tc, vl, vc, total_s = _all_sum(loss_sum, correct, v_loss, v_correct, seconds)
        metrics = {"epoch": epoch + 1, "train/loss": tl / n_train, "train/acc": tc / n_train,
                   "val/loss": vl / len(val_x), "val/acc": vc / len(val_x),
                   "train/samples_per_s": n_train / (total_s / world),  # over the mean worker epoch time
                   "lr": engine.get_lr()[0], "global_step": engine.global_steps}
        if log:
            log.metrics(metrics, step=epoch + 1)
            print(f"[train] epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train/loss']:.4f}  "
                  f"acc {metrics['train/acc']:.4f}  val_loss {metrics['val/loss']:.4f}  "
                  f"val_acc {metrics['val/acc']:.4f}  {metrics['train/samples_per_s']:.0f} samples/s",
                  flush=True)
        _save_checkpoint(engine, epoch, metrics)
        if cfg.scaling.inject_failure_after_epoch == epoch + 1 and rank == world - 1:
            marker = Path(config["state_dir"]) / f"failure_injected_after_epoch_{epoch + 1}"
            if not marker.exists():  # once: the restarted group must get past this point
                marker.touch()
                raise RuntimeError(f"injected failure after epoch {epoch + 1} "
                                   "(scaling.inject_failure_after_epoch)")
        if cfg.train.stop_after_epochs and epoch + 1 >= cfg.train.stop_after_epochs:
            if log:
                print(f"[train] stopping after epoch {epoch + 1} as configured; re-run with "
                      f"run_name={config['run_name']} to resume", flush=True)
            return

    # consolidate: under ZeRO-3 each rank holds a slice of every parameter
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    from tasks.common.model_io import state_digest

    digests = [None] * world  # every rank must end with the same model: check, don't assume
    dist.all_gather_object(digests, state_digest(state))
    if log:
        _publish(cfg, data, kwargs, state, digests, log)


def _publish(cfg: TrainConfig, data, kwargs: dict[str, Any], state, digests: list[str], log) -> None:
    """Rank 0: rebuild the plain model, score the test split, log it as safetensors + model.json."""
    from tasks.common.batches import predict_labels
    from tasks.common.model_io import artifact_bytes, save_model
    from tasks.common.registry import get_model

    log.text(json.dumps({f"rank{r}": d for r, d in enumerate(digests)}, indent=2), "rank_digests.json")
    final = get_model(cfg.model.name, **kwargs)
    final.load_state_dict(state)
    final.eval()
    test_x, test_y = data.test_x[: cfg.data.limit_eval], data.test_y[: cfg.data.limit_eval]
    test_acc = float((predict_labels(final, test_x, data.mean, data.std) == test_y).mean())
    with tempfile.TemporaryDirectory() as tmp:
        out = save_model(final, Path(tmp) / "model", cfg.model.name, kwargs, input={
            "shape": list(data.input_shape), "pixel_max": 255, "mean": data.mean, "std": data.std,
            "classes": list(data.classes), "dataset": cfg.data.name, "synthetic": data.synthetic,
        }, test_acc=test_acc)
        size = artifact_bytes(out)
        log.model(out)
    log.metrics({"test/acc": test_acc, "model/bytes": size, "ranks/identical": float(len(set(digests)) == 1),
                 "model/parameters": sum(p.numel() for p in final.parameters())}, step=cfg.train.epochs)
    print(f"[train] test accuracy {test_acc:.4f} on {len(test_y)} images; model {size:,} bytes", flush=True)


# ---------------------------------------------------------------------------------------------
# driver side


def _state_file(storage: str, name: str) -> Path:
    return Path(storage).expanduser() / name / "squeezelab_run.json"


def main(cfg: TrainConfig) -> str:
    """Build the TorchTrainer, fit, and return the MLflow run id."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.core.ray_session import ensure_ray, require_cpus

    uri = tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    require_registered("model", cfg.model.name, "model.name")
    require_registered("dataset", cfg.data.name, "data.name")
    ensure_ray(uri)
    require_cpus(cfg.scaling.num_workers * cfg.scaling.threads_per_worker, "scaling.num_workers")

    name = cfg.run_name or time.strftime("train-%Y%m%d-%H%M%S")
    storage = cfg.scaling.storage_path or str(Path.home() / "ray_results")
    state = _state_file(storage, name)
    resume_id = json.loads(state.read_text())["mlflow_run_id"] if state.exists() else None
    with tracking.job_run(cfg, "train", cfg.experiment, name, resume_run_id=resume_id,
                          tags={"zero_stage": str(cfg.scaling.zero_stage), "dataset": cfg.data.name,
                                "model": cfg.model.name}) as run:
        run_id = run.info.run_id
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"mlflow_run_id": run_id}))
        print(f"[train] run {name}  MLflow run {run_id}  ({cfg.scaling.num_workers} workers, "
              f"ZeRO-{cfg.scaling.zero_stage})", flush=True)
        threads = cfg.scaling.threads_per_worker
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "tracking_uri": uri,
                               "run_id": run_id, "run_name": name, "state_dir": str(state.parent)},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers,
                                                   resources_per_worker={"CPU": threads}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.scaling.keep_checkpoints),
                # Train's print patch echoes every worker print twice in the driver's output
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads),
                                                 "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            ),
        )
        result = trainer.fit()
        if result.checkpoint:
            import mlflow

            mlflow.set_tag("checkpoint", result.checkpoint.path)
        if cfg.register_as:
            tracking.register(run_id, cfg.register_as, alias="current")
    print(f"[train] done: MLflow run {run_id}", flush=True)
    return run_id


if __name__ == "__main__":
    run_cli(TrainConfig, main)
