"""Fit one small classifier in one process with a loss (ensemble); log accuracy and calibration.

    python -m pipelines.fit --config pipelines/configs/fit_tables.yaml
    python -m pipelines.fit --config pipelines/configs/fit_tables.yaml data.name=letter \\
        'losses={sq: {name: squentropy}}'
    python -m pipelines.fit --config pipelines/configs/fit_tables.yaml --smoke            # what CI runs
    python -m pipelines.fit --config pipelines/configs/prune_lenet.yaml                   # LOBSTER pruning
    ray job submit --working-dir . --runtime-env-json \\
        '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/path/mlflow/mlflow.db"}}' \\
        -- python -m pipelines.fit --config pipelines/configs/fit_tables.yaml

The trial of the loss sweeps (``pipelines.sweep`` with ``job: fit``). Its models have 10^3-10^5
parameters and train on tables (tasks/common/tables.py) or small images: a Ray Train + DeepSpeed
worker group would take longer to start than such a run takes, and both CPUs of a small box; one
fit takes ``threads`` CPUs, so a sweep runs as many at once as the cluster has CPUs. Bigger models
train with ``pipelines.train`` (Ray Train + DeepSpeed), which a sweep can run as well.

The loss is a weighted ensemble of registered losses (``losses``: cross_entropy, squentropy,
rescaled_square, bce, hinge, exponential, ensloss, ...); a binary set whose every term is a
single-score loss gets a model with one output. Logged: per-epoch train loss parts and validation
metrics, then test accuracy, NLL, Brier, ECE (equal-width and equal-mass bins), the same after
post-hoc temperature scaling fitted on the validation split (``test/ts/*``), a reliability diagram
(``reliability.png``), the model (safetensors + model.json), its bytes and parameter count.
``sparsity`` adds LOBSTER (or its plain-decay ablation) after every optimiser step and, with
``sparsity.prune``, the official plateau -> rewind -> threshold pruning schedule
(``pipelines/configs/prune_lenet.yaml``); logged: ``sparsity/remaining`` per epoch, every pruning event
(``prune/*``), and the final remaining fraction and non-zero count.
A run whose loss turns non-finite stops there, keeps the last finite epoch's weights and logs
``train/diverged_epoch``; test rows whose logits are still not finite score as uniform predictions.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines.core import tracking
from pipelines.core.config import ConfigError, JobConfig, Section, require_registered, run_cli
from pipelines.core.training import ModelConfig, OptimConfig, SparsityConfig, loss_ensemble


class FitDataConfig(Section):
    name: str = "digits"  # a registered table or image dataset (tasks/common/tables.py, datasets.py)
    val_fraction: float = Field(0.1, gt=0, lt=1)  # carved from the training part, stratified
    test_fraction: float = Field(0.3, gt=0, lt=1)  # held out when the source has no official test split
    limit_train: int | None = Field(None, gt=0)  # first N training rows (smoke runs)
    limit_eval: int | None = Field(None, gt=0)  # ... and N validation / test rows


class FitModelConfig(ModelConfig):
    name: str = "mlp"
    # num_classes / in_features / in_channels come from the dataset
    kwargs: dict[str, Any] = Field(default_factory=lambda: {"hidden": [256, 256]})


class FitOptimConfig(OptimConfig):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0)  # SGD + Nesterov, as the Squentropy author code trains its MLPs
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["onecycle", "cosine", "constant", "step"] = "cosine"
    eval_every: int = Field(1, ge=1)  # validation metrics every N epochs (and after the last)


def _default_losses() -> dict[str, dict[str, Any]]:
    return {"ce": {"name": "cross_entropy"}}


class FitConfig(JobConfig):
    experiment: str = "squeezelab"  # MLflow experiment
    run_name: str | None = None
    seed: int = 0  # model init, batch order and the data split
    data: FitDataConfig = Field(default_factory=FitDataConfig)
    model: FitModelConfig = Field(default_factory=FitModelConfig)
    # term -> {name: <loss registry name, default the term>, weight, <options>}
    losses: dict[str, dict[str, Any]] = Field(default_factory=_default_losses)
    train: FitOptimConfig = Field(default_factory=FitOptimConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)  # LOBSTER / decay + plateau pruning
    threads: int = Field(1, ge=1)  # torch threads = the CPUs a sweep trial reserves
    ece_bins: int = Field(10, ge=2)  # 10 equal-width bins, as the Squentropy author code

    SMOKE: ClassVar[dict[str, Any]] = {"data.limit_train": 256, "data.limit_eval": 128, "train.epochs": 3}

    @model_validator(mode="after")
    def _consistent(self) -> "FitConfig":
        from tasks.common.registry import DATA_KWARGS

        if self.train.optimizer == "dot":
            raise ValueError("train.optimizer: dot optimises a distillation loss; use pipelines.distill")
        if self.train.stop_after_epochs:
            raise ValueError("train.stop_after_epochs: a fit run is not resumable; lower train.epochs")
        if self.sparsity.prune and self.train.eval_every != 1:
            raise ValueError("train.eval_every: pruning watches the validation loss every epoch; set it to 1")
        for key in DATA_KWARGS:
            if key in self.model.kwargs:
                raise ValueError(f"model.kwargs.{key} comes from the dataset; remove it")
        loss_ensemble(self.losses)
        return self


@dataclass
class FitData:
    """A dataset as float tensors: tables standardised on the training split, images normalised."""

    name: str
    classes: tuple[str, ...]
    train_x: Any
    train_y: Any
    val_x: Any
    val_y: Any
    test_x: Any
    test_y: Any
    source: str
    synthetic: bool
    input_shape: tuple[int, ...]

    @classmethod
    def load(cls, cfg: FitDataConfig, seed: int) -> "FitData":
        import torch

        from tasks.common.registry import lookup

        kind = getattr(lookup("dataset", cfg.name)(), "kind", "image")
        if kind == "table":
            from tasks.common.tables import load_table

            s = load_table(cfg.name, seed=seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)

            def prep(x):
                return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        elif kind == "image":
            from tasks.common.batches import normalise
            from tasks.common.datasets import load_dataset

            s = load_dataset(cfg.name, seed=seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)

            def prep(x):
                return normalise(x, s.mean, s.std)
        else:
            raise ConfigError(f"data.name: {cfg.name!r} is a {kind} dataset; pipelines.fit trains on tables "
                              "and images (text models train with pipelines.train)")
        n, m = cfg.limit_train, cfg.limit_eval
        y = [torch.from_numpy(np.asarray(v, dtype=np.int64)) for v in (s.train_y[:n], s.val_y[:m], s.test_y[:m])]
        return cls(cfg.name, tuple(s.classes), prep(s.train_x[:n]), y[0], prep(s.val_x[:m]), y[1],
                   prep(s.test_x[:m]), y[2], s.source, s.synthetic, tuple(s.input_shape))


def _logits(model, x, batch: int = 4096):
    """Eval-mode logits; a row with a non-finite value (a diverged model) becomes all zeros, i.e. the
    uniform prediction, so that it scores as the guess it is instead of breaking every metric."""
    import torch

    model.eval()
    with torch.no_grad():
        z = torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])
    z[~torch.isfinite(z).all(-1) if z.ndim > 1 else ~torch.isfinite(z)] = 0.0
    return z


def evaluate(model, x, y, bins: int, temperature: float = 1.0) -> dict[str, float]:
    """acc, nll, brier, ece, ece_mass of ``model`` on (x, y), logits divided by ``temperature``."""
    import torch

    from tasks.common.metrics import summary
    from tasks.temperature_scaling import class_logits

    probs = torch.softmax(class_logits(_logits(model, x)).double() / temperature, 1).numpy()
    return summary(probs, y.numpy(), bins)


def model_outputs(cfg: FitConfig, data: FitData) -> int:
    """One score for single-score binary losses (on a two-class set), else one logit per class."""
    if not loss_ensemble(cfg.losses).single_score():
        return len(data.classes)
    if len(data.classes) != 2:
        raise ConfigError(f"losses: single-score binary losses need a two-class dataset; "
                          f"{data.name} has {len(data.classes)} classes")
    return 1


def train(cfg: FitConfig, data: FitData, report: Callable[[dict[str, float]], None] | None = None):
    """Train the configured model; returns (model, kwargs, per-epoch history, diverged epoch or None)."""
    import torch

    from pipelines.core.training import build_optimizer
    from tasks.common.registry import data_kwargs, get_model
    from tasks.lobster import PruningSchedule, apply_masks, decay_step, lobster_step, masks_of, remaining
    from tasks.common.seeding import hash_seed, seed_everything

    torch.set_num_threads(cfg.threads)
    ensemble = loss_ensemble(cfg.losses)
    outputs = model_outputs(cfg, data)
    seed_everything(cfg.seed)
    kwargs = {**cfg.model.kwargs, **data_kwargs(cfg.model.name, data.input_shape, outputs)}
    model = get_model(cfg.model.name, **kwargs)
    n = len(data.train_x)
    batch = min(cfg.train.batch_size, n)  # a set smaller than one batch trains full-batch
    steps = n // batch
    opt, sched = build_optimizer(cfg.train, model.parameters(), cfg.train.epochs * steps)
    sparse = cfg.sparsity
    schedule = PruningSchedule(sparse.patience, sparse.tolerance, sparse.max_evals) if sparse.prune else None
    history: list[dict[str, float]] = []
    diverged = None
    last_good = copy.deepcopy(model.state_dict())
    t0 = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        model.train()
        torch.manual_seed(hash_seed(cfg.seed, epoch))  # dropout and stochastic losses (EnsLoss draws)
        perm = torch.from_numpy(np.random.default_rng([cfg.seed, epoch]).permutation(n))
        masks = masks_of(model) if schedule or sparse.regularizer != "none" else None  # zeros stay zeros
        sums: dict[str, float] = {}
        for step in range(steps):
            idx = perm[step * batch:(step + 1) * batch]
            parts = ensemble({"logits": model(data.train_x[idx]), "target": data.train_y[idx]})
            if not torch.isfinite(parts["loss"]):
                diverged = epoch + 1
                break
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            if sparse.regularizer == "lobster":
                lobster_step(model, sparse.lmbda, masks)
            elif sparse.regularizer == "decay":
                decay_step(model, sparse.lmbda, masks)
            elif masks is not None:
                apply_masks(model, masks)  # momentum would otherwise revive pruned weights
            for k, v in parts.items():
                sums[f"train/{k}"] = sums.get(f"train/{k}", 0.0) + v.item() / steps
        if diverged:
            model.load_state_dict(last_good)
            print(f"[fit] loss not finite in epoch {diverged}: stopped, keeping epoch {diverged - 1}'s weights",
                  flush=True)
            break
        last_good = copy.deepcopy(model.state_dict())
        row = {"epoch": epoch + 1, **sums, "lr": sched.get_last_lr()[0]}
        evaluated = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
        if evaluated:
            row.update({f"val/{k}": v for k, v in evaluate(model, data.val_x, data.val_y, cfg.ece_bins).items()})
        if schedule or masks is not None:
            nonzero, total = remaining(model)
            row["sparsity/remaining"] = nonzero / total
        if schedule:
            event = schedule.epoch_end(model, row["val/nll"],
                                       lambda m: evaluate(m, data.val_x, data.val_y, cfg.ece_bins)["nll"])
            if event:
                row.update({f"prune/{k}": v for k, v in event.items()})
                print(f"[fit] epoch {epoch + 1}: plateau -> rewound and pruned at |p| < {event['threshold']:.3g}: "
                      f"{event['remaining']:.2%} of the parameters remain (val nll {event['loss']:.4f})", flush=True)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if report and evaluated:  # a Tune report is a round trip to the driver (~40 ms): not every epoch
            report(row)
    return model, kwargs, history, diverged


def _log_history(history: list[dict[str, float]]) -> None:
    tracking.log_points((k, v, h["epoch"]) for h in history for k, v in h.items() if k != "epoch")


def main(cfg: FitConfig, parent_run_id: str | None = None,
         report: Callable[[dict[str, float]], None] | None = None) -> str:
    """Fit, evaluate and log; returns the MLflow run id (a child run under ``parent_run_id``).
    ``report`` receives the metrics of every evaluation epoch, then the final ones (a Tune trial passes
    tune.report)."""
    import mlflow
    import torch

    from tasks.common.metrics import reliability_diagram
    from tasks.common.model_io import artifact_bytes, save_model
    from tasks.temperature_scaling import class_logits, fit_temperature

    tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    require_registered("model", cfg.model.name, "model.name")
    require_registered("dataset", cfg.data.name, "data.name")
    data = FitData.load(cfg.data, cfg.seed)
    model_outputs(cfg, data)  # a loss that cannot train on this data is a config error, before any run
    name = cfg.run_name or time.strftime(f"fit-{cfg.data.name}-%Y%m%d-%H%M%S")
    tags = {"dataset": cfg.data.name, "model": cfg.model.name, "losses": ",".join(
        e.get("name", k) for k, e in cfg.losses.items()), "data.synthetic": str(data.synthetic)}
    with tracking.job_run(cfg, "fit", cfg.experiment, name, parent_run_id=parent_run_id, tags=tags) as run:
        print(f"[fit] {name}: {cfg.model.name} on {data.name} ({len(data.train_x)} train / {len(data.val_x)} val / "
              f"{len(data.test_x)} test{', synthetic' if data.synthetic else ''}), losses "
              f"{tags['losses']}, MLflow run {run.info.run_id}", flush=True)
        model, kwargs, history, diverged = train(cfg, data, report)
        _log_history(history)
        temperature = fit_temperature(_logits(model, data.val_x), data.val_y)
        test = evaluate(model, data.test_x, data.test_y, cfg.ece_bins)
        scaled = evaluate(model, data.test_x, data.test_y, cfg.ece_bins, temperature)
        final = {**{f"test/{k}": v for k, v in test.items()}, **{f"test/ts/{k}": v for k, v in scaled.items()},
                 "temperature": temperature, "model/parameters": sum(p.numel() for p in model.parameters()),
                 "train/seconds": history[-1]["seconds"] if history else 0.0,
                 "train/diverged_epoch": float(diverged or 0)}
        if cfg.sparsity.prune or cfg.sparsity.regularizer != "none":
            from tasks.lobster import remaining

            nonzero, total = remaining(model)
            final.update({"sparsity/remaining": nonzero / total, "sparsity/nonzero": nonzero,
                          "prune/events": float(sum(1 for h in history if "prune/remaining" in h))})
        with tempfile.TemporaryDirectory() as tmp:
            out = save_model(model, Path(tmp) / "model", cfg.model.name, kwargs, test_acc=test["acc"],
                             input={"kind": "table" if len(data.input_shape) == 1 else "image",
                                    "shape": list(data.input_shape), "classes": list(data.classes),
                                    "dataset": data.name, "synthetic": data.synthetic})
            final["model/bytes"] = artifact_bytes(out)
            mlflow.log_artifacts(str(out), tracking.MODEL_DIR)
            logits = class_logits(_logits(model, data.test_x)).double()
            y = data.test_y.numpy()
            curves = {"as trained": (torch.softmax(logits, 1).numpy(), y),
                      f"temperature {temperature:.2f}": (torch.softmax(logits / temperature, 1).numpy(), y)}
            title = f"{data.name}{' (synthetic)' if data.synthetic else ''}: {cfg.model.name}, {tags['losses']}"
            mlflow.log_artifact(str(reliability_diagram(curves, Path(tmp) / "reliability.png", title,
                                                        cfg.ece_bins)))
        mlflow.log_metrics(final, step=len(history))
        if report:
            report({"epoch": len(history), **final})
        print(f"[fit] test acc {test['acc']:.4f}  nll {test['nll']:.4f}  ece {test['ece']:.4f}  "
              f"(temperature {temperature:.2f}: ece {scaled['ece']:.4f})  {final['train/seconds']:.1f} s", flush=True)
    print(f"[fit] done: MLflow run {run.info.run_id}", flush=True)
    return run.info.run_id


if __name__ == "__main__":
    run_cli(FitConfig, main)
