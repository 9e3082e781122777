import numpy as np
import pytest

from tasks.common.metrics import accuracy, brier, ece, nll, reliability, reliability_diagram, summary


def test_hand_computed_metrics():
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    y = np.array([0, 0, 1, 1])
    assert accuracy(p, y) == 0.5
    assert nll(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.3, 0.8])))
    # brier: (0.01 + 0.01), (0.36 + 0.36), (0.49 + 0.49), (0.04 + 0.04)
    assert brier(p, y) == pytest.approx((0.02 + 0.72 + 0.98 + 0.08) / 4)
    # confidences 0.9 (right), 0.6 (wrong), 0.7 (wrong), 0.8 (right): 10 equal-width bins, one each
    assert ece(p, y, 10) == pytest.approx((0.1 + 0.6 + 0.7 + 0.2) / 4)
    # 2 equal-mass bins: {0.6 wrong, 0.7 wrong} and {0.8 right, 0.9 right}
    assert ece(p, y, 2, "mass") == pytest.approx(0.5 * 0.65 + 0.5 * 0.15)


def test_equal_width_bins_put_the_upper_edge_in_the_lower_bin():
    p = np.array([[0.6, 0.4], [0.7, 0.3]])
    rows = reliability(p, np.array([0, 1]), bins=5)  # 0.6 is the upper edge of (0.4, 0.6]
    assert [r[2] for r in rows] == [1, 1]


def test_a_calibrated_predictor_has_near_zero_ece_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50000, 4)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])
    assert ece(p, y) < 0.01 and ece(p, y, scheme="mass") < 0.01
    sharp = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)
    assert ece(sharp, y) > 0.1
    assert set(summary(p, y)) == {"acc", "nll", "brier", "ece", "ece_mass"}


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        accuracy(np.array([[0.5, 0.6]]), np.array([0]))
    with pytest.raises(ValueError, match="labels"):
        ece(np.array([[0.5, 0.5]]), np.array([0, 1]))


def test_reliability_diagram_is_written(tmp_path):
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), 200)
    y = rng.integers(0, 3, 200)
    out = reliability_diagram({"a": (p, y), "b": (p, y)}, tmp_path / "r.png", "title")
    assert out.stat().st_size > 5000
