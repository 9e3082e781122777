"""The TOTO job as a user runs it: the paper's flags, its Ray-task simulations, MLflow, `ray job submit`."""
import json
import re
import subprocess

import pytest

from tests.conftest import BIN, REPO

pytestmark = pytest.mark.integration


def test_toto_prints_exact_and_approximate_tips_and_checks_them_by_simulation(cluster, mlflow_client):
    proc = cluster.job("toto", "--hit-rate", "0.5", "--tier", "11", "--safety", "0.99", "--smoke")
    run_id = re.search(r"\[toto\] done: MLflow run (\w+)", proc.stdout).group(1)
    m = mlflow_client.get_run(run_id).data.metrics
    from tasks import toto

    assert m["n_exact"] == toto.tips_exact(0.5, 11, 0.99) and m["n_approx"] == toto.tips_approx(0.5, 11, 0.99)
    assert m["n_approx"] >= m["n_exact"]  # the paper's approximation is conservative
    assert f"| given | 0.5000 | {int(m['n_exact']):,} | {int(m['n_approx']):,} |" in proc.stdout
    # the urn-model Monte Carlo (Ray tasks) agrees with the exact coverage
    assert abs(m["mc_coverage"] - m["exact_coverage"]) < 4 * m["mc_stderr"] + 1e-9
    assert m["exact_coverage"] >= 0.99
    # all tips sharing the realised outcomes of heterogeneous matches: below the promised 99%
    assert m["stress/coverage"] < m["stress/iid"] and m["stress/shortfall"] == pytest.approx(0.99 - m["stress/coverage"])
    assert "toto.md" in {a.path for a in mlflow_client.list_artifacts(run_id)}


def test_toto_with_bundesliga_hit_rates_through_ray_job_submit(cluster, mlflow_client):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": cluster.tracking_uri}}), "--",
           "python", "-m", "pipelines.toto", "--data", "bundesliga", "--tier", "10", "--safety", "0.9", "--smoke",
           "monte_carlo_rounds=0", "stress_rounds=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-3000:]
    run_id = re.search(r"\[toto\] done: MLflow run (\w+)", out).group(1)
    m = mlflow_client.get_run(run_id).data.metrics
    for rule in ("home_win", "better_team", "elo"):
        assert 0.35 < m[f"bundesliga/{rule}/hit_rate"] < 0.55  # draws are always missed
        assert m[f"bundesliga/{rule}/n_approx"] >= m[f"bundesliga/{rule}/n_exact"] > 0


@pytest.mark.parametrize("args,message", [
    (["--hit-rate", "1.5"], "hit_rate: Input should be less than 1"),
    (["--hit-rate", "0"], "hit_rate: Input should be greater than 0"),
    (["--tier", "9"], "tier: Input should be greater than or equal to 10"),
    (["--tier", "14"], "tier: Input should be less than or equal to 13"),
    (["--safety", "1"], "safety: Input should be less than 1"),
    (["--data", "premier_league"], "data: Input should be 'none' or 'bundesliga'"),
])
def test_bad_arguments_exit_2_with_the_reason(cluster, args, message):
    proc = cluster.job("toto", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]
