import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from tasks import toto as T

SAFETIES = (0.9, 0.99, 0.999, 0.9999)


# ------------------------------------------------------------------------------------- the paper's urn
def test_reduced_space_reproduces_the_papers_table_1_and_p_half():
    n_space, m = T.reduced_space(1 / 3)
    assert n_space == pytest.approx(1_594_323, rel=1e-12)
    np.testing.assert_allclose(m[10:], [2288, 312, 26, 1], rtol=1e-12)
    assert m.sum() == pytest.approx(n_space, rel=1e-12)
    n_space, m = T.reduced_space(1 / 2)
    assert n_space == 8192
    np.testing.assert_array_equal(m, [math.comb(13, x) for x in range(14)])
    assert T.tail_count(1 / 2, 10) == 286 + 78 + 13 + 1
    assert T.tail_count(1 / 3, 12) == pytest.approx(27, rel=1e-12)
    # M_x / N = P(x) (eq. 5) also for a p with non-integer 1/p
    n_space, m = T.reduced_space(0.55)
    np.testing.assert_allclose(m / n_space, T.strike_distribution(0.55), rtol=1e-12)


def test_tips_reproduce_the_papers_tables_2_and_4():
    # Tables 2 and 4 (eq. 15, rounded up); the paper rounds the two p = 1/2 tier-13 cells 8110.08 and
    # 8191.18 to the nearest integer (8110, 8191); rounded up (so that Q is reached) they are 8111, 8192
    paper = {(1 / 3, 10): [1397, 2793, 4187, 5580], (1 / 3, 13): [1434891, 1578380, 1592729, 1594164],
             (1 / 2, 10): [50, 100, 149, 198], (1 / 2, 11): [203, 400, 593, 781],
             (1 / 2, 12): [1243, 2297, 3191, 3949], (1 / 2, 13): [7373, 8111, 8184, 8192]}
    for (p, tier), ns in paper.items():
        assert [T.tips_approx(p, tier, q) for q in SAFETIES] == ns, (p, tier)


# ----------------------------------------------------------------------------- exhaustive enumeration
def _urn(k: int, matches: int) -> np.ndarray:
    """Strikes of every tip of the k^matches urn, by explicit enumeration of the picks (0 = true outcome)."""
    return np.array([sum(d == 0 for d in tip) for tip in itertools.product(range(k), repeat=matches)])


@pytest.mark.parametrize("k,matches,max_n", [(2, 4, 6), (2, 5, 5), (3, 4, 3)])
def test_coverage_exact_equals_exhaustive_enumeration_of_all_subsets(k, matches, max_n):
    strikes = _urn(k, matches)
    p = 1 / k
    n_space, m = T.reduced_space(p, matches)
    np.testing.assert_allclose(m, np.bincount(strikes, minlength=matches + 1), rtol=1e-12)
    for n in range(0, max_n + 1):
        combos = list(itertools.combinations(range(len(strikes)), n))
        subsets = np.array(combos, dtype=int).reshape(len(combos), n)
        best = strikes[subsets].max(axis=1, initial=-1)             # most strikes among the n tips
        for tier in range(matches + 1):
            want = float(np.mean(best >= tier))                   # share of all C(N, n) subsets covered
            assert T.coverage_exact(p, tier, n, matches) == pytest.approx(want, abs=1e-12), (tier, n)
            # both approximations lie below the exact value
            assert T.coverage_approx(p, tier, n, matches) <= want + 1e-12
            assert T.coverage_eq15(p, tier, n, matches) <= want + 1e-12


