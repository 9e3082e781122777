"""Ray start-up: join the cluster a job was submitted to, or start an embedded local one.

``ray.init()`` connects to ``RAY_ADDRESS`` when set (``ray job submit`` sets it for the driver) and
otherwise starts a local Ray with token auth on (Ray 2.59+). The env vars every worker needs - the
MLflow store, the data cache - travel in the job's runtime env, never in code.
"""
from __future__ import annotations

import os

from pipelines.core.config import ConfigError

# Forwarded to every Ray worker of a job started from this driver.
_FORWARDED = ("MLFLOW_TRACKING_URI", "SQUEEZELAB_CACHE")


def ensure_ray(tracking_uri: str | None = None, *, dashboard: bool = True) -> None:
    """Join the job's cluster, or start a local one; ``dashboard=False`` leaves out the local one's dashboard
    (its head process and ~10 module processes, ~0.25 GB) for jobs that need no state API (no Ray Train)."""
    import ray

    if ray.is_initialized():
        return
    from pipelines.core.tracking import in_submitted_job

    if in_submitted_job():  # the job's runtime env already reaches every worker; Ray refuses a second
        ray.init(log_to_driver=True, logging_level="WARNING")
        return
    # Ray runs workers at nice 15 so its control plane stays responsive on busy nodes; on a small
    # box the training workers are the job, and at nice 15 they lose ~10% of their CPU to Ray's
    # own bookkeeping processes (measured: benchmarks/train_throughput.py). Applies to the local
    # Ray this call starts; a cluster keeps its own setting.
    os.environ.setdefault("RAY_worker_niceness", "0")
    env = {k: os.environ[k] for k in _FORWARDED if k in os.environ}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    # the dashboard stays on (127.0.0.1) by default: Ray Train's clean-up actor polls the state API it serves
    # no env vars to forward: no runtime env at all (an empty one is still one; measured on a busy 2-CPU
    # box, a Ray Data actor pool of 2 was ready ~2 s sooner without it)
    ray.init(runtime_env={"env_vars": env} if env else None, log_to_driver=True, logging_level="WARNING",
             include_dashboard=None if dashboard else False)


def capacity(have: float, ceiling: str) -> float:
    """The CPUs a cluster can reach: what it has, or the declared autoscaling ceiling if higher."""
    try:
        return max(have, float(ceiling))
    except ValueError:  # unset or not a number: no autoscaling promise
        return have


def require_cpus(needed: float, what: str) -> None:
    """Fail before starting when the cluster can never fit the job (Ray would wait forever).

    An autoscaling cluster may have no CPUs until a job asks: the cluster files in clusters/
    declare their ceiling in ``SQUEEZELAB_MAX_CPUS``, and a job that fits under it may wait for
    the autoscaler instead of failing."""
    import ray

    have = ray.cluster_resources().get("CPU", 0)
    can = capacity(have, os.environ.get("SQUEEZELAB_MAX_CPUS", ""))
    if needed > can:
        grow = f" and can grow to {can:g} (SQUEEZELAB_MAX_CPUS)" if can > have else ""
        raise ConfigError(f"{what}: needs {needed:g} CPUs but the Ray cluster has {have:g}{grow}")
    if needed > have:
        print(f"[ray] {what}: needs {needed:g} CPUs, the cluster has {have:g} now; waiting for the "
              f"autoscaler (ceiling {can:g})", flush=True)
