"""SqueezeLLM: sensitivity-weighted non-uniform quantisation with a dense-and-sparse split.

Kim, Hooper, Gholami, Dong, Li, Shen, Mahoney, Keutzer, "SqueezeLLM: Dense-and-Sparse Quantization",
ICML 2024 (arXiv 2306.07629).

Implements, for the weight W [out, in] of every nn.Linear:
- sensitivity: the Fisher diagonal F = sum over calibration samples d of (dL_d/dW)^2, one backward
  per sample, accumulated in float32 (``fisher_diagonal``);
- non-uniform quantisation: per output row (optionally per group of input columns) a look-up table
  (LUT) of 2^bits values from weighted 1-D k-means, minimising sum_i F_i (w_i - c_a(i))^2
  (``weighted_kmeans_rows``, all rows at once), method ``"squeezellm"``;
- dense-and-sparse: the top ``outlier_pct`` % of |W| and the top ``sensitive_pct`` % of F are kept
  exactly (up to float16) in a CSR matrix and get weight 0 in the k-means (``sparse_mask``);
- baselines on the same footing: round-to-nearest min-max uniform per row or group (``"rtn"``,
  stored as an evenly spaced LUT), unweighted k-means (``"kmeans"``), and a negative control,
  k-means weighted by random positive numbers (``"random_weights"``);
- one storage format for all of them (``PackedWeight``): float16 LUT, bit-packed codes, CSR
  correction; it round-trips through safetensors bit for bit and counts its own bytes;
- ``QuantLinear`` (a drop-in for nn.Linear), ``quantize_model``, ``packed_state`` /
  ``load_packed_state`` for whole models, pickle-free.

Usage::

    fisher = fisher_diagonal(model, batches, lambda m, x: m(x, labels=x).loss)   # batches of 1
    stats = quantize_model(model, fisher, bits=3, method="squeezellm", sensitive_pct=0.05)
    save_file(packed_state(model), "model.safetensors")
    load_packed_state(fresh_model, load_file("model.safetensors"))

Speed: a 576 x 1536 matrix at 3 bits takes ~0.2 s (k-means methods) or ~0.02 s (RTN) on one
thread. The k-means is a few hundred small tensor ops; on a machine whose cores are busy with other
work, OpenMP barriers make 2 threads 5x slower than 1, so call ``torch.set_num_threads(1)`` there.

Departs from the paper and its code (SqueezeAILab/SqueezeLLM, kssteven418/SqueezeLLM-gradients):
- CPU and plain PyTorch; no LUT kernels. ``QuantLinear`` dequantises to a float matrix and calls
  F.linear, so the size saving is on disk and in the packed buffers, not in compute.
- k-means: the official code runs sklearn KMeans (k-means++ init, random_state=0, max_iter=50) per
  row in a process pool. We run Lloyd's iterations for all rows at once, exploiting that the problem
  is 1-D: each row is sorted once, a cluster is then a contiguous run of the sorted row, its
  boundaries come from searchsorted on the centroid midpoints and its weighted mean from float64
  prefix sums (instead of a scatter-add over all n points), so one iteration costs
  O(rows * k log n). The fixed points are Lloyd's. Init is a deterministic greedy k-means++
  (``_greedy_init``): candidates at evenly spaced quantiles of the weighted squared error instead
  of random draws, the best of 8 kept per step. Quantile or min-max inits, tried first, left Lloyd
  60-120 % above the optimum on heavy-tailed rows; this one ends within ~6 % of the exact (DP)
  optimum and ~4 % below sklearn's official call on the unit test's rows. An empty cluster (no
  weight) is re-seeded at its row's point of largest weighted error, one per row and iteration,
  which can only lower the objective. At most 50 iterations, as in the official code.
- the LUT is stored in float16 (the brief's bit count, 16 bits per entry), and codes are the nearest
  float16 LUT entry to each weight, not the k-means labels: for a fixed table that is never worse.
- magnitude outliers are the top ``outlier_pct`` % of |w| per matrix, exactly that many. The official
  rule is |w| >= max(|q1 - r IQR|, |q3 + r IQR|) with the range r tuned per model until the target
  percentage is hit; a percentage is the quantity the paper reports and compares at, so we take it
  directly. Sensitive values: the top ``sensitive_pct`` % of F, exactly that many (official: F >
  the k-th value). Both counts are max(1, round(numel * pct / 100)) when pct > 0.
- masked positions carry the code of the LUT entry nearest to w itself (official: nearest to 0,
  because the dense part is zero there), so the correction S' = W - LUT[idx] is as small as it can
  be and its float16 rounding error too. Values are float16 (official: float32), columns int32.
- a row whose Fisher values are all 0 on its kept positions gets uniform weights on those positions
  (official: uniform over the whole row, outlier zeros included, which pulls a centroid to 0).
- Fisher: computed in eval mode (no dropout noise), as a sum (not a mean: k-means and the top-%
  rule are scale-free), with torch.autograd.grad instead of backward hooks. The calibration data is
  whatever the caller passes (official: 128 random C4 windows of 512 tokens).
- RTN is stored as an evenly spaced LUT of 2^bits float16 values per row/group, not as a scale and
  a zero point: one format for every method, at (2^bits - 2) * 16 / group_size more bits per weight.
- codes are one LSB-first bitstream over all rows (official: int32 words, 3-bit codes straddling
  word boundaries); optional per-group LUTs (the paper has one LUT per row only).
- weights must fit float16's range (|w| <= 65504).
"""
from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("rtn", "kmeans", "squeezellm", "random_weights")
KMEANS_ITERS = 50  # max_iter of the official sklearn KMeans call
INIT_CANDIDATES = 8  # per greedy init step; sklearn's k-means++ tries 2 + ln k, more is cheap here
# names of the tensors of one PackedWeight, in a file and as QuantLinear buffers
PACKED_KEYS = ("meta", "lut", "codes", "crow", "col", "values")
FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------- bit packing
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2^bits) -> uint8 bitstream; code i holds bits [i*bits, (i+1)*bits), LSB first."""
    flat = codes.reshape(-1).to(torch.uint8)
    stream = (flat[:, None] >> torch.arange(bits, dtype=torch.uint8, device=flat.device)) & 1
    stream = stream.reshape(-1)
    pad = (-stream.numel()) % 8  # the last byte is zero-padded
    stream = torch.cat([stream, stream.new_zeros(pad)]).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(1, dtype=torch.uint8)


def unpack_codes(buf: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``count`` codes, int64 (ready for gather)."""
    stream = (buf[:, None] >> torch.arange(8, dtype=torch.uint8, device=buf.device)) & 1
    stream = stream.reshape(-1)[: count * bits].view(count, bits)
    # uint8 until the end: an int64 [count, bits] intermediate would be 8x the memory
    shifted = stream << torch.arange(bits, dtype=torch.uint8, device=buf.device)
    return shifted.sum(1, dtype=torch.uint8).long()


