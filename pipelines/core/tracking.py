"""MLflow tracking: where the store is, the parent run of a job, model artifacts in and out.

Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite store in the repository's ``mlflow/`` folder
(MLflow 3.13+ refuses a plain ``./mlruns`` file store) with artifacts beside it. A job submitted
with ``ray job submit`` runs in a temporary copy of the working dir, where that default would vanish
with the job, so there the URI must come through ``runtime_env.env_vars`` (see the README).

Models are logged as a directory artifact (``model/``: safetensors + model.json, never a pickle) and
are addressed as ``runs:/<run_id>`` or ``models:/<registered name>@<alias>``.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipelines.core.config import ConfigError, JobConfig, flatten, to_yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STORE = REPO / "mlflow"
MODEL_DIR = "model"
# MLflow caps a param value at 6000 characters; configs never come close, but be explicit
_PARAM_MAX = 6000


def in_submitted_job() -> bool:
    """True inside the driver of a ``ray job submit`` job (Ray passes the job config in this variable)."""
    return "job_submission_id" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("file:") or (uri and "://" not in uri):
            raise ConfigError(f"MLFLOW_TRACKING_URI={uri}: MLflow 3.17 refuses file stores; "
                              "use sqlite:////abs/path/mlflow.db or an http:// tracking server")
        return uri
    if in_submitted_job():
        raise ConfigError(
            "MLFLOW_TRACKING_URI: not set, and a submitted job runs in a temporary copy of the working "
            "dir where the default store would be lost; pass it with --runtime-env-json "
            "'{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"sqlite:////abs/path/mlflow/mlflow.db\"}}' "
            "or point it at a tracking server (make mlflow-server)")
    DEFAULT_STORE.mkdir(exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite store; a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def _mlflow():
    import mlflow  # imported late: `tasks` never needs it and the CLI should start fast

    return mlflow


def setup(experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the tracking URI (workers need it too)."""
    mlflow = _mlflow()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=artifact_root(uri))
        except mlflow.exceptions.MlflowException:
            pass  # created concurrently by another job
    mlflow.set_experiment(experiment)
    return uri


def versions() -> dict[str, str]:
    # package metadata, not `import torch, deepspeed`: a driver that needs neither (pipelines.score) would
    # carry ~0.15 GB and ~2 s of imports for two tags
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"  # a job's working-dir copy has no .git
    return {"git_commit": commit, "ray_version": version("ray"), "torch_version": version("torch"),
            "deepspeed_version": version("deepspeed")}


@contextlib.contextmanager
def job_run(cfg: JobConfig, job: str, experiment: str, run_name: str,
            resume_run_id: str | None = None, tags: dict[str, str] | None = None,
            parent_run_id: str | None = None) -> Iterator[Any]:
    """The MLflow run of a job: params = flattened resolved config, ``config.yaml`` artifact, tags with
    versions. ``resume_run_id`` reopens the run of an interrupted job; ``parent_run_id`` nests the run
    under a sweep's parent run (a Tune trial runs in a process of its own, so it names the parent)."""
    mlflow = _mlflow()
    setup(experiment)
    if resume_run_id and not _run_exists(resume_run_id):
        print(f"[tracking] run {resume_run_id} is not in {tracking_uri()}; logging to a new run", flush=True)
        resume_run_id = None
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id)
    else:
        run = mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id)
        # MLflow param names allow only alphanumerics and _-. :/ (free-text config keys may hold more)
        params = {re.sub(r"[^\w\-. :/]", "_", k): str(v)[:_PARAM_MAX]
                  for k, v in flatten(cfg.model_dump(mode="json")).items()}
        mlflow.log_params(params)
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        mlflow.set_tags({"squeezelab.job": job, **versions(), **(tags or {})})
    try:
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


def _run_exists(run_id: str) -> bool:
    mlflow = _mlflow()
    try:
        mlflow.tracking.MlflowClient().get_run(run_id)
        return True
    except mlflow.exceptions.MlflowException:
        return False


