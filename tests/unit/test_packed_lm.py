import json

import pytest
import torch
from safetensors.torch import load_file

from tasks.common.model_io import SPEC
from tasks.llm import tiny_llama
from tasks.packed_lm import load_packed_lm, round_unpacked_, save_packed_lm
from tasks.squeezellm import QuantLinear, quantize_model


@pytest.mark.parametrize("method, extra", [("rtn", {}), ("kmeans", {"outlier_pct": 1.0})])
def test_artifact_rebuilds_the_quantized_model_bit_for_bit(tmp_path, method, extra):
    model = tiny_llama(vocab_size=96, seed=1)
    stats = quantize_model(model, bits=3, method=method, **extra)
    round_unpacked_(model)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(input_ids=x).logits
    save_packed_lm(model, tmp_path, base="tiny", quantization={"method": method, "bits": 3})
    back, tok, spec = load_packed_lm(tmp_path)
    assert tok is None and spec["quantization"] == {"method": method, "bits": 3}
    with torch.inference_mode():
        assert torch.equal(back(input_ids=x).logits, want)
    layers = [n for n, m in back.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(layers) == sorted(stats["layers"]) == spec["packed_layers"]
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tied again, stored once
    # built with its parameters on the meta device: every tensor must now be real, and the rotary
    # embedding's inv_freq (in no file) computed, not left empty
    assert not any(t.is_meta for t in [*back.parameters(), *back.buffers()])
    assert torch.equal(back.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in stored and stored["model.embed_tokens.weight"].dtype == torch.float16
    assert spec["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_rounding_keeps_packed_buffers_and_dtype_and_is_idempotent():
    model = tiny_llama(vocab_size=64, seed=2)
    quantize_model(model, bits=4, method="rtn")
    luts = {n: m.lut.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    round_unpacked_(model)
    norm = model.model.norm.weight
    assert norm.dtype == torch.float32 and torch.equal(norm, norm.half().float())
    once = {k: v.clone() for k, v in model.state_dict().items()}
    round_unpacked_(model)
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m.lut, luts[n]) for n, m in model.named_modules() if isinstance(m, QuantLinear))


def test_loading_anything_else_is_a_clear_error(tmp_path):
    (tmp_path / SPEC).write_text(json.dumps({"model": "squeezenet1_1", "kwargs": {}}))
    with pytest.raises(ValueError, match="not a packed LM"):
        load_packed_lm(tmp_path)
