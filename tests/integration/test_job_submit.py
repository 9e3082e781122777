"""`ray job submit` of the smoke config against the `ray start --head` cluster, token auth on."""
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO
from tests.integration.conftest import CONFIG

pytestmark = pytest.mark.integration


def submit(cluster, runtime_env: dict, *args: str) -> subprocess.CompletedProcess:
    return cluster.submit("train", "--config", CONFIG, "--smoke", f"scaling.storage_path={cluster.storage}", *args,
                          runtime_env=runtime_env, check=False)


def test_submitted_job_trains_and_logs_to_the_store_named_in_runtime_env(cluster, mlflow_client):
    proc = submit(cluster, {"env_vars": {"MLFLOW_TRACKING_URI": cluster.tracking_uri}}, "run_name=submitted")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    exp = mlflow_client.get_experiment_by_name("squeezelab")
    runs = mlflow_client.search_runs([exp.experiment_id], "attributes.run_name = 'submitted'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert 0.0 < runs[0].data.metrics["test/acc"] <= 1.0
    assert runs[0].data.tags["git_commit"] == "unknown"  # the job ran in Ray's copy of the working dir


def test_submitted_job_without_a_store_fails_fast_with_the_fix(cluster):
    proc = submit(cluster, {"env_vars": {}}, "run_name=nostore")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config error: MLFLOW_TRACKING_URI: not set" in out and "--runtime-env-json" in out


def test_submission_without_the_clusters_token_is_refused_and_runs_nothing(cluster, tmp_path):
    import requests

    env = {**cluster.env, "HOME": str(tmp_path)}  # no ~/.ray/auth_token
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", "intruder", "--",
           "python", "-c", "print('ran')"]
    for wrong in (None, "f" * 32):  # no token, then a wrong one
        if wrong:
            env["RAY_AUTH_TOKEN"] = wrong
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "token" in (proc.stdout + proc.stderr).lower()
    # the dashboard's REST API too: no bearer token, 401; the cluster's token, 200 - and no job ran
    assert requests.get(f"{cluster.dashboard}/api/jobs/", timeout=10).status_code == 401
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    jobs = requests.get(f"{cluster.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert jobs.status_code == 200 and "intruder" not in jobs.text
