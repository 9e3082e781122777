"""Robust Bellman losses: the saddle's maximum is the objective, its gradient is the learners' mean
update, the Huber and absolute forms have bounded steps, and the exact MDPs are what they claim."""
import numpy as np
import pytest

from tasks.common.mdps import RewardNoise, baird, random_walk, random_walk_features, sample
from tasks.robust_bellman import (LinearLearner, huber, inner_solution, objective, objective_gradient, psi,
                                  run_prediction, saddle)

LOSSES = ["squared", "huber", "absolute"]


def test_random_walk_values_are_the_known_linear_ramp_and_d_mu_is_stationary():
    mdp = random_walk(5, "tabular")
    np.testing.assert_allclose(mdp.true_values(), [-2 / 3, -1 / 3, 0, 1 / 3, 2 / 3], atol=1e-12)
    d = mdp.state_distribution()
    chain = np.einsum("sa,sat->st", mdp.mu, mdp.P)
    np.testing.assert_allclose(d @ chain, d, atol=1e-12)
    assert d.min() > 0 and d.sum() == pytest.approx(1.0)
    # tabular features represent v_pi exactly: its Bellman error is zero everywhere
    np.testing.assert_allclose(mdp.bellman_error(mdp.true_values()), 0.0, atol=1e-12)


@pytest.mark.parametrize("kind,width", [("tabular", 5), ("inverted", 5), ("dependent", 3)])
def test_random_walk_features_are_unit_rows_of_the_tdc_papers_widths(kind, width):
    X = random_walk_features(5, kind)
    assert X.shape == (5, width)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0)
    with pytest.raises(ValueError, match="features"):
        random_walk_features(5, "fourier")


def test_sampled_trajectory_visits_states_by_d_mu_with_the_right_ratios():
    mdp = random_walk(5, "dependent")
    tr = sample(mdp, 60_000, np.random.default_rng(0))
    freq = np.bincount(tr.s, minlength=5) / len(tr.s)
    np.testing.assert_allclose(freq, mdp.state_distribution(), atol=0.01)
    assert set(np.round(tr.rho, 6)) == {round(0.5 / 0.6, 6), round(0.5 / 0.4, 6)}
    assert set(tr.gamma) == {0.0, 1.0}  # terminations restart with discount 0


def test_reward_noise_is_zero_mean_with_outliers_at_the_configured_rate():
    noise = RewardNoise(std=0.0, outlier_prob=0.01, outlier_size=50.0)
    x = noise.sample(np.random.default_rng(1), 400_000)
    assert np.mean(np.abs(x) == 50.0) == pytest.approx(0.01, rel=0.05)
    assert abs(x.mean()) < 4 * 50 * np.sqrt(0.01 / len(x))
    with pytest.raises(ValueError):
        RewardNoise(std=-1.0)


def _msbe_minimiser(mdp):
    """argmin_w sum_s d(s) BE(s)^2: BE = b + J w is affine, so weighted least squares."""
    d = mdp.state_distribution()
    J, b = mdp.bellman_error_jacobian(), mdp.bellman_error(np.zeros(mdp.features))
    sw = np.sqrt(d)[:, None]
    return np.linalg.lstsq(sw * J, -(sw[:, 0] * b), rcond=None)[0]


def test_unbounded_h_saddle_equals_msbe_at_the_optimum_and_ascent_on_h_finds_it():
    mdp = random_walk(5, "dependent")  # 3 features, 5 states: the MSBE's minimum is not zero
    w = _msbe_minimiser(mdp)
    d = mdp.state_distribution()
    msbe = objective(mdp, w, "squared")
    assert msbe > 1e-4
    np.testing.assert_allclose(objective_gradient(mdp, w, "squared"), 0.0, atol=1e-12)  # it is the optimum
    assert saddle(mdp, w, inner_solution(mdp, w), "squared") == pytest.approx(msbe, rel=1e-12)
    h = np.zeros(mdp.states)  # gradient ascent on the saddle in h (dL/dh = d (BE - h)) from h = 0
    for _ in range(4000):
        h += 2.0 * d * (mdp.bellman_error(w) - h)
    assert saddle(mdp, w, h, "squared") == pytest.approx(msbe, rel=1e-9)


