"""SqueezeAttention: layer-wise KV-cache budgets from how much each attention layer changes the residual stream.

Wang, Cui, Gan, "SqueezeAttention: 2D Management of KV-Cache in LLM Inference via Layer-wise Optimal
Budget", 2024 (arXiv 2404.04793; code: github.com/hetailang/SqueezeAttention).

Implements:
- Layer importance at the prefill: for decoder layer l with residual input x_l (before ``input_layernorm``)
  and h_l = x_l + Attn_l(RMSNorm(x_l)) (after the attention residual add, before the MLP),
  ``cos_l = mean over prompt tokens of cosine(x_l[t], h_l[t])`` (``layer_importance``). A high cosine
  means attention changed the stream little: the layer is *less* important.
- Grouping: k-means with 3 clusters over the L scalars; the cluster with the highest centre is the
  unimportant group G3, the other two (G1 + G2) the important ones (``group_layers``).
- Reallocation at a constant total (``squeeze_allocate``, ``squeeze_budgets``): G3 gets ``p`` times the
  uniform budget, the freed entries are shared by G1 + G2, so that the sum over layers of kept KV entries
  is exactly ``num_layers * uniform_budget``.
- Any sequence-wise eviction policy then runs per layer with its own budget: ``SlidingWindow`` and
  ``StreamingLLM`` from ``tasks.llm``, and ``H2O`` (heavy hitters + recent tokens) here.
  ``SqueezeAttentionBudget`` is a ``tasks.llm.KVPolicy`` that does all of the above inside
  ``tasks.llm.generate``: importance from hooks during the real prefill, budgets at step 0, then pruning.
- The random-reallocation control (``random_budgets``: the same budgets assigned to layers at random) and
  the evaluation used for the claim (``kv_budget_loss``: teacher-forced next-token NLL while decoding token
  by token with the pruned cache; memory in bytes from ``tasks.llm.kv_cache_bytes``).

Departs from the paper and its code:
- Budgets are integer KV entries, not fractions of the prompt: ``p`` is G3's budget as a fraction of the
  *uniform* budget (the code's ``KV_class3 / ini_size``; its README uses 0.25 / 0.4 = 0.625 for
  LLaMA + StreamingLLM and 0.08 / 0.21 = 0.38 for Mistral + sliding window; default here 0.625, the Llama
  example). Rounding leftovers go one entry each to the most important G1 + G2 layers (lowest cosine,
  then lowest index), so the total is conserved exactly; every layer keeps >= ``min_budget``.
- k-means is the exact optimum of the 1-D problem (dynamic programming over the sorted distinct values,
  weighted by multiplicity) instead of sklearn's Lloyd iterations: deterministic, never splits equal
  values, and its within-cluster sum of squares is <= sklearn's. With one distinct cosine there is nothing
  to reallocate and every layer gets the uniform budget; with two, the higher one is G3.
- The cosine is averaged over every token of every row of the batch (the code uses row 0 only); with the
  batch of one that both use, they agree.
- The code's StreamingLLM caches pre-RoPE keys and re-rotates them at their in-cache positions;
  ``tasks.llm`` keeps absolute positions (see its docstring). The two agree within the model's context.
- H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
  NeurIPS 2023, arXiv 2306.14048) is in the paper but its integration was never released. Here the
  accumulated attention of every cached key is read from the attention weights that transformers' eager
  attention returns (forward hooks on each layer's ``self_attn``; the model must be built with
  ``attn_implementation="eager"``; sdpa does not return weights). Scores are summed over the prefill's
  queries and every decoded query, and over the query heads that share a KV head (GQA), and tokens are
  chosen per KV head, as H2O chooses them per head. A layer with budget b keeps its ``recent`` newest
  tokens (``round(recent_fraction * b)``, half by default as in H2O) and the ``b - recent`` older tokens
  with the largest accumulated attention (ties: the earlier token).

    from tasks.llm import tiny_llama, generate
    from tasks.squeeze_attention import SqueezeAttentionBudget, kv_budget_loss, squeeze_budgets, random_budgets
    model = tiny_llama(layers=6, attn_implementation="eager")
    policy = SqueezeAttentionBudget("h2o", total_fraction=0.2)
    with policy.attached(model):                      # hooks: importance at the prefill, H2O's scores
        new, stats = generate(model, prompt_ids, 32, kv_policy=policy)
    print(policy.budgets, stats["kv_bytes"])
    budgets = lambda ids: squeeze_budgets(model, ids, uniform_budget=26, p=0.625, min_budget=5)
    print(kv_budget_loss(model, windows, 128, budgets, "streaming_llm")["nll"])
"""
from __future__ import annotations

