"""The compress job end to end: a trained SqueezeNet from MLflow -> pruned, shared, Huffman-coded
artifact whose bytes are its real size, reloaded exactly, and served by the Ray Serve app."""
import re

import numpy as np
import pytest
import requests

from tests.conftest import free_port

pytestmark = pytest.mark.integration

CONFIG = "pipelines/configs/compress_squeezenet.yaml"


@pytest.fixture(scope="module")
def compressed(cluster, zero_runs):
    proc = cluster.job("compress", "--config", CONFIG, "--smoke", f"source=runs:/{zero_runs[0]}",
                       "run_name=compress-smoke")
    return re.search(r"\[compress\] done: MLflow run (\w+)", proc.stdout).group(1), proc.stdout


def test_stages_are_logged_with_real_bytes_and_the_file_decodes_to_the_shared_model(compressed, mlflow_client):
    run_id, stdout = compressed
    m = mlflow_client.get_run(run_id).data.metrics
    assert m["dense/bytes"] > m["pruned/bytes"] > m["shared/bytes"] > m["file/bytes"]
    assert m["compression/ratio"] == pytest.approx(m["dense/bytes"] / m["file/bytes"]) and m["compression/ratio"] > 5
    assert m["file/acc"] == m["shared/acc"]  # the job also checks prediction by prediction
    parts = sum(m[f"file/bytes_{k}"] for k in ("header", "codebooks", "codes", "gaps", "rest"))
    files = {a.path: a.file_size for a in mlflow_client.list_artifacts(run_id, "model")}
    assert set(files) == {"model/model.sqdc", "model/model.json"}
    assert files["model/model.sqdc"] == parts and sum(files.values()) == m["file/bytes"]
    assert 0.2 < m["compression/density"] < 0.5 and "| file |" in stdout


def test_the_compressed_artifact_is_served_and_answers_like_the_decoded_model(compressed):
    from ray import serve

    from pipelines.core.tracking import load_logged_model
    from pipelines.serve import ServeConfig, deploy
    from tasks.common.batches import normalise
    from tasks.common.datasets import load_dataset

    run_id, _ = compressed
    url = deploy(ServeConfig(model_uri=f"runs:/{run_id}", port=free_port(), block=False, max_images=16))
    try:
        images = load_dataset("fashion_mnist").test_x[:8, 0]
        r = requests.post(f"{url}/classify", json={"images": images.tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        labels = [p["label"] for p in r.json()["predictions"]]
        info = requests.get(f"{url}/info", timeout=30).json()
    finally:
        serve.shutdown()
    model, spec, _ = load_logged_model(f"runs:/{run_id}")
    assert spec["format"] == "deep_compression"
    import torch

    x = normalise(images[:, None], spec["input"]["mean"], spec["input"]["std"])
    with torch.no_grad():
        assert labels == model(x).argmax(1).tolist()
    assert info["bytes"] < 400_000  # the served artifact is the compressed one


def test_a_missing_source_exits_2_naming_the_key(cluster):
    proc = cluster.job("compress", "--config", CONFIG, "--smoke", "source=runs:/0123456789abcdef", check=False)
    assert proc.returncode == 2 and "source: cannot load" in proc.stderr, proc.stderr[-1500:]
