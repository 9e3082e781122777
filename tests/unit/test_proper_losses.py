"""Black-box proper losses: unbiasedness (Monte Carlo against closed forms, |mean - truth| < 4 se),
exact identities on hand-made samples, properness over two families of models, and the degree rule."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tasks.proper_losses import (
    conditional_sampler,
    evaluate,
    geometric_cross_entropy,
    monomial_estimate,
    poisson_cross_entropy,
    power_loss,
    single_draw_loss,
    squared_distance,
)


def sampler(p):
    return lambda n, rng: rng.choice(len(p), size=n, p=p)


def pair(seed: int, K: int):
    """A target q ~ Dirichlet(1) and a model p that covers q's support (min p >= 0.3 / K)."""
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.ones(K))
    return 0.7 * rng.dirichlet(np.ones(K)) + 0.3 / K, q


# closed forms of the estimators' expectations
def expected_power(p, q, d):
    return (d - 1) * np.sum(p**d, -1) - d * np.sum(q * p ** (d - 1), -1)


def cross_entropy(p, q):
    return -np.sum(q * np.log(p), -1)


def assert_unbiased(e, truth):
    assert e.stderr > 0
    assert abs(e.mean - truth) < 4 * e.stderr, (e.mean, e.stderr, truth)


# ------------------------------------------------------------------------------------ unbiasedness
@pytest.mark.parametrize("a,b", [(1, 1), (2, 0), (0, 2), (2, 1), (3, 1), (2, 2)])
def test_monomial_estimator_is_unbiased(a, b):
    p, q = pair(0, K=6)
    e = evaluate(sampler(p), sampler(q), "monomial", rounds=20_000, m=4, k=3, rng=10, a=a, b=b)
    assert_unbiased(e, np.sum(p**a * q**b))


@pytest.mark.parametrize("loss,kwargs,closed_form", [
    ("power", {"degree": 2}, lambda p, q: expected_power(p, q, 2)),
    ("power", {"degree": 3}, lambda p, q: expected_power(p, q, 3)),
    ("squared_distance", {}, lambda p, q: np.sum((p - q) ** 2)),
    ("single_draw", {}, lambda p, q: -np.sum(p * q)),
])
@pytest.mark.parametrize("K", [5, 20])
def test_fixed_draw_losses_are_unbiased(loss, kwargs, closed_form, K):
    p, q = pair(K, K)
    e = evaluate(sampler(p), sampler(q), loss, rounds=20_000, m=5, k=3, rng=2, **kwargs)
    assert_unbiased(e, closed_form(p, q))
    assert e.model_draws == 20_000 * 5


def test_geometric_stopping_cross_entropy_is_unbiased():
    p, q = pair(3, K=12)
    e = evaluate(sampler(p), sampler(q), "geometric_ce", rounds=20_000, k=1, rng=4)
    assert_unbiased(e, cross_entropy(p, q))
    # expected cost of geometric stopping: E[T] = sum_y q_y / p_y draws per target
    assert e.model_draws / 20_000 == pytest.approx(np.sum(q / p), rel=0.05)


def test_poisson_cross_entropy_is_unbiased():
    p, q = pair(3, K=12)
    rate = 120
    assert rate > 3 / p.min()  # rate >> 1 / min p keeps the heavy tail in check
    e = evaluate(sampler(p), sampler(q), "poisson_ce", rounds=10_000, k=1, rng=5, rate=rate)
    assert_unbiased(e, cross_entropy(p, q))
    assert e.model_draws / 10_000 == pytest.approx(rate, rel=0.02)


# ------------------------------------------------------------------------------ exact identities
def test_power_loss_of_degree_2_is_the_collision_loss_on_a_hand_made_sample():
    model, target = ["a", "a", "b"], ["a", "c"]
    # pairs i != i' (6 ordered): X1 = X2 twice -> 1/3; pairs (i, j) (6): X1 = Y1, X2 = Y1 -> 1/3;
    # collision loss = mean 1[Xi = Xi'] - 2 mean 1[Xi = Yj] = 1/3 - 2/3
    assert power_loss(model, target, degree=2) == pytest.approx(-1 / 3, abs=1e-12)
    # ||p - q||^2: + mean_{j != j'} 1[Yj = Yj'] = 0
    assert squared_distance(model, target) == pytest.approx(-1 / 3, abs=1e-12)
    assert single_draw_loss(model, target) == pytest.approx(-1 / 3, abs=1e-12)
    # sum (c)_2 (t)_1 / ((3)_2 (2)_1) = (2 * 1 * 1) / (6 * 2)
    assert monomial_estimate(model, target, 2, 1) == pytest.approx(1 / 6, abs=1e-12)


