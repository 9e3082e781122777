"""A byte-level Llama trained from scratch on Jane Austen: the second model of the quantization and KV-cache
experiments (issue 5, part 4).

SmolLM2-135M's only offline copy was stored at 4 bits (tasks/llm.py), so its float32 weights already
lie on a 4-bit grid and flatter 4-bit quantization. This model's weights are trained here, in float32,
by the train job (Ray Train + DeepSpeed), so nothing about them favours one quantization grid:

    python -m pipelines.train --config pipelines/configs/byte_lm_austen.yaml

- ``austen_bytes`` (a registered dataset): the UTF-8 bytes of five novels from Debian
  ``r-cran-janeaustenr`` for training, Persuasion held out (its first half validation, its second half
  test), cut into non-overlapping windows of ``context + 1`` bytes: x = the first ``context`` bytes, y =
  the next byte at every position. Real text, no labels to invent.
- ``byte_lm`` (a registered model): ``LlamaForCausalLM`` from a config (RMSNorm, SwiGLU, RoPE, grouped
  KV heads, tied embeddings; vocabulary 256). Its forward returns the logits as [batch, vocab, positions]
  so that the train job's classification code (cross-entropy over dim 1, arg-max over dim 1) is
  next-byte prediction with no special case; ``.lm`` is the transformers model the LM jobs
  (perplexity, generation, quantization) use directly.
Not a paper's method: a small model of the same family as SmolLM2, for a second, clean data point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tasks.common.datasets import ImageSplits
from tasks.common.registry import register_dataset, register_model

VOCAB = 256  # bytes
HELD_OUT = "persuasion"  # also the SmolLM2 evaluation text of pipelines.quantize
BYTE_NAMES = tuple(f"0x{b:02x}" for b in range(VOCAB))  # the "classes": one per next byte


@dataclass(frozen=True)
class LMSplits(ImageSplits):
    """Windows of token ids, int64: x [N, context] and y [N, context] (y[:, t] follows x[:, t]). The split
    layout of the image sets (input_shape = (context,); one class per byte value), without normalisation."""


def _windows(data: bytes, context: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.frombuffer(data, dtype=np.uint8)
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(f"{len(ids)} bytes make no window of {context} + 1")
    x = ids[: n * context].reshape(n, context).astype(np.int64)
    y = ids[1: n * context + 1].reshape(n, context).astype(np.int64)
    return x, y


@dataclass(frozen=True)
class AustenBytes:
    """What ``lookup("dataset", "austen_bytes")()`` returns: the novels, split into windows on demand."""
    texts: dict[str, str]
    kind: str = "lm"
    source: str = "Debian r-cran-janeaustenr (Jane Austen's six novels, public domain)"

    def splits(self, context: int, seed: int = 0) -> LMSplits:
        """Train on every novel but ``HELD_OUT`` (windows in a seed-shuffled order), validate on the first
        half of ``HELD_OUT``, test on its second half."""
        train = [_windows(t.encode("utf-8"), context) for n, t in sorted(self.texts.items()) if n != HELD_OUT]
        x, y = np.concatenate([a for a, _ in train]), np.concatenate([b for _, b in train])
        order = np.random.default_rng(seed).permutation(len(x))
        held = self.texts[HELD_OUT].encode("utf-8")
        vx, vy = _windows(held[: len(held) // 2], context)
        tx, ty = _windows(held[len(held) // 2:], context)
        return LMSplits("austen_bytes", BYTE_NAMES, x[order], y[order], vx, vy, tx, ty, source=self.source)


@register_dataset("austen_bytes")
def austen_bytes() -> AustenBytes:
    from tasks.llm import austen_texts

    return AustenBytes(austen_texts())


class ByteLM(nn.Module):
    """A Llama over bytes whose forward gives logits [batch, vocab, positions] (see the module docstring)."""

    def __init__(self, num_classes: int = VOCAB, layers: int = 4, hidden: int = 128, heads: int = 4,
                 kv_heads: int = 2, context: int = 256):
        super().__init__()
        from tasks.llm import _offline_transformers

        tf = _offline_transformers()
        config = tf.LlamaConfig(vocab_size=num_classes, hidden_size=hidden, intermediate_size=int(8 * hidden / 3),
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                max_position_embeddings=context, tie_word_embeddings=True, bos_token_id=None,
                                eos_token_id=None, pad_token_id=None)
        self.lm = tf.LlamaForCausalLM(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=x, use_cache=False).logits.transpose(1, 2)


@register_model("byte_lm")
def byte_lm(num_classes: int = VOCAB, layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
            context: int = 256) -> ByteLM:
    """Defaults: 4 layers of width 128 (SwiGLU 341), 4 heads over 2 KV heads: ~0.8M parameters, trainable
    on 2 CPU cores in minutes."""
    return ByteLM(num_classes, layers, hidden, heads, kv_heads, context)


byte_lm.input_kind = "bytes"  # token ids in, one prediction per position out (tests/unit/test_registry.py)