@pytest.mark.parametrize("loss", LOSSES)
def test_saddle_is_maximised_by_the_inner_solution_over_the_losses_set(loss):
    mdp = random_walk(5, "inverted")
    rng = np.random.default_rng(3)
    w = rng.normal(0, 2, mdp.features)
    tau = 0.3
    best = saddle(mdp, w, inner_solution(mdp, w, loss, tau), loss, tau)
    assert best == pytest.approx(objective(mdp, w, loss, tau), rel=1e-12)
    bound = {"squared": 5.0, "huber": tau, "absolute": 1.0}[loss]
    for _ in range(200):
        h = rng.uniform(-bound, bound, mdp.states)
        assert saddle(mdp, w, h, loss, tau) <= best + 1e-12
    if loss != "squared":
        with pytest.raises(ValueError, match="h"):
            saddle(mdp, w, np.full(mdp.states, 2 * bound), loss, tau)


def test_huber_is_quadratic_inside_tau_linear_outside_and_tends_to_absolute():
    x = np.linspace(-3, 3, 61)
    np.testing.assert_allclose(huber(x, 10.0), 0.5 * x * x)
    assert huber(np.array([2.0]), 0.5)[0] == pytest.approx(0.5 * 2 - 0.125)
    np.testing.assert_allclose(huber(x, 1e-6) / 1e-6, np.abs(x), atol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_objective_gradient_matches_finite_differences(loss):
    mdp = random_walk(5, "dependent")
    w = np.random.default_rng(4).normal(0, 1, mdp.features)
    g = objective_gradient(mdp, w, loss, 0.2)
    eps = 1e-6
    fd = [(objective(mdp, w + eps * e, loss, 0.2) - objective(mdp, w - eps * e, loss, 0.2)) / (2 * eps)
          for e in np.eye(mdp.features)]
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", LOSSES)
def test_gtd2_mean_update_is_the_objectives_negative_gradient_when_h_is_the_inner_solution(loss):
    mdp = random_walk(5, "tabular")  # tabular h can equal BE state by state
    w = np.random.default_rng(5).normal(0, 1, mdp.features)
    tau = 0.25
    learner = LinearLearner("gtd2", w, alpha=0.1, loss=loss, tau=tau, smooth=False,
                            h=mdp.bellman_error(w))  # h(s) = x(s).theta = BE(s)
    dw, dh = learner.expected_direction(mdp)
    np.testing.assert_allclose(dw, -objective_gradient(mdp, w, loss, tau), atol=1e-12)
    np.testing.assert_allclose(dh, 0.0, atol=1e-12)  # h's regression is at its fixed point (beta = 0)


def test_tdc_mean_update_equals_gtd2s_for_the_squared_loss_but_not_for_huber():
    mdp = random_walk(5, "tabular")
    w = np.random.default_rng(6).normal(0, 2, mdp.features)
    h = mdp.bellman_error(w)
    same = [LinearLearner(a, w, 0.1, "squared", h=h).expected_direction(mdp)[0] for a in ("tdc", "gtd2")]
    np.testing.assert_allclose(same[0], same[1], atol=1e-12)
    tau = 0.1 * np.abs(h).max()  # clip binds: TDC-Huber keeps delta x unclipped (the author's code)
    tdc, gtd2 = [LinearLearner(a, w, 0.1, "huber", tau, smooth=False, h=h).expected_direction(mdp)[0]
                 for a in ("tdc", "gtd2")]
    np.testing.assert_allclose(gtd2, -objective_gradient(mdp, w, "huber", tau), atol=1e-12)
    assert np.abs(tdc - gtd2).max() > 1e-3


@pytest.mark.parametrize("loss", ["huber", "absolute"])
def test_robust_gradients_and_steps_are_bounded_whatever_the_error(loss):
    mdp = random_walk(5, "dependent")
    d, J = mdp.state_distribution(), mdp.bellman_error_jacobian()
    tau = 0.5
    bound = (tau if loss == "huber" else 1.0) * d @ np.linalg.norm(J, axis=1)
    for scale in (1.0, 1e3, 1e6):
        w = np.random.default_rng(7).normal(0, scale, mdp.features)
        assert np.linalg.norm(objective_gradient(mdp, w, loss, tau)) <= bound + 1e-9
    # the MSBE's gradient has no such bound: it grows with the error
    big = np.full(mdp.features, 1e6)
    assert np.linalg.norm(objective_gradient(mdp, big, "squared")) > 1e3 * bound
    # one sampled GTD2 step with a reward outlier of 10^6 stays within rho * bound * |x - gamma x'|
    x, xp = mdp.X[1], mdp.X[2]
    learner = LinearLearner("gtd2", np.zeros(mdp.features), 1.0, loss, tau, h=np.full(mdp.features, 1e6))
    dw, _ = learner.direction(x, xp, 1e6, 1.0, 1.25)
    assert np.linalg.norm(dw) <= 1.25 * (tau if loss == "huber" else 1.0) * np.linalg.norm(x - xp) + 1e-12


def test_psi_agrees_on_numpy_and_torch_and_smooth_tends_to_the_clip():
    import torch

    h = np.linspace(-5, 5, 101)
    for loss in LOSSES:
        np.testing.assert_allclose(psi(h, loss, 0.7), psi(torch.from_numpy(h), loss, 0.7).numpy(), atol=1e-12)
    np.testing.assert_allclose(psi(h, "huber", 1.0, smooth=False), np.clip(h, -1, 1))
    assert np.abs(psi(h, "huber", 1.0)).max() <= 1.0 and np.abs(psi(h, "absolute", 0.1)).max() <= 1.0
    np.testing.assert_allclose(psi(h[np.abs(h) > 1], "absolute", 1e-3), np.sign(h[np.abs(h) > 1]))


def test_off_policy_td_diverges_on_baird_while_tdc_and_gtd2_learn():
    mdp = baird()
    np.testing.assert_allclose(mdp.true_values(), 0.0, atol=1e-12)
    tr = sample(mdp, 5000, np.random.default_rng(0))
    td = run_prediction(mdp, LinearLearner("td", mdp.w0, 0.01), tr, 50)
    assert td.diverged and td.rmsve[-1] == td.rmsve[0]  # capped at the initial error once it blows up
    for algorithm in ("tdc", "gtd2"):
        res = run_prediction(mdp, LinearLearner(algorithm, mdp.w0, 0.01), tr, 50)
        assert not res.diverged and res.rmsve[-1] < 0.5 * res.rmsve[0]


def test_learners_reach_low_error_on_the_random_walk_and_reject_bad_settings():
    mdp = random_walk(5, "tabular")
    tr = sample(mdp, 20_000, np.random.default_rng(2))
    for algorithm in ("td", "tdc", "gtd2"):
        res = run_prediction(mdp, LinearLearner(algorithm, mdp.w0, 0.03), tr, 1000)
        assert res.rmsve[-1] < 0.15 < res.rmsve[0]
    with pytest.raises(ValueError, match="TD has no auxiliary h"):
        LinearLearner("td", mdp.w0, 0.1, "huber")
    with pytest.raises(ValueError, match="algorithm"):
        LinearLearner("sarsa", mdp.w0, 0.1)
    with pytest.raises(ValueError, match="tau"):
        LinearLearner("gtd2", mdp.w0, 0.1, "huber", tau=0.0)