# ------------------------------------------------------------------------------- packed weights
@dataclass
class PackedWeight:
    """W_hat = LUT[row, group, code] + S', the storage of every method here.

    ``lut`` float16 [rows, groups, 2^bits] (ascending per group); ``codes`` the bit-packed code of
    every weight, row-major; ``crow``/``col``/``values`` the CSR correction S' (int32, int32,
    float16), nonzero pattern = the dense-and-sparse mask, explicit zeros included.
    """

    shape: tuple[int, int]
    bits: int
    group_size: int
    lut: torch.Tensor
    codes: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense(self) -> torch.Tensor:
        """LUT[row, group, code] alone, float32 [rows, in]: the dense part without S'."""
        rows, cols = self.shape
        codes = unpack_codes(self.codes, self.bits, self.numel).view(rows, cols // self.group_size, -1)
        return self.lut.float().gather(2, codes).view(rows, cols)

    def dequantize(self) -> torch.Tensor:
        """W_hat, float32 [rows, in]."""
        w = self.dense()
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=w.device), self.crow.diff().long())
        w[rows, self.col.long()] += self.values.float()  # positions are unique: no accumulate needed
        return w

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Everything needed to rebuild it, as tensors (shape and bits in ``meta``), for safetensors."""
        meta = torch.tensor([*self.shape, self.bits, self.group_size], dtype=torch.int32)
        parts = {"meta": meta, "lut": self.lut, "codes": self.codes, "crow": self.crow, "col": self.col,
                 "values": self.values}
        return {prefix + k: v.contiguous() for k, v in parts.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> PackedWeight:
        rows, cols, bits, group_size = (int(v) for v in tensors[prefix + "meta"])
        t = {k: tensors[prefix + k] for k in PACKED_KEYS[1:]}
        packed = cls((rows, cols), bits, group_size, **t)
        packed.validate()
        return packed

    def validate(self) -> None:
        """Shapes and dtypes agree with each other; raises ValueError on a corrupt or foreign file."""
        rows, cols = self.shape
        groups = cols // self.group_size if self.group_size else 0
        expect = {"lut": ((rows, groups, 2 ** self.bits), torch.float16),
                  "codes": (((rows * cols * self.bits + 7) // 8,), torch.uint8),
                  "crow": ((rows + 1,), torch.int32),
                  "col": ((self.nnz,), torch.int32), "values": ((self.nnz,), torch.float16)}
        if not (1 <= self.bits <= 8 and groups * self.group_size == cols):
            raise ValueError(f"bad packed weight: bits {self.bits}, group size {self.group_size}, shape {self.shape}")
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"packed {name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        if int(self.crow[-1]) != self.nnz:
            raise ValueError(f"packed crow ends at {int(self.crow[-1])}, but there are {self.nnz} values")

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors: what a safetensors file holds besides its JSON header."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def effective_bits(self) -> float:
        """Bits per weight, everything counted: codes, LUT, CSR correction, meta."""
        return 8 * self.nbytes / self.numel


# -------------------------------------------------------------------------------------- k-means
def _prefix(x: torch.Tensor) -> torch.Tensor:
    """Row-wise cumulative sums with a leading 0: sum over sorted positions [a, b) = P[b] - P[a]."""
    out = x.new_empty(x.shape[0], x.shape[1] + 1)
    out[:, 0] = 0
    torch.cumsum(x, 1, out=out[:, 1:])
    return out


def _run(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Sums over the sorted positions [lo, hi) of each row."""
    return prefix.gather(1, hi) - prefix.gather(1, lo)


