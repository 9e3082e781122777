"""The Ray Serve endpoint on the shared cluster: real HTTP, a model loaded from MLflow by alias."""
import json
import socket

import numpy as np
import pytest
import requests

from tests.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def endpoint(cluster, zero_runs):
    from ray import serve

    from pipelines.serve import ServeConfig, deploy

    url = deploy(ServeConfig(model_uri="models:/squeezenet-fashion@current", port=free_port(), block=False,
                             max_images=16))
    yield url
    serve.shutdown()


def test_classify_answers_with_probabilities_matching_the_model(endpoint):
    from pipelines.core.tracking import load_logged_model
    from tasks.common.batches import normalise
    from tasks.common.datasets import load_dataset

    data = load_dataset("fashion_mnist")
    images = data.test_x[:10, 0]
    r = requests.post(f"{endpoint}/classify", json={"images": images.tolist()}, timeout=60)
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert len(preds) == 10
    probs = np.array([p["probabilities"] for p in preds])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    model, spec, _ = load_logged_model("models:/squeezenet-fashion@current")
    import torch

    with torch.no_grad():
        expected = torch.softmax(model(normalise(images[:, None], spec["input"]["mean"], spec["input"]["std"])), 1)
    assert np.allclose(probs, expected.numpy(), atol=1e-5)
    assert [p["class"] for p in preds] == [spec["input"]["classes"][p["label"]] for p in preds]


@pytest.mark.parametrize("body,status,reason", [
    (b"", 400, "empty body"),
    (b"[1,2", 400, "not valid JSON"),
    (json.dumps({"pixels": []}).encode(), 422, "key \"images\""),
    (json.dumps({"images": [[[0.5] * 28] * 27]}).encode(), 422, "must be 28x28"),
    (json.dumps({"images": [[["a"] * 28] * 28]}).encode(), 422, "must be numbers"),
    (b'{"images": [[' + b",".join([b"[" + b",".join([b"Infinity"] * 28) + b"]"] * 28) + b"]]}", 422, "NaN or infinite"),
    (json.dumps({"images": [[[0] * 28] * 28] * 17}).encode(), 413, "17 images exceed the limit of 16"),
    (b"x" * (9 * 2**20), 413, "exceeds the limit"),
])
def test_bad_requests_get_a_4xx_json_reason(endpoint, body, status, reason):
    r = requests.post(f"{endpoint}/classify", data=body, timeout=60)
    assert r.status_code == status
    assert reason in r.json()["error"]


def test_health_info_and_loopback_binding(endpoint):
    assert requests.get(f"{endpoint}/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(f"{endpoint}/info", timeout=30).json()
    assert info["model"] == "squeezenet1_1" and info["bytes"] > 0 and info["input_shape"] == [1, 28, 28]
    host_ip = socket.gethostbyname(socket.gethostname())
    if not host_ip.startswith("127."):
        port = int(endpoint.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            socket.create_connection((host_ip, port), timeout=2).close()