def test_coverage_exact_is_vectorised_exact_for_large_n_and_one_past_n_minus_s():
    # exact rationals for the real urn sizes: C(N-S, n) / C(N, n) with Python integers
    for p, tier, ns in [(1 / 2, 12, [1, 100, 300, 1243, 3949]), (1 / 3, 10, [1, 256, 257, 1397, 4187]),
                        (1 / 3, 13, [1, 257, 5000])]:
        n_space, s = round(T.reduced_space(p)[0]), round(T.tail_count(p, tier))
        want = [float(1 - Fraction(math.comb(n_space - s, n), math.comb(n_space, n))) for n in ns]
        np.testing.assert_allclose(T.coverage_exact(p, tier, np.array(ns)), want, rtol=1e-11)
    # 5 matches, p = 1/2, >= 3 strikes: N = 32, S = 16; n = N - S misses only with 1 / C(32, 16)
    assert T.tail_count(1 / 2, 3, matches=5) == 16
    assert T.coverage_exact(1 / 2, 3, 16, matches=5) == pytest.approx(1 - 1 / math.comb(32, 16), abs=1e-15)
    assert T.coverage_exact(1 / 2, 3, 16, matches=5) < 1.0
    assert T.coverage_exact(1 / 2, 3, 17, matches=5) == 1.0
    assert T.coverage_exact(1 / 2, 12, 0) == 0.0
    assert isinstance(T.coverage_exact(1 / 2, 12, 5), float)


def test_both_approximations_are_conservative_for_every_n():
    for p in (1 / 3, 1 / 2, 0.55):
        n_space = T.reduced_space(p)[0]
        n = np.arange(0, int(n_space) + 1)
        for tier in range(14):
            exact = T.coverage_exact(p, tier, n)
            assert np.all(np.diff(exact) >= -1e-15), (p, tier)
            assert np.all(exact - T.coverage_approx(p, tier, n) >= 0.0), (p, tier)
            assert np.all(exact - T.coverage_eq15(p, tier, n) >= -1e-13), (p, tier)   # equal at tier 13


def test_tips_approx_is_never_below_tips_exact_and_tier_13_is_n_equals_n_q():
    for p in (1 / 3, 1 / 2, 0.55):
        n_space = T.reduced_space(p)[0]
        for tier in range(10, 14):
            for q in SAFETIES:
                exact, approx = T.tips_exact(p, tier, q), T.tips_approx(p, tier, q)
                assert exact <= approx, (p, tier, q)
                # tips_exact is the smallest n reaching Q
                assert T.coverage_exact(p, tier, exact) >= q > T.coverage_exact(p, tier, exact - 1)
                assert T.coverage_eq15(p, tier, approx) >= q - 1e-12
                if tier == 13:   # n = N Q (eq. 9); for real N at most floor(N) tips exist (p = 0.55, Q = 99.99%)
                    assert approx == math.ceil(n_space * q), (p, q)
                    assert exact == min(approx, math.floor(n_space)), (p, q)
                    if p != 0.55:
                        assert exact == approx
    # eq. 15 overshoots where the paper's condition fails (p = 1/2, >= 10: S/N = 0.046)
    assert (T.tips_exact(1 / 2, 10, 0.9999), T.tips_approx(1 / 2, 10, 0.9999)) == (193, 198)


def test_validity_condition_bounds_the_eq15_error_on_the_paying_tiers():
    worst = 0.0
    for p in (1 / 3, 1 / 2, 0.55):
        n_space = T.reduced_space(p)[0]
        n = np.arange(0, int(n_space) + 1)
        for tier in range(10, 14):
            ok = T.approximation_valid(p, tier, n)
            if ok.any():
                err = np.abs(T.coverage_exact(p, tier, n[ok]) - T.coverage_eq15(p, tier, n[ok]))
                worst = max(worst, err.max())
    assert worst < 1e-3
    assert T.approximation_ratio(1 / 2, 12, 8192 - 14 * 100) == pytest.approx(0.01)
    assert T.approximation_valid(1 / 2, 12, 100) and not T.approximation_valid(1 / 2, 10, 0)
    assert T.approximation_ratio(1 / 2, 12, 8192) == math.inf


# ---------------------------------------------------------------------------------------- Monte Carlo
@pytest.mark.parametrize("tier,n,rounds", [(10, 50, 20000), (11, 202, 20000), (12, 1243, 6000)])
def test_simulate_urn_agrees_with_coverage_exact(tier, n, rounds):
    hit = T.simulate_urn(1 / 2, tier, n, rounds, np.random.default_rng(tier))
    want = T.coverage_exact(1 / 2, tier, n)
    assert hit.dtype == bool and hit.shape == (rounds,)
    assert abs(hit.mean() - want) < 4 * math.sqrt(want * (1 - want) / rounds)


