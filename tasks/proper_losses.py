"""Black-box proper losses: score a generative model against a target from samples of both only.

Kimpara, Frongillo, Waggoner, "Proper Losses for Discrete Generative Models", ICML 2023
(arXiv 2211.03761).

Setting (the paper's): a finite outcome set Y; the model p and the target q are black boxes that can
only be sampled i.i.d. A loss of m model draws X_1..X_m and k target draws Y_1..Y_k is *black-box
proper* if its expectation is minimised over p at p = q, for every q. What the abstract states, and
all of the paper that could be read here: such losses "must take a polynomial form, and the number of
draws from the model and target distribution must exceed the degree of the polynomial"; this rules
out a loss whose expectation is the cross-entropy; "arbitrary sampling schemes such as Poisson
sampling" make a cross-entropy loss possible. The paper's body (its theorems, its constructions, its
Poisson scheme) could not be read here, so every formula below is a RECONSTRUCTION from standard
U-statistic and scoring-rule arguments, checked by the Monte Carlo tests in
tests/unit/test_proper_losses.py, and not a transcription of the paper.

Implements:
- ``monomial_estimate``: the unbiased U-statistic for sum_y p_y^a q_y^b from counts c (model) and t
  (target): sum_y (c_y)_a (t_y)_b / ((m)_a (k)_b), with (n)_j the falling factorial. It needs m >= a and
  k >= b draws, which is the abstract's characterisation (the number of draws bounds the degree).
- ``power_loss``: the proper scoring rule of the Bregman/Savage form of G(p) = sum_y p_y^d,
  S(p, y) = (d-1) sum p^d - d p_y^(d-1), estimated from m >= d model draws and k >= 1 target draws.
  Its expectation over y ~ q is D_G(q, p) - sum q^d, minimised at p = q. With d = 2 it is the Brier /
  quadratic score, and the estimator is the all-pairs collision loss 1[X1=X2] - 1[X1=Y] - 1[X2=Y].
- ``squared_distance``: unbiased ||p - q||^2 (the delta-kernel MMD^2), m >= 2, k >= 2.
- ``geometric_cross_entropy`` and ``poisson_cross_entropy``: unbiased estimators of the cross-entropy
  -sum_y q_y log p_y from a random number of model draws, through -log p = sum_j (1 - p)^j / j.
- ``single_draw_loss``: -1[X=Y], expectation -<p, q>; NOT proper (the counter-example of one model draw
  for a degree-2 score). Kept for tests and as a warning.
- ``evaluate``: average any of them over independent rounds; mean, standard error, per-round values.

Departs from the paper: not checkable where it matters, since its body was not read. Choices made
here: (1) draws must be AT LEAST the degree (m >= a, k >= b), which is what the U-statistic needs; the
abstract's wording is "exceed". (2) The Poisson cross-entropy is Rao-Blackwellised over the order of
the N draws: given N = n draws of which c equal y, P(first j draws all differ from y) = (n - c)_j / (n)_j
replaces the indicator 1[X_1..X_j != y] of the plain randomised-truncation estimator. The expectation
is unchanged (it is the indicator form averaged over all orderings, checked exactly in the tests), the
variance is lower, and the loss depends on counts only. Whether the paper's Poisson scheme is this one
is unverified. (3) Outcomes are mapped to integer ids jointly over model and target samples and all
losses are computed from counts; nothing enumerates tuples of draws.

Comparing two models from samples only (lower is better; the same integer rng gives both models the
same held-out rounds, so the per-round difference is a paired comparison):

    from tasks.proper_losses import evaluate
    small = evaluate(sample_small, heldout, "power", m=8, k=8, rng=0)  # sample_small(n, rng) -> n outcomes
    ref = evaluate(sample_reference, heldout, "power", m=8, k=8, rng=0)
    gap = small.values - ref.values  # mean +- std / sqrt(rounds)

Outcomes may be any hashable values: a 1-D array of ints or strings, a 2-D array whose rows are
outcomes (e.g. token-id sequences of one length), or a list of tuples (token sequences of any length).
A 2-D row and the tuple with the same entries are the same outcome.

Variance, the practical catch: collisions are rare when Y is large (whole sentences), so the
polynomial losses stay unbiased but need many draws per round; coarsening outcomes (n-grams, feature
bins) makes them proper only for the coarsened distribution. The cross-entropy estimators need p to
cover q's support: geometric stopping costs E[T] = sum_y q_y / p_y draws (infinite if p misses a
y that q can produce). The Poisson version has, in theory, infinite variance for every y with
p_y < 1 (its weights 1 / (j P(N >= j)) grow faster than (1 - p_y)^j shrinks), so its standard error is
unreliable unless rate >> 1 / min p_y; prefer the geometric one when you can afford it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np

Samples = Union[np.ndarray, Sequence[Any]]  # 1-D array, 2-D array (rows are outcomes) or list of outcomes
Sampler = Callable[[int, np.random.Generator], Samples]  # sample_model(n, rng) -> n outcomes

LOSSES = ("power", "squared_distance", "single_draw", "monomial", "geometric_ce", "poisson_ce")
_SEQUENTIAL = ("geometric_ce", "poisson_ce")  # need a sampler, not a fixed sample


# ----------------------------------------------------------------------------------------- outcomes
class _OutcomeCoder:
    """Maps outcomes to integer ids, consistently over every call (model and target share one coder)."""

    def __init__(self) -> None:
        self._ids: dict[Any, int] = {}

    def _code(self, key: Any) -> int:
        return self._ids.setdefault(key, len(self._ids))

    def encode(self, samples: Samples) -> np.ndarray:
        arr = None
        if isinstance(samples, np.ndarray):
            arr = samples
        else:
            try:
                arr = np.asarray(samples)
            except ValueError:  # ragged: tuples of different lengths
                arr = None
        if arr is not None and arr.dtype != object and arr.ndim in (1, 2):
            if arr.ndim == 1:
                uniq, inverse = np.unique(arr, return_inverse=True)
                keys = [u.item() for u in uniq]
            else:  # rows are outcomes (token sequences of one length)
                uniq, inverse = np.unique(arr, axis=0, return_inverse=True)
                keys = [tuple(row.tolist()) for row in uniq]
            codes = np.fromiter((self._code(key) for key in keys), dtype=np.int64, count=len(keys))
            return codes[inverse.reshape(-1)]
        if arr is not None and arr.dtype != object:
            raise ValueError(f"samples must be 1-D (outcomes) or 2-D (rows are outcomes), got shape {arr.shape}")
        items = list(samples)
        return np.fromiter((self._code(_hashable(x)) for x in items), dtype=np.int64, count=len(items))


def _hashable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return tuple(x.tolist()) if x.ndim else x.item()
    if isinstance(x, list):
        return tuple(x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def _n_outcomes(samples: Samples) -> int:
    return len(samples) if not isinstance(samples, np.ndarray) else samples.shape[0]


def _take(samples: Samples, idx: np.ndarray) -> Samples:
    if isinstance(samples, np.ndarray):
        return samples[idx]
    return [samples[i] for i in idx]


def _draw(sampler: Sampler, n: int, rng: np.random.Generator) -> Samples:
    out = sampler(n, rng)
    if _n_outcomes(out) != n:
        raise ValueError(f"sample_model(n={n}, rng) returned {_n_outcomes(out)} outcomes")
    return out


def conditional_sampler(probs: np.ndarray) -> Sampler:
    """A black box for a conditional model: one outcome distribution per context (the rows of ``probs``,
    [contexts, outcomes], e.g. an LM's next-token distributions at held-out positions). ``sample(n, rng)``
    needs n = contexts x r and returns r draws from context 0, then r from context 1, and so on (outcome
    ids, int64). Used as both the model and the target of ``evaluate(..., rounds=contexts)``, round i is
    context i (rounds are consecutive blocks, and outcomes of different rounds never collide), so the
    mean loss is the conditional loss averaged over the contexts. Only its draws reach the loss."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] < 1 or (probs < 0).any() or not (probs.sum(1) > 0).all():
        raise ValueError(f"probs must be [contexts, outcomes] of non-negative rows with mass, got {probs.shape}")
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]

    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        contexts = cdf.shape[0]
        if n % contexts:
            raise ValueError(f"{n} draws do not split evenly over {contexts} contexts")
        u = rng.random((contexts, n // contexts))
        draws = np.stack([np.searchsorted(row, ui, side="right") for row, ui in zip(cdf, u)])
        return np.minimum(draws, cdf.shape[1] - 1).reshape(-1).astype(np.int64)  # guards u ~ 1 - eps

    return sample


# ------------------------------------------------------------------------------ counts per round
def falling_factorial(n: np.ndarray | int, j: int) -> np.ndarray:
    """(n)_j = n (n-1) ... (n-j+1), elementwise; 1 for j = 0 and 0 for integer 0 <= n < j."""
    n = np.asarray(n, dtype=np.float64)
    out = np.ones_like(n)
    for i in range(j):
        out = out * (n - i)
    return out


@dataclass(frozen=True)
class _RoundCounts:
    """Model and target counts of the outcomes that occur in each round, stored sparsely: for each
    (round, outcome) pair seen, ``c`` model draws and ``t`` target draws of it in that round."""

    round_of_pair: np.ndarray
    c: np.ndarray  # c_y: model count (float64)
    t: np.ndarray  # t_y: target count
    m: int  # model draws per round
    k: int  # target draws per round
    rounds: int

    @classmethod
    def from_samples(cls, model_samples: Samples, target_samples: Samples, m: int, k: int, rounds: int = 1,
                     coder: _OutcomeCoder | None = None) -> "_RoundCounts":
        coder = coder or _OutcomeCoder()
        model_ids, target_ids = coder.encode(model_samples), coder.encode(target_samples)
        if model_ids.size != rounds * m or target_ids.size != rounds * k:
            raise ValueError(f"expected {rounds}x{m} model and {rounds}x{k} target outcomes, "
                             f"got {model_ids.size} and {target_ids.size}")
        n_ids = int(max(model_ids.max(initial=-1), target_ids.max(initial=-1))) + 1
        # one key per (round, outcome): round * n_ids + id; rounds are consecutive blocks of m (k) draws
        model_keys = np.repeat(np.arange(rounds, dtype=np.int64), m) * n_ids + model_ids
        target_keys = np.repeat(np.arange(rounds, dtype=np.int64), k) * n_ids + target_ids
        keys, inverse = np.unique(np.concatenate([model_keys, target_keys]), return_inverse=True)
        inverse = inverse.reshape(-1)
        c = np.bincount(inverse[: model_keys.size], minlength=keys.size).astype(np.float64)
        t = np.bincount(inverse[model_keys.size:], minlength=keys.size).astype(np.float64)
        return cls(keys // max(n_ids, 1), c, t, m, k, rounds)

    def monomial(self, a: int, b: int, what: str = "") -> np.ndarray:
        """Per round, the unbiased estimate of sum_y p_y^a q_y^b."""
        if not (isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)) and a >= 0 and b >= 0):
            raise ValueError(f"degrees must be non-negative integers, got a={a}, b={b}")
        if a + b == 0:
            raise ValueError("a + b must be at least 1: sum_y p_y^0 q_y^0 = |Y| is not estimable from samples")
        what = what or f"sum_y p_y^{a} q_y^{b}"
        for draws, degree, who in ((self.m, a, "model"), (self.k, b, "target")):
            if draws < degree:
                raise ValueError(
                    f"{what} has degree {degree} in the {who} distribution and needs at least {degree} {who} "
                    f"draws per round, got {draws}: a black-box loss is unbiased only when the number of "
                    "draws is at least the degree of its polynomial (Kimpara et al. 2023)")
        terms = falling_factorial(self.c, a) * falling_factorial(self.t, b)
        sums = np.bincount(self.round_of_pair, weights=terms, minlength=self.rounds)
        return sums / (falling_factorial(self.m, a) * falling_factorial(self.k, b))


def _check_degree(degree: int) -> int:
    if not isinstance(degree, (int, np.integer)) or degree < 2:
        raise ValueError(f"degree must be an integer >= 2 (G(p) = sum p^d is strictly convex only then), "
                         f"got {degree!r}")
    return int(degree)


def _power(rc: _RoundCounts, degree: int = 2) -> np.ndarray:
    d = _check_degree(degree)
    what = f"power_loss of degree {d}"
    # S(p, y) = (d-1) sum_y' p_y'^d - d p_y^(d-1), averaged over the target draws y
    return (d - 1) * rc.monomial(d, 0, what) - d * rc.monomial(d - 1, 1, what)


def _squared_distance(rc: _RoundCounts) -> np.ndarray:
    what = "squared_distance (degree 2)"
    return rc.monomial(2, 0, what) + rc.monomial(0, 2, what) - 2 * rc.monomial(1, 1, what)


def _single_draw(rc: _RoundCounts) -> np.ndarray:
    return -rc.monomial(1, 1, "single_draw_loss")


def _monomial(rc: _RoundCounts, a: int = 1, b: int = 1) -> np.ndarray:
    return rc.monomial(a, b)


_FIXED_SAMPLE = {"power": _power, "squared_distance": _squared_distance, "single_draw": _single_draw,
                 "monomial": _monomial}


def _fixed_sample_loss(name: str, model_samples: Samples, target_samples: Samples, **kwargs: Any) -> float:
    m, k = _n_outcomes(model_samples), _n_outcomes(target_samples)
    rc = _RoundCounts.from_samples(model_samples, target_samples, m, k)
    return float(_FIXED_SAMPLE[name](rc, **kwargs)[0])


# ------------------------------------------------------------------ fixed number of draws (public)
def monomial_estimate(model_samples: Samples, target_samples: Samples, a: int, b: int) -> float:
    """Unbiased estimate of sum_y p_y^a q_y^b from m i.i.d. model and k i.i.d. target draws.

    The U-statistic sum_y (c_y)_a (t_y)_b / ((m)_a (k)_b), with c, t the counts: the average of
    1[X_i1 = .. = X_ia = Y_j1 = .. = Y_jb] over all ordered tuples of distinct draws. Raises ValueError
    when m < a or k < b (the number of draws must be at least the degree).
    """
    return _fixed_sample_loss("monomial", model_samples, target_samples, a=a, b=b)


def power_loss(model_samples: Samples, target_samples: Samples, degree: int = 2) -> float:
    """Black-box proper loss of the power score G(p) = sum_y p_y^d (d = ``degree``; d = 2 is Brier).

    Unbiased for (d-1) sum_y p_y^d - d sum_y q_y p_y^(d-1) = D_G(q, p) - sum_y q_y^d, which is minimised
    at p = q. Needs m >= d model draws and k >= 1 target draws (ValueError otherwise). With d = 2 it
    equals the collision loss 1[X1=X2] - 1[X1=Y] - 1[X2=Y] averaged over all pairs i != i' and all j.
    """
    return _fixed_sample_loss("power", model_samples, target_samples, degree=degree)


def squared_distance(model_samples: Samples, target_samples: Samples) -> float:
    """Unbiased estimate of ||p - q||^2 = sum p^2 + sum q^2 - 2 <p, q> (needs m >= 2 and k >= 2).

    All pairs: mean_{i != i'} 1[X_i = X_i'] + mean_{j != j'} 1[Y_j = Y_j'] - 2 mean_{i, j} 1[X_i = Y_j];
    can be negative when p and q are close.
    """
    return _fixed_sample_loss("squared_distance", model_samples, target_samples)


def single_draw_loss(model_samples: Samples, target_samples: Samples) -> float:
    """-1[X = Y] averaged over all (i, j): expectation -<p, q>. NOT proper: it is minimised by a point
    mass on argmax_y q_y, not by q. The counter-example for "draws >= degree"; do not rank models with it.
    """
    return _fixed_sample_loss("single_draw", model_samples, target_samples)


# ---------------------------------------------------------- random number of draws: cross-entropy
@dataclass(frozen=True)
class CrossEntropyEstimate:
    """Unbiased estimate of the cross-entropy -sum_y q_y log p_y (in nats) from model draws.

    value: mean of ``per_target``; per_target: the estimate of -log p_y for each target draw y;
    draws: model draws the estimator used for each target (T for geometric stopping, N for Poisson);
    capped: geometric stopping only, targets where ``max_draws`` was reached with no match (their
    entry is then the lower bound H_max_draws); draws_made: total outcomes asked of the sampler.
    """

    value: float
    per_target: np.ndarray
    draws: np.ndarray
    capped: np.ndarray
    draws_made: int


def _harmonic(n: np.ndarray) -> np.ndarray:
    """H_n = sum_{i=1}^n 1/i for integer arrays n >= 0."""
    n = np.asarray(n, dtype=np.int64)
    top = int(n.max(initial=0))
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1))])
    return table[n]


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _start_sampling(rng, target_samples: Samples) -> tuple[np.random.Generator, "_OutcomeCoder", np.ndarray]:
    """(generator, a coder that will also code the model's draws, the target draws' ids)."""
    coder = _OutcomeCoder()
    target_ids = coder.encode(target_samples)
    if target_ids.size == 0:
        raise ValueError("need at least one target draw")
    return _rng(rng), coder, target_ids


