"""Distil a teacher into a student on Ray Train workers with DeepSpeed, tracked in MLflow.

    python -m pipelines.distill --config pipelines/configs/distill_fashion.yaml \\
        teacher.model_uri=models:/squeezenet-fashion@current
    python -m pipelines.distill --config pipelines/configs/distill_fashion.yaml --smoke     # what CI runs
    python -m pipelines.distill --config ... train.optimizer=dot train.nesterov=false     # KD + DOT
    ray job submit --working-dir . --runtime-env-json \\
        '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/path/mlflow/mlflow.db"}}' \\
        -- python -m pipelines.distill --config pipelines/configs/distill_fashion.yaml

The teacher is a model logged by the train job (``runs:/<run id>`` or ``models:/<name>@<alias>``).
Every worker loads it, the ranks split the teacher's forward pass over the training images once
(no augmentation, so its logits are fixed) and share the logits, then each rank trains the student
with DeepSpeed on its shard of every epoch. The loss is a weighted ensemble of named terms
(``losses``: cross-entropy, Hinton KD, MiniMoE's load balance, ...) whose parts are all logged.
What is distilled is config:

- KD: any registry student, ``losses`` = task + ``kd`` terms, ``train.optimizer=sgd``;
- DOT: the same with ``train.optimizer=dot`` (tasks/dot.py: two momentum buffers, partitioned by ZeRO);
- MiniMoE: ``student.name=minimoe_mlp`` plus a ``load_balance`` term (``num_experts=1`` = dense student);
- Weight Squeezing: ``student.init=weight_squeezing`` (an MLP teacher; the student's weights are
  learned maps of the teacher's), or ``gated_weight_squeezing``; the student is materialised as a
  plain ``mlp`` before it is logged.

Rank 0 logs per-epoch metrics (``train/loss/<term>`` for every term), the teacher's and the student's
test accuracy, size on disk and parameter counts, and the student model (safetensors + model.json),
ready for ``pipelines.serve``. Re-running with the same ``run_name`` resumes from the last checkpoint.
"""
from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.core import tracking
from pipelines.core.config import ConfigError, Section, require_registered, run_cli
from pipelines.core.training import (DeepSpeedJobConfig, ModelConfig, OptimConfig, WorkerData,
                                     build_optimizer, check_sections, ds_config, gather_state, log_model,
                                     loss_ensemble, run_epochs, run_job, test_accuracy)


class TeacherConfig(Section):
    # a model logged by pipelines.train: runs:/<run id> or models:/<registered name>@<alias>
    model_uri: str = "models:/squeezenet-fashion@current"


class StudentConfig(ModelConfig):
    name: str = "squeezenet1_1"
    kwargs: dict[str, Any] = Field(default_factory=lambda: {
        "stem": "small", "batch_norm": True, "init": "kaiming", "base_e": 32, "incr_e": 32})
    # scratch: a freshly initialised registry model; weight_squeezing: W_s = L W_t R from an MLP
    # teacher (tasks/weight_squeezing.py); gated_weight_squeezing: g * W_own + (1 - g) * L W_t R
    init: Literal["scratch", "weight_squeezing", "gated_weight_squeezing"] = "scratch"
    # options of tasks.weight_squeezing.squeeze_mlp, e.g. {init: select | orthogonal, tie_maps: true}
    squeeze: dict[str, Any] = Field(default_factory=dict)


class DistillOptimConfig(OptimConfig):
    lr: float = Field(0.05, gt=0)  # mdistiller's CIFAR KD / DOT setting: SGD 0.05, momentum 0.9, no Nesterov
    nesterov: bool = False


def _default_losses() -> dict[str, dict[str, Any]]:
    # mdistiller's CIFAR KD setting, which DOT is published with: CE 0.1 + KD 0.9 at T = 4
    return {"ce": {"name": "cross_entropy", "weight": 0.1},
            "kd": {"name": "kd", "weight": 0.9, "temperature": 4.0, "group": "distill"}}


class DistillConfig(DeepSpeedJobConfig):
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    # term -> {name: <loss registry name, default the term>, weight, group: task | distill, <options>}
    losses: dict[str, dict[str, Any]] = Field(default_factory=_default_losses)
    train: DistillOptimConfig = Field(default_factory=DistillOptimConfig)

    SMOKE: ClassVar[dict[str, Any]] = {
        "data.limit_train": 512, "data.limit_eval": 256, "train.epochs": 2, "train.batch_size": 64,
        "register_as": None,  # a smoke model must never take over the registry alias
    }

    @model_validator(mode="after")
    def _consistent(self) -> "DistillConfig":
        check_sections(self.train, self.scaling, self.student.kwargs, model_key="student")
        ensemble = loss_ensemble(self.losses)
        if self.train.optimizer == "dot" and ensemble.groups() != {"task", "distill"}:
            raise ValueError("train.optimizer: dot needs both a task and a distill loss term "
                             f"(losses has groups {sorted(ensemble.groups())})")
        if self.student.init != "scratch" and self.student.name != "mlp":
            raise ValueError(f"student.name: {self.student.init} builds an mlp student from an mlp teacher, "
                             f"got {self.student.name!r}")
        if self.train.label_smoothing:
            raise ValueError("train.label_smoothing: set it on the loss term instead "
                             "(losses.<term>.label_smoothing of a cross_entropy term)")
        if self.student.squeeze and self.student.init == "scratch":
            raise ValueError("student.squeeze: options of weight squeezing, but student.init is scratch")
        return self