def test_simulate_urn_draws_distinct_tips_uniformly_in_both_samplers():
    # 3 matches, k = 3: 27 tips, M_3 = 1. n = 3 uses rejection (9 <= 27), n = 20 Floyd (400 > 27)
    rng = np.random.default_rng(0)
    for n in (3, 20):
        want = T.coverage_exact(1 / 3, 3, n, matches=3)
        assert want == pytest.approx(n / 27)
        hit = T.simulate_urn(1 / 3, 3, n, 40000, rng, matches=3)
        assert abs(hit.mean() - want) < 4 * math.sqrt(want * (1 - want) / 40000)
    # distinctness itself: once n > N - S every round must hit (a duplicate would make room for a miss)
    assert T.simulate_urn(1 / 2, 2, 5, 2000, rng, matches=3).all()      # N = 8, S = 4; Floyd (25 > 8)
    assert T.simulate_urn(1 / 2, 1, 2, 2000, rng, matches=3).all()      # N = 8, S = 7; rejection (4 <= 8)
    assert T.simulate_urn(1 / 2, 0, 8, 10, rng, matches=3).all()        # all 8 tips: tier 0 always hit
    assert not T.simulate_urn(1 / 2, 3, 0, 10, rng, matches=3).any()


# ---------------------------------------------------------------------------------- strike distribution
def test_strike_distribution_binomial_and_poisson_binomial():
    d = T.strike_distribution(0.5)
    np.testing.assert_allclose(d, [math.comb(13, x) / 8192 for x in range(14)], rtol=1e-14)
    np.testing.assert_allclose(T.strike_distribution([0.37] * 13), T.strike_distribution(0.37), rtol=1e-12)
    rng = np.random.default_rng(0)
    hr = rng.uniform(0.2, 0.8, size=13)
    pb = T.strike_distribution(hr)
    assert pb.sum() == pytest.approx(1.0, abs=1e-14) and np.all(pb >= 0)
    assert pb @ np.arange(14) == pytest.approx(hr.sum(), rel=1e-12)
    # by hand: p = (0.5, 0.2, 0.9)
    # P0 = .5*.8*.1 = .04; P1 = .5*.8*.1 + .5*.2*.1 + .5*.8*.9 = .41; P3 = .5*.2*.9 = .09; P2 = 1 - .54
    np.testing.assert_allclose(T.strike_distribution([0.5, 0.2, 0.9], matches=3), [0.04, 0.41, 0.46, 0.09],
                               atol=1e-15)
    with pytest.raises(ValueError, match="matches=len"):
        T.strike_distribution([0.5, 0.2, 0.9])


# ----------------------------------------------------------------------------------- fees and profit
def test_fees_and_the_papers_profit():
    assert T.fees(0) == 0.0
    assert T.fees(12) == 6.5 and T.fees(13) == 7.5 and T.fees(24) == 13.0
    # the paper's Table 5c (p = 1/2, Q = 90%) and sequential bet: >= 12 with n = 1243 costs 673.5 (~EUR 674)
    assert T.fees(1243) == 673.5
    assert T.paper_profit(12, 1243) == 5775.5
    assert T.paper_profit(13, 7373) == 103819.0
    assert T.paper_profit(11, 203) == 324.0 and T.paper_profit(10, 50) == 21.5
    assert T.paper_profit(11, 781) == 10.5
    with pytest.raises(ValueError, match="no payout for tier 9"):
        T.paper_profit(9, 10)


# ------------------------------------------------------------------------------- heterogeneous matches
def test_pick_probs_for_hit_rate_hits_the_rate_and_refuses_the_unreachable():
    rng = np.random.default_rng(0)
    q = rng.dirichlet(5 * np.array([0.46, 0.26, 0.28]), size=13)
    for rate in (1 / 3, 0.4, 0.5, 0.6):
        pi = T.pick_probs_for_hit_rate(q, rate)
        assert pi.shape == (13, 3) and np.allclose(pi.sum(1), 1)
        assert np.mean(np.sum(q * pi, axis=1)) == pytest.approx(rate, abs=1e-6)
    np.testing.assert_allclose(T.pick_probs_for_hit_rate(q, 1 / 3), 1 / 3)
    fav = q.max(1).mean()
    with pytest.raises(ValueError, match="not reachable"):
        T.pick_probs_for_hit_rate(q, fav + 0.01)
    with pytest.raises(ValueError, match="not reachable"):
        T.pick_probs_for_hit_rate(q, 0.3)


