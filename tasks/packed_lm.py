"""A quantized causal LM as files: packed linear layers, everything else in float16, config and tokenizer.

The artifact ``pipelines.quantize`` writes and ``pipelines.serve`` loads (a directory, no pickle):

    model.json         {"model": "packed_lm", "format": "squeezellm_packed", "architecture": ..., "tied": {...},
                        "quantization": {...}, ...}: what it is and how it was made
    model.safetensors  every QuantLinear's packed tensors (tasks/squeezellm.py: b-bit codes, float16 look-up
                       tables, CSR float16 sparse part) and every other parameter and buffer in float16
    config.json        the transformers config the architecture is rebuilt from (no weights downloaded)
    tokenizer files    as ``tokenizer.save_pretrained`` writes them (none for a byte-level model)

Its bytes on disk are the model's real size. The non-quantized tensors (embeddings, norms, a head) are
stored in float16 as in the paper's baselines; ``round_unpacked_`` applies the same rounding to a model in
memory, so the model a job evaluates is bit for bit the one the files rebuild. A weight two modules share
(tied input and output embeddings) is stored once and re-tied on load (``tied`` in model.json).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasks.common.model_io import SPEC, WEIGHTS, read_spec, write_spec
from tasks.squeezellm import PACKED_KEYS, QuantLinear, load_packed_state, packed_state

FORMAT = "squeezellm_packed"
STORED_DTYPE = torch.float16  # non-quantized tensors, as the paper's fp16 baseline stores them


def _packed_names(model: torch.nn.Module) -> set[str]:
    """State-dict keys that belong to a QuantLinear's packed buffers (kept exactly as they are)."""
    return {f"{name}.{key}" for name, m in model.named_modules() if isinstance(m, QuantLinear) for key in PACKED_KEYS}


def round_unpacked_(model: torch.nn.Module) -> torch.nn.Module:
    """Round every floating parameter and buffer outside the packed layers to float16 precision, in place
    (the values ``save_packed_lm`` stores), keeping their dtype. Returns the model."""
    packed = _packed_names(model)
    with torch.no_grad():
        for name, t in list(model.state_dict(keep_vars=True).items()):
            if name not in packed and t.is_floating_point():
                t.copy_(t.to(STORED_DTYPE).to(t.dtype))
    return model


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{key: first key with the same storage} for tensors the state dict lists twice (tied weights)."""
    first: dict[tuple[Any, ...], str] = {}
    out = {}
    for key, t in state.items():
        if not t.numel():  # empty tensors may all report the same address without sharing anything
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.dtype)
        if ident in first:
            out[key] = first[ident]
        else:
            first[ident] = key
    return out


def save_packed_lm(model, directory: str | Path, tokenizer=None, **meta: Any) -> Path:
    """Write the artifact of a causal LM whose linears ``quantize_model`` replaced; returns the directory.
    ``meta`` goes into model.json (how it was quantized, the base model, the evaluation corpus)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    live = model.state_dict()
    tied = _aliases(live)
    packed = _packed_names(model)
    state = {k: (v if k in packed or not v.is_floating_point() else v.to(STORED_DTYPE))
             for k, v in packed_state(model).items() if k not in tied}
    save_file(state, str(directory / WEIGHTS))
    model.config.save_pretrained(str(directory))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    return write_spec(directory, "packed_lm", {}, format=FORMAT, architecture=model.config.model_type,
                      tied=tied, packed_layers=sorted(k[: -len(".meta")] for k in packed if k.endswith(".meta")),
                      **meta)


def load_packed_lm(directory: str | Path, tokenizer: bool = True):
    """(model in eval mode with QuantLinear layers, tokenizer or None, model.json spec) from
    ``save_packed_lm``'s files. The architecture is built from config.json; nothing is downloaded."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as tf

    directory = Path(directory)
    spec = read_spec(directory)
    if spec.get("format") != FORMAT:
        raise ValueError(f"{directory / SPEC} describes a {spec.get('format') or spec.get('model')!r}, "
                         f"not a packed LM ({FORMAT})")
    from accelerate import init_empty_weights

    config = tf.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    # parameters on the meta device (no float32 skeleton: ~540 MB for SmolLM2 that the packed model
    # would never use), buffers on the CPU: the rotary embedding's non-persistent inv_freq is in no file
    with init_empty_weights(include_buffers=False):
        model = tf.AutoModelForCausalLM.from_config(config)
    state = load_file(str(directory / WEIGHTS))
    packed = {k for k in state if k.rsplit(".", 1)[-1] in PACKED_KEYS and k.rsplit(".", 1)[0] + ".meta" in state}
    floats = {k: (v if k in packed or not v.is_floating_point() else v.to(torch.float32)) for k, v in state.items()}
    for alias, source in spec.get("tied", {}).items():
        floats[alias] = floats[source]
    load_packed_state(model, floats, assign=True)
    model.tie_weights()  # the same Parameter again where the config ties them
    tok = None
    if tokenizer and (directory / "tokenizer_config.json").exists():
        tok = tf.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return model.eval(), tok, spec