# ---------------------------------------------------------------------------------------------
# worker side


def _teacher_logits(teacher, data: WorkerData, rank: int, world: int, batch: int = 512):
    """Logits of the frozen teacher for every training image: each rank computes a strided share."""
    import torch
    import torch.distributed as dist

    n = len(data.train_x)
    mine = torch.arange(rank, n, world)
    with torch.no_grad():
        parts = [teacher(data.as_input(data.train_x[mine[i:i + batch].numpy()]))
                 for i in range(0, len(mine), batch)]
    own = torch.cat(parts) if parts else torch.zeros(0, data.splits.num_classes)
    # all_gather needs equal shapes: pad every share to the longest
    longest = -(-n // world)
    padded = torch.zeros(longest, own.shape[1])
    padded[: len(own)] = own
    shares = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shares, padded)
    logits = torch.empty(n, own.shape[1])
    for r, share in enumerate(shares):
        idx = torch.arange(r, n, world)
        logits[idx] = share[: len(idx)]
    return logits


def build_student(cfg: DistillConfig, teacher, data: WorkerData):
    """(trainable student module, registry name and kwargs of the plain model it publishes as)."""
    from tasks.common.registry import get_model

    kwargs = data.model_kwargs(cfg.student.name, cfg.student.kwargs)
    if cfg.student.init == "scratch":
        return get_model(cfg.student.name, **kwargs), cfg.student.name, kwargs
    from tasks.mlp import MLP
    from tasks.weight_squeezing import mlp_kwargs, squeeze_mlp

    if not isinstance(teacher, MLP):
        raise ValueError(f"student.init={cfg.student.init} needs an mlp teacher, got {type(teacher).__name__}")
    gated = cfg.student.init == "gated_weight_squeezing"
    own = get_model("mlp", **kwargs) if gated else None  # the student's own (fresh) weights
    squeezed = squeeze_mlp(teacher, kwargs.get("hidden", (64, 64)), gated=gated, student_init=own,
                           **cfg.student.squeeze)
    return squeezed, "mlp", mlp_kwargs(squeezed)