def test_shared_outcomes_poisson_binomial_matches_enumeration_of_all_tips():
    # outcomes fixed (degenerate match_probs): P(tip >= tier) by enumerating all 3^4 tips
    q = np.eye(3)[[0, 2, 1, 0]]
    pi = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    outcome = q.argmax(1)
    for tier in range(5):
        p_tip = sum(np.prod([pi[m, t] for m, t in enumerate(tip)])
                    for tip in itertools.product(range(3), repeat=4)
                    if sum(t == o for t, o in zip(tip, outcome)) >= tier)
        cov = T.simulate_shared_outcomes(q, pi, tier, 7, 5, np.random.default_rng(0))
        np.testing.assert_allclose(cov, 1 - (1 - p_tip) ** 7, rtol=1e-12)


def test_shared_outcomes_reduce_to_coverage_approx_when_hits_do_not_depend_on_outcomes():
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(3), size=13)              # heterogeneous matches, uniform picks: hit rate 1/3 always
    pi = np.full((13, 3), 1 / 3)
    for tier, n in [(10, 1397), (12, 130330)]:
        cov = T.simulate_shared_outcomes(q, pi, tier, n, 200, rng)
        np.testing.assert_allclose(cov, T.coverage_approx(1 / 3, tier, n), rtol=1e-10)


def test_shared_outcomes_fall_short_of_the_iid_formula_on_heterogeneous_matches():
    # Dirichlet around (.46, .26, .28); picks tuned to a mean hit rate of 1/2; n from the exact urn at Q = 90%
    rng = np.random.default_rng(0)
    q = rng.dirichlet(5 * np.array([0.46, 0.26, 0.28]), size=13)
    pi = T.pick_probs_for_hit_rate(q, 0.5)
    for tier in (10, 12):
        n = T.tips_exact(0.5, tier, 0.9)
        cov = T.simulate_shared_outcomes(q, pi, tier, n, 4000, rng)
        se = cov.std() / math.sqrt(len(cov))
        assert cov.mean() + 4 * se < T.coverage_approx(0.5, tier, n) - 0.05   # > 5 pp short (Jensen + spread)


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,match", [
    (lambda: T.reduced_space(0.0), r"open interval \(0, 1\)"),
    (lambda: T.reduced_space(1.0), r"open interval \(0, 1\)"),
    (lambda: T.coverage_exact(1.2, 10, 5), r"hit rate p"),
    (lambda: T.coverage_exact(0.5, 14, 5), r"tier .* 0\.\.13"),
    (lambda: T.coverage_approx(0.5, -1, 5), r"tier .* 0\.\.13"),
    (lambda: T.tail_count(0.5, 14), r"tier"),
    (lambda: T.coverage_exact(0.5, 10, -1), r"n must be >= 0"),
    (lambda: T.coverage_exact(0.5, 10, np.array([1, -2])), r"n must be >= 0"),
    (lambda: T.coverage_exact(0.5, 10, 2.5), r"whole number"),
    (lambda: T.tips_exact(0.5, 10, 1.0), r"safety level Q"),
    (lambda: T.tips_approx(0.5, 10, 0.0), r"safety level Q"),
    (lambda: T.fees(-1), r"n must be a whole number >= 0"),
    (lambda: T.strike_distribution(1.5), r"\[0, 1\]"),
    (lambda: T.simulate_urn(0.55, 10, 5, 10, np.random.default_rng(0)), r"1/p to be an integer"),
    (lambda: T.simulate_urn(0.5, 3, 9, 10, np.random.default_rng(0), matches=3), r"cannot draw n=9"),
    (lambda: T.pick_probs_for_hit_rate(np.ones((13, 2)) / 2, 0.5), r"shape \[matches, 3\]"),
    (lambda: T.simulate_shared_outcomes(np.full((4, 3), 1 / 3), np.full((4, 3), 1 / 3), 5, 3, 10,
                                        np.random.default_rng(0)), r"tier .* 0\.\.4"),
])
def test_bad_inputs_raise_value_error_with_a_clear_message(call, match):
    with pytest.raises(ValueError, match=match):
        call()