class RunLogger:
    """Logs to an existing run by id from any process (e.g. the rank-0 Ray Train worker)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def model(self, local_dir: str | Path) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), MODEL_DIR)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)


def log_points(points) -> None:
    """Log (key, value, step) points to the active run, 1,000 per write: sweep trials share one SQLite
    store, and a write per point would serialise them on its lock."""
    import time

    from mlflow.entities import Metric

    mlflow = _mlflow()
    now = int(time.time() * 1000)
    rows = [Metric(k, float(v), now, int(step)) for k, v, step in points]
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    for i in range(0, len(rows), 1000):
        client.log_batch(run_id, metrics=rows[i:i + 1000])


def resolve_model_uri(model_uri: str) -> str:
    """``runs:/<id>`` | ``runs:/<id>/model`` | ``models:/<name>@<alias>`` | ``models:/<name>/<version>``
    -> the artifact URI of the model directory."""
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient()
    if model_uri.startswith("runs:/"):
        run_id, _, sub = model_uri.removeprefix("runs:/").partition("/")
        return f"runs:/{run_id}/{sub or MODEL_DIR}"
    if model_uri.startswith("models:/"):
        ref = model_uri.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = ref.rsplit("/", 1)
            version = client.get_model_version(name, number)
        return version.source
    raise ValueError(f"model URI {model_uri!r}: expected runs:/<run_id> or models:/<name>@<alias>")


def pin_model_uri(model_uri: str) -> str:
    """``models:/<name>@<alias>`` -> ``models:/<name>/<version>`` it points at now; other URIs unchanged."""
    if not (model_uri.startswith("models:/") and "@" in model_uri):
        return model_uri
    mlflow = _mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    name, alias = model_uri.removeprefix("models:/").split("@", 1)
    version = mlflow.tracking.MlflowClient().get_model_version_by_alias(name, alias)
    return f"models:/{name}/{version.version}"


def download_model(model_uri: str, dst: str | Path | None = None) -> Path:
    """Fetch a logged model directory to local disk and return its path."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per 2-file model is noise
    dst = Path(dst or tempfile.mkdtemp(prefix="squeezelab-model-"))
    local = mlflow.artifacts.download_artifacts(artifact_uri=resolve_model_uri(model_uri), dst_path=str(dst))
    return Path(local)


def read_model_spec(model_uri: str, store: str | None = None) -> dict:
    """A logged model's model.json alone (what it is, how to load it), without fetching its weights;
    ``store``: the tracking URI (default: ``tracking_uri()``)."""
    import json

    from tasks.common.model_io import SPEC

    mlflow = _mlflow()
    mlflow.set_tracking_uri(store or tracking_uri())
    path = mlflow.artifacts.download_artifacts(artifact_uri=f"{resolve_model_uri(model_uri).rstrip('/')}/{SPEC}",
                                               dst_path=tempfile.mkdtemp(prefix="squeezelab-spec-"))
    return json.loads(Path(path).read_text())


def download_configured_model(model_uri: str, key: str) -> Path:
    """``download_model`` for a model a config names under ``key``: a wrong run id, name or alias is a
    config error that names the key (exit 2), not a traceback."""
    try:
        return download_model(model_uri)
    except Exception as exc:  # MLflow raises several types for a missing run, model or alias
        raise ConfigError(f"{key}: cannot load {model_uri!r}: {str(exc).splitlines()[0]}") from None


def load_logged_model(model_uri: str):
    """(torch module in eval mode, model.json spec, local dir) for a logged model."""
    from tasks.common.model_io import load_model

    local = download_model(model_uri)
    model, spec = load_model(local)
    return model, spec, local


def register(run_id: str, name: str, alias: str | None = None) -> str:
    """Register a run's model directory under ``name`` (and point ``alias`` at it); returns the version."""
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient()
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # exists
    version = client.create_model_version(name, source=f"runs:/{run_id}/{MODEL_DIR}", run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version.version


def finish(job: str, run_id: str, register_as: str | None = None) -> str:
    """A job's last words: register its model as ``register_as`` (alias current) when asked, print where
    the run is, and return the run id."""
    if register_as:
        version = register(run_id, register_as, alias="current")
        print(f"[{job}] registered {register_as} version {version} (alias current)", flush=True)
    print(f"[{job}] done: MLflow run {run_id}", flush=True)
    return run_id
