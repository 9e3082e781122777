"""The churn jobs as users run them, submitted with `ray job submit`: train a PnO model on the real Telco
table and register it, then batch-score a Parquet customer table with it on Ray Data (an actor pool),
bad rows included."""
import json

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

CHURN = "pipelines/configs/churn_telco.yaml"
SCORE = "pipelines/configs/score_telco.yaml"


@pytest.fixture(scope="module")
def churn_model(cluster, mlflow_client):
    proc = cluster.submit("churn", "--config", CHURN, "--smoke", "run_name=churn-smoke", "register_as=churn-ci")
    assert "[churn] done" in proc.stdout and "succeeded" in proc.stdout + proc.stderr
    return mlflow_client.get_model_version_by_alias("churn-ci", "current").run_id


def test_pno_model_is_trained_evaluated_in_money_and_logged(churn_model, mlflow_client):
    run = mlflow_client.get_run(churn_model)
    m = run.data.metrics
    assert run.data.tags["data.synthetic"] == "False" and run.data.tags["method"] == "pno"
    # money on the real test split: the model's own targeting beats contacting everyone, and no list
    # beats the hindsight-perfect one; MP is the best fraction, so at least the model's own choice
    assert m["test/profit_all"] < m["test/average_profit"] <= m["test/profit_hindsight"]
    assert m["test/average_profit"] <= m["test/mp"] + 1e-9
    assert 0.75 < m["test/auc"] < 1 and 0 < m["test/targeted"] < 1 and m["test/empc"] > 0
    names = {a.path for a in mlflow_client.list_artifacts(churn_model)}
    assert {"profit_curve.png", "model"} <= names
    files = {a.path for a in mlflow_client.list_artifacts(churn_model, "model")}
    assert files == {"model/model.json", "model/model.safetensors"}  # no pickle anywhere


def test_scoring_keeps_every_row_and_rejects_bad_ones_with_a_reason(cluster, churn_model, mlflow_client, tmp_path):
    out = tmp_path / "out"
    proc = cluster.submit("score", "--config", SCORE, "--smoke", "model=models:/churn-ci@current",
                          f"input={tmp_path / 'customers'}", f"output={out}", "make_input_rows=3000", "top=50")
    assert "3,000 rows in = " in proc.stdout
    scored, rejects = pd.read_parquet(out / "scored"), pd.read_parquet(out / "rejects")
    summary = json.loads((out / "summary.json").read_text())
    assert len(scored) + len(rejects) == 3000 == summary["rows_in"]
    assert len(rejects) == 6  # make_table breaks max(4, rows // 500) rows, one of four kinds each
    assert set(scored.customer_id).isdisjoint(rejects.customer_id)
    kinds = {r.split(":")[0] for r in rejects.reason}
    assert kinds == {"missing value", "wrong type", "unknown category", "invalid clv"}
    assert scored.churn_probability.between(0, 1).all()
    assert (scored.target == (scored.expected_profit > 0)).all()  # PnO targets by expected profit
    targets = pd.read_parquet(out / "targets.parquet")
    assert len(targets) == 50 and targets.expected_profit.is_monotonic_decreasing
    assert targets.expected_profit.iloc[-1] >= scored.expected_profit.nlargest(50).iloc[-1] - 1e-9
    run = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("churn").experiment_id],
                                    "tags.`squeezelab.job` = 'score'")[0]
    assert run.data.metrics["rejected"] == 6 and run.data.metrics["scored"] == len(scored)


def test_scoring_config_errors_name_the_key(cluster, churn_model, tmp_path):
    proc = cluster.job("score", "--config", SCORE, "model=models:/churn-ci@current",
                       f"input={tmp_path / 'nothing'}", f"output={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2 and "input: no such file or folder" in proc.stderr
    proc = cluster.job("score", "--config", SCORE, "model=models:/no-such-model@current",
                       f"input={tmp_path}", f"output={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2 and "model: cannot load" in proc.stderr
