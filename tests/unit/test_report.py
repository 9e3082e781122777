"""Report arithmetic that needs no MLflow: range comparisons, curve alignment, metric direction."""
import numpy as np
import pytest

from pipelines.report import _common_steps, metric_lower_is_better, sensitivity_table


def test_sensitivity_table_compares_per_seed_range_means_and_finds_the_best_value():
    points = [(0.1, "a=0.1"), (1.0, "a=1.0")]
    values = {"a=0.1": {"base": {0: 1.0, 1: 2.0, 2: 3.0}, "new": {0: 0.5, 1: 1.0, 2: 2.0}},
              "a=1.0": {"base": {0: 3.0, 1: 4.0, 2: 5.0}, "new": {0: 1.5, 1: 2.0, 2: 3.5}}}
    lines = sensitivity_table(values, points, [("new", "base")], ["base", "new"], "err", "x.a")
    base_row, new_row = lines[2], lines[3]
    # base per seed over the range: 2, 3, 4 -> 3.0 +- 1.0; new: 1, 1.5, 2.75 -> 1.75; paired diffs -1, -1.5, -1.25
    assert base_row.startswith("| base | 3.0000 ± 1.0000 |") and base_row.endswith("| 2.0000 | 0.1 |")
    assert new_row.startswith("| new | 1.7500 ± ") and "| base | **-1.2500** (" in new_row
    assert new_row.endswith("| 1.1667 | 0.1 |")


def test_curves_at_shared_steps_stay_and_episode_curves_are_binned_forward_filled():
    same = [(np.array([0, 10, 20]), np.array([3.0, 2.0, 1.0])), (np.array([0, 10, 20]), np.array([1.0, 1.0, 1.0]))]
    steps, y = _common_steps(same)
    assert list(steps) == [0, 10, 20] and y.shape == (2, 3)
    ragged = [(np.array([10, 30, 100]), np.array([1.0, 3.0, 5.0])), (np.array([50, 100]), np.array([2.0, 4.0]))]
    steps, y = _common_steps(ragged, bins=4)
    assert list(steps) == [25, 50, 75, 100]
    np.testing.assert_allclose(y[0], [1.0, 3.0, 3.0, 5.0])   # bin (25, 50] holds 30; (50, 75] is empty: carried
    np.testing.assert_allclose(y[1], [2.0, 2.0, 2.0, 4.0])   # first bin empty: the first value


@pytest.mark.parametrize("metric,lower", [("value/rmsve_final", True), ("test/ece", True), ("test/acc", False),
                                          ("return/final", False), ("value/diverged", True)])
def test_metric_direction(metric, lower):
    assert metric_lower_is_better(metric) is lower


def test_large_numbers_get_separators_whether_or_not_they_are_whole():
    from pipelines.report import _fmt

    assert _fmt(387480.0) == "387,480" and _fmt(495144.8) == "495,144.8" and _fmt(0.91234) == "0.9123"
    assert _fmt(float("nan")) == "n/a"
    from pipelines.report import _signed

    assert _signed(-107665.2) == "-107,665.2" and _signed(0.0123) == "+0.0123" and _signed(0.0) == "+0.0000"