def test_counts_formula_matches_enumeration_over_distinct_draws():
    rng = np.random.default_rng(7)
    model, target = rng.integers(0, 3, size=5), rng.integers(0, 3, size=4)
    m, k = len(model), len(target)

    def enumerate_monomial(a, b):  # mean of 1[all a model and b target draws equal] over distinct tuples
        vals = [len({*(model[i] for i in xs), *(target[j] for j in ys)}) == 1
                for xs in itertools.permutations(range(m), a) for ys in itertools.permutations(range(k), b)]
        return np.mean(vals)

    for a, b in [(1, 1), (2, 0), (0, 2), (2, 1), (3, 2)]:
        assert monomial_estimate(model, target, a, b) == pytest.approx(enumerate_monomial(a, b), abs=1e-12)
    collision = np.mean([int(model[i] == model[i2]) - int(model[i] == target[j]) - int(model[i2] == target[j])
                         for i, i2 in itertools.permutations(range(m), 2) for j in range(k)])
    assert power_loss(model, target, 2) == pytest.approx(collision, abs=1e-12)
    d3 = np.mean([2 * int(model[i] == model[i2] == model[i3]) - 3 * int(model[i] == model[i2] == target[j])
                  for i, i2, i3 in itertools.permutations(range(m), 3) for j in range(k)])
    assert power_loss(model, target, 3) == pytest.approx(d3, abs=1e-12)


def test_poisson_estimator_is_the_ordered_form_averaged_over_orderings():
    # plain randomised-truncation form: sum_{j<=N} 1[X_1..X_j != y] / (j P(N >= j));
    # ours averages it over the N! orderings
    rate = 3.0

    def tail(j):  # P(N >= j), N ~ Poisson(rate)
        return 1 - sum(math.exp(-rate) * rate**i / math.factorial(i) for i in range(j))

    found = 0
    for seed in range(50):
        drawn = []

        def recording(n, rng):
            out = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
            drawn.append(out)
            return out

        est = poisson_cross_entropy(recording, [0], rng=seed, rate=rate)
        x = np.concatenate(drawn) if drawn else np.zeros(0, int)
        if not (3 <= len(x) <= 6 and 0 < np.sum(x == 0) < len(x)):
            continue
        ordered = [sum(1 / (j * tail(j)) for j in range(1, len(x) + 1) if all(v != 0 for v in order[:j]))
                   for order in itertools.permutations(x)]
        assert est.value == pytest.approx(np.mean(ordered), rel=1e-9)
        assert est.draws[0] == len(x)
        found += 1
    assert found >= 5


# ------------------------------------------------------------------------------------- properness
K_PROPER = 10


def tempered(q, t):  # p_t = softmax(t log q)
    z = t * np.log(q)
    z = np.exp(z - z.max())
    return z / z.sum()


def smoothed(q, alpha):  # p_alpha = (1 - alpha) q + alpha uniform
    return (1 - alpha) * q + alpha / len(q)


@pytest.fixture(scope="module")
def q_proper():
    return np.random.default_rng(11).dirichlet(np.ones(K_PROPER))


def test_proper_losses_are_minimised_at_the_target_and_the_single_draw_loss_is_not(q_proper):
    q = q_proper
    ts = np.round(np.arange(0.5, 3.01, 0.1), 2)
    alphas = np.round(np.arange(0.0, 0.51, 0.05), 2)
    proper = {"power2": lambda p: expected_power(p, q, 2), "power3": lambda p: expected_power(p, q, 3),
              "squared_distance": lambda p: np.sum((p - q) ** 2), "cross_entropy": lambda p: cross_entropy(p, q)}
    for name, f in proper.items():
        assert ts[np.argmin([f(tempered(q, t)) for t in ts])] == 1.0, name
        assert alphas[np.argmin([f(smoothed(q, a)) for a in alphas])] == 0.0, name
    single = [-np.sum(tempered(q, t) * q) for t in ts]
    assert ts[np.argmin(single)] == ts[-1]  # sharper is always better: rewards the mode of q
    assert single[list(ts).index(2.0)] < single[list(ts).index(1.0)]