import contextlib
import math
import random
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tasks.llm import (
    FullCache,
    KVPolicy,
    SlidingWindow,
    StepInfo,
    StreamingLLM,
    decode_step,
    kv_cache_bytes,
    kv_cache_lengths,
)

DEFAULT_P = 0.625        # G3 budget / uniform budget: README's LLaMA2 + StreamingLLM run, KV_class3 0.25 / ini_size 0.4
DEFAULT_SINKS = 4        # StreamingLLM attention sinks, the code's --start_size 4
DEFAULT_RECENT = 0.5     # H2O: half recent, half heavy hitters (the H2O paper's split)
NUM_GROUPS = 3           # KMeans(n_clusters=3) in the code
POLICIES = ("sliding_window", "streaming_llm", "h2o")


def _decoder_layers(model) -> list:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no decoder .layers")
    for layer in layers:
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn"):
            if not hasattr(layer, name):
                raise TypeError(f"{type(layer).__name__} lacks {name}: not a pre-norm Llama-style decoder layer")
    return list(layers)


# --- layer importance ---------------------------------------------------------------------------------

class _ImportanceHooks:
    """Forward pre-hooks that record, per decoder layer, the mean cosine between the residual stream entering
    attention (the input of ``input_layernorm``) and the stream after the attention residual add (the input
    of ``post_attention_layernorm``). Every forward overwrites the record: read it after the prefill."""

    def __init__(self, model):
        self.layers = _decoder_layers(model)
        n = len(self.layers)
        self.similarity: list[float | None] = [None] * n
        self.tokens = [0] * n           # query tokens of the forward that was recorded
        self._x: list[torch.Tensor | None] = [None] * n
        self._handles: list = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.input_layernorm.register_forward_pre_hook(partial(self._before, i)))
            self._handles.append(layer.post_attention_layernorm.register_forward_pre_hook(partial(self._after, i)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._x = [None] * len(self.layers)

    def _before(self, i, module, args):
        self._x[i] = args[0]  # x_l

    def _after(self, i, module, args):
        x, h = self._x[i], args[0]  # h_l = x_l + Attn_l(RMSNorm(x_l))
        self._x[i] = None
        cos = F.cosine_similarity(x.double(), h.double(), dim=-1)  # [batch, tokens]; float64: a zero update gives 1
        self.similarity[i] = float(cos.mean().clamp(-1.0, 1.0))
        self.tokens[i] = x.shape[1]

    def result(self, tokens: int | None = None) -> torch.Tensor:
        if any(s is None for s in self.similarity):
            raise RuntimeError("no forward pass was recorded; run the prefill inside the hooks")
        if tokens is not None and any(t != tokens for t in self.tokens):
            raise RuntimeError(f"the last recorded forward had {self.tokens} tokens per layer, "
                               f"not the prompt's {tokens}")
        return torch.tensor(self.similarity, dtype=torch.float64)


def layer_importance(model, input_ids: torch.Tensor) -> torch.Tensor:
    """cos_l per decoder layer, float64 [num_layers] in [-1, 1], from one forward of ``input_ids``
    ([batch, tokens] or [tokens]): lower = attention changed the residual stream more = more important."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
    device = next(model.parameters()).device
    with _ImportanceHooks(model) as hooks, torch.inference_mode():
        model(input_ids=ids.to(device), use_cache=False)
        return hooks.result(ids.shape[1])


# --- grouping and reallocation ------------------------------------------------------------------------

def kmeans_1d(values: Sequence[float], k: int = NUM_GROUPS) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-means of scalars: (labels [n], centres [k']) with clusters numbered by increasing centre and
    k' = min(k, number of distinct values). Dynamic programming over the sorted distinct values weighted by
    their counts (an optimal 1-D clustering is a set of contiguous runs); ties go to the earlier split."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"need finite values, got {v}")
    u, counts = np.unique(v, return_counts=True)
    m, kk = len(u), min(k, len(u))
    c = u - u.mean()  # centred: the prefix-sum variance formula loses less precision
    w = np.concatenate([[0.0], np.cumsum(counts)])
    s1 = np.concatenate([[0.0], np.cumsum(counts * c)])
    s2 = np.concatenate([[0.0], np.cumsum(counts * c * c)])

    def sse(i, j):  # within-cluster sum of squares of distinct values i..j-1
        n = w[j] - w[i]
        return max(0.0, (s2[j] - s2[i]) - (s1[j] - s1[i]) ** 2 / n)

    cost = np.full((kk + 1, m + 1), np.inf)
    split = np.zeros((kk + 1, m + 1), dtype=int)
    cost[0, 0] = 0.0
    for g in range(1, kk + 1):
        for j in range(g, m + 1):
            for i in range(g - 1, j):
                total = cost[g - 1, i] + sse(i, j)
                if total < cost[g, j]:  # strict: the earliest split wins a tie
                    cost[g, j], split[g, j] = total, i
    label_of_unique = np.zeros(m, dtype=int)
    j = m
    for g in range(kk, 0, -1):
        i = split[g, j]
        label_of_unique[i:j] = g - 1
        j = i
    labels = label_of_unique[np.searchsorted(u, v)]
    centres = np.array([v[labels == g].mean() for g in range(kk)])
    return labels, centres


def group_layers(similarity: Sequence[float], k: int = NUM_GROUPS) -> np.ndarray:
    """Cluster label per layer, 0 = lowest cosine (most important) ... k'-1 = the unimportant group G3."""
    return kmeans_1d(similarity, k)[0]


def squeeze_allocate(similarity: Sequence[float], uniform_budget: int, p: float = DEFAULT_P,
                     min_budget: int = 1, max_budget: int | None = None) -> list[int]:
    """Integer KV budget per layer with the same total as ``uniform_budget`` on every layer.

    G3 (the highest-cosine cluster) gets ``floor(p * uniform_budget + 0.5)`` entries, clamped to
    [``min_budget``, ``uniform_budget``] (``p`` is b_G3 / b_init in the paper's terms); the other layers share
    the rest equally, the remainder going one entry each to the lowest-cosine layers (then lowest index).
    ``max_budget``: the most entries a layer can ever hold (the sequence length). When G3 is most of the
    layers, the few others would be given more than that and the surplus would be lost, the total kept
    falling below the uniform one; it is handed on instead, in equal shares, to the layers below the cap
    (in the same order), so that the total stays the uniform one."""
    sim = np.asarray(similarity, dtype=np.float64).reshape(-1)
    n, budget = len(sim), int(uniform_budget)
    if n == 0:
        raise ValueError("no layers")
    if budget < min_budget:
        raise ValueError(f"uniform budget {budget} < min_budget {min_budget}")
    if not 0 <= p:
        raise ValueError(f"p must be >= 0, got {p}")
    labels = group_layers(sim)
    g3 = labels == labels.max()
    if g3.all():  # one distinct cosine: no group is less important than another
        return [budget] * n
    b3 = min(budget, max(min_budget, math.floor(p * budget + 0.5)))
    rest = n * budget - int(g3.sum()) * b3
    others = sorted(np.flatnonzero(~g3).tolist(), key=lambda i: (sim[i], i))
    share, extra = divmod(rest, len(others))
    out = [b3] * n
    for rank, i in enumerate(others):
        out[i] = share + (1 if rank < extra else 0)
    return out if max_budget is None else _cap_budgets(out, int(max_budget), sorted(range(n), key=lambda i: (sim[i], i)))


def _cap_budgets(budgets: list[int], cap: int, order: list[int]) -> list[int]:
    """Water-filling: no budget above ``cap``; what is cut goes in equal shares (remainder by ``order``) to
    the layers still below it, until none is over or every layer is at the cap."""
    out = list(budgets)
    while (surplus := sum(max(0, b - cap) for b in out)) > 0:
        out = [min(b, cap) for b in out]
        free = [i for i in order if out[i] < cap]
        if not free:
            break
        share, extra = divmod(surplus, len(free))
        for rank, i in enumerate(free):
            out[i] += share + (1 if rank < extra else 0)
    return out


def squeeze_budgets(model, prompt_ids: torch.Tensor, uniform_budget: int, p: float = DEFAULT_P,
                    min_budget: int = 1, max_budget: int | None = None) -> list[int]:
    """``squeeze_allocate`` of ``layer_importance(model, prompt_ids)``: costs one extra forward of the prompt
    (``SqueezeAttentionBudget`` measures during the real prefill instead)."""
    return squeeze_allocate(layer_importance(model, prompt_ids).tolist(), uniform_budget, p, min_budget, max_budget)


def random_budgets(budgets: Sequence[int], seed: int = 0) -> list[int]:
    """The control: the same per-layer budgets (same total, same group sizes and values) assigned to layers
    by a random permutation drawn with ``seed``, so only *which* layers get more is lost."""
    out = [int(b) for b in budgets]
    random.Random(seed).shuffle(out)
    return out


def fraction_budget(fraction: float, length: int, min_budget: int = 1) -> int:
    """Uniform per-layer budget as a fraction of ``length`` tokens: ``int(fraction * length)`` as the code's
    ``int(b * P)``, at least ``min_budget``."""
    return max(int(min_budget), int(fraction * length))


# --- eviction policies with per-layer budgets ----------------------------------------------------------

def _budget_list(window: int | Sequence[int], num_layers: int) -> list[int]:
    if isinstance(window, int):
        return [window] * num_layers
    if len(window) != num_layers:
        raise ValueError(f"{len(window)} per-layer budgets for a {num_layers}-layer model")
    return [int(w) for w in window]


class H2O:
    """Heavy-hitter oracle with a budget per layer (``window``: an int or one per layer): keep the
    ``recent`` newest tokens and the older tokens with the largest accumulated attention, per KV head.

    Needs the attention weights: build the model with ``attn_implementation="eager"`` and run inside
    ``with policy.attached(model):``."""

    def __init__(self, window: int | Sequence[int], recent_fraction: float = DEFAULT_RECENT):
        self.set_budgets(window)
        if not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"recent_fraction must be in [0, 1], got {recent_fraction}")
        self.recent_fraction = float(recent_fraction)
        self._scores: dict[int, torch.Tensor] = {}     # layer -> accumulated attention [batch, kv_heads, kept]
        self._positions: dict[int, torch.Tensor] = {}  # layer -> absolute positions kept [batch, kv_heads, kept]
        self._attached = 0

    def set_budgets(self, window: int | Sequence[int]) -> None:
        self.window = int(window) if isinstance(window, int) else [int(w) for w in window]
        if min([self.window] if isinstance(self.window, int) else self.window, default=0) < 0:
            raise ValueError(f"negative budget in {self.window}")

    def layer_budgets(self, num_layers: int) -> list[int]:
        return _budget_list(self.window, num_layers)

    def recent_counts(self, num_layers: int) -> list[int]:
        """Newest tokens always kept per layer: ``round(recent_fraction * budget)``, halves up."""
        return [min(b, math.floor(self.recent_fraction * b + 0.5)) for b in self.layer_budgets(num_layers)]

    def kept_positions(self, layer: int) -> torch.Tensor:
        """Absolute positions of the entries layer ``layer`` holds, [batch, kv_heads, kept]."""
        return self._positions[layer]

    @contextlib.contextmanager
    def attached(self, model) -> Iterator["H2O"]:
        impl = getattr(model.config, "_attn_implementation", None)
        if impl != "eager":
            raise ValueError(f"H2O reads attention weights, which only eager attention returns; the model uses "
                             f"{impl!r} (build it with attn_implementation='eager' or call "
                             f"model.set_attn_implementation('eager'))")
        if self._attached:  # already hooked (e.g. kv_budget_loss inside the caller's `with`): hooks once only
            yield self
            return
        handles = [layer.self_attn.register_forward_hook(partial(self._record, i))
                   for i, layer in enumerate(_decoder_layers(model))]
        self._attached += 1
        try:
            yield self
        finally:
            self._attached -= 1
            for handle in handles:
                handle.remove()

    def _record(self, i, module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("self_attn returned no attention weights; H2O needs attn_implementation='eager'")
        batch, heads, q, k = weights.shape
        kv_heads = heads // module.num_key_value_groups  # query head h reads KV head h // groups (repeat_kv)
        score = weights.detach().float().sum(2).view(batch, kv_heads, heads // kv_heads, k).sum(2)
        prev = self._scores.get(i)
        if prev is not None and q < k:  # a step after the prefill: the older entries carry their sums
            if prev.shape[-1] != k - q:
                raise RuntimeError(f"layer {i}: {prev.shape[-1]} scored entries but the cache held {k - q}; "
                                   "was the cache pruned by another policy?")
            score[..., : k - q] += prev
        self._scores[i] = score

    def prune(self, cache, info: StepInfo) -> None:
        num_layers = len(cache.layers)
        budgets, recents = self.layer_budgets(num_layers), self.recent_counts(num_layers)
        for i, layer in enumerate(cache.layers):
            keys = getattr(layer, "keys", None)
            if keys is None or keys.ndim != 4:
                continue
            batch, kv_heads, length, _ = keys.shape
            prev = self._positions.get(i) if info.step > 0 else None
            fresh = length - (prev.shape[-1] if prev is not None else 0)
            new = torch.arange(info.seen - fresh, info.seen, device=keys.device).expand(batch, kv_heads, fresh)
            positions = new if prev is None else torch.cat([prev, new], dim=-1)
            self._positions[i] = positions
            budget, recent = budgets[i], recents[i]
            if length <= budget:
                continue
            scores = self._scores.get(i)
            if scores is None or scores.shape[-1] != length:
                raise RuntimeError(f"layer {i}: no attention scores for its {length} entries; run the model inside "
                                   "`with policy.attached(model):` (eager attention)")
            older = length - recent
            order = torch.sort(scores[..., :older], dim=-1, descending=True, stable=True).indices  # ties: earlier
            heavy = order[..., : budget - recent]
            idx = torch.cat([heavy.sort(dim=-1).values,
                             torch.arange(older, length, device=keys.device).expand(batch, kv_heads, recent)], dim=-1)
            layer.keys = keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
            layer.values = layer.values.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, layer.values.shape[-1]))
            self._scores[i] = scores.gather(-1, idx)
            self._positions[i] = positions.gather(-1, idx)


_POLICY_NAMES = {SlidingWindow: "sliding_window", StreamingLLM: "streaming_llm", H2O: "h2o"}


def _policy_name(policy: str | type) -> str:
    name = _POLICY_NAMES.get(policy, policy) if isinstance(policy, type) else policy
    if name not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    return name


def policy_min_budget(policy: str | type, sinks: int = DEFAULT_SINKS) -> int:
    """Smallest per-layer budget a policy accepts: StreamingLLM keeps its sinks plus at least one recent
    token (the brief's clamp >= sinks + 1), the others one token."""
    return sinks + 1 if _policy_name(policy) == "streaming_llm" else 1


def budget_policy(policy: str | type, budgets: int | Sequence[int], *, sinks: int = DEFAULT_SINKS,
                  recent_fraction: float = DEFAULT_RECENT):
    """The eviction policy ``policy`` (a name in ``POLICIES`` or the class) keeping ``budgets`` KV entries
    per layer (an int or one per layer; for StreamingLLM sinks included)."""
    name = _policy_name(policy)
    values = [budgets] if isinstance(budgets, int) else list(budgets)
    low = policy_min_budget(name, sinks)
    if min(values) < low:
        raise ValueError(f"{name} needs budgets >= {low}, got {budgets}")
    if name == "sliding_window":
        return SlidingWindow(budgets)
    if name == "streaming_llm":
        return StreamingLLM(sinks, budgets - sinks if isinstance(budgets, int) else [b - sinks for b in budgets])
    return H2O(budgets, recent_fraction)


class SqueezeAttentionBudget:
    """A ``KVPolicy`` for ``tasks.llm.generate``: at the prefill (step 0) it reads each layer's cosine from
    hooks, sets the uniform budget to ``fraction_budget(total_fraction, prompt_length)`` entries per layer,
    reallocates it with ``squeeze_allocate`` (``p``), and from then on prunes with ``policy`` (a name in
    ``POLICIES`` or the class) at those budgets. Run it inside ``with policy.attached(model):``.
    After step 0, ``budgets`` and ``similarity`` hold what was used. ``p=1`` is the uniform baseline at the
    same total (every layer gets the uniform budget)."""

    def __init__(self, policy: str | type = "streaming_llm", total_fraction: float = 0.2, p: float = DEFAULT_P, *,
                 sinks: int = DEFAULT_SINKS, recent_fraction: float = DEFAULT_RECENT, min_budget: int | None = None):
        self.policy = _policy_name(policy)
        if total_fraction <= 0:
            raise ValueError(f"total_fraction must be > 0, got {total_fraction}")
        self.total_fraction, self.p, self.sinks = float(total_fraction), float(p), int(sinks)
        self.recent_fraction = recent_fraction
        self.min_budget = policy_min_budget(self.policy, sinks) if min_budget is None else int(min_budget)
        self._h2o = H2O(0, recent_fraction) if self.policy == "h2o" else None  # scores must be seen from the prefill
        self._hooks: _ImportanceHooks | None = None
        self._inner: Any = None
        self.budgets: list[int] | None = None
        self.similarity: torch.Tensor | None = None

    @contextlib.contextmanager
    def attached(self, model) -> Iterator["SqueezeAttentionBudget"]:
        if self._hooks is not None:  # already attached: hooks once only
            yield self
            return
        with contextlib.ExitStack() as stack:
            if self._h2o is not None:
                stack.enter_context(self._h2o.attached(model))
            self._hooks = stack.enter_context(_ImportanceHooks(model))
            try:
                yield self
            finally:
                self._hooks = None

    def prune(self, cache, info: StepInfo):
        if info.step == 0:
            if self._hooks is None:
                raise RuntimeError("run generate inside `with policy.attached(model):` so the prefill is measured")
            self.similarity = self._hooks.result(info.prompt_length)
            uniform = fraction_budget(self.total_fraction, info.prompt_length, self.min_budget)
            self.budgets = squeeze_allocate(self.similarity.tolist(), uniform, self.p, self.min_budget)
            if self._h2o is not None:
                self._h2o.set_budgets(self.budgets)
                self._inner = self._h2o
            else:
                self._inner = budget_policy(self.policy, self.budgets, sinks=self.sinks)
        if self._inner is None:
            raise RuntimeError("pruning before the prefill was measured")
        return self._inner.prune(cache, info)


# --- evaluation ---------------------------------------------------------------------------------------

def _attached(policy, model):
    return policy.attached(model) if hasattr(policy, "attached") else contextlib.nullcontext()


Budgets = int | Sequence[int] | Callable[[torch.Tensor], Sequence[int]] | None


def kv_budget_loss(model, windows: torch.Tensor, prompt_len: int, budgets: Budgets = None,
                   policy: str | type | KVPolicy = "streaming_llm", *, sinks: int = DEFAULT_SINKS,
                   recent_fraction: float = DEFAULT_RECENT) -> dict:
    """Teacher-forced next-token NLL (nats) with a compressed KV cache, for the claim "at equal total
    budget, SqueezeAttention's per-layer budgets lose less than uniform ones".

    For each window ([count, T] token ids, or [T]): prefill the first ``prompt_len`` tokens with full
    attention, prune, then feed tokens ``prompt_len .. T-2`` one at a time, pruning after each, and score
    the prediction of every token ``prompt_len .. T-1`` (T - prompt_len targets; the fed tokens are the
    text's, not the model's, so every policy is scored on the same tokens).

    ``budgets``: None = the full cache; an int = that many entries on every layer; a list = one per layer;
    a callable = per-window budgets from the prompt ([1, prompt_len] ids), e.g.
    ``lambda ids: squeeze_budgets(model, ids, b, p)``. ``policy``: a name in ``POLICIES`` (or the class),
    or a ready ``KVPolicy`` (then ``budgets`` must be None; e.g. ``SqueezeAttentionBudget``).

    Returns ``nll`` (mean over windows and targets), ``nll_per_window`` (float64 [count]), ``budgets``
    (per window, None for the full cache), ``kv_lengths`` (kept entries per layer at the end, last
    window), ``kv_bytes`` (kept bytes at the end, mean over windows) and ``kv_bytes_full`` (what the full
    cache holds at the end)."""
    windows = torch.as_tensor(windows, dtype=torch.long)
    windows = windows.unsqueeze(0) if windows.ndim == 1 else windows
    if windows.ndim != 2 or not 1 <= prompt_len < windows.shape[1]:
        raise ValueError(f"need windows [count, T] with 1 <= prompt_len < T, got {tuple(windows.shape)}, {prompt_len}")
    ready = not isinstance(policy, (str, type))
    if ready and budgets is not None:
        raise ValueError("budgets apply to a policy name; a ready KVPolicy brings its own")
    from transformers import DynamicCache  # lazily, as tasks.llm does: importing transformers is slow
    device = next(model.parameters()).device
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    length = windows.shape[1]
    nlls, used, kv_end, kv_full, lengths = [], [], [], 0, []
    with torch.inference_mode():
        for window in windows.to(device):
            prompt = window[:prompt_len].unsqueeze(0)
            if ready:
                kv_policy, chosen = policy, None
            elif budgets is None:
                kv_policy, chosen = FullCache(), None
            else:
                chosen = budgets(prompt) if callable(budgets) else budgets
                chosen = _budget_list(chosen, num_layers) if isinstance(chosen, int) else [int(b) for b in chosen]
                kv_policy = budget_policy(policy, chosen, sinks=sinks, recent_fraction=recent_fraction)
            with _attached(kv_policy, model):
                cache = DynamicCache(config=model.config)
                info = StepInfo(0, prompt_len, prompt_len, num_layers)
                logits, cache = decode_step(model, cache, prompt, 0, kv_policy, info)
                losses = [F.cross_entropy(logits.float(), window[prompt_len: prompt_len + 1], reduction="sum")]
                for t in range(prompt_len, length - 1):
                    info = StepInfo(t - prompt_len + 1, t + 1, prompt_len, num_layers)
                    logits, cache = decode_step(model, cache, window[t: t + 1].unsqueeze(0), t, kv_policy, info)
                    losses.append(F.cross_entropy(logits.float(), window[t + 1: t + 2], reduction="sum"))
            nlls.append(torch.stack(losses).double().mean().cpu())
            used.append(chosen if not ready else getattr(policy, "budgets", None))
            lengths = kv_cache_lengths(cache)
            kv_end.append(kv_cache_bytes(cache))
            per_entry = kv_end[-1] / max(1, sum(lengths))  # bytes of one token's key and value in one layer
            kv_full = round(per_entry * num_layers * (length - 1))
    per_window = torch.stack(nlls)
    return {"nll": float(per_window.mean()), "nll_per_window": per_window, "budgets": used,
            "kv_lengths": lengths, "kv_bytes": float(np.mean(kv_end)), "kv_bytes_full": int(kv_full)}
