"""Language modelling through the train job: a byte-level Llama on Jane Austen trained by Ray Train +
DeepSpeed (next-byte loss and accuracy per position), logged, then quantized from its MLflow run."""
import re

import pytest

pytestmark = pytest.mark.integration


def test_a_byte_lm_trains_under_deepspeed_and_quantizes_from_its_run(cluster, mlflow_client):
    proc = cluster.job("train", "--config", "pipelines/configs/byte_lm_austen.yaml", "--smoke",
                       "data.limit_train=128", "data.limit_eval=32", "data.max_length=64",
                       "model.kwargs={layers: 2, hidden: 32, heads: 2, kv_heads: 1, context: 64}",
                       "train.batch_size=16")
    run_id = re.search(r"\[train\] done: MLflow run (\w+)", proc.stdout).group(1)
    m = mlflow_client.get_run(run_id).data.metrics
    # next-byte prediction: accuracy is a fraction of positions, the loss below a uniform guess over 256 bytes
    assert 0 < m["val/acc"] < 1 and 0 < m["test/acc"] < 1
    assert m["val/loss"] < 5.545  # ln 256
    proc = cluster.job("quantize", "--config", "pipelines/configs/quantize_smollm2.yaml", "--smoke",
                       f"model=runs:/{run_id}/model", "method=rtn", "bits=4")
    qid = re.search(r"\[quantize\] done: MLflow run (\w+)", proc.stdout).group(1)
    q = mlflow_client.get_run(qid).data.metrics
    assert q["quantized/layers"] == 2 * 7 and q["quantized/perplexity"] > 1
    assert mlflow_client.get_run(qid).data.tags["model"] == f"runs:/{run_id}/model"
