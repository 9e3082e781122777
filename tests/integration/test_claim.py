"""A claim sweep end to end: Ray Tune trials that are real distil jobs, child runs under one MLflow
parent, and the report written from what MLflow holds."""
import re

import pytest
import yaml

pytestmark = pytest.mark.integration


def test_claim_sweep_runs_paired_trials_and_writes_the_report(cluster, mlflow_client, mlp_teacher, tmp_path):
    claim = {
        "name": "ci", "title": "CI claim", "paper": "none (machinery check)", "job": "distill",
        "config": "pipelines/configs/distill_mlp_fashion.yaml",
        # smaller than --smoke and two trials at a time on one worker each: the machinery is the point, and
        # four Ray Train trials one after the other (start-up bound) took two minutes of CI
        "overrides": [f"teacher.model_uri=runs:/{mlp_teacher}", f"scaling.storage_path={cluster.storage}",
                      "train.epochs=1", "data.limit_train=128", "data.limit_eval=64", "scaling.num_workers=1"],
        "max_concurrent": 2,
        "arms": {"kd": [], "ws": ["student.init=weight_squeezing"]}, "baseline": "kd",
        "metrics": ["train/kd"], "results_dir": str(tmp_path),
    }
    path = tmp_path / "ci.yaml"
    path.write_text(yaml.safe_dump(claim))
    proc = cluster.job("claim", "--config", str(path), "--smoke")  # the sweep job under its first name
    parent = re.search(r"\[sweep\] done: MLflow run (\w+)", proc.stdout).group(1)

    children = mlflow_client.search_runs([mlflow_client.get_run(parent).info.experiment_id],
                                         filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted((r.data.tags["claim.arm"], r.data.tags["claim.seed"]) for r in children) == [
        ("kd", "0"), ("kd", "1"), ("ws", "0"), ("ws", "1")]
    assert all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in children)
    # the same seed gives the same data order and initial student in every arm: the pairing is real
    assert {r.data.params["seed"] for r in children} == {"0", "1"}

    report = (tmp_path / "ci-smoke.md").read_text()
    assert "smoke run: tiny data, not evidence" in report
    accs = {(r.data.tags["claim.arm"], r.data.tags["claim.seed"]): r.data.metrics["test/acc"] for r in children}
    ws_mean = (accs[("ws", "0")] + accs[("ws", "1")]) / 2
    assert f"| ws | 2 | {ws_mean:.4f}" in report  # the table is computed from the logged runs
    for r in children:
        assert r.info.run_id in report
    assert (tmp_path / "ci-smoke-0.png").stat().st_size > 1000
    arts = {a.path for a in mlflow_client.list_artifacts(parent, "report")}
    assert {"report/ci-smoke.md", "report/ci-smoke-0.png"} <= arts
