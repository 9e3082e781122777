"""Check a paper's claim: a Ray Tune sweep over arms (method settings) x paired seeds, then a report.

    python -m pipelines.claim --config pipelines/configs/claims/dot.yaml
    python -m pipelines.claim --config pipelines/configs/claims/dot.yaml --smoke    # tiny jobs, 2 seeds
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": ...}}' \\
        -- python -m pipelines.claim --config pipelines/configs/claims/dot.yaml

Every trial is a real run of a job (``pipelines.train`` or ``pipelines.distill``, itself a Ray Train
run with DeepSpeed) built from the claim's base config, the shared overrides, the arm's overrides and
the seed; it logs as a child of one parent MLflow run. Arms share seeds, so every comparison with the
baseline arm is paired. At the end ``pipelines.report`` writes ``docs/results/<name>.md``.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from pipelines.core import tracking
from pipelines.core.config import ConfigError, JobConfig, load_config, run_cli

# job -> its config class; a claim can sweep any of them
JOBS = {"train": "TrainConfig", "distill": "DistillConfig"}


class ClaimConfig(JobConfig):
    name: str  # short id: the report goes to docs/results/<name>.md
    title: str  # the claim, in the paper's words
    paper: str  # citation, and the baseline / numbers the paper reports
    experiment: str = "claims"  # MLflow experiment of the parent and child runs
    job: str = "distill"  # pipelines.<job> runs every trial
    config: str  # the job's base YAML (relative to the repository root)
    overrides: list[str] = Field(default_factory=list)  # dotted overrides for every arm
    arms: dict[str, list[str]]  # arm name -> its own overrides
    baseline: str  # the arm the paper compares against
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    metric: str = "test/acc"  # the headline metric (higher is better)
    metrics: list[str] = Field(default_factory=list)  # further metrics to tabulate
    # groups of arms reported as separate paired comparisons, e.g. low-data vs full-data regimes:
    # {regime: {arm: baseline arm}}; default: every arm against ``baseline``
    comparisons: dict[str, dict[str, str]] = Field(default_factory=dict)
    notes: str = ""  # caveats the report must carry (synthetic data, scale, departures)
    results_dir: str = "docs/results"  # where the report goes (relative to the repository root)
    smoke: bool = False  # run every job with its own --smoke config (CI); the report says so

    SMOKE: ClassVar[dict[str, Any]] = {"smoke": True, "seeds": [0, 1]}

    @model_validator(mode="after")
    def _consistent(self) -> "ClaimConfig":
        if self.job not in JOBS:
            raise ValueError(f"job: must be one of {sorted(JOBS)}, got {self.job!r}")
        if self.baseline not in self.arms:
            raise ValueError(f"baseline: {self.baseline!r} is not one of the arms {sorted(self.arms)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: must be distinct")
        for regime, pairs in self.comparisons.items():
            for arm, base in pairs.items():
                if arm not in self.arms or base not in self.arms:
                    raise ValueError(f"comparisons.{regime}: {arm!r} vs {base!r} names an unknown arm")
        return self


def _job_config(claim: ClaimConfig, arm: str, seed: int, stamp: str):
    module = importlib.import_module(f"pipelines.{claim.job}")
    cls = getattr(module, JOBS[claim.job])
    overrides = [*claim.overrides, *claim.arms[arm], f"seed={seed}", f"experiment={claim.experiment}",
                 f"run_name=claim-{claim.name}-{stamp}-{arm}-s{seed}", "register_as=null"]
    return module, load_config(cls, str(tracking.REPO / claim.config), overrides, claim.smoke)


def _trial(params: dict[str, Any]) -> None:
    """One Tune trial: one job run (a Ray Train run) as a child of the claim's parent MLflow run."""
    import mlflow
    from ray import tune

    claim = ClaimConfig.model_validate(params["claim"])
    module, cfg = _job_config(claim, params["arm"], params["seed"], params["stamp"])
    run_id = module.main(cfg, parent_run_id=params["parent"])
    client = mlflow.MlflowClient(tracking.tracking_uri())
    client.set_tag(run_id, "claim.arm", params["arm"])
    client.set_tag(run_id, "claim.seed", str(params["seed"]))
    client.set_tag(run_id, "claim.name", claim.name)
    metrics = client.get_run(run_id).data.metrics
    tune.report({"run_id": run_id, **{k: v for k, v in metrics.items() if k in [claim.metric, *claim.metrics]}})


def main(claim: ClaimConfig) -> str:
    from ray import tune

    from pipelines import report
    from pipelines.core.ray_session import ensure_ray

    uri = tracking.tracking_uri()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for arm in claim.arms:  # every trial's config must validate before anything runs
        try:
            _job_config(claim, arm, claim.seeds[0], stamp)
        except ConfigError as exc:
            raise ConfigError(f"arms.{arm}: {exc}") from None
    ensure_ray(uri)
    with tracking.job_run(claim, "claim", claim.experiment, f"claim-{claim.name}-{stamp}",
                          tags={"claim.name": claim.name, "claim.smoke": str(claim.smoke)}) as run:
        parent = run.info.run_id
        print(f"[claim] {claim.name}: {len(claim.arms)} arms x {len(claim.seeds)} seeds, "
              f"MLflow parent run {parent}", flush=True)
        space = {"claim": claim.model_dump(mode="json"), "parent": parent, "stamp": stamp,
                 "arm": tune.grid_search(list(claim.arms)), "seed": tune.grid_search(claim.seeds)}
        # the trial itself only drives a Ray Train run whose workers reserve the CPUs, so it asks for
        # no CPU (Tune refuses an empty request: a little memory instead); one trial at a time,
        # since each Train run takes the whole of a small box
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": 0, "memory": 256 * 1024**2}), param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(name=f"claim-{claim.name}-{stamp}", verbose=1,
                                      storage_path=str(Path.home() / "ray_results")),
        )
        results = tuner.fit()
        failed = [r for r in results if r.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(results)} trials failed; first: {failed[0].error}")
        out = report.write(parent, claim)
        import mlflow

        for f in [out, *sorted(out.parent.glob(f"{out.stem}-*.png"))]:
            mlflow.log_artifact(str(f), "report")
    shown = out.relative_to(tracking.REPO) if out.is_relative_to(tracking.REPO) else out
    print(f"[claim] done: MLflow run {parent}; report {shown}", flush=True)
    return parent


if __name__ == "__main__":
    run_cli(ClaimConfig, main)
