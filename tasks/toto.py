"""How many TOTO tips guarantee >= x strikes at a safety level Q: the paper's urn model, exact and approximate.

Stömmer, "Beating the average: how to generate profit by exploiting the inefficiencies of soccer betting"
(arXiv 2303.16648).
Implements: the binomial strike distribution of one tip (eq. 1); the "reduced combination space" urn of
N = (1/p)^13 tips of which M_x = N P(x) have x strikes (eqs. 2, 5); the exact probability that n distinct
tips hold at least one with >= x strikes, 1 - C(N - S_x, n) / C(N, n) (eq. 11, S_x = sum_{x' >= x} M_x');
the approximation and its inversion n = N [1 - (1 - Q)^(1/S_x)] (eqs. 13-15, rounded up as in Tables 2
and 4); the validity condition S_x << N - n; fees (0.50 EUR per tip and per voucher of 12 tips) and the
paper's "expected profit" = tier payout - fees (eq. 16); a Monte Carlo of the urn.
Beyond the paper (from our research note, section 9 (d)-(f)): a Poisson-binomial strike distribution for
per-match hit rates, and a stress test in which all tips face the same realised outcomes.

Departs from the paper:
- Eq. 14 as transcribed, Q = 1 - (1 - S/N)^n (``coverage_approx``: n tips drawn WITH replacement, i.e.
  i.i.d.), is not the formula that eq. 15 inverts. Eq. 15, n = N [1 - (1 - Q)^(1/S)], solves
  Q = 1 - (1 - n/N)^S (``coverage_eq15``): by the symmetry C(N-S, n)/C(N, n) = C(N-n, S)/C(N, S) =
  prod_{j<S} (N-n-j)/(N-j) (the kind of identity eq. 12 states), each factor is ~ 1 - n/N exactly when
  S << N - n, which is the paper's stated condition. The paper's Tables 2 and 4 are eq. 15 (p = 1/2,
  >= 12 strikes, Q = 90%: eq. 15 gives 1,243 as tabulated; inverting 1 - (1 - S/N)^n would give 1,347).
  We keep both and name them apart: ``coverage_approx`` is what i.i.d. tips get (the baseline of the
  stress test), ``tips_approx`` is the paper's eq. 15, ``coverage_eq15`` is the curve eq. 15 inverts.
  Both lie below the exact coverage (proofs in their docstrings), so eq. 15 never asks for fewer tips
  than needed: tips_approx >= tips_exact.
  (We read the paper through a transcription of its equations and tables, not the PDF itself.)
- n is rounded up everywhere, so that Q is reached. The tables (as transcribed) round up too, except two
  p = 1/2 tier-13 cells, N Q = 8,110.08 and 8,191.18, tabulated as 8,110 and 8,191 (8,111 and 8,192 here).
- N and S_x are real for p with non-integer 1/p (p = 0.55: N = 2,372.9); the exact coverage uses the
  gamma function, which the paper's integer binomial coefficients extend.
- "Expected profit" is the paper's own definition (payout of the tier minus fees). It is not an expectation:
  it neither weights the payout by Q nor adds lower tiers, and pari-mutuel payouts vary week to week.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import comb, gammaln

MATCHES = 13                                                # matches per tip (13er Wette)
PAYOUTS = {10: 49.0, 11: 434.0, 12: 6449.0, 13: 107813.0}   # EUR, the paper's 1.5-year average payout per tier
FEE_PER_TIP = 0.5                                           # EUR
FEE_PER_VOUCHER = 0.5                                       # EUR, one voucher holds up to 12 tips
TIPS_PER_VOUCHER = 12

_EXACT_PRODUCT_TERMS = 256   # n up to this: coverage_exact sums log1p(-S/(N-i)) term by term (no cancellation)
_FLOYD_MAX_SPACE = 2**28     # simulate_urn keeps a [rounds, k^matches] bool mask for large n; beyond this it refuses


# ----------------------------------------------------------------------------------------------- checks
def _whole(value, low: int, high: float, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{what}, got {value!r}")
    return int(value)


def _open_unit(value, what: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{what} must lie in the open interval (0, 1), got {value}")
    return value


def _check_matches(matches) -> int:
    return _whole(matches, 1, math.inf, "matches must be a positive integer")


def _check_p(p) -> float:
    return _open_unit(p, "hit rate p")


def _check_tier(tier, matches: int) -> int:
    return _whole(tier, 0, matches, f"tier (minimum number of strikes) must be an integer in 0..{matches}")


def _check_safety(safety) -> float:
    return _open_unit(safety, "safety level Q")


def _check_n(n) -> np.ndarray:
    arr = np.asarray(n, dtype=float)
    if np.any(~np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"number of tips n must be >= 0, got {n!r}")
    if np.any(arr != np.floor(arr)):
        raise ValueError(f"number of tips n must be a whole number, got {n!r}")
    return arr


def _out(arr: np.ndarray, like):
    return float(arr) if np.ndim(like) == 0 else arr


# ------------------------------------------------------------------------------------ strikes and urn
def strike_distribution(p, matches: int = MATCHES) -> np.ndarray:
    """P(x strikes) for x = 0..matches (eq. 1).

    ``p`` a scalar in [0, 1]: binomial C(m, x) p^x (1-p)^(m-x). ``p`` a sequence of per-match hit rates
    p_1..p_m in [0, 1]: the Poisson-binomial, by the exact dynamic programme over matches; its length must
    equal ``matches`` (pass ``matches=len(p)`` for other than 13 matches).
    """
    matches = _check_matches(matches)
    arr = np.asarray(p, dtype=float)
    if arr.ndim == 0:
        q = float(arr)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"hit rate p must lie in [0, 1], got {q}")
        x = np.arange(matches + 1)
        return comb(matches, x) * q**x * (1.0 - q) ** (matches - x)
    if arr.ndim != 1:
        raise ValueError(f"p must be a scalar or a 1-d sequence of per-match hit rates, got shape {arr.shape}")
    if len(arr) != matches:
        raise ValueError(f"p holds {len(arr)} per-match hit rates but matches={matches}; pass matches=len(p)")
    if np.any(~(arr >= 0.0) | ~(arr <= 1.0)):
        raise ValueError(f"per-match hit rates must lie in [0, 1], got {arr}")
    dist = np.zeros(matches + 1)
    dist[0] = 1.0
    for i, pi in enumerate(arr):             # after match i, dist[x] = P(x strikes among matches 0..i)
        dist[1:i + 2] = dist[1:i + 2] * (1.0 - pi) + dist[:i + 1] * pi
        dist[0] *= 1.0 - pi
    return dist


def reduced_space(p: float, matches: int = MATCHES) -> tuple[float, np.ndarray]:
    """The paper's urn: N = (1/p)^matches tips, M_x = N P(x) of them with x strikes (eqs. 2, 5).

    M_x is evaluated as C(m, x) (1/p - 1)^(m - x), algebraically N P(x), so that integer cases come out as
    integers (p = 1/3: M = 2,288 / 312 / 26 / 1 for 10..13; p = 1/2: M_x = C(13, x)) and sum(M) = N.
    """
    matches, p = _check_matches(matches), _check_p(p)
    n_space = (1.0 / p) ** matches                            # N
    x = np.arange(matches + 1)
    m = comb(matches, x) * (1.0 / p - 1.0) ** (matches - x)   # M_x: C(m,x) (k-1)^(m-x) for k = 1/p
    return float(n_space), m


def tail_count(p: float, tier: int, matches: int = MATCHES) -> float:
    """S_x = sum_{x' >= tier} M_x': tips in the urn with at least ``tier`` strikes."""
    matches = _check_matches(matches)
    tier = _check_tier(tier, matches)
    _, m = reduced_space(p, matches)
    return float(m[tier:].sum())


def _space_and_tail(p, tier, matches) -> tuple[float, float]:
    matches = _check_matches(matches)
    tier = _check_tier(tier, matches)
    n_space, m = reduced_space(p, matches)
    return n_space, min(float(m[tier:].sum()), n_space)


# ------------------------------------------------------------------------------------------- coverage
def _stirling_corr(z):
    """lnGamma(z) - [(z - 1/2) ln z - z + ln(2 pi)/2], the Stirling series to z^-9 (error < 1e-16 for z >= 20)."""
    z2 = z * z
    return (1.0 / 12 - (1.0 / 360 - (1.0 / 1260 - (1.0 / 1680 - 1.0 / (1188 * z2)) / z2) / z2) / z2) / z


def _log_miss(n_space: float, s: float, n: np.ndarray) -> np.ndarray:
    """log C(N-S, n) / C(N, n) = lnG(N-n+1) - lnG(N-S-n+1) - lnG(N+1) + lnG(N-S+1) for 0 <= n <= N - S.

    With x1 = N-S-n+1 and x2 = N-S+1 this is [lnG(x1+S) - lnG(x1)] - [lnG(x2+S) - lnG(x2)]. For x1 >= 20 the
    two brackets are written with Stirling's series and subtracted term by term (the S ln(x+S) parts
    become S log1p(-n/(x2+S))), so no two numbers of size lnG(N) ~ 2e7 (p = 1/3) are ever subtracted:
    plain gammaln would leave ~1e-8 absolute error in log space, this leaves ~1e-12 relative.
    """
    x1, x2 = n_space - s - n + 1.0, n_space - s + 1.0
    out = np.empty_like(n)
    big = x1 >= 20.0
    a = x1[big]
    out[big] = ((a - 0.5) * np.log1p(s / a) - (x2 - 0.5) * np.log1p(s / x2)
                + s * np.log1p(-n[big] / (x2 + s))
                + (_stirling_corr(a + s) - _stirling_corr(a)) - (_stirling_corr(x2 + s) - _stirling_corr(x2)))
    a = x1[~big]                                             # n close to N - S: miss ratio ~ 0 anyway
    out[~big] = (gammaln(a + s) - gammaln(a)) - (gammaln(x2 + s) - gammaln(x2))
    return out


def coverage_exact(p: float, tier: int, n, matches: int = MATCHES):
    """P(at least one of n DISTINCT tips has >= tier strikes) = 1 - C(N - S, n) / C(N, n) (eq. 11).

    C(N-S, n)/C(N, n) = Gamma(N-S+1) Gamma(N-n+1) / (Gamma(N-S-n+1) Gamma(N+1)), evaluated in log space
    (Stirling-differenced, see ``_log_miss``; the first 256 n by the product
    prod_{i<n} (1 - S/(N-i))), so real N and S and N in the millions are fine. 1.0 once n > N - S (every
    draw of n tips must then contain a winning one). Vectorised over n; a scalar n gives a float.
    """
    n_space, s = _space_and_tail(p, tier, matches)
    n_arr = _check_n(n)
    flat = n_arr.ravel()
    log_miss = np.zeros_like(flat)                            # log C(N-S, n) / C(N, n)
    sure = flat > n_space - s
    small = ~sure & (flat <= _EXACT_PRODUCT_TERMS)
    if small.any():
        i = np.arange(int(flat[small].max()))
        terms = np.log1p(-s / (n_space - i))                  # i < n <= N - S, so S/(N-i) < 1
        log_miss[small] = np.concatenate([[0.0], np.cumsum(terms)])[flat[small].astype(int)]
    big = ~sure & ~small
    if big.any():
        log_miss[big] = _log_miss(n_space, s, flat[big])
    cov = np.where(sure, 1.0, -np.expm1(np.minimum(log_miss, 0.0)))
    return _out(cov.reshape(n_arr.shape), n)


def coverage_approx(p: float, tier: int, n, matches: int = MATCHES):
    """Eq. 14 as transcribed, 1 - (1 - S/N)^n: the coverage of n tips drawn WITH replacement (i.i.d.).

    S/N = P(one tip has >= tier strikes), so this is exactly the coverage of n independent tips (the
    stress test's baseline). It lies below ``coverage_exact``: C(N-S, n)/C(N, n) = prod_{i<n} (1 - S/(N-i))
    and every factor is <= 1 - S/N. It is NOT what eq. 15 inverts (see ``coverage_eq15``); for n/N not small
    it is far below the exact value (>= 13 strikes, n = N/2: 0.39 against the exact 0.5).
    """
    n_space, s = _space_and_tail(p, tier, matches)
    n_arr = _check_n(n)
    frac = min(s / n_space, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_miss = np.where(n_arr > 0, n_arr * np.log1p(-frac), 0.0)
    return _out(-np.expm1(log_miss), n)


def coverage_eq15(p: float, tier: int, n, matches: int = MATCHES):
    """1 - (1 - n/N)^S: the coverage curve that the paper's eq. 15 inverts (1.0 once n >= N).

    From C(N-S, n)/C(N, n) = prod_{j<S} (1 - n/(N-j)) with each factor replaced by 1 - n/N, which needs
    S << N - n (the paper's condition). Conservative for S >= 1 (always true here: S >= M_13 = 1): with
    g(S) = log C(N-S, n)/C(N, n) - S log(1 - n/N), g(0) = g(1) = 0 (C(N-1, n)/C(N, n) = 1 - n/N) and g is
    concave in S (a sum of log(1 - S/(N-i))), so g(S) <= 0 for S >= 1, i.e. exact >= this.
    """
    n_space, s = _space_and_tail(p, tier, matches)
    n_arr = _check_n(n)
    frac = np.minimum(n_arr / n_space, 1.0)
    with np.errstate(divide="ignore"):
        cov = -np.expm1(s * np.log1p(-frac))
    return _out(cov, n)


# ---------------------------------------------------------------------------------------- tips needed
def tips_approx(p: float, tier: int, safety: float, matches: int = MATCHES) -> int:
    """The paper's eq. 15, n = N [1 - (1 - Q)^(1/S)], rounded up (Tables 2 and 4); tier 13 gives ceil(N Q).

    A relative slack of 1e-12 before rounding up keeps float noise from turning an exact integer into the
    next one (N Q = 4096 for p = 1/2, Q = 1/2). Never below ``tips_exact`` (``coverage_eq15`` <= exact).
    """
    n_space, s = _space_and_tail(p, tier, matches)
    safety = _check_safety(safety)
    x = n_space * -math.expm1(math.log1p(-safety) / s)     # N [1 - (1-Q)^(1/S)]
    return int(math.ceil(x * (1.0 - 1e-12)))


def tips_exact(p: float, tier: int, safety: float, matches: int = MATCHES) -> int:
    """Smallest n with ``coverage_exact`` >= Q, by bisection on the integers.

    The bracket is [0, hi] with hi = min(tips_approx, floor(N - S) + 1): both have coverage >= Q. A
    coverage within 1e-12 below Q counts as reaching it (the same float-noise slack as ``tips_approx``).
    """
    n_space, s = _space_and_tail(p, tier, matches)
    safety = _check_safety(safety)

    def ok(n: int) -> bool:
        return coverage_exact(p, tier, n, matches) >= safety - 1e-12

    lo, hi = 0, int(math.floor(n_space - s)) + 1             # coverage(0) = 0 < Q; coverage(hi) = 1
    cand = tips_approx(p, tier, safety, matches)
    if cand < hi and ok(cand):
        hi = cand
    while hi - lo > 1:                                       # invariant: not ok(lo), ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def approximation_ratio(p: float, tier: int, n, matches: int = MATCHES) -> float:
    """S / (N - n): the paper's validity condition for eqs. 13-15 is S << N - n (inf once n >= N)."""
    n_space, s = _space_and_tail(p, tier, matches)
    n_arr = _check_n(n)
    with np.errstate(divide="ignore"):
        ratio = np.where(n_arr < n_space, s / np.maximum(n_space - n_arr, 1e-300), np.inf)
    return _out(ratio, n)


def approximation_valid(p: float, tier: int, n, threshold: float = 0.01, matches: int = MATCHES) -> bool:
    """S / (N - n) < threshold, the paper's "S << N - n" made concrete.

    threshold = 0.01 reads "<<" as two orders of magnitude; our research note expected it to keep eq. 15's
    curve within 1e-3 of the exact coverage. Measured over p in {1/3, 1/2, 0.55} and every n in [0, N]
    with ratio < 0.01: max |coverage_exact - coverage_eq15| = 8.6e-4 over the paying tiers 10..13
    (p = 0.55, >= 12), but 1.6e-3 at p = 1/3, >= 9 (tests/unit/test_toto.py checks the 10..13 bound).
    At p = 1/2 the condition fails for tiers 10 and 11 at every n (S/N = 0.046 and 0.011), and there
    eq. 15 asks for 1-5 tips more than needed. The ratio says nothing about ``coverage_approx``, whose
    error grows with n / N instead (0.36 at >= 13 strikes, where the ratio is ~1/N until n ~ N).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    ratio = approximation_ratio(p, tier, n, matches)
    return _out(np.asarray(ratio) < threshold, n) if np.ndim(n) else bool(ratio < threshold)


# ------------------------------------------------------------------------------------- fees and profit
def fees(n: int) -> float:
    """0.50 EUR per tip plus 0.50 EUR per voucher of up to 12 tips: 0.5 n + 0.5 ceil(n / 12)."""
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"number of tips n must be a whole number >= 0, got {n!r}")
    n = int(n)
    return FEE_PER_TIP * n + FEE_PER_VOUCHER * (-(-n // TIPS_PER_VOUCHER))


def paper_profit(tier: int, n: int, payouts: dict = PAYOUTS) -> float:
    """The paper's "expected profit" (eq. 16): the tier's average payout minus the fees of n tips.

    Not an expectation: the payout is not weighted by the probability Q of reaching the tier, lower tiers
    hit along the way are not added, and the payout is a 1.5-year average of a pari-mutuel pool.
    """
    if tier not in payouts:
        raise ValueError(f"no payout for tier {tier!r}; payouts cover tiers {sorted(payouts)}")
    return float(payouts[tier]) - fees(n)


# ----------------------------------------------------------------------------------------- simulation
def _strikes_of(tips: np.ndarray, k: int, matches: int) -> np.ndarray:
    """Number of base-k digits equal to 0 (the true outcome) among the ``matches`` digits of each tip."""
    t = tips.astype(np.int64, copy=True)
    strikes = np.zeros(t.shape, dtype=np.int64)
    for _ in range(matches):
        t, digit = np.divmod(t, k)
        strikes += digit == 0
    return strikes


def simulate_urn(p: float, tier: int, n: int, rounds: int, rng: np.random.Generator,
                 matches: int = MATCHES) -> np.ndarray:
    """Monte Carlo of the urn: per round draw n DISTINCT tips uniformly from the k^matches tips (k = 1/p)
    and report whether any has >= tier strikes. Returns a bool array [rounds].

    A tip is an integer in [0, k^matches); its base-k digits are its picks and digit 0 is the true outcome,
    so M_x = C(m, x) (k-1)^(m-x) tips have x strikes, as in ``reduced_space``. Small n (n^2 <= k^m):
    draw with replacement and redraw the rounds that hold a duplicate. Larger n: Floyd's algorithm, one
    step per tip, vectorised over rounds on a [rounds, k^m] membership mask.
    """
    matches = _check_matches(matches)
    p = _check_p(p)
    tier = _check_tier(tier, matches)
    k = round(1.0 / p)
    if k < 2 or abs(1.0 / p - k) > 1e-9:
        raise ValueError(f"simulate_urn needs 1/p to be an integer (the urn has k^matches tips), got 1/p = {1/p}")
    space = k**matches
    n = int(_check_n(n))
    if n > space:
        raise ValueError(f"cannot draw n={n} distinct tips from a space of {space} (= {k}^{matches})")
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    rounds = int(rounds)
    hit = np.zeros(rounds, dtype=bool)
    if n == 0:
        return hit
    if n * n <= space:                                       # rejection: P(duplicate) <= ~0.4 per round
        todo = np.arange(rounds)
        while todo.size:
            tips = rng.integers(0, space, size=(todo.size, n))
            srt = np.sort(tips, axis=1)
            fresh = ~np.any(srt[:, 1:] == srt[:, :-1], axis=1)
            hit[todo[fresh]] = np.any(_strikes_of(tips[fresh], k, matches) >= tier, axis=1)
            todo = todo[~fresh]
        return hit
    if space > _FLOYD_MAX_SPACE:
        raise ValueError(f"n={n} distinct tips from a space of {space} would need a {space}-entry mask per "
                         f"round; use n^2 <= {space} or a smaller space")
    winning = _strikes_of(np.arange(space), k, matches) >= tier
    chunk = max(1, 2**24 // space)
    for start in range(0, rounds, chunk):
        c = min(chunk, rounds - start)
        rows = np.arange(c)
        chosen = np.zeros((c, space), dtype=bool)
        for j in range(space - n, space):                    # Floyd: a uniform n-subset of range(space)
            t = rng.integers(0, j + 1, size=c)
            t = np.where(chosen[rows, t], j, t)
            chosen[rows, t] = True
        hit[start:start + c] = np.any(chosen & winning, axis=1)
    return hit


def _check_probs(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"{name} must have shape [matches, 3] (1 / X / 2), got {arr.shape}")
    if np.any(~(arr >= 0)) or np.any(np.abs(arr.sum(1) - 1.0) > 1e-6):
        raise ValueError(f"{name} rows must be probabilities (>= 0, summing to 1)")
    return arr


def pick_probs_for_hit_rate(match_probs: np.ndarray, hit_rate: float) -> np.ndarray:
    """Pick distributions pi_m ∝ q_m^tau with one global tau >= 0 such that the mean hit rate
    mean_m sum_o q_m(o) pi_m(o) equals ``hit_rate``.

    tau = 0 picks uniformly (hit rate exactly 1/3); tau -> inf picks each match's favourite (ties split),
    the largest reachable hit rate mean_m max_o q_m(o). The hit rate is non-decreasing in tau (its
    derivative is Cov_pi(q, log q) >= 0), so bisection on tau finds it (to 1e-12). ValueError outside
    [1/3, favourite rate].
    """
    q = _check_probs(match_probs, "match_probs")
    hit_rate = float(hit_rate)
    logq = np.where(q > 0, np.log(np.where(q > 0, q, 1.0)), -np.inf)

    def picks(tau: float) -> np.ndarray:
        if tau == 0:
            return np.full_like(q, 1.0 / 3)
        z = tau * logq
        w = np.exp(z - z.max(1, keepdims=True))
        return w / w.sum(1, keepdims=True)

    def rate(pi: np.ndarray) -> float:
        return float(np.mean(np.sum(q * pi, axis=1)))

    fav = q == q.max(1, keepdims=True)
    fav_picks = fav / fav.sum(1, keepdims=True)
    lo_rate, hi_rate = rate(picks(0.0)), rate(fav_picks)
    if not lo_rate - 1e-12 <= hit_rate <= hi_rate + 1e-12:
        raise ValueError(f"hit rate {hit_rate} is not reachable with pi ∝ q^tau, tau >= 0: the range is "
                         f"[{lo_rate:.6f} (uniform picks), {hi_rate:.6f} (always the favourite)]")
    if hit_rate <= lo_rate:
        return picks(0.0)
    lo, hi = 0.0, 1.0
    while rate(picks(hi)) < hit_rate:
        lo, hi = hi, 2 * hi
        if hi > 1e6:                                          # numerically the favourite limit
            return fav_picks
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if rate(picks(mid)) < hit_rate:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return picks(hi)


def _poisson_binomial_tail(h: np.ndarray, tier: int) -> np.ndarray:
    """P(>= tier successes) for each row of independent success probabilities h [rounds, m]."""
    rounds, m = h.shape
    dist = np.zeros((rounds, m + 1))
    dist[:, 0] = 1.0
    for i in range(m):
        hi = h[:, i:i + 1]
        dist[:, 1:i + 2] = dist[:, 1:i + 2] * (1.0 - hi) + dist[:, :i + 1] * hi
        dist[:, 0] *= 1.0 - h[:, i]
    return np.clip(dist[:, tier:].sum(1), 0.0, 1.0)


def simulate_shared_outcomes(match_probs: np.ndarray, pick_probs: np.ndarray, tier: int, n: int, rounds: int,
                             rng: np.random.Generator) -> np.ndarray:
    """Stress test of the independence assumption: all n tips face the SAME realised outcomes.

    Per round: draw one outcome o_m ~ match_probs[m] per match; a tip drawn from pick_probs then hits match m
    with probability pick_probs[m, o_m], independently across matches, so P(tip >= tier | outcomes) is a
    Poisson-binomial tail, and n i.i.d. tips cover the round with probability 1 - (1 - P)^n. Returns that
    exact conditional coverage per round [rounds]; its mean is the coverage. Since 1 - (1 - P)^n is concave
    in P, the mean lies below 1 - (1 - E P)^n (Jensen), and compared with ``coverage_approx(hit_rate, ...)``
    it also pays for the spread of the per-match hit rates.
    """
    q = _check_probs(match_probs, "match_probs")
    pi = _check_probs(pick_probs, "pick_probs")
    if q.shape != pi.shape:
        raise ValueError(f"match_probs {q.shape} and pick_probs {pi.shape} must have the same shape")
    m = q.shape[0]
    tier = _check_tier(tier, m)
    n = float(_check_n(n))
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    u = rng.random((int(rounds), m, 1))
    cdf = np.cumsum(q, axis=1)
    outcome = np.minimum((u > cdf[None, :, :2]).sum(-1), 2)            # [rounds, m] in {0, 1, 2}
    h = pi[np.arange(m)[None, :], outcome]                              # per-match hit probability
    tail = _poisson_binomial_tail(h, tier)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_miss = np.where(n > 0, n * np.log1p(-tail), 0.0)
    return -np.expm1(log_miss)
