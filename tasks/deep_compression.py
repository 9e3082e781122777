"""Deep Compression: magnitude pruning, trained weight sharing and Huffman coding, as used on SqueezeNet.

Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
Quantization and Huffman Coding", ICLR 2016 (arXiv 1510.00149); applied to SqueezeNet in Iandola et
al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model size" (arXiv
1602.07360), whose 0.66 MB / 0.47 MB models are 8- / 6-bit codes at ~1/3 of the weights kept.

Implements, for the weights of every nn.Conv2d and nn.Linear:
- pruning: per-layer masks keeping the largest |w| (``magnitude_masks``), applied to the weights
  (``apply_masks`` / ``enforce``) and to their gradients (``mask_gradients``) while retraining;
- trained quantisation: 1-D k-means with k = 2^bits on the kept weights, linear initialisation by
  default (``kmeans_1d``); ``share_weights`` then makes every layer compute W = C[idx] * M from a
  trainable codebook C, so autograd gives the paper's gradient-sum rule dL/dc_j = sum of dL/dW_i over
  the members i of cluster j; ``remove_sharing`` bakes the result back into plain dense weights;
  ``quantize_rtn`` is the uniform min-max baseline;
- storage: positions of kept weights as relative gaps in ``gap_bits`` bits with filler entries where
  a gap does not fit (``relative_indices``), canonical Huffman codes for both the code stream and the
  gap stream (``huffman_*``), and a self-describing, pickle-free file (``encode`` / ``decode``,
  ``save_compressed`` / ``load_compressed``) that rebuilds the registry model exactly.

Departs from the paper:
- pruning keeps a target density per layer (top-k of |w|, ties to the lower index) instead of the
  threshold q * std(W): sizes become a setting rather than an outcome, and the released SqueezeNet
  model is described by its per-layer densities. Iterating prune -> retrain is the job's loop.
- a filler entry stores a reserved code symbol k ("zero, not a weight") next to the k real codes.
  The paper stores a zero weight, which costs a cluster pinned at 0 and leaves the decoder unable
  to tell padding from a weight; the reserved symbol costs one Huffman leaf.
- gaps are distance - 1 (position = cumsum(gap + 1) - 1, as in songhan/SqueezeNet-Deep-Compression
  decode.py), so a 4-bit field spans 16 positions and a run of zeros of length d needs d // 16 fillers.
- Huffman code lengths are capped at MAX_CODE_LEN = 20 bits, by halving the symbol counts until the
  optimal code fits, so the decoder's lookup table stays <= 2^20 entries. Realistic streams never
  reach the cap; only Fibonacci-like counts do (the code is then near-optimal, not optimal).
- empty clusters keep their previous centroid (the paper does not say); the codebook always has
  2^bits float32 entries, as the paper counts 32 * 2^b bits per layer.
- the file format (magic b"SQDC") is ours: the released file has fixed-width 8-bit codes and no
  Huffman coding. Biases, BatchNorm parameters and buffers and any weight left unshared are stored
  raw (a safetensors blob), like the paper's uncompressed biases. Code tables are stored as canonical
  Huffman code lengths in the JSON header, which the paper's size accounting leaves out.
- float32 weights only: the codebook is float32 and decoding reproduces it bit for bit.
"""
from __future__ import annotations

import heapq
import json
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.nn.utils import parametrize

from tasks.common.model_io import SPEC
from tasks.common.registry import get_model

PRUNABLE = (nn.Conv2d, nn.Linear)
MAGIC = b"SQDC"
VERSION = 1
COMPRESSED = "model.sqdc"
MAX_CODE_LEN = 20  # decoder table of 2^20 entries; see the docstring
_PREFIX = struct.Struct("<4sII")  # magic, version, JSON header length
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"  # one character per code length in the header