def geometric_cross_entropy(sample_model: Sampler, target_samples: Samples,
                            rng: np.random.Generator | int | None = None, *, max_draws: int = 100_000,
                            on_cap: str = "raise") -> CrossEntropyEstimate:
    """Cross-entropy by geometric stopping: for each target draw y, draw from the model until the first
    draw equals y; with T draws, E[H_{T-1}] = sum_j P(T > j) / j = sum_j (1 - p_y)^j / j = -log p_y.

    sample_model(n, rng) must return n i.i.d. model outcomes. Draws come in growing chunks, so the
    sampler is asked for up to about twice the T it needs; ``draws`` reports T, ``draws_made`` the total.
    If T would exceed ``max_draws`` (p_y = 0 gives an infinite cost), ``on_cap="raise"`` raises
    RuntimeError; ``on_cap="flag"`` marks the target in ``capped`` and scores it by the lower bound
    H_max_draws, so ``value`` is then a lower bound.
    """
    if on_cap not in ("raise", "flag"):
        raise ValueError(f"on_cap must be 'raise' or 'flag', got {on_cap!r}")
    if max_draws < 1:
        raise ValueError(f"max_draws must be >= 1, got {max_draws}")
    rng, coder, target_ids = _start_sampling(rng, target_samples)
    n_targets = target_ids.size
    stop_time = np.zeros(n_targets, dtype=np.int64)  # T, 0 while pending
    drawn = np.zeros(n_targets, dtype=np.int64)  # draws so far without a match
    pending = np.arange(n_targets)
    chunk, draws_made = 8, 0
    while pending.size:
        # every pending target has drawn the same number so far; cap one sampler call at ~4M outcomes
        # and no target beyond max_draws
        size = int(min(chunk, max(1, 2**22 // pending.size), max_draws - drawn[pending[0]]))
        ids = coder.encode(_draw(sample_model, pending.size * size, rng)).reshape(pending.size, size)
        draws_made += pending.size * size
        hit = ids == target_ids[pending, None]
        found = hit.any(axis=1)
        stop_time[pending[found]] = drawn[pending[found]] + hit[found].argmax(axis=1) + 1
        drawn[pending[~found]] += size
        pending = pending[~found]
        pending = pending[drawn[pending] < max_draws]
        chunk = min(2 * chunk, 4096)
    capped = stop_time == 0
    if capped.any() and on_cap == "raise":
        raise RuntimeError(
            f"{int(capped.sum())} of {n_targets} target draws were not produced by the model in max_draws="
            f"{max_draws} draws: p may give them (near) zero probability, where the cross-entropy is "
            "infinite. Raise max_draws, or pass on_cap='flag' to get a lower bound")
    per_target = _harmonic(np.where(capped, max_draws + 1, stop_time) - 1)  # capped: H_max_draws
    draws = np.where(capped, max_draws, stop_time)
    return CrossEntropyEstimate(float(per_target.mean()), per_target, draws, capped, draws_made)


def _poisson_tail_weights(rate: float, top: int) -> np.ndarray:
    """w_j = 1 / (j P(N >= j)) for N ~ Poisson(rate), j = 0..top (w_0 unused, set to 0)."""
    last = int(max(top, rate + 40 * math.sqrt(rate) + 100)) + 100  # pmf beyond `last` is negligible
    i = np.arange(last + 1)
    log_pmf = -rate + i * math.log(rate) - np.array([math.lgamma(x + 1) for x in i])
    log_tail = np.logaddexp.accumulate(log_pmf[::-1])[::-1]  # log P(N >= j)
    j = np.arange(1, top + 1)
    return np.concatenate([[0.0], np.exp(-log_tail[1: top + 1]) / j])


def poisson_cross_entropy(sample_model: Sampler, target_samples: Samples,
                          rng: np.random.Generator | int | None = None, *, rate: float = 100.0
                          ) -> CrossEntropyEstimate:
    """Cross-entropy with a Poisson number of draws (randomised truncation of -log p = sum_j (1-p)^j / j).

    For each target draw y: N ~ Poisson(rate) model draws, c of them equal to y; the estimate is
    sum_{j=1}^{N-c} [(N-c)_j / (N)_j] / (j P(N >= j)), whose expectation is -log p_y. (N-c)_j / (N)_j is
    the chance that the first j of the N draws in random order all differ from y: the plain estimator
    sum_j 1[X_1..X_j != y] / (j P(N >= j)) averaged over orderings (Rao-Blackwellised). Heavy-tailed,
    with infinite variance in theory: use rate >> 1 / min_y p_y over q's likely outcomes.
    """
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng, coder, target_ids = _start_sampling(rng, target_samples)
    n_targets = target_ids.size
    n_draws = rng.poisson(rate, size=n_targets)  # N per target
    total = int(n_draws.sum())
    owner = np.repeat(np.arange(n_targets), n_draws)
    model_ids = coder.encode(_draw(sample_model, total, rng)) if total else np.zeros(0, dtype=np.int64)
    matches = np.bincount(owner, weights=model_ids == target_ids[owner], minlength=n_targets).astype(np.int64)
    misses = n_draws - matches  # N - c
    # the estimate depends on (N, N - c) only: compute it once per distinct pair
    pairs, inverse = np.unique(np.stack([n_draws, misses], axis=1), axis=0, return_inverse=True)
    n, z = pairs[:, 0].astype(np.float64), pairs[:, 1].astype(np.float64)
    top = int(z.max(initial=0))
    weights = _poisson_tail_weights(rate, top)
    r = np.arange(top)[None, :]  # factor r of (z)_j / (n)_j = prod_{r<j} (z - r) / (n - r)
    valid = r < z[:, None]
    factors = np.where(valid, (z[:, None] - r) / np.where(valid, n[:, None] - r, 1.0), 0.0)
    no_match_prob = np.cumprod(factors, axis=1)  # column j-1: P(first j draws all miss y | N, c)
    per_pair = no_match_prob @ weights[1:] if top else np.zeros(len(pairs))
    per_target = per_pair[inverse.reshape(-1)]
    return CrossEntropyEstimate(float(per_target.mean()), per_target, n_draws, np.zeros(n_targets, bool), total)


# --------------------------------------------------------------------------------------- evaluate
@dataclass(frozen=True)
class Evaluation:
    """mean and stderr of a loss over ``rounds`` independent rounds; ``values`` holds each round's
    loss (subtract two models' values round by round for a paired comparison); ``model_draws`` is
    the number of model outcomes the estimator used."""

    mean: float
    stderr: float
    rounds: int
    values: np.ndarray
    model_draws: int


def evaluate(sample_model: Sampler, target: Samples | Sampler, loss: str = "power", *, rounds: int | None = None,
             m: int = 2, k: int = 1, rng: np.random.Generator | int | None = None, **loss_kwargs: Any
             ) -> Evaluation:
    """Score a generative model against a target from samples only: the loss averaged over rounds.

    sample_model(n, rng) -> n i.i.d. model outcomes. ``target`` is either held-out target samples
    (split into ``rounds`` disjoint random blocks of k, so rounds are independent; default
    rounds = len(target) // k) or a sampler like sample_model (default rounds = 1000).
    ``loss`` (see LOSSES): "power" (``degree=2``: Brier / collision), "squared_distance",
    "single_draw" (improper; for comparison only), "monomial" (``a=, b=``: the estimator of
    sum p^a q^b), or the cross-entropy estimators "geometric_ce" (``max_draws=, on_cap=``) and
    "poisson_ce" (``rate=``), which ignore m and score each of the k target draws of a round.
    Each round uses m fresh model draws and k target draws; the model is sampled in one call.

    Lower is better for every loss. Two models evaluated with the same integer ``rng`` see the same
    target blocks, so ``a.values - b.values`` gives a paired comparison with a smaller standard error.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if m < 1 or k < 1:
        raise ValueError(f"m and k must be >= 1, got m={m}, k={k}")
    model_rng, target_rng = _rng(rng).spawn(2)  # target blocks depend only on the seed: paired comparisons
    if callable(target):
        rounds = 1000 if rounds is None else rounds
        target_samples = _draw(target, rounds * k, target_rng)
    else:
        available = _n_outcomes(target) // k
        rounds = available if rounds is None else rounds
        if rounds > available:
            raise ValueError(f"{_n_outcomes(target)} target samples give at most {available} disjoint rounds "
                             f"of k={k}, asked for {rounds}")
        target_samples = _take(target, target_rng.permutation(_n_outcomes(target))[: rounds * k])
    if rounds < 1:
        raise ValueError(f"need at least one round, got {rounds}")

    if loss in _SEQUENTIAL:
        estimator = geometric_cross_entropy if loss == "geometric_ce" else poisson_cross_entropy
        est = estimator(sample_model, target_samples, model_rng, **loss_kwargs)
        values, model_draws = est.per_target.reshape(rounds, k).mean(axis=1), int(est.draws.sum())
    else:
        model_samples = _draw(sample_model, rounds * m, model_rng)
        rc = _RoundCounts.from_samples(model_samples, target_samples, m, k, rounds)
        values, model_draws = _FIXED_SAMPLE[loss](rc, **loss_kwargs), rounds * m
    stderr = float(values.std(ddof=1) / math.sqrt(rounds)) if rounds > 1 else float("nan")
    return Evaluation(float(values.mean()), stderr, rounds, values, model_draws)
