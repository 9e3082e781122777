"""Sweep arms (losses, methods) x grid cells (datasets, learning rates, ...) x paired seeds on Ray Tune.

    python -m pipelines.sweep --config pipelines/configs/claims/squentropy.yaml
    python -m pipelines.sweep --config pipelines/configs/claims/squentropy.yaml --smoke   # tiny runs, 2 seeds
    python -m pipelines.sweep --config pipelines/configs/claims/dot.yaml              # DeepSpeed trials
    ray job submit --working-dir . --runtime-env-json \\
        '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/path/mlflow/mlflow.db"}}' \\
        -- python -m pipelines.sweep --config pipelines/configs/claims/squentropy.yaml

Every trial is a real run of a job built from the sweep's base ``config``, the shared ``overrides``,
the arm's overrides, the grid cell's values and the seed:

- ``job: fit`` (pipelines/fit.py): a small model trained in the trial's own process on ``threads``
  CPUs, so Tune runs as many trials at once as the cluster has CPUs;
- ``job: train`` / ``job: distill``: a Ray Train + DeepSpeed run per trial, one at a time by default
  (each takes the workers of a small box).

Each trial logs as a child of one parent MLflow run, tagged with its arm, cell and seed. Arms share
seeds (the same seed means the same split, initial weights and batch order in every arm), so each
comparison with the baseline arm within a cell is paired. At the end ``pipelines.report`` writes the
results table (mean +- std, paired difference, p-value, per cell and summarised across cells) and
plots to ``<results_dir>/<name>.md`` and logs them to the parent run.
``python -m pipelines.claim`` is the same job (its configs predate grids).
"""
from __future__ import annotations

import importlib
import itertools
import json
import time
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.core import tracking
from pipelines.core.config import ConfigError, JobConfig, load_config, run_cli
from pipelines.core.training import default_storage

# job -> its config class; a sweep can run any of them
JOBS = {"train": "TrainConfig", "distill": "DistillConfig", "fit": "FitConfig", "value": "ValueConfig",
        "compress": "CompressConfig", "churn": "ChurnConfig", "quantize": "QuantizeConfig",
        "kv_budget": "KVBudgetConfig"}
IN_PROCESS = {"fit", "value", "compress", "churn", "quantize", "kv_budget"}  # jobs whose trial trains in its own process (no Ray Train worker group)


