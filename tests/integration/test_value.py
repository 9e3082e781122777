"""The value-learning job as a user runs it (prediction and control), its stepsize-sensitivity sweep on
Ray Tune, `ray job submit`, and its config errors."""
import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import BIN, REPO

pytestmark = pytest.mark.integration

RANDOM_WALK = "pipelines/configs/value_random_walk.yaml"


def _run_id(text: str) -> str:
    return re.search(r"\[value\] done: MLflow run (\w+)", text).group(1)


def test_prediction_logs_an_exact_error_curve_that_falls(cluster, mlflow_client):
    proc = cluster.job("value", "--config", RANDOM_WALK, "--smoke", "agent.algorithm=gtd2", "agent.loss=huber",
                       "agent.tau=0.1", "agent.alpha=0.0625", "steps=3000")
    run_id = _run_id(proc.stdout)
    m = mlflow_client.get_run(run_id).data.metrics
    assert m["value/rmsve_final"] < 0.6 * m["value/rmsve_initial"] and m["value/diverged"] == 0
    assert {"objective/msbe", "objective/hbe", "objective/abe"} <= set(m)
    curve = mlflow_client.get_metric_history(run_id, "value/rmsve")
    assert [p.step for p in sorted(curve, key=lambda p: p.step)][:3] == [0, 100, 200] and len(curve) == 31
    assert mlflow_client.get_run(run_id).data.tags["data.synthetic"] == "True"


def test_td_diverges_on_baird_through_ray_job_submit(cluster, mlflow_client):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": cluster.tracking_uri}}), "--",
           "python", "-m", "pipelines.value", "--config", "pipelines/configs/value_baird.yaml"]  # 5,000 steps: 0.1 s
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-3000:]
    m = mlflow_client.get_run(_run_id(out)).data.metrics
    assert m["value/diverged"] == 1 and m["value/rmsve_final"] == m["value/rmsve_initial"]


def test_control_smoke_run_logs_episode_returns(cluster, mlflow_client):
    proc = cluster.job("value", "--config", "pipelines/configs/value_cartpole.yaml", "--smoke", "agent.loss=huber")
    run_id = _run_id(proc.stdout)
    m = mlflow_client.get_run(run_id).data.metrics
    assert m["return/episodes"] >= 5 and m["control/diverged"] == 0 and m["return/final"] > 0
    assert len(mlflow_client.get_metric_history(run_id, "return/episode")) == m["return/episodes"]


@pytest.mark.parametrize("override,message", [
    ("agent.algorithm=qrc", "agent.algorithm: random_walk is a prediction (td, gtd2, tdc) task, not qrc"),
    ("agent.loss=huber", "agent.loss: td has no Bellman-error estimator h"),
    ("env.states=4", "env.states: the random walk needs an odd number of states"),
    ("agent.alpha=0", "agent.alpha: Input should be greater than 0"),
])
def test_bad_settings_exit_2_naming_the_key(cluster, override, message):
    extra = ["agent.algorithm=td"] if "loss" in override else []
    proc = cluster.job("value", "--config", RANDOM_WALK, *extra, override, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]


def test_stepsize_sweep_reports_sensitivity_curves_and_range_comparisons(cluster, mlflow_client, tmp_path):
    cfg = yaml.safe_load((REPO / "pipelines/configs/claims/robust_bellman.yaml").read_text())
    cfg.update(experiment="ci-robust-bellman", results_dir=str(tmp_path), seeds=[0, 1],
               arms={k: cfg["arms"][k] for k in ("tdc", "gtd2", "gtd2_huber_tau0.1")},
               comparisons={"loss": {"gtd2_huber_tau0.1": "gtd2"}},
               grid={"env.outlier_prob": [0.01], "agent.alpha": [0.03125, 0.125]}, overrides=["steps=2000"])
    path = tmp_path / "robust_bellman.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = cluster.job("sweep", "--config", str(path))
    parent = re.search(r"\[sweep\] done: MLflow run (\w+)", proc.stdout).group(1)
    exp = mlflow_client.get_run(parent).info.experiment_id
    runs = mlflow_client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 3 * 2 * 2 and {r.data.tags["claim.cell"] for r in runs} == {
        "outlier_prob=0.01, alpha=0.03125", "outlier_prob=0.01, alpha=0.125"}
    report = (tmp_path / "robust_bellman.md").read_text()
    assert "## Sensitivity to `agent.alpha`" in report and (tmp_path / "robust_bellman-sensitivity.png").stat().st_size
    row = next(line for line in report.splitlines() if line.startswith("| gtd2_huber_tau0.1 | ") and "(" in line)
    # the range mean is the mean over the two stepsizes of the per-seed values logged by the runs
    vals = {}
    for r in runs:
        if r.data.tags["claim.arm"] == "gtd2_huber_tau0.1":
            vals.setdefault(int(r.data.tags["claim.seed"]), []).append(r.data.metrics["value/rmsve_final"])
    mean = sum(sum(v) / len(v) for v in vals.values()) / len(vals)
    assert f"| {mean:.4f} ± " in row
    assert "sensitivity" in {a.path.rsplit("-", 1)[-1].split(".")[0]
                             for a in mlflow_client.list_artifacts(parent, "report")}