def test_monte_carlo_ranks_the_target_first_for_proper_losses_but_not_for_the_single_draw(q_proper):
    q = q_proper

    def paired_gap(loss, p_worse, **kw):
        # same integer seed -> same target rounds: paired difference of per-round losses (p_worse - q)
        a = evaluate(sampler(p_worse), sampler(q), loss, rounds=20_000, m=10, k=10, rng=21, **kw)
        b = evaluate(sampler(q), sampler(q), loss, rounds=20_000, m=10, k=10, rng=21, **kw)
        diff = a.values - b.values
        return diff.mean(), diff.std(ddof=1) / math.sqrt(diff.size)

    for p_worse in (tempered(q, 2.0), smoothed(q, 0.5)):
        for kw in ({"degree": 2}, {"degree": 3}):
            gap, se = paired_gap("power", p_worse, **kw)
            truth = expected_power(p_worse, q, kw["degree"]) - expected_power(q, q, kw["degree"])
            assert gap > 4 * se and abs(gap - truth) < 4 * se
    gap, se = paired_gap("single_draw", tempered(q, 2.0))
    assert gap < -4 * se  # the improper loss prefers the sharpened model to the target itself


def test_geometric_cross_entropy_prefers_the_target(q_proper):
    q = q_proper
    target = np.random.default_rng(31).choice(K_PROPER, size=20_000, p=q)
    at_q = evaluate(sampler(q), target, "geometric_ce", k=1, rng=32)
    sharp = evaluate(sampler(tempered(q, 1.5)), target, "geometric_ce", k=1, rng=32)
    diff = sharp.values - at_q.values
    assert diff.mean() > 4 * diff.std(ddof=1) / math.sqrt(diff.size)


# -------------------------------------------------------------------------------- draws >= degree
@pytest.mark.parametrize("call", [
    lambda: power_loss([0, 1], [0], degree=3),
    lambda: power_loss([0], [0, 1]),
    lambda: squared_distance([0, 1, 1], [0]),
    lambda: monomial_estimate([0, 1], [0, 1], 3, 0),
    lambda: monomial_estimate([0, 1], [0, 1], 1, 3),
    lambda: evaluate(sampler(np.ones(3) / 3), sampler(np.ones(3) / 3), "power", rounds=10, m=2, degree=3),
])
def test_too_few_draws_for_the_degree_raise(call):
    with pytest.raises(ValueError, match="degree"):
        call()


def test_bad_degree_and_unknown_loss_raise():
    with pytest.raises(ValueError, match="degree"):
        power_loss([0, 1, 2], [0], degree=1)
    with pytest.raises(ValueError, match="unknown loss"):
        evaluate(sampler(np.ones(3) / 3), [0, 1], "brier")


# --------------------------------------------------------------------------------------- outcomes
def test_tuple_outcomes_give_the_same_values_as_int_codes():
    p, q = pair(41, K=7)
    rng = np.random.default_rng(42)
    model, target = rng.choice(7, size=40, p=p), rng.choice(7, size=30, p=q)
    ragged = [tuple(range(100 + i, 100 + 2 * i + 1)) for i in range(7)]  # token sequences, lengths 1..7
    fixed = np.array([[i, 50 - i, 7] for i in range(7)])  # token sequences of one length, as rows
    for code in (lambda x: [ragged[i] for i in x], lambda x: fixed[x], lambda x: [f"s{i}" for i in x]):
        assert power_loss(code(model), code(target), 3) == power_loss(model, target, 3)
        assert squared_distance(code(model), code(target)) == squared_distance(model, target)
        assert single_draw_loss(code(model), code(target)) == single_draw_loss(model, target)
    # a 2-D row and the tuple with the same entries are the same outcome
    assert squared_distance(fixed[model], [tuple(r) for r in fixed[target]]) == squared_distance(model, target)

    as_tuples = lambda n, r: [ragged[i] for i in sampler(p)(n, r)]  # noqa: E731
    for estimator, kw in ((geometric_cross_entropy, {}), (poisson_cross_entropy, {"rate": 30})):
        ints = estimator(sampler(p), target, rng=43, **kw)
        tups = estimator(as_tuples, [ragged[i] for i in target], rng=43, **kw)
        np.testing.assert_array_equal(ints.per_target, tups.per_target)
        np.testing.assert_array_equal(ints.draws, tups.draws)
    e_int = evaluate(sampler(p), target, "power", m=4, k=3, rng=44)
    e_tup = evaluate(as_tuples, [ragged[i] for i in target], "power", m=4, k=3, rng=44)
    assert e_int.rounds == e_tup.rounds == 10 and e_int.mean == e_tup.mean


