import math

import pytest

from tasks.common.stats import mean_std, paired


def test_paired_t_test_matches_the_textbook_value():
    base = [0.80, 0.82, 0.79, 0.81, 0.80]
    meth = [0.82, 0.83, 0.80, 0.84, 0.81]  # differences 0.02, 0.01, 0.01, 0.03, 0.01
    r = paired(base, meth)
    d_mean, d_std = 0.016, math.sqrt(((0.004**2) * 1 + (0.006**2) * 3 + 0.014**2) / 4)
    t = d_mean / (d_std / math.sqrt(5))
    assert r.mean_diff == pytest.approx(d_mean)
    assert r.std_diff == pytest.approx(d_std)
    assert (r.wins, r.losses, r.n) == (5, 0, 5)
    assert t == pytest.approx(4.0, rel=1e-9)
    assert r.p_value == pytest.approx(0.01613, abs=1e-5)  # two-sided, 4 degrees of freedom


def test_degenerate_and_bad_inputs():
    assert math.isnan(paired([1.0], [2.0]).p_value)
    assert math.isnan(paired([1.0, 2.0], [1.5, 2.5]).p_value)  # constant difference: no variance
    with pytest.raises(ValueError, match="equal"):
        paired([1.0, 2.0], [1.0])
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