# ----------------------------------------------------------------------------------------- layers
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name of each Conv2d/Linear weight -> its module, shared (parametrized) ones included.

    A module reachable under two names (SqueezeNet's conv10 is also classifier.1) counts once, under
    its first name. A weight tied to another module (an embedding reused as a head) is left alone:
    sharing it would silently untie it.
    """
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    return {_join(name, "weight"): m for name, m in model.named_modules()
            if isinstance(m, PRUNABLE) and (parametrize.is_parametrized(m, "weight") or holders[id(m.weight)] == 1)}


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every Conv2d and Linear, keyed as in ``named_parameters``; biases, norms excluded.

    Layers already under ``share_weights`` are not listed: their weight is no longer a Parameter.
    """
    return {k: m.weight for k, m in _weight_layers(model).items() if not parametrize.is_parametrized(m, "weight")}


def _per_layer(value: Any, names: list[str], default: Any, what: str) -> dict[str, Any]:
    """A scalar for every layer, or a dict naming some of them (the rest get ``default``)."""
    if not isinstance(value, dict):
        return {n: value for n in names}
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{what}: unknown layer {unknown[0]!r}; prunable layers: {', '.join(names)}")
    return {n: value.get(n, default) for n in names}


# ---------------------------------------------------------------------------------------- pruning
def magnitude_masks(model: nn.Module, density: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Per layer, True for the round(density * n) weights of largest |w| (at least one)."""
    layers = prunable(model)
    masks = {}
    for name, d in _per_layer(density, list(layers), 1.0, "density").items():
        if not (isinstance(d, (int, float)) and 0.0 < d <= 1.0):
            raise ValueError(f"density of {name!r} must be in (0, 1], got {d!r}")
        w = layers[name].detach().reshape(-1)
        keep = max(1, int(round(d * w.numel())))
        # stable sort: equal magnitudes keep the lower index, so masks are reproducible
        order = torch.sort(w.abs(), descending=True, stable=True).indices[:keep]
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        mask[order] = True
        masks[name] = mask.view_as(layers[name])
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place. Shared layers are skipped: their mask is built in."""
    layers, plain = _weight_layers(model), prunable(model)
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in layers:
                raise ValueError(f"mask for unknown layer {name!r}")
            if name in plain:
                plain[name].masked_fill_(~mask.to(plain[name].device, torch.bool), 0.0)


def enforce(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Call after every optimizer step while retraining a pruned model.

    Masked gradients alone do not keep pruned weights at 0: a momentum buffer filled before pruning
    keeps pushing them, and so does any optimizer state or decoupled update that is not the gradient.
    """
    apply_masks(model, masks)


def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that zero the gradient of every pruned weight; ``handle.remove()`` ends retraining."""
    layers = prunable(model)
    handles = []
    for name, mask in masks.items():
        if name not in layers:
            raise ValueError(f"mask for unknown or shared layer {name!r}")
        keep = mask.to(layers[name].device, torch.bool)
        handles.append(layers[name].register_hook(lambda g, keep=keep: g.masked_fill(~keep, 0.0)))
    return handles


# ----------------------------------------------------------------------------------- quantisation
def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted centroids c: bucketize on midpoints, O(n log k) memory-free."""
    return torch.bucketize(x, (c[1:] + c[:-1]) / 2)  # a point on a midpoint joins the lower cluster


def _init_centroids(x: torch.Tensor, k: int, init: str, generator: torch.Generator | None) -> torch.Tensor:
    if init == "linear":  # c_j = min + j (max - min) / (k - 1): keeps the rare large weights (paper 3.2)
        return torch.linspace(x.min().item(), x.max().item(), k, device=x.device)
    if init == "random":  # k distinct weights (fewer if w has fewer: duplicates end up empty clusters)
        uniq = torch.unique(x)
        pick = uniq[torch.randperm(uniq.numel(), generator=generator)[:k].to(x.device)]
        return torch.cat([pick, pick[-1:].expand(k - pick.numel())])
    if init == "density":  # evenly spaced levels of the CDF, mid-bin: (j + 0.5) / k
        s = x.sort().values
        q = (torch.arange(k, device=x.device, dtype=torch.float64) + 0.5) / k
        return s[(q * (s.numel() - 1)).round().long()]
    raise ValueError(f"init must be 'linear', 'random' or 'density', got {init!r}")


def kmeans_1d(w: torch.Tensor, k: int, iters: int = 30, init: str = "linear",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm on the values of w: (centroids [k] float32 ascending, idx [n] int64)."""
    x = w.detach().reshape(-1).float()
    if x.numel() == 0 or k < 1:
        raise ValueError(f"k-means needs values and k >= 1, got {x.numel()} values and k = {k}")
    c = _init_centroids(x, k, init, generator).float().sort().values
    for _ in range(iters):
        idx = _nearest(x, c)
        sums = torch.bincount(idx, weights=x.double(), minlength=k)  # float64: exact enough for 1e6 terms
        counts = torch.bincount(idx, minlength=k)
        # an empty cluster keeps its centroid; in 1-D the means stay sorted, the sort is a guard
        new = torch.where(counts > 0, (sums / counts.clamp(min=1)).float(), c).sort().values
        if torch.equal(new, c):
            break
        c = new
    return c, _nearest(x, c)


def quantize_rtn(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform min-max round-to-nearest on 2^bits levels per tensor, dequantized (the baseline).

    For a pruned layer quantise only the kept weights: ``w[mask] = quantize_rtn(w[mask], bits)``.
    """
    lo, hi = w.min(), w.max()
    if hi == lo:
        return w.clone()
    scale = (hi - lo) / (2 ** bits - 1)
    return torch.round((w - lo) / scale).clamp(0, 2 ** bits - 1) * scale + lo


class SharedWeight(nn.Module):
    """Parametrization W = scatter of centroids[idx] into the kept positions of mask, 0 elsewhere.

    ``centroids`` (C, trained) is the layer's only parameter; ``idx`` (one cluster per kept weight,
    row-major order) and ``mask`` (M) are fixed buffers. Indexing back-propagates as a scatter-add,
    which is exactly the paper's rule dL/dc_j = sum_{i: idx_i = j, M_i} dL/dW_i.
    """

    def __init__(self, centroids: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.detach().clone())
        self.register_buffer("idx", idx)
        self.register_buffer("mask", mask)

    @property
    def bits(self) -> int:
        return int(math.log2(self.centroids.numel()))

    def forward(self, original: torch.Tensor) -> torch.Tensor:  # the frozen dense weight: unused
        return self.centroids.new_zeros(self.mask.shape).masked_scatter(self.mask, self.centroids[self.idx])


def shared_layers(model: nn.Module) -> dict[str, SharedWeight]:
    """Parameter name -> SharedWeight of every layer under ``share_weights``."""
    out = {}
    for name, m in _weight_layers(model).items():
        if parametrize.is_parametrized(m, "weight"):
            found = [p for p in m.parametrizations.weight if isinstance(p, SharedWeight)]
            if found:
                out[name] = found[0]
    return out


def share_weights(model: nn.Module, masks: dict[str, torch.Tensor], bits: int | dict[str, int],
                  init: str = "linear", iters: int = 30,
                  generator: torch.Generator | None = None) -> dict[str, SharedWeight]:
    """Cluster the kept weights of every masked layer into 2^bits centroids and train those instead.

    A dict ``bits`` must name every masked layer. The dense weight stays in the module, frozen and
    unused, until ``remove_sharing``; build the optimizer after this call (centroids are new).
    """
    layers = _weight_layers(model)
    for name in masks:
        if name not in layers:
            raise ValueError(f"mask for unknown layer {name!r}")
    per_bits = _per_layer(bits, list(masks), None, "bits")
    shared = {}
    for name, mask in masks.items():
        b, module = per_bits[name], layers[name]
        if not (isinstance(b, int) and 1 <= b <= 8):  # codes and the filler fit one byte's alphabet
            raise ValueError(f"bits of {name!r} must be an int in 1..8, got {b!r}")
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"{name!r} is already parametrized; remove_sharing first")
        w = module.weight.detach()
        keep = mask.to(w.device, torch.bool).clone()  # the layer owns its mask
        kept = w[keep]
        if kept.numel():
            c, idx = kmeans_1d(kept, 2 ** b, iters, init, generator)
        else:
            c, idx = torch.zeros(2 ** b, device=w.device), torch.zeros(0, dtype=torch.long, device=w.device)
        shared[name] = SharedWeight(c.to(w.dtype), idx, keep)
        parametrize.register_parametrization(module, "weight", shared[name])
        module.parametrizations.weight.original.requires_grad_(False)  # the dense weight no longer trains
    return shared


def remove_sharing(model: nn.Module) -> nn.Module:
    """Bake the shared weights into plain dense Parameters: the original architecture's state_dict."""
    shared = shared_layers(model)
    for name, m in _weight_layers(model).items():
        if name in shared:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m.weight.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------- Huffman
def huffman_code_lengths(counts: dict[int, int] | np.ndarray | list[int]) -> dict[int, int]:
    """Optimal prefix-code lengths (capped at MAX_CODE_LEN) for symbols of non-zero count."""
    items = counts.items() if isinstance(counts, dict) else enumerate(np.asarray(counts).tolist())
    table = {int(s): int(c) for s, c in items if c > 0}
    if len(table) <= 1:
        return {s: 1 for s in table}  # a lone symbol still needs one bit per occurrence
    while True:
        lengths = _huffman_lengths(table)
        if max(lengths.values()) <= MAX_CODE_LEN:
            return lengths
        table = {s: (c + 1) // 2 for s, c in table.items()}  # flatter counts, shallower tree


def _huffman_lengths(table: dict[int, int]) -> dict[int, int]:
    # heap of (count, tie-break, node); parent[] links make each leaf's depth its code length
    heap = [(c, i, i) for i, c in enumerate(table.values())]
    heapq.heapify(heap)
    parent = [-1] * len(heap)
    while len(heap) > 1:
        (ca, _, a), (cb, _, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent.append(-1)
        parent[a] = parent[b] = len(parent) - 1
        heapq.heappush(heap, (ca + cb, len(parent) - 1, len(parent) - 1))
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):  # parents are created after their children
        depth[node] = depth[parent[node]] + 1
    return {s: depth[i] for i, s in enumerate(table)}


def canonical_codes(lengths: dict[int, int]) -> dict[int, int]:
    """Canonical Huffman codes: by (length, symbol), each code the previous + 1, shifted to its length."""
    # lengths may come from a file: refuse any that would overflow the decoder table or overlap codes
    if any(not 1 <= n <= MAX_CODE_LEN for n in lengths.values()) or \
            sum(1 << (MAX_CODE_LEN - n) for n in lengths.values()) > 1 << MAX_CODE_LEN:
        raise ValueError(f"invalid Huffman code lengths (1..{MAX_CODE_LEN}, Kraft sum <= 1 needed)")
    codes, code, prev = {}, 0, 0
    for s, n in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= n - prev
        codes[s], code, prev = code, code + 1, n
    return codes


def _code_tables(lengths: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    size = max(lengths) + 1
    code_of, len_of = np.zeros(size, np.int64), np.zeros(size, np.int64)
    for s, c in canonical_codes(lengths).items():
        code_of[s], len_of[s] = c, lengths[s]
    return code_of, len_of


def huffman_encode(symbols: np.ndarray, lengths: dict[int, int]) -> bytes:
    """Concatenate the canonical codes of ``symbols``, MSB first, zero-padded to whole bytes."""
    symbols = np.asarray(symbols, np.int64).reshape(-1)
    if symbols.size == 0:
        return b""
    code_of, len_of = _code_tables(lengths)
    if symbols.min() < 0 or symbols.max() >= len(len_of) or not len_of[symbols].all():
        raise ValueError("a symbol has no Huffman code")
    n, code = len_of[symbols], code_of[symbols]
    start = np.cumsum(n) - n  # bit offset of each code
    bits = np.zeros(int(n.sum()), np.uint8)
    for j in range(int(n.max())):  # j-th bit of every code at least j + 1 long
        sel = n > j
        bits[start[sel] + j] = (code[sel] >> (n[sel] - 1 - j)) & 1
    return np.packbits(bits).tobytes()


def huffman_decode(data: bytes, lengths: dict[int, int], n: int) -> np.ndarray:
    """The first ``n`` symbols of ``data``; ValueError if the stream ends early or holds no code."""
    if n == 0:
        return np.zeros(0, np.int64)
    if not lengths:
        raise ValueError(f"Huffman stream of {n} symbols has no code table")
    codes = canonical_codes(lengths)
    top = max(lengths.values())
    sym_at, len_at = np.zeros(1 << top, np.int64), np.zeros(1 << top, np.uint8)  # len 0: no code
    for s, c in codes.items():
        lo, hi = c << (top - lengths[s]), (c + 1) << (top - lengths[s])
        sym_at[lo:hi], len_at[lo:hi] = s, lengths[s]
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    nb = bits.size
    padded = np.concatenate([bits, np.zeros(top, np.uint8)]).astype(np.int64)
    window = np.zeros(nb, np.int64)  # the next `top` bits at every bit position
    for j in range(top):
        window = (window << 1) | padded[j:j + nb]
    step = len_at[window]
    step[np.arange(nb) + step > nb] = 0  # a code running past the data is no code
    step = np.append(step, 0)  # position nb: the data is spent
    hops = step.tolist()  # small ints: the Python loop below touches no numpy scalars
    pos, p = [0] * n, 0
    for i in range(n):
        pos[i] = p
        p += hops[p]
    pos = np.asarray(pos, np.int64)
    if not step[pos].all():
        raise ValueError(f"Huffman stream truncated or corrupt: fewer than {n} symbols")
    return sym_at[window[pos]]


def _pack_lengths(lengths: dict[int, int]) -> str:
    """Code lengths as one base-36 character per symbol 0..max ('0': no code): compact JSON."""
    return "".join(_DIGITS[lengths.get(s, 0)] for s in range(max(lengths) + 1)) if lengths else ""


def _unpack_lengths(text: str) -> dict[int, int]:
    return {s: int(ch, 36) for s, ch in enumerate(text) if ch != "0"}


# -------------------------------------------------------------------------------- sparse indices
def relative_indices(mask_flat: np.ndarray, gap_bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Stored entries as gaps (distance to the previous entry - 1) that fit ``gap_bits`` bits.

    A run of d zeros before a kept weight becomes d // 2^gap_bits filler entries of gap 2^gap_bits - 1
    and then the weight with gap d % 2^gap_bits. Returns (gaps uint8 of every stored entry, flat
    positions of the fillers). Zeros after the last kept weight are implied by the shape.
    """
    if not 1 <= gap_bits <= 8:
        raise ValueError(f"gap_bits must be in 1..8, got {gap_bits}")
    span = 1 << gap_bits
    kept = np.flatnonzero(np.asarray(mask_flat, bool).reshape(-1))
    run = np.diff(kept, prepend=-1) - 1  # zeros before each kept weight
    per = run // span + 1  # fillers + the weight itself
    slot = np.cumsum(per) - 1  # stream index of each kept weight
    gaps = np.full(int(per.sum()), span - 1, np.uint8)
    gaps[slot] = run % span
    filler = np.ones(gaps.size, bool)
    filler[slot] = False
    return gaps, stored_positions(gaps)[filler]


def stored_positions(gaps: np.ndarray) -> np.ndarray:
    """Flat position of every stored entry (fillers included): cumsum(gap + 1) - 1."""
    return np.cumsum(np.asarray(gaps, np.int64) + 1) - 1


def mask_from_relative_indices(gaps: np.ndarray, filler_positions: np.ndarray, size: int) -> np.ndarray:
    """Inverse of ``relative_indices``: the flat boolean mask of ``size`` entries."""
    pos = stored_positions(gaps)
    if pos.size and pos[-1] >= size:
        raise ValueError(f"relative indices reach position {pos[-1]} of a {size}-entry tensor")
    mask = np.zeros(size, bool)
    mask[pos] = True
    mask[np.asarray(filler_positions, np.int64)] = False
    return mask


# ------------------------------------------------------------------------------------ file format
def _dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of the model with every shared layer as its plain dense weight."""
    names = shared_layers(model)
    shared = {name: m for name, m in _weight_layers(model).items() if name in names}
    names_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(n)
    skip = tuple(_join(n, "parametrizations.weight.") for m in shared.values() for n in names_of[id(m)])
    state = {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    for m in shared.values():
        w = m.weight.detach()  # one tensor for all of the module's names: they dedupe as aliases
        for n in names_of[id(m)]:
            state[_join(n, "weight")] = w
    return state


def _dedupe(state: dict[str, torch.Tensor], first: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors stored once, alias key -> stored key) for entries that are one tensor under two names."""
    stored, aliases, seen = {}, {}, {}
    for key in [*first, *(k for k in state if k not in first)]:
        v = state[key]
        ident = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
        else:
            stored[key] = v
            if ident is not None:
                seen[ident] = key
    return stored, aliases


def dense_bytes(model: nn.Module) -> int:
    """float32 bytes of all parameters and buffers of the dense model (each tensor once)."""
    return 4 * sum(v.numel() for v in _dedupe(_dense_state(model))[0].values())


def _encode_layer(sw: SharedWeight, gap_bits: int) -> tuple[dict[str, Any], list[bytes]]:
    k = sw.centroids.numel()
    mask = sw.mask.detach().cpu().numpy().reshape(-1)
    gaps, _ = relative_indices(mask, gap_bits)
    pos = stored_positions(gaps)
    codes = np.full(pos.size, k, np.int64)  # k: the filler symbol
    codes[mask[pos]] = sw.idx.cpu().numpy()  # kept weights appear in row-major order in both
    code_len = huffman_code_lengths(np.bincount(codes, minlength=k + 1))
    gap_len = huffman_code_lengths(np.bincount(gaps, minlength=1 << gap_bits))
    record = {"shape": list(sw.mask.shape), "bits": sw.bits, "k": k, "nnz": int(mask.sum()),
              "entries": int(pos.size), "code_lengths": _pack_lengths(code_len),
              "gap_lengths": _pack_lengths(gap_len)}
    blobs = [sw.centroids.detach().cpu().float().numpy().astype("<f4").tobytes(),
             huffman_encode(codes, code_len), huffman_encode(gaps, gap_len)]
    return record, blobs


def encode(model: nn.Module, masks: dict[str, torch.Tensor] | None, spec: dict[str, Any],
           gap_bits: int = 4) -> bytes:
    """The Deep Compression file of a model after ``share_weights``.

    Shared layers are stored as codebook + Huffman codes + Huffman gaps; every other tensor of the
    state_dict (biases, norms, weights not shared) raw. ``masks``, when given, must be the ones the
    layers were shared with: a masked layer that is not shared is an error, not a silent dense copy.
    """
    shared = shared_layers(model)
    for name, mask in (masks or {}).items():
        if name not in shared:
            raise ValueError(f"{name!r} is masked but not shared: call share_weights before encode")
        if not torch.equal(mask.to(shared[name].mask.device, torch.bool), shared[name].mask):
            raise ValueError(f"mask of {name!r} differs from the one it was shared with")
    stored, aliases = _dedupe(_dense_state(model), first=list(shared))
    blobs: list[bytes] = []

    def section(blob: bytes) -> list[int]:
        blobs.append(blob)
        return [sum(map(len, blobs[:-1])), len(blob)]

    layers = []
    for name, sw in shared.items():
        record, (codebook, codes, gaps) = _encode_layer(sw, gap_bits)
        layers.append({"name": name, **record, "codebook": section(codebook), "codes": section(codes),
                       "gaps": section(gaps)})
    rest = {k: v.detach().cpu().contiguous().clone() for k, v in stored.items() if k not in shared}
    header = {"spec": spec, "gap_bits": gap_bits, "layers": layers, "aliases": aliases,
              "rest": section(save_safetensors(rest))}
    body = b"".join(blobs)
    header["crc32"] = zlib.crc32(body)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(head)) + head + body


def _parse(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, body) after checking magic, version, lengths, section layout and checksum."""
    if len(data) < _PREFIX.size:
        raise ValueError(f"truncated: {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"bad magic {magic!r}: not a Deep Compression (SQDC) file")
    if version != VERSION:
        raise ValueError(f"unsupported version {version}; this reader knows version {VERSION}")
    if _PREFIX.size + head_len > len(data):
        raise ValueError(f"truncated: header of {head_len} bytes, {len(data) - _PREFIX.size} left")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + head_len])
        ranges = sorted([r for rec in header["layers"] for r in (rec["codebook"], rec["codes"], rec["gaps"])]
                        + [header["rest"]])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt header: {e}") from e
    body = data[_PREFIX.size + head_len:]
    end = 0
    for offset, length in ranges:  # sections tile the body: no gap, no overlap
        if offset != end or length < 0:
            raise ValueError(f"corrupt header: section at {offset} where {end} was expected")
        end += length
    if end != len(body):
        raise ValueError(f"{'truncated' if end > len(body) else 'trailing bytes'}: "
                         f"sections need {end} body bytes, file has {len(body)}")
    if zlib.crc32(body) != header.get("crc32"):
        raise ValueError("corrupt body: CRC32 mismatch")
    return header, body


def _decode_layer(rec: dict[str, Any], body: bytes, gap_bits: int) -> torch.Tensor:
    def cut(section: list[int]) -> bytes:
        return body[section[0]:section[0] + section[1]]

    k, size = rec["k"], math.prod(rec["shape"])
    codebook = np.frombuffer(cut(rec["codebook"]), "<f4")
    codes = huffman_decode(cut(rec["codes"]), _unpack_lengths(rec["code_lengths"]), rec["entries"])
    gaps = huffman_decode(cut(rec["gaps"]), _unpack_lengths(rec["gap_lengths"]), rec["entries"])
    pos = stored_positions(gaps)
    real = codes < k
    if (codebook.size != k or codes.max(initial=0) > k or gaps.max(initial=0) >= 1 << gap_bits
            or pos.max(initial=-1) >= size or int(real.sum()) != rec["nnz"]):
        raise ValueError(f"corrupt layer {rec['name']!r}: streams disagree with its record")
    w = np.zeros(size, np.float32)
    w[pos[real]] = codebook[codes[real]]
    return torch.from_numpy(w).reshape(rec["shape"])


def decode(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(dense state_dict, spec): pruned entries exactly 0, kept ones exactly their centroid."""
    header, body = _parse(data)
    try:
        state = {rec["name"]: _decode_layer(rec, body, header["gap_bits"]) for rec in header["layers"]}
        offset, length = header["rest"]
        state.update(load_safetensors(body[offset:offset + length]))
        for alias, key in header["aliases"].items():
            state[alias] = state[key]
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"corrupt file: {e!r}") from e
    return state, header["spec"]


def size_breakdown(data: bytes) -> dict[str, int]:
    """Bytes of each part of the file: header (prefix + JSON), codebooks, codes, gaps, rest."""
    header, body = _parse(data)
    total = lambda part: sum(rec[part][1] for rec in header["layers"])  # noqa: E731
    return {"header": len(data) - len(body), "codebooks": total("codebook"), "codes": total("codes"),
            "gaps": total("gaps"), "rest": header["rest"][1]}


def compression_report(model_dense_bytes: int, data: bytes) -> dict[str, float]:
    """Sizes, the compression factor and the stored-entry counts of a file."""
    header, _ = _parse(data)
    layers = header["layers"]
    weights = sum(math.prod(rec["shape"]) for rec in layers)
    nnz, entries = sum(rec["nnz"] for rec in layers), sum(rec["entries"] for rec in layers)
    return {"dense_bytes": model_dense_bytes, "file_bytes": len(data), "ratio": model_dense_bytes / len(data),
            **size_breakdown(data), "weights": weights, "nnz": nnz, "fillers": entries - nnz,
            "density": nnz / max(weights, 1)}


def save_compressed(model: nn.Module, masks: dict[str, torch.Tensor] | None, directory: str | Path,
                    name: str, kwargs: dict[str, Any], **meta: Any) -> Path:
    """Write ``model.sqdc`` and ``model.json`` (the registry spec, format "deep_compression")."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"model": name, "kwargs": kwargs, **meta, "format": "deep_compression"}
    (directory / COMPRESSED).write_bytes(encode(model, masks, spec))
    (directory / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return directory


def load_compressed(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the registry model from ``model.sqdc``: a plain dense module in eval mode, and its spec."""
    state, spec = decode((Path(directory) / COMPRESSED).read_bytes())
    model = get_model(spec["model"], **spec["kwargs"])
    model.load_state_dict(state, strict=True)
    return model.eval(), spec
