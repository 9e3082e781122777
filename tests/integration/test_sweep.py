"""Loss sweeps on Ray Tune: fit trials (each a real training run in its own process) logged as child
runs of one MLflow parent, run locally and through `ray job submit`; the fit job on its own."""
import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import BIN, REPO

pytestmark = pytest.mark.integration

BASE = "pipelines/configs/fit_tables.yaml"


def write_sweep(tmp_path, name: str, **fields) -> str:
    cfg = {"name": name, "job": "fit", "config": BASE, "experiment": f"ci-{name}", "results_dir": str(tmp_path),
           "seeds": [0, 1], **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def children(client, parent: str):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_loss_sweep_lands_paired_child_runs_and_a_report_computed_from_them(cluster, mlflow_client, tmp_path):
    path = write_sweep(tmp_path, "losses", overrides=["train.epochs=12"],
                       arms={"ce": [], "squentropy": ["losses={sq: {name: squentropy}}"]}, baseline="ce",
                       grid={"data.name": ["vehicle"]}, metrics=["test/ece", "test/ts/ece", "test/nll"])
    proc = cluster.job("sweep", "--config", path)
    parent = re.search(r"\[sweep\] done: MLflow run (\w+)", proc.stdout).group(1)

    runs = children(mlflow_client, parent)
    assert sorted((r.data.tags["claim.arm"], r.data.tags["claim.seed"], r.data.tags["claim.cell"]) for r in runs) == [
        ("ce", "0", "vehicle"), ("ce", "1", "vehicle"), ("squentropy", "0", "vehicle"), ("squentropy", "1", "vehicle")]
    for r in runs:
        m = r.data.metrics
        assert r.info.status == "FINISHED" and r.data.params["data.name"] == "vehicle"
        assert 0.4 < m["test/acc"] <= 1.0 and 0.0 <= m["test/ece"] < 1.0 and m["temperature"] > 0
        assert m["test/ts/acc"] == m["test/acc"]  # temperature scaling never changes the arg-max
        assert len(mlflow_client.get_metric_history(r.info.run_id, "train/loss")) == 12
        assert {a.path for a in mlflow_client.list_artifacts(r.info.run_id)} >= {"model", "reliability.png",
                                                                                 "config.yaml"}
    # the trial's loss is the arm's: squentropy's run logged its term, CE's its own
    terms = {r.data.tags["claim.arm"]: {k for k in r.data.metrics if k.startswith("train/loss/")} for r in runs}
    assert terms == {"ce": {"train/loss/ce"}, "squentropy": {"train/loss/sq"}}

    report = (tmp_path / "losses.md").read_text()
    acc = {(r.data.tags["claim.arm"], r.data.tags["claim.seed"]): r.data.metrics["test/acc"] for r in runs}
    assert f"| **ce** (baseline) | 2 | {(acc['ce', '0'] + acc['ce', '1']) / 2:.4f}" in report
    diff = ((acc["squentropy", "0"] - acc["ce", "0"]) + (acc["squentropy", "1"] - acc["ce", "1"])) / 2
    assert "| squentropy | 2 | " in report and f"{diff:+.4f}" in report
    assert {"report/losses.md", "report/losses-0.png"} <= {a.path for a in mlflow_client.list_artifacts(parent, "report")}

    # a trial is an ordinary fit run: the same config run alone reproduces its numbers exactly
    alone = cluster.job("fit", "--config", BASE, "data.name=vehicle", "train.epochs=12", "seed=1",
                        "experiment=ci-alone")
    run_id = re.search(r"\[fit\] done: MLflow run (\w+)", alone.stdout).group(1)
    assert mlflow_client.get_run(run_id).data.metrics["test/acc"] == acc["ce", "1"]


def test_binary_sweep_submitted_with_ray_job_submit(cluster, mlflow_client, tmp_path):
    """EnsLoss vs BCE on a real binary table, submitted to the cluster as a user would."""
    path = write_sweep(tmp_path, "binary", overrides=["train.epochs=10", "model.kwargs.batch_norm=true"],
                       arms={"bce": ["losses={bce: {name: bce}}"], "ensloss": ["losses={ens: {name: ensloss}}"]},
                       baseline="bce", grid={"data.name": ["sonar"]}, metrics=["test/ece"])
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": cluster.tracking_uri}}), "--",
           "python", "-m", "pipelines.sweep", "--config", path]
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    parent = re.search(r"\[sweep\] done: MLflow run (\w+)", out).group(1)
    runs = children(mlflow_client, parent)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    # single-score losses: the model has one output (a 60-256-256-1 MLP with BatchNorm)
    assert {r.data.metrics["model/parameters"] for r in runs} == {60 * 256 + 256 + 256 * 256 + 256 + 256 + 1 + 4 * 256}
    assert (tmp_path / "binary.md").exists()


@pytest.mark.parametrize("args,message", [
    (["--config", BASE, "data.name=nope"], "data.name: unknown dataset 'nope'"),
    (["--config", BASE, "losses={h: {name: hinge}}"], "losses: single-score binary losses need a two-class"),
    (["--config", BASE, "losses={x: {name: nope}}"], "losses: unknown loss 'nope'"),
    (["--config", BASE, "train.optimizer=dot"], "train.optimizer: dot optimises a distillation loss"),
])
def test_fit_config_errors_exit_2_naming_the_key(cluster, args, message):
    proc = cluster.job("fit", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr


def test_sweep_config_errors_name_the_arm_before_anything_runs(cluster, tmp_path):
    path = write_sweep(tmp_path, "bad", arms={"ce": [], "typo": ["losses={x: {name: squentroopy}}"]}, baseline="ce")
    proc = cluster.job("sweep", "--config", path, check=False)
    assert proc.returncode == 2
    assert "arms.typo: losses: unknown loss 'squentroopy'" in proc.stderr
    assert "[sweep]" not in proc.stdout  # no parent run, no trial