# ------------------------------------------------------------------ cost cap and held-out targets
def test_geometric_stopping_raises_or_flags_when_the_model_misses_the_target():
    p = np.array([0.5, 0.5, 0.0])  # the model never produces outcome 2
    with pytest.raises(RuntimeError, match="max_draws"):
        geometric_cross_entropy(sampler(p), [0, 2, 1], rng=0, max_draws=500)
    est = geometric_cross_entropy(sampler(p), [0, 2, 1], rng=0, max_draws=500, on_cap="flag")
    np.testing.assert_array_equal(est.capped, [False, True, False])
    assert est.draws[1] == 500 and est.per_target[1] == pytest.approx(np.sum(1 / np.arange(1, 501)))
    assert 1 <= est.draws[0] < 500 and est.draws_made >= est.draws.sum()


def test_held_out_targets_are_split_into_disjoint_rounds():
    q = np.ones(4) / 4
    target = np.arange(4).repeat(25)  # 100 held-out samples
    e = evaluate(sampler(q), target, "squared_distance", m=3, k=4, rng=0)
    assert e.rounds == 25 and e.values.shape == (25,)
    with pytest.raises(ValueError, match="disjoint rounds"):
        evaluate(sampler(q), target, "squared_distance", rounds=26, m=3, k=4, rng=0)


# ------------------------------------------------------------------------- conditional (per-context) models
def test_conditional_sampler_draws_each_block_from_its_own_row():
    probs = np.array([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.2, 0.2, 0.6]])
    draws = conditional_sampler(probs)(3 * 20_000, np.random.default_rng(0)).reshape(3, -1)
    freq = np.stack([np.bincount(row, minlength=3) / row.size for row in draws])
    np.testing.assert_allclose(freq, probs, atol=0.015)
    assert (draws[1] == 2).all() and not (draws[0] == 2).any()  # zero-probability outcomes never come out
    with pytest.raises(ValueError, match="split evenly"):
        conditional_sampler(probs)(10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="contexts, outcomes"):
        conditional_sampler(np.array([0.5, 0.5]))


def test_paired_gap_to_the_target_scored_against_itself_is_unbiased_for_the_mean_squared_distance():
    # the quantize job's black-box comparison: per context, power(p vs q) - power(q vs q), on the same
    # target draws, estimates ||p - q||^2; averaged over contexts it must match the exact mean
    rng = np.random.default_rng(5)
    q = rng.dirichlet(np.full(12, 0.3), size=400)
    p = 0.8 * q + 0.2 * rng.dirichlet(np.ones(12), size=400)
    target = conditional_sampler(q)
    kw = {"rounds": 400, "m": 8, "k": 8, "rng": 11}
    small = evaluate(conditional_sampler(p), target, "power", **kw)
    floor = evaluate(conditional_sampler(q), target, "power", **kw)
    gap = small.values - floor.values
    exact = ((p - q) ** 2).sum(1).mean()
    assert exact > 0 and abs(gap.mean() - exact) < 4 * gap.std(ddof=1) / np.sqrt(gap.size), (gap.mean(), exact)
    assert np.allclose(floor.values.mean(), -(q**2).sum(1).mean(), atol=4 * floor.stderr)
