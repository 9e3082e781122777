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


@pytest.mark.parametrize("args, key", [
    (["bits=9"], "bits"),
    (["eval.text=austen:ulysses"], "eval.text"),
    (["eval.windows=100000"], "eval"),
])
def test_config_errors_exit_2_naming_the_key(cluster, args, key):
    proc = cluster.job("quantize", "--config", CONFIG, "--smoke", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert key in proc.stderr and "Traceback" not in proc.stderr
