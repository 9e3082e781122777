"""The KV-budget job end to end on a random tiny Llama (the smoke model): SqueezeAttention's budgets under
H2O (eager attention), the loss against the full cache's, the bytes kept, all in MLflow."""
import json
import re

import pytest

pytestmark = pytest.mark.integration

CONFIG = "pipelines/configs/kv_budget_smollm2.yaml"


def test_squeeze_budgets_keep_the_uniform_total_and_the_run_logs_the_loss_gap(cluster, mlflow_client):
    proc = cluster.job("kv_budget", "--config", CONFIG, "--smoke", "policy=h2o", "allocation=squeeze")
    run_id = re.search(r"\[kv\] done: MLflow run (\w+)", proc.stdout).group(1)
    m = mlflow_client.get_run(run_id).data.metrics
    assert m["kv/nll_gap"] == pytest.approx(m["kv/nll"] - m["full/nll"])
    assert m["kv/bytes"] < m["kv/bytes_full"] and 0 < m["kv/kept_fraction"] < 0.5
    budgets = json.load(open(mlflow_client.download_artifacts(run_id, "kv_budgets.json")))["budgets"]
    per_layer = m["kv/budget_per_layer"]  # 20% of a 48-token window
    assert all(sum(b) == per_layer * len(b) for b in budgets)  # the total is the uniform one, exactly


def test_a_prompt_as_long_as_the_window_is_a_config_error(cluster):
    proc = cluster.job("kv_budget", "--config", CONFIG, "--smoke", "prompt=48", check=False)
    assert proc.returncode == 2 and "prompt:" in proc.stderr and "Traceback" not in proc.stderr