def _plain_student(cfg: DistillConfig, teacher, data: WorkerData, state):
    """(trained student as the registry model it is published as, materialised if squeezed; name; kwargs)."""
    module, name, kwargs = build_student(cfg, teacher, data)
    module.load_state_dict(state)
    if cfg.student.init == "scratch":
        return module, name, kwargs
    from tasks.weight_squeezing import materialise

    return materialise(module.eval()), name, kwargs


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker = one DeepSpeed rank."""
    import deepspeed
    import ray.train
    import torch

    from tasks.common.losses import LossEnsemble
    from tasks.common.model_io import load_model
    from tasks.common.seeding import seed_everything
    from tasks.dot import two_phase_step

    cfg = DistillConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    log = tracking.RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None

    teacher_dir = tracking.download_model(cfg.teacher.model_uri)
    teacher, _ = load_model(teacher_dir)
    data = WorkerData.load(cfg.data, cfg.seed, cfg.scaling.channels_last)
    steps = data.steps_per_epoch(cfg.train.batch_size)
    t0 = time.perf_counter()
    teacher_logits = _teacher_logits(teacher, data, rank, world)
    if log:
        print(f"[distill] teacher logits for {len(teacher_logits)} training examples in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)

    seed_everything(cfg.seed)  # identical initial student weights on every rank
    student, _, _ = build_student(cfg, teacher, data)
    losses = LossEnsemble.from_config(cfg.losses)
    opt, sched = build_optimizer(cfg.train, student.parameters(), cfg.train.epochs * steps)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=opt, lr_scheduler=sched,
                                           config=ds_config(cfg.train.batch_size, world, cfg.scaling.zero_stage,
                                                            cfg.train.grad_clip))
    if cfg.scaling.channels_last:  # after initialize, as in pipelines.train (ZeRO-0 only)
        engine.module.to(memory_format=torch.channels_last)
    aux = getattr(engine.module, "aux_outputs", None)  # e.g. MiniMoE's load balance

    needs = losses.needs()

    def train_step(b, x, y):
        outputs = {"target": y, "teacher_logits": teacher_logits[b]}
        if "student_qkv" in needs:  # MiniLMv2 relation distillation: last-layer Q, K, V of both models
            outputs["logits"], outputs["student_qkv"] = engine(x, return_qkv=True)
            with torch.no_grad():
                outputs["teacher_qkv"] = teacher(x, return_qkv=True)[1]
            outputs["attention_mask"] = (x != 0).long()  # id 0 is [PAD]
        else:
            outputs["logits"] = engine(x)
        outputs.update(aux() if aux else {})
        parts = losses(outputs)
        if cfg.train.optimizer == "dot":  # the distillation gradient first, then the task gradient
            two_phase_step(opt, engine.backward, engine.step, losses.total(parts, "distill"),
                           losses.total(parts, "task"))
        else:
            engine.backward(parts["loss"])
            engine.step()
        return outputs["logits"].detach(), {"loss" if k == "loss" else k.removeprefix("loss/"): v.item()
                                            for k, v in parts.items()}

    if not run_epochs(engine, cfg=cfg, data=data, train_step=train_step, log=log, job="distill",
                      loop_config=config):
        return
    state, digests = gather_state(engine)
    if log:
        _publish(cfg, data, teacher, teacher_dir, state, digests, log)


def _publish(cfg: DistillConfig, data: WorkerData, teacher, teacher_dir, state, digests: list[str], log) -> None:
    """Rank 0: score teacher and student on the test split; log the student as a plain registry model."""
    from tasks.common.model_io import artifact_bytes, read_spec
    from tasks.minimoe import active_parameters, utilisation_entropy

    log.text(json.dumps({f"rank{r}": d for r, d in enumerate(digests)}, indent=2), "rank_digests.json")
    student, name, kwargs = _plain_student(cfg, teacher, data, state)
    student_acc, teacher_acc = test_accuracy(student, data), test_accuracy(teacher, data)
    size = log_model(log, student, name, kwargs, data, cfg.data.name, test_acc=student_acc,
                     distilled_from=cfg.teacher.model_uri, teacher_spec=read_spec(teacher_dir))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    metrics = {"test/acc": student_acc, "teacher/test_acc": teacher_acc, "test/acc_gap": teacher_acc - student_acc,
               "model/bytes": size, "teacher/bytes": artifact_bytes(teacher_dir),
               "model/parameters": count(student), "model/active_parameters": active_parameters(student),
               "teacher/parameters": count(teacher), "ranks/identical": float(len(set(digests)) == 1)}
    if hasattr(student, "expert_utilisation"):
        import torch

        with torch.no_grad():
            student(data.as_input(data.test_x))  # one pass over the whole test set: its routing
        metrics["experts/utilisation_entropy"] = utilisation_entropy(student.expert_utilisation())
    log.metrics(metrics, step=cfg.train.epochs)
    print(f"[distill] student test accuracy {student_acc:.4f} ({size:,} bytes, {metrics['model/parameters']:,} "
          f"parameters) vs teacher {teacher_acc:.4f} ({metrics['teacher/bytes']:,} bytes, "
          f"{metrics['teacher/parameters']:,} parameters) on {len(data.test_y)} images", flush=True)


# ---------------------------------------------------------------------------------------------
# driver side


def _check_teacher(cfg: DistillConfig) -> tuple[str, dict[str, Any]]:
    """Resolve the teacher before any worker starts; a wrong URI or dataset is a config error.
    Returns the URI pinned to a version (an alias may move while a sweep runs) and model.json."""
    from tasks.common.model_io import read_spec

    try:
        pinned = tracking.pin_model_uri(cfg.teacher.model_uri)
        spec = read_spec(tracking.download_model(pinned))
    except Exception as exc:  # MLflow raises several types for a missing run, model or alias
        raise ConfigError(f"teacher.model_uri: cannot load {cfg.teacher.model_uri!r}: "
                          f"{str(exc).splitlines()[0]}") from None
    trained_on = spec.get("input", {}).get("dataset")
    if trained_on and trained_on != cfg.data.name:
        raise ConfigError(f"teacher.model_uri: the teacher was trained on {trained_on!r}, "
                          f"but data.name is {cfg.data.name!r}")
    if cfg.student.init != "scratch" and spec["model"] != "mlp":
        raise ConfigError(f"student.init: {cfg.student.init} needs an mlp teacher; "
                          f"{cfg.teacher.model_uri} is a {spec['model']}")
    return pinned, spec


def main(cfg: DistillConfig, parent_run_id: str | None = None) -> str:
    """Build the TorchTrainer, fit, and return the MLflow run id (a child run under ``parent_run_id``)."""
    from pipelines.core.ray_session import ensure_ray, require_cpus

    uri = tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    require_registered("model", cfg.student.name, "student.name")
    require_registered("dataset", cfg.data.name, "data.name")
    tracking.setup(cfg.experiment)
    pinned, teacher_spec = _check_teacher(cfg)
    alias = cfg.teacher.model_uri
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"model_uri": pinned})})
    ensure_ray(uri)
    require_cpus(cfg.scaling.num_workers * cfg.scaling.threads_per_worker, "scaling.num_workers")

    method = "dot" if cfg.train.optimizer == "dot" else cfg.student.init if cfg.student.init != "scratch" else "kd"
    return run_job(cfg, "distill", train_loop,
                   {"model": cfg.student.name, "teacher": pinned, "teacher_requested": alias,
                    "teacher_model": teacher_spec["model"], "method": method},
                   f"teacher {cfg.teacher.model_uri} ({teacher_spec['model']}) -> student {cfg.student.name} "
                   f"[{method}] ", parent_run_id)


if __name__ == "__main__":
    run_cli(DistillConfig, main)
