import numpy as np
import pandas as pd
import pytest

from tasks.common.football import bundesliga_results, outcomes, rule_hit_rates, tip_better_team, tip_elo, wilson


def table(rows):
    return pd.DataFrame(rows, columns=["date_time", "matchday", "home_team", "home_score", "guest_score",
                                       "guest_team", "season"])


def test_rules_use_only_what_was_known_before_the_match():
    df = table([("t1", 1, "A", 3, 0, "B", 2000), ("t2", 2, "B", 1, 1, "A", 2000), ("t3", 3, "B", 0, 2, "A", 2000)])
    assert outcomes(df).tolist() == [1, 0, -1]
    # better team: no history -> home; then A has 3 ppg vs B 0 -> away (A); then A (3+1)/2 vs B 1/2 -> away
    assert tip_better_team(df).tolist() == [1, -1, -1]
    # Elo: equal ratings -> the home side (advantage 60); after A's win A's rating is higher, which
    # 60 home points still outweigh, but without a home advantage the tip goes to A
    assert tip_elo(df).tolist() == [1, 1, 1]
    assert tip_elo(df, home_advantage=0.0).tolist() == [1, -1, -1]


def test_hit_rates_on_the_real_bundesliga_results():
    df = bundesliga_results()
    assert len(df) == 5096 and df["season"].min() == 2004
    rates = rule_hit_rates(df)
    home = rates["home_win"]
    assert home.matches == 5096 - 306  # the first season is burn-in
    assert home.hits == int((outcomes(df)[306:] == 1).sum())
    assert home.low < home.rate < home.high
    # a rating of past results beats always tipping the home side (draws, ~29%, are misses for all)
    assert rates["elo"].rate > rates["home_win"].rate


def test_wilson_interval_known_value():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert np.isclose(sum(wilson(0, 10)), wilson(0, 10)[1])  # lower bound 0 at no hits