class SweepConfig(JobConfig):
    name: str  # short id: the report goes to <results_dir>/<name>.md
    title: str = ""  # the claim, in the paper's words (default: the name)
    paper: str = ""  # citation, and the baseline / numbers the paper reports
    experiment: str = "claims"  # MLflow experiment of the parent and child runs
    job: Literal["train", "distill", "fit", "value", "compress", "churn", "quantize", "kv_budget"] = "distill"  # pipelines.<job> runs every trial
    config: str  # the job's base YAML (relative to the repository root)
    overrides: list[str] = Field(default_factory=list)  # dotted overrides for every trial
    arms: dict[str, list[str]]  # arm name -> its own overrides (a loss, a method, ...)
    baseline: str  # the arm the paper compares against
    # further axes, {dotted key: [values]}: every combination is a cell (a dataset, a learning rate);
    # arms are compared within each cell, and the report summarises the cells. Keys that move together
    # form one axis: {"data.condensed_ipc, train.batch_size": [[1, 10], [50, 64]]}. Overrides (shared and
    # per arm) may name the trial's seed as {seed}: data.condensed=runs/condensed/recover-seed{seed}
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    metric: str = "test/acc"  # the headline metric
    metrics: list[str] = Field(default_factory=list)  # further metrics to tabulate
    # groups of arms reported as separate paired comparisons, e.g. low-data vs full-data regimes:
    # {regime: {arm: baseline arm}}; default: every arm against ``baseline``
    comparisons: dict[str, dict[str, str]] = Field(default_factory=dict)
    # a numeric grid key (a stepsize): the report adds sensitivity curves (each metric against it, per
    # arm) and compares arms over its whole range (per seed, the metric averaged over the range)
    sensitivity: str | None = None
    # a metric logged per step (a learning curve): the report plots it for every arm at the value of
    # ``sensitivity`` where the arm's headline metric was best
    curve: str | None = None
    notes: str = ""  # caveats the report must carry (synthetic data, scale, departures)
    results_dir: str = "docs/results"  # where the report goes (relative to the repository root)
    max_concurrent: int | None = Field(None, ge=1)  # trials at once; default: fit fills the CPUs, others 1
    smoke: bool = False  # run every job with its own --smoke config (CI); the report says so

    SMOKE: ClassVar[dict[str, Any]] = {"smoke": True, "seeds": [0, 1]}

    @model_validator(mode="after")
    def _consistent(self) -> "SweepConfig":
        if self.baseline not in self.arms:
            raise ValueError(f"baseline: {self.baseline!r} is not one of the arms {sorted(self.arms)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: must be distinct")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: give at least one value")
            width = len(axis_keys(key))
            if width > 1 and not all(isinstance(v, list) and len(v) == width for v in values):
                raise ValueError(f"grid.{key}: every value must list {width} values, one per key")
        for regime, pairs in self.comparisons.items():
            for arm, base in pairs.items():
                if arm not in self.arms or base not in self.arms:
                    raise ValueError(f"comparisons.{regime}: {arm!r} vs {base!r} names an unknown arm")
        if self.sensitivity is not None:
            values = self.grid.get(self.sensitivity)
            if values is None:
                raise ValueError(f"sensitivity: {self.sensitivity!r} is not a grid key {sorted(self.grid)}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"sensitivity: grid.{self.sensitivity} must hold numbers")
        if self.curve and not self.sensitivity:
            raise ValueError("curve: needs sensitivity (the curves are drawn at each arm's best value of it)")
        if not self.title:
            self.title = self.name
        if self.smoke:  # CI: the first value of every grid axis is enough to exercise the machinery
            self.grid = {k: v[:1] for k, v in self.grid.items()}
        return self

    def cells(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values ([{}] without a grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.grid.values())]


def axis_keys(key: str) -> list[str]:
    """The dotted keys of one grid axis: ``"a.b"``, or several that move together: ``"a.b, c.d"``."""
    return [k.strip() for k in key.split(",")]


def cell_values(cell: dict[str, Any]) -> dict[str, Any]:
    """A grid cell as {dotted key: value}, axes of keys that move together unpacked."""
    out: dict[str, Any] = {}
    for key, value in cell.items():
        keys = axis_keys(key)
        out.update(zip(keys, value) if len(keys) > 1 else [(key, value)])
    return out


def cell_label(cell: dict[str, Any]) -> str:
    """``letter`` for one grid key, ``name=letter, lr=0.01`` for several, ``all`` without a grid."""
    if not cell:
        return "all"
    values = cell_values(cell)
    if len(values) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def job_config(sweep: SweepConfig, arm: str, cell: dict[str, Any], seed: int, stamp: str):
    """(job module, validated job config) of one trial."""
    module = importlib.import_module(f"pipelines.{sweep.job}")
    cls = getattr(module, JOBS[sweep.job])
    values = cell_values(cell)
    tag = "-".join(str(v) for v in values.values())
    overrides = [*(o.replace("{seed}", str(seed)) for o in [*sweep.overrides, *sweep.arms[arm]]),
                 *(_override(k, v) for k, v in values.items()),
                 f"seed={seed}", f"experiment={sweep.experiment}",
                 f"run_name=sweep-{sweep.name}-{stamp}-{arm}{'-' + tag if tag else ''}-s{seed}"]
    if "register_as" in cls.model_fields:
        overrides.append("register_as=null")  # a trial never takes over a registry alias
    return module, load_config(cls, str(tracking.REPO / sweep.config), overrides, sweep.smoke)


def _trial(params: dict[str, Any]) -> None:
    """One Tune trial: one job run as a child of the sweep's parent MLflow run."""
    import mlflow
    from ray import tune

    sweep = SweepConfig.model_validate(params["sweep"])
    cell = sweep.cells()[params["cell"]]
    module, cfg = job_config(sweep, params["arm"], cell, params["seed"], params["stamp"])
    if sweep.job in IN_PROCESS:
        run_id = module.main(cfg, parent_run_id=params["parent"], report=tune.report)
    else:
        run_id = module.main(cfg, parent_run_id=params["parent"])
    client = mlflow.MlflowClient(tracking.tracking_uri())
    for key, value in {"claim.arm": params["arm"], "claim.seed": str(params["seed"]), "claim.name": sweep.name,
                       "claim.cell": cell_label(cell)}.items():
        client.set_tag(run_id, key, value)
    metrics = client.get_run(run_id).data.metrics
    tune.report({"run_id": run_id, **{k: v for k, v in metrics.items() if k in [sweep.metric, *sweep.metrics]}})


def _resources(sweep: SweepConfig, cfg) -> tuple[dict[str, float], int | None]:
    """(per-trial Tune resources, max concurrent trials)."""
    if sweep.job in IN_PROCESS:
        return {"cpu": cfg.threads}, sweep.max_concurrent  # Tune packs trials onto the free CPUs
    # the trial itself only drives a Ray Train run whose workers reserve the CPUs, so it asks for no
    # CPU (Tune refuses an empty request: a little memory instead); one at a time by default, since
    # each Train run takes the whole of a small box
    return {"cpu": 0, "memory": 256 * 1024**2}, sweep.max_concurrent or 1


def main(sweep: SweepConfig) -> str:
    from ray import tune

    from pipelines import report
    from pipelines.core.ray_session import ensure_ray

    uri = tracking.tracking_uri()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cells = sweep.cells()
    first = None
    for arm in sweep.arms:  # every trial's config must validate before anything runs
        for cell in cells:
            try:
                _, cfg = job_config(sweep, arm, cell, sweep.seeds[0], stamp)
            except ConfigError as exc:
                where = f"arms.{arm}" + (f" (grid cell {cell_label(cell)})" if cell else "")
                raise ConfigError(f"{where}: {exc}") from None
            first = first or cfg
    resources, concurrent = _resources(sweep, first)
    ensure_ray(uri)
    trials = len(sweep.arms) * len(cells) * len(sweep.seeds)
    with tracking.job_run(sweep, "sweep", sweep.experiment, f"sweep-{sweep.name}-{stamp}",
                          tags={"claim.name": sweep.name, "claim.smoke": str(sweep.smoke)}) as run:
        parent = run.info.run_id
        print(f"[sweep] {sweep.name}: {len(sweep.arms)} arms x {len(cells)} cells x {len(sweep.seeds)} seeds = "
              f"{trials} {sweep.job} trials, MLflow parent run {parent}", flush=True)
        space = {"sweep": sweep.model_dump(mode="json"), "parent": parent, "stamp": stamp,
                 "arm": tune.grid_search(list(sweep.arms)), "cell": tune.grid_search(list(range(len(cells)))),
                 "seed": tune.grid_search(sweep.seeds)}
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(_trial, resources), param_space=space,
            # fit trials reuse their worker process: imports and MLflow set-up are paid once per CPU,
            # not per trial (a few seconds each against runs that may take one second)
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=sweep.job in IN_PROCESS),
            run_config=tune.RunConfig(name=f"sweep-{sweep.name}-{stamp}", verbose=1,
                                      storage_path=default_storage()),
        )
        results = tuner.fit()
        import mlflow

        mlflow.log_metrics({"sweep/trials": trials, "sweep/seconds": time.perf_counter() - t0})
        failed = [r for r in results if r.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(results)} trials failed; first: {failed[0].error}")
        out = report.write(parent, sweep)
        for f in [out, *sorted(out.parent.glob(f"{out.stem}-*.png"))]:
            mlflow.log_artifact(str(f), "report")
    shown = out.relative_to(tracking.REPO) if out.is_relative_to(tracking.REPO) else out
    print(f"[sweep] done: MLflow run {parent}; report {shown}", flush=True)
    return parent


if __name__ == "__main__":
    run_cli(SweepConfig, main)
