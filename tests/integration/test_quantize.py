"""The quantize job end to end on a random tiny Llama (the smoke model): Fisher, SqueezeLLM with the
dense-and-sparse part, the packed artifact logged to MLflow with its real bytes, reloaded and generating;
submitted with ``ray job submit`` as a user would."""
import json
import re
import struct

import pytest
import torch

pytestmark = pytest.mark.integration

CONFIG = "pipelines/configs/quantize_smollm2.yaml"


def _safetensors_sizes(path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, from its header (what the file really holds)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def quantized(cluster):
    proc = cluster.submit("quantize", "--config", CONFIG, "--smoke", "run_name=quantize-smoke")
    return re.search(r"\[quantize\] done: MLflow run (\w+)", proc.stdout).group(1), proc.stdout


def test_submitted_run_logs_perplexity_bits_and_a_packed_artifact_of_its_real_size(quantized, mlflow_client):
    from mlflow.artifacts import download_artifacts

    from tasks.packed_lm import load_packed_lm
    from tasks.squeezellm import PACKED_KEYS

    run_id, stdout = quantized
    m = mlflow_client.get_run(run_id).data.metrics
    assert m["quantized/perplexity"] > 0 and m["reference/perplexity"] > 0
    assert m["quantized/ppl_gap"] == pytest.approx(m["quantized/perplexity"] / m["reference/perplexity"] - 1)
    assert m["time/fisher_s"] > 0  # squeezellm needs the Fisher diagonal
    # the black-box loss from draws only: the floor is the reference against itself (Brier < 0)
    assert m["blackbox/power_reference"] < 0 and m["blackbox/sq_distance_exact"] >= 0
    assert abs(m["blackbox/power_gap"] - m["blackbox/sq_distance_exact"]) < 5 * m["blackbox/power_gap_se"] + 1e-3
    local = download_artifacts(run_id=run_id, artifact_path="model", tracking_uri=mlflow_client.tracking_uri)
    files = {a.path: a.file_size for a in mlflow_client.list_artifacts(run_id, "model")}
    assert sum(files.values()) == m["artifact/bytes"]
    # effective bits = every byte the packed layers hold in the file (codes, tables, sparse part) per weight
    sizes = _safetensors_sizes(f"{local}/model.safetensors")
    packed = sum(v for k, v in sizes.items() if k.rsplit(".", 1)[-1] in PACKED_KEYS)
    assert 8 * packed / m["quantized/weights"] == pytest.approx(m["bits/effective"], rel=1e-9)
    assert 3 < m["bits/effective"] < 8  # 3-bit codes + tables + the 0.5% sparse part of tiny layers
    # the tied embedding is stored once, in float16
    assert sizes["model.embed_tokens.weight"] == 2 * 256 * 64 and "lm_head.weight" not in sizes

    model, tokenizer, spec = load_packed_lm(local)
    assert spec["quantization"]["method"] == "squeezellm" and spec["quantization"]["bits"] == 3
    assert model.lm_head.weight is model.model.embed_tokens.weight  # re-tied
    from tasks.llm import ByteTokenizer, generate

    tok = ByteTokenizer()
    prompt = torch.tensor(tok("The capital of Italy is")["input_ids"])
    tokens, _ = generate(model, prompt, 8)
    sample = mlflow_client.download_artifacts(run_id, "sample.txt")
    assert open(sample).read() == "The capital of Italy is" + tok.decode(tokens.tolist()) + "\n"
    assert "reference perplexity" in stdout and "effective bits" in stdout


def test_a_config_error_exits_2_naming_the_key(cluster):
    # more text than the novel holds is found only once the job reads it (field checks: tests/unit/test_config.py)
    proc = cluster.job("quantize", "--config", CONFIG, "--smoke", "eval.windows=100000", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "eval" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def text_endpoint(quantized):
    from ray import serve

    from pipelines.serve import ServeConfig, deploy
    from tests.conftest import free_port

    url = deploy(ServeConfig(model_uri=f"runs:/{quantized[0]}", port=free_port(), block=False, max_new_tokens=16,
                             max_prompt_tokens=64))
    yield url
    serve.shutdown()


def test_the_packed_model_serves_greedy_text_equal_to_local_generation(text_endpoint, quantized, mlflow_client):
    import requests
    from mlflow.artifacts import download_artifacts

    from tasks.llm import ByteTokenizer, generate
    from tasks.packed_lm import load_packed_lm

    r = requests.post(f"{text_endpoint}/generate", json={"prompt": "The capital of Italy is", "max_new_tokens": 12},
                      timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    local = download_artifacts(run_id=quantized[0], artifact_path="model", tracking_uri=mlflow_client.tracking_uri)
    model, _, _ = load_packed_lm(local)
    tok = ByteTokenizer()
    tokens, _ = generate(model, torch.tensor(tok("The capital of Italy is")["input_ids"]), 12)
    assert out["text"] == tok.decode(tokens.tolist()) and out["tokens"] == 12 and out["finished"] == "length"
    assert out["kv"]["bytes"] == out["kv"]["bytes_full"]  # the full cache
    info = requests.get(f"{text_endpoint}/info", timeout=30).json()
    assert (info["method"], info["bits"]) == ("squeezellm", 3) and info["bytes"] > 0


def test_a_squeezed_kv_cache_keeps_its_total_budget_and_fewer_bytes(text_endpoint):
    import requests

    r = requests.post(f"{text_endpoint}/generate", timeout=120, json={
        "prompt": "It is a truth universally acknowledged, that a single man", "max_new_tokens": 16,
        "kv": {"policy": "streaming_llm", "budget": 12, "allocation": "squeeze"}})
    assert r.status_code == 200, r.text
    kv = r.json()["kv"]
    assert sum(kv["budgets"]) == 12 * len(kv["budgets"]) and len(set(kv["budgets"])) > 1
    assert kv["bytes"] < kv["bytes_full"]


@pytest.mark.parametrize("body, status, reason", [
    ({"prompt": "Hi", "max_new_tokens": 17}, 422, "max_new_tokens: must be 1..16"),
    ({"prompt": "x" * 65}, 413, "65 tokens exceed the limit of 64"),
    ({"prompt": "Hi", "kv": {"policy": "streaming_llm", "budget": 2}}, 422, "kv.budget"),
])
def test_bad_generate_requests_get_a_4xx_json_reason(text_endpoint, body, status, reason):
    import requests

    r = requests.post(f"{text_endpoint}/generate", json=body, timeout=60)
    assert r.status_code == status and reason in r.json()["error"], r.text
