"""Train an image classifier on Ray Train workers with DeepSpeed, tracked in MLflow.

    python -m pipelines.train --config pipelines/configs/squeezenet_fashion.yaml
    python -m pipelines.train --config pipelines/configs/squeezenet_fashion.yaml --smoke   # what CI runs
    python -m pipelines.train --config ... scaling.zero_stage=3 train.epochs=2           # overrides
    ray job submit --working-dir . --runtime-env-json \\
        '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/path/mlflow/mlflow.db"}}' \\
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
from typing import Any, ClassVar

from pydantic import Field, model_validator

from pipelines.core import tracking
from pipelines.core.config import require_registered, run_cli
from pipelines.core.training import (DeepSpeedJobConfig, ModelConfig, OptimConfig, SparsityConfig, SparsityStep,
                                     WorkerData, build_optimizer, check_sections, ds_config, gather_state,
                                     log_model, loss_ensemble, run_epochs, run_job, test_accuracy)


class TrainConfig(DeepSpeedJobConfig):
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: OptimConfig = Field(default_factory=OptimConfig)
    # a loss ensemble by name, {term: {name: <registered loss>, weight, <options>}} (every part is
    # logged as train/loss/<term>); none: cross-entropy with train.label_smoothing
    losses: dict[str, dict[str, Any]] | None = None
    # LOBSTER (or plain decay) after every engine step, on ZeRO 0-2 (tasks/lobster.py); the pruning
    # schedule (sparsity.prune) runs in pipelines.fit
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)

    SMOKE: ClassVar[dict[str, Any]] = {
        "data.limit_train": 512, "data.limit_eval": 256, "train.epochs": 2, "train.batch_size": 64,
        "register_as": None,  # a smoke model must never take over the registry alias
    }

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        check_sections(self.train, self.scaling, self.model.kwargs)
        if self.train.optimizer == "dot":
            raise ValueError("train.optimizer: dot optimises a distillation loss; use pipelines.distill")
        if self.losses is not None and loss_ensemble(self.losses).single_score():
            raise ValueError("losses: single-score binary losses train one-output models with pipelines.fit")
        if self.losses is not None and self.train.label_smoothing:
            raise ValueError("train.label_smoothing: with losses, set it on the loss term instead "
                             "(losses.<term>.label_smoothing of a cross_entropy term)")
        if self.sparsity.prune:
            raise ValueError("sparsity.prune: the plateau pruning schedule runs in pipelines.fit "
                             "(pipelines/configs/prune_lenet.yaml); the train job applies the regulariser")
        if self.data.condensed and not self.data.condensed_path().is_dir():
            raise ValueError(f"data.condensed: {self.data.condensed_path()} is not a folder (pipelines.condense "
                             "writes one; a relative path starts at the repository root)")
        if self.data.condensed and self.data.condensed_labels == "soft" and self.losses is not None:
            raise ValueError("losses: a condensed set with soft labels trains on the teacher's stored logits; "
                             "set data.condensed_labels=hard to use a loss ensemble")
        if self.sparsity.regularizer != "none" and self.scaling.zero_stage == 3:
            raise ValueError("sparsity.regularizer: needs every rank to hold whole parameters; use "
                             "scaling.zero_stage 0, 1 or 2")
        return self


# ---------------------------------------------------------------------------------------------
# worker side


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker = one DeepSpeed rank."""
    import deepspeed
    import ray.train
    import torch
    import torch.nn.functional as F

    from tasks.common.registry import get_model
    from tasks.common.seeding import seed_everything

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    log = tracking.RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None

    data = WorkerData.load(cfg.data, cfg.seed, cfg.scaling.channels_last)
    kwargs = data.model_kwargs(cfg.model.name, cfg.model.kwargs)
    steps = data.steps_per_epoch(cfg.train.batch_size)
    model = get_model(cfg.model.name, **kwargs)
    opt, sched = build_optimizer(cfg.train, model.parameters(), cfg.train.epochs * steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=ds_config(cfg.train.batch_size, world, cfg.scaling.zero_stage,
                                                            cfg.train.grad_clip))
    if cfg.scaling.channels_last:
        # after initialize: DeepSpeed's CPU broadcast of the initial weights needs NCHW tensors. Under
        # ZeRO-0 the optimizer holds the Parameter objects themselves, so re-laying their data is safe.
        engine.module.to(memory_format=torch.channels_last)

    ensemble = loss_ensemble(cfg.losses) if cfg.losses else None
    regularize = SparsityStep(engine, cfg.sparsity) if cfg.sparsity.regularizer != "none" else None

    def loss_parts(rows, x, y):
        if data.soft is not None:  # a condensed set: this epoch's stored view and the teacher's logits on it
            from tasks.sre2l import soft_label_loss

            x, teacher = data.soft_batch(rows, x, engine.global_steps // steps)
            logits = engine(x)
            return logits, {"loss": soft_label_loss(logits, teacher, cfg.data.condensed_temperature)}
        logits = engine(x)
        if ensemble:
            return logits, ensemble({"logits": logits, "target": y})
        return logits, {"loss": F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)}

    def train_step(rows, x, y):
        logits, parts = loss_parts(rows, x, y)
        engine.backward(parts["loss"])
        if regularize:
            regularize.before_step()
        engine.step()
        if regularize:
            regularize.after_step()
        return logits.detach(), {k: v.item() for k, v in parts.items()}

    if not run_epochs(engine, cfg=cfg, data=data, train_step=train_step, log=log, job="train",
                      loop_config=config):
        return
    state, digests = gather_state(engine)
    if log:
        _publish(cfg, data, kwargs, state, digests, log)


def _publish(cfg: TrainConfig, data: WorkerData, kwargs: dict[str, Any], state, digests: list[str], log) -> None:
    """Rank 0: rebuild the plain model, score the test split, log it as safetensors + model.json."""
    from tasks.common.registry import get_model

    log.text(json.dumps({f"rank{r}": d for r, d in enumerate(digests)}, indent=2), "rank_digests.json")
    final = get_model(cfg.model.name, **kwargs)
    final.load_state_dict(state)
    test_acc = test_accuracy(final, data)
    # a fine-tuned pretrained model is rebuilt from its own weights, not the pretrained ones
    saved = {**kwargs, "pretrained": False} if kwargs.get("pretrained") else kwargs
    size = log_model(log, final, cfg.model.name, saved, data, cfg.data.name, test_acc=test_acc)
    log.metrics({"test/acc": test_acc, "model/bytes": size, "ranks/identical": float(len(set(digests)) == 1),
                 "model/parameters": sum(p.numel() for p in final.parameters())}, step=cfg.train.epochs)
    unit = {"lm": "windows (next-token accuracy)", "text": "texts"}.get(data.kind, "images")
    print(f"[train] test accuracy {test_acc:.4f} on {len(data.test_y)} {unit}; model {size:,} bytes", flush=True)


# ---------------------------------------------------------------------------------------------
# driver side


def main(cfg: TrainConfig, parent_run_id: str | None = None) -> str:
    """Build the TorchTrainer, fit, and return the MLflow run id (a child run under ``parent_run_id``)."""
    from pipelines.core.ray_session import ensure_ray, require_cpus

    uri = tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    require_registered("model", cfg.model.name, "model.name")
    require_registered("dataset", cfg.data.name, "data.name")
    ensure_ray(uri)
    require_cpus(cfg.scaling.num_workers * cfg.scaling.threads_per_worker, "scaling.num_workers")

    return run_job(cfg, "train", train_loop, {"model": cfg.model.name}, "", parent_run_id)


if __name__ == "__main__":
    run_cli(TrainConfig, main)