def _interval(prefix: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Sum over each cluster [b_j, b_j+1) of a sorted row."""
    return _run(prefix, bounds[:, :-1], bounds[:, 1:])


def _midpoints(c: torch.Tensor) -> torch.Tensor:
    return ((c[:, 1:] + c[:, :-1]) / 2).contiguous()


def nearest(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per row, index of the nearest of the ascending ``levels`` [rows, k] to each x [rows, n].

    searchsorted on the midpoints: O(n log k) and no [rows, n, k] distance tensor. A point exactly
    on a midpoint joins the lower level.
    """
    return torch.searchsorted(_midpoints(levels), x.contiguous())


def _bounds(xs: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Cluster j of a sorted row is positions [b_j, b_j+1): the same assignment as ``nearest``."""
    inner = torch.searchsorted(xs, _midpoints(c), right=True)  # points <= midpoint go below it
    edge = inner.new_full((xs.shape[0], 1), xs.shape[1])
    return torch.cat([torch.zeros_like(edge), inner, edge], 1)


def _row_weights(weight: torch.Tensor) -> torch.Tensor:
    """Divide each row by its max (the minimiser is scale-free; constant rows become exactly 1, so
    equal weights give exactly unweighted k-means) and give all-zero rows uniform weights."""
    top = weight.amax(1, keepdim=True)
    return torch.where(top > 0, weight / torch.where(top > 0, top, 1.0), 1.0)


def _greedy_init(xs: torch.Tensor, ws: torch.Tensor, cum: torch.Tensor, moment: torch.Tensor, square: torch.Tensor,
                 k: int, candidates: int = INIT_CANDIDATES) -> torch.Tensor:
    """Deterministic greedy k-means++ on sorted rows: start at the weighted mean, then k - 1 times
    add the best of ``candidates`` points spread evenly over the cumulative weighted squared error
    (D^2), best = largest drop of the objective.

    k-means++ samples candidates in proportion to D^2; taking them at the D^2 quantiles
    (j + 1/2) / candidates is the same idea without a random state. In 1-D a new centroid v takes
    over the run of sorted points between the midpoints to its neighbouring centroids, so its gain
    is a difference of prefix sums: O(candidates log n) per row and step, plus O(n) to update D^2.
    """
    rows, n = xs.shape
    c = moment[:, -1:] / cum[:, -1:]  # the best single centroid: the weighted mean
    d = ws * (xs - c).square()  # D^2: each point's weighted squared distance to its nearest centroid
    q = (torch.arange(candidates, dtype=xs.dtype, device=xs.device) + 0.5) / candidates
    inf = xs.new_full((rows, 1), torch.inf)
    for _ in range(k - 1):
        dd = _prefix(d)
        pos = torch.searchsorted(dd[:, 1:].contiguous(), q * dd[:, -1:]).clamp(max=n - 1)
        v = xs.gather(1, pos)  # [rows, candidates]
        # the run of points v would take: between the midpoints to the centroids either side of it
        at = torch.searchsorted(c, v)
        padded = torch.cat([-inf, c, inf], 1)
        lo = torch.searchsorted(xs, (padded.gather(1, at) + v) / 2)
        hi = torch.searchsorted(xs, (padded.gather(1, at + 1) + v) / 2, right=True)
        # gain = what those points cost now - what they would cost at v; ties on a midpoint gain 0
        new_cost = _run(square, lo, hi) - 2 * v * _run(moment, lo, hi) + v * v * _run(cum, lo, hi)
        best = (_run(dd, lo, hi) - new_cost).argmax(1, keepdim=True)
        pick = v.gather(1, best)
        d = torch.minimum(d, ws * (xs - pick).square())
        c = torch.cat([c, pick], 1).sort(1).values
    return c


def _reseed_empty(xs: torch.Tensor, ws: torch.Tensor, c: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Move the first empty cluster of each row onto the row's point of largest weighted error.

    Only rows with an empty cluster are looked at (an O(n) pass); the move takes that point's error
    off the objective, so Lloyd stays monotone. Rows already at zero error are left alone.
    """
    rows = empty.any(1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return c
    cr, xr = c[rows], xs[rows]
    err = ws[rows] * (xr - cr.gather(1, nearest(cr, xr))).square()
    gain, best = err.max(1)
    pick = gain > 0
    c = c.clone()
    c[rows[pick], empty[rows[pick]].float().argmax(1)] = xr[pick].gather(1, best[pick, None]).squeeze(1)
    return c


def weighted_kmeans_rows(w: torch.Tensor, weight: torch.Tensor, k: int,
                         iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of every row of w, minimising sum_i weight_i (w_i - c_a(i))^2 per row.

    Returns (centroids [rows, k] ascending, in w's float dtype; labels [rows, n] int64). Rows whose
    weights are all 0 are clustered with uniform weights. ``iters=0`` returns the init and its
    nearest labels. All rows are processed at once, in float64; see the module docstring.
    """
    if w.dim() != 2 or weight.shape != w.shape or w.shape[1] == 0 or k < 1:
        raise ValueError(f"need w [rows, n>0], weight of the same shape and k >= 1; got {tuple(w.shape)}, "
                         f"{tuple(weight.shape)}, k={k}")
    x, wt = w.detach().double(), weight.detach().double()
    if not (torch.isfinite(x).all() and torch.isfinite(wt).all() and (wt >= 0).all()):
        raise ValueError("k-means needs finite values and finite non-negative weights")
    order = w.detach().sort(1).indices  # in w's own dtype: float32 sorts faster, same order
    xs = x.gather(1, order)
    ws = _row_weights(wt).gather(1, order)
    # float64 prefix sums of w, w x, w x^2: every cluster sum is a difference of two of them
    cum, moment, square = _prefix(ws), _prefix(ws * xs), _prefix(ws * xs * xs)
    c, prev = _greedy_init(xs, ws, cum, moment, square, k), None
    for _ in range(iters):
        b = _bounds(xs, c)
        if prev is not None and torch.equal(b, prev):  # assignment stable: Lloyd has converged
            break
        prev = b
        mass, total = _interval(cum, b), _interval(moment, b)
        c = torch.where(mass > 0, total / torch.where(mass > 0, mass, 1.0), c)  # empty: stay put
        c, perm = c.sort(1)  # a guard: 1-D means keep their order up to rounding
        c = _reseed_empty(xs, ws, c, (mass <= 0).gather(1, perm))
        c = c.sort(1).values
    dtype = w.dtype if w.is_floating_point() else torch.float32
    return c.to(dtype), nearest(c, x)


# --------------------------------------------------------------------------------- the methods
def _top_count(numel: int, pct: float) -> int:
    return max(1, round(numel * pct / 100)) if pct > 0 else 0


def _top_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count:
        mask[score.reshape(-1).topk(count).indices] = True  # exactly `count`, ties broken by topk
    return mask.view_as(score)


def sparse_mask(w: torch.Tensor, fisher: torch.Tensor | None = None, outlier_pct: float = 0.0,
                sensitive_pct: float = 0.0) -> torch.Tensor:
    """Positions kept in the sparse part: top ``outlier_pct`` % of |w| OR top ``sensitive_pct`` % of F.

    Percent, as in the paper: 0.05 means 0.05 %, not 5 %.
    """
    for name, pct in (("outlier_pct", outlier_pct), ("sensitive_pct", sensitive_pct)):
        if not 0.0 <= pct < 100.0:
            raise ValueError(f"{name} is a percentage in [0, 100), got {pct!r}")
    mask = _top_mask(w.abs(), _top_count(w.numel(), outlier_pct))
    if sensitive_pct > 0:
        if fisher is None:
            raise ValueError("sensitive_pct > 0 needs the Fisher diagonal")
        mask |= _top_mask(fisher, _top_count(w.numel(), sensitive_pct))
    return mask


def _rtn_levels(w: torch.Tensor, keep: torch.Tensor, k: int) -> torch.Tensor:
    """k evenly spaced levels from min to max of the kept entries of each row (all, if none kept)."""
    keep = keep | ~keep.any(1, keepdim=True)
    lo = torch.where(keep, w, torch.inf).amin(1, keepdim=True)
    hi = torch.where(keep, w, -torch.inf).amax(1, keepdim=True)
    steps = torch.arange(k, dtype=w.dtype, device=w.device) / (k - 1)
    return lo + (hi - lo) * steps  # lo + j * step, with step = (hi - lo) / (2^bits - 1)


def _sample_weights(method: str, w: torch.Tensor, fisher: torch.Tensor | None, seed: int) -> torch.Tensor:
    if method == "kmeans":
        return torch.ones_like(w)
    if method == "squeezellm":
        if fisher is None:
            raise ValueError('method "squeezellm" needs the Fisher diagonal')
        return fisher.float()
    # negative control: spread-out positive weights that know nothing about the loss
    gen = torch.Generator(device=w.device).manual_seed(seed)
    return torch.empty(w.shape, device=w.device).exponential_(generator=gen).clamp_min(1e-6)


def _check_inputs(w: torch.Tensor, fisher: torch.Tensor | None, bits: int, method: str, group_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    if group_size < 1 or w.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features {w.shape[1]}")
    if not torch.isfinite(w).all() or w.abs().max() > FP16_MAX:
        raise ValueError("weights must be finite and within float16 range")
    if fisher is not None and (fisher.shape != w.shape or not torch.isfinite(fisher).all() or (fisher < 0).any()):
        raise ValueError(f"Fisher must be finite, >= 0 and shaped like the weight {tuple(w.shape)}")


def _pack(w: torch.Tensor, levels: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int) -> PackedWeight:
    """Round the LUT to float16, code every weight by its nearest entry, store S' at the mask."""
    rows, cols = w.shape
    lut = levels.half().view(rows, cols // group_size, 2 ** bits)  # rounding keeps the order
    flat_lut = lut.float().view(-1, 2 ** bits)
    codes = nearest(flat_lut, w.view(-1, group_size))
    dense = flat_lut.gather(1, codes).view(rows, cols)
    crow = F.pad(mask.sum(1).cumsum(0), (1, 0)).int()
    col = mask.nonzero()[:, 1].int()  # row-major, the order of w[mask]
    values = (w - dense)[mask].half()  # S' = W - LUT[idx]
    return PackedWeight((rows, cols), bits, group_size, lut, pack_codes(codes, bits), crow, col, values)


def quantize_weight(w: torch.Tensor, fisher: torch.Tensor | None = None, *, bits: int, method: str,
                    group_size: int | None = None, outlier_pct: float = 0.0, sensitive_pct: float = 0.0,
                    seed: int = 0, iters: int = KMEANS_ITERS) -> PackedWeight:
    """Quantise one weight [out, in] with one LUT of 2^bits float16 values per row (or group).

    method: "rtn" (uniform min-max), "kmeans" (unweighted), "squeezellm" (Fisher-weighted, needs
    ``fisher``), "random_weights" (weights from ``seed``: a control). ``group_size`` input columns
    share a LUT (default: the whole row, as in the paper). ``outlier_pct`` / ``sensitive_pct`` (in
    percent) move entries into the sparse part; they get weight 0 in the k-means and are left out
    of RTN's min and max.
    """
    w = w.detach().float().contiguous()  # views below need a row-major layout
    group_size = group_size or w.shape[1]
    _check_inputs(w, fisher, bits, method, group_size)
    fisher = None if fisher is None else fisher.detach().float().contiguous()
    mask = sparse_mask(w, fisher, outlier_pct, sensitive_pct)
    wg, keep = w.view(-1, group_size), (~mask).view(-1, group_size)
    if method == "rtn":
        levels = _rtn_levels(wg, keep, 2 ** bits)
    else:
        sw = _sample_weights(method, w, fisher, seed).view(-1, group_size) * keep
        # no Fisher mass on any kept entry: uniform over the kept ones, never over the outliers
        sw = torch.where(sw.sum(1, keepdim=True) > 0, sw, keep.float())
        levels, _ = weighted_kmeans_rows(wg, sw, 2 ** bits, iters)
    return _pack(w, levels.float(), mask, bits, group_size)


# ----------------------------------------------------------------------------------- the layer
class QuantLinear(nn.Module):
    """nn.Linear over a PackedWeight: y = x W_hat^T + b.

    The packed tensors are buffers (they move with ``.to(device)`` and are the module's state_dict,
    next to ``bias``); dtype casts such as ``model.half()`` leave them alone, since a cast would
    change the stored bits. With ``cache=True`` (default) W_hat is dequantised on the first forward
    and kept in the input's dtype: every later call is a plain F.linear, but the layer then holds a
    full float matrix next to its packed form, so RAM is larger than the unquantised layer's (the
    saving is on disk). ``cache=False`` dequantises on every call: RAM stays at the packed size plus
    one transient matrix, at the cost of an unpack per call.
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, cache: bool = True):
        super().__init__()
        packed.validate()
        self.out_features, self.in_features = packed.shape
        self.cache = cache
        for name, t in packed.tensors().items():
            self.register_buffer(name, t.clone())
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone()))
        self._weight: torch.Tensor | None = None  # not a buffer: never saved

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight.from_tensors({k: getattr(self, k) for k in PACKED_KEYS})

    @property
    def weight(self) -> torch.Tensor:
        """W_hat, float32 (cached if ``cache``); read-only, for code that inspects ``.weight``."""
        return self._dequantized(torch.float32)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        w = self._weight
        if w is None or w.dtype != dtype:
            with torch.no_grad():
                w = self.packed.dequantize().to(dtype)
            if self.cache:
                self._weight = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._dequantized(x.dtype), bias)

    def _apply(self, fn: Callable, recurse: bool = True) -> QuantLinear:
        before = {k: self._buffers[k] for k in PACKED_KEYS}
        super()._apply(fn, recurse)
        for k, old in before.items():  # keep the device move, undo any dtype cast
            if self._buffers[k].dtype != old.dtype:
                self._buffers[k] = old.to(self._buffers[k].device)
        self._weight = None
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._weight = None  # new codes: the cached matrix is stale

    def extra_repr(self) -> str:
        p = self.packed
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={p.bits}, "
                f"group_size={p.group_size}, sparse={p.nnz}, bias={self.bias is not None}")


# ---------------------------------------------------------------------------------- the model
def _linears(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """Module name -> nn.Linear, each module once (under its first name), or those in ``names``."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if names is None:
        return found
    names = list(names)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"not an nn.Linear of the model: {unknown[0]!r}; linears: {', '.join(found)}")
    return {n: found[n] for n in names}


def fisher_diagonal(model: nn.Module, samples: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                    names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """F = sum over samples of (dL/dW)^2 for every nn.Linear weight: module name -> float32 [out, in].

    One backward per sample, so pass batches of one (squaring a batch-mean gradient is a different
    and worse estimator). Gradients are squared and summed in float32 whatever the model's dtype (a
    bf16 sum underflows). ``loss_fn(model, sample)`` returns a scalar. Runs in eval mode; afterwards
    every module's train/eval mode and every parameter's requires_grad are as before and every
    ``.grad`` is None.
    """
    layers = _linears(model, names)
    params = [m.weight for m in layers.values()]
    modes = {m: m.training for m in model.modules()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in zip(layers, params)}
    try:
        model.eval()
        for p, _ in flags:  # gradients of the target weights only: the rest is wasted work
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for sample in samples:
            loss = loss_fn(model, sample)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for n, g in zip(layers, grads):
                if g is not None:  # a layer the loss does not reach has F = 0
                    fisher[n].add_(g.float().square())
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    return fisher


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """A pattern matches the full module name or its last part, glob-style ("lm_head", "*.mlp.*")."""
    return any(fnmatch.fnmatchcase(name, s) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], s) for s in skip)


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (an embedding reused as a head)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def quantize_model(model: nn.Module, fisher: Mapping[str, torch.Tensor] | None = None, *, bits: int,
                   method: str, group_size: int | None = None, outlier_pct: float = 0.0,
                   sensitive_pct: float = 0.0, seed: int = 0, skip: Iterable[str] = ("lm_head",),
                   cache: bool = True) -> dict[str, Any]:
    """Replace every nn.Linear (except ``skip`` and weights tied to another module) by a QuantLinear.

    ``fisher`` maps module names to F (from ``fisher_diagonal``); needed by "squeezellm" and by
    ``sensitive_pct``. Layer i uses seed ``seed + i``. Returns {"layers": {name: stats}, "total":
    stats}, with bits, effective bits, bytes, sparse entries, relative error and seconds.
    """
    skip, tied = tuple(skip), _tied(model)
    todo = {n: m for n, m in _linears(model).items() if not _skipped(n, skip) and id(m.weight) not in tied}
    layers: dict[str, dict[str, Any]] = {}
    done: dict[int, QuantLinear] = {}
    for i, (name, lin) in enumerate(todo.items()):
        start = time.perf_counter()
        f = None if fisher is None else fisher.get(name)
        if f is None and (method == "squeezellm" or sensitive_pct > 0):
            raise ValueError(f"no Fisher diagonal for layer {name!r}")
        packed = quantize_weight(lin.weight, f, bits=bits, method=method, group_size=group_size,
                                 outlier_pct=outlier_pct, sensitive_pct=sensitive_pct, seed=seed + i)
        w = lin.weight.detach().float()
        done[id(lin)] = QuantLinear(packed, lin.bias, cache).to(lin.weight.device)
        layers[name] = {"shape": list(packed.shape), "bits": bits, "effective_bits": packed.effective_bits,
                        "nbytes": packed.nbytes, "sparse_nnz": packed.nnz,
                        "rel_error": float((packed.dequantize() - w).norm() / w.norm().clamp_min(1e-30)),
                        "seconds": time.perf_counter() - start}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if id(m) in done:  # every name a quantised module goes by, not just the first
            model.set_submodule(name, done[id(m)])
    numel = sum(s["shape"][0] * s["shape"][1] for s in layers.values())
    nbytes = sum(s["nbytes"] for s in layers.values())
    total = {"layers": len(layers), "numel": numel, "nbytes": nbytes, "bits": bits,
             "effective_bits": 8 * nbytes / numel if numel else 0.0,
             "seconds": sum(s["seconds"] for s in layers.values()),
             "skipped": [n for n in _linears(model) if n not in todo]}
    return {"layers": layers, "total": total}


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state of a quantised model for ``safetensors.torch.save_file``: packed buffers of
    every QuantLinear plus all other parameters and buffers, as contiguous CPU copies (safetensors
    refuses shared storage, e.g. tied embeddings)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def load_packed_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], cache: bool = True,
                      assign: bool = False) -> nn.Module:
    """Load ``packed_state`` output into a model of the same architecture, quantised or not.

    Every module whose six packed tensors are present becomes a QuantLinear built from them; then
    the whole state is loaded strictly (``assign``: the tensors become the parameters instead of being
    copied into them, as a model built on the meta device needs). Returns the model.
    """
    prefixes = {k[: -len("meta")] for k in tensors if k == "meta" or k.endswith(".meta")}
    for prefix in sorted(p for p in prefixes if all(p + k in tensors for k in PACKED_KEYS)):
        if not prefix:
            raise ValueError("the model itself is a quantised linear: wrap it in a container module")
        layer = QuantLinear(PackedWeight.from_tensors(tensors, prefix), tensors.get(prefix + "bias"), cache)
        model.set_submodule(prefix[:-1], layer)
    model.load_state_dict(dict(tensors), strict=True, assign=assign)
    return model
