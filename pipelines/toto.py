"""TOTO 13er Wette: how many distinct tips make a strike tier likely, what they cost, and whether the
paper's approximation and independence assumption hold.

    python -m pipelines.toto --hit-rate 0.5 --tier 11 --safety 0.99
    python -m pipelines.toto --data bundesliga --tier 10 --safety 0.9     # p from real Bundesliga rules
    python -m pipelines.toto --config pipelines/configs/toto_tables.yaml  # the paper's tables -> docs/results/toto.md
    python -m pipelines.toto --smoke                                      # what CI runs
    ray job submit --working-dir . --runtime-env-json \\
        '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/path/mlflow/mlflow.db"}}' \\
        -- python -m pipelines.toto --hit-rate 0.5 --tier 11 --safety 0.99

For a per-match hit rate p (or, with ``--data bundesliga``, the measured hit rates of simple rules on
real results: tasks/common/football.py) it prints the number of distinct tips n needed for at least
one tip with >= ``tier`` strikes with probability ``safety``: exact (hypergeometric, in log space) and
by the paper's approximation n = N(1 - (1 - Q)^(1/S_x)), whether the approximation's condition
S_x << N - n holds, the fees and the paper's profit figure (tasks/toto.py, Stömmer, arXiv
2303.16648). Two simulations run as Ray tasks: a Monte Carlo of the paper's urn model (distinct tips
drawn from the reduced combination space; needs 1/p to be an integer) that checks the exact
coverage, and the stress test in which all tips face the same realised outcomes of 13 matches with
heterogeneous (synthetic) outcome probabilities, where the formula's independence assumption fails.
Everything is logged to MLflow; ``tables: true`` also writes the paper's tables to ``results_dir``.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipelines.core import tracking
from pipelines.core.config import JobConfig, run_cli

FLAGS = {"--hit-rate": "hit_rate", "--tier": "tier", "--safety": "safety", "--data": "data"}
TABLE_RATES = {"1/3": 1 / 3, "1/2": 1 / 2}
TABLE_SAFETY = (0.9, 0.99, 0.999, 0.9999)
# the stress test's matches: outcome probabilities (home, draw, away) drawn around the Bundesliga
# average (synthetic: no match-level odds ship offline)
STRESS_MEAN, STRESS_CONCENTRATION = (0.46, 0.26, 0.28), 4.0


class TotoConfig(JobConfig):
    experiment: str = "toto"  # MLflow experiment
    hit_rate: float = Field(0.5, gt=0, lt=1)  # probability that one tipped match is right
    tier: int = Field(11, ge=10, le=13)  # the payout tier aimed at: at least this many of 13 right
    safety: float = Field(0.99, gt=0, lt=1)  # probability that at least one tip reaches the tier
    data: Literal["none", "bundesliga"] = "none"  # bundesliga: also the hit rates of rules on real results
    monte_carlo_rounds: int = Field(20_000, ge=0)  # urn-model rounds (0: skip)
    stress_rounds: int = Field(20_000, ge=0)  # shared-outcome rounds (0: skip)
    tasks: int = Field(4, ge=1)  # Ray tasks each simulation is split over
    seed: int = 0
    tables: bool = False  # also write the paper's tables (p 1/3 and 1/2, tiers 10-13, 4 safety levels)
    results_dir: str = "docs/results"  # where tables: true writes toto.md (relative to the repository root)

    SMOKE: ClassVar[dict[str, Any]] = {"monte_carlo_rounds": 2_000, "stress_rounds": 2_000, "tasks": 2}


def plan(p: float, tier: int, safety: float) -> dict[str, float]:
    """n exact and approximate, the validity ratio, fees and the paper's profit for one hit rate."""
    from tasks import toto

    exact, approx = toto.tips_exact(p, tier, safety), toto.tips_approx(p, tier, safety)
    return {"n_exact": exact, "n_approx": approx, "ratio": toto.approximation_ratio(p, tier, approx),
            "valid": float(toto.approximation_valid(p, tier, approx)), "fees": toto.fees(approx),
            "profit": toto.paper_profit(tier, approx), "coverage_at_approx": toto.coverage_exact(p, tier, approx)}


def _chunks(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts) if total // parts + (i < total % parts)]


def monte_carlo_urn(p: float, tier: int, n: int, rounds: int, tasks: int, seed: int) -> tuple[float, float]:
    """(coverage, standard error) of n distinct tips in the urn model, simulated over Ray tasks."""
    import numpy as np
    import ray

    @ray.remote(num_cpus=1)
    def chunk(size: int, part: int):
        from tasks.toto import simulate_urn

        return simulate_urn(p, tier, n, size, np.random.default_rng([seed, part]))

    hits = np.concatenate(ray.get([chunk.remote(size, i) for i, size in enumerate(_chunks(rounds, tasks))]))
    return float(hits.mean()), float(hits.std(ddof=1) / math.sqrt(len(hits)))


def stress_test(p: float, tier: int, n: int, rounds: int, tasks: int, seed: int) -> dict[str, float]:
    """Mean coverage when all n tips, drawn independently from per-match pick distributions tuned to the
    average hit rate p, face the same realised outcomes of 13 matches with heterogeneous (synthetic)
    outcome probabilities; with ``iid``, the coverage the same n independent tips would have if every
    match were an independent coin with hit rate p (1 - (1 - S/N)^n)."""
    import numpy as np
    import ray

    from tasks.toto import MATCHES, coverage_approx, pick_probs_for_hit_rate

    rng = np.random.default_rng([seed, 99])
    match_probs = rng.dirichlet(STRESS_CONCENTRATION * np.array(STRESS_MEAN), size=MATCHES)
    picks = pick_probs_for_hit_rate(match_probs, p)

    @ray.remote(num_cpus=1)
    def chunk(size: int, part: int):
        from tasks.toto import simulate_shared_outcomes

        return simulate_shared_outcomes(match_probs, picks, tier, n, size, np.random.default_rng([seed, 100 + part]))

    cov = np.concatenate(ray.get([chunk.remote(size, i) for i, size in enumerate(_chunks(rounds, tasks))]))
    return {"coverage": float(cov.mean()), "stderr": float(cov.std(ddof=1) / math.sqrt(len(cov))),
            "iid": float(coverage_approx(p, tier, n))}


def _row(label: str, p: float, r: dict[str, float]) -> str:
    return (f"| {label} | {p:.4f} | {r['n_exact']:,} | {r['n_approx']:,} | {r['ratio']:.2g} | "
            f"{'yes' if r['valid'] else 'no'} | {r['fees']:,.2f} | {r['profit']:,.2f} |")


HEADER = ["| hit rate from | p | n exact | n (paper's approximation) | S_x / (N - n) | approximation valid | "
          "fees (EUR) | paper's profit (EUR) |", "|---|---|---|---|---|---|---|---|"]


def tables_markdown(report: str) -> str:
    from tasks.toto import PAYOUTS

    lines = ["# TOTO 13er Wette: distinct tips needed, exact vs the paper's approximation", "",
             "Paper: R. Stömmer, \"Beating the average: how to generate profit by exploiting the inefficiencies "
             "of soccer betting\" (arXiv 2303.16648). Written by `python -m pipelines.toto --config "
             "pipelines/configs/toto_tables.yaml` (tasks/toto.py); nothing here is typed by hand.", "",
             f"n: distinct tips for P(at least one tip with >= tier strikes) >= Q, in the paper's urn model "
             f"(N = (1/p)^13 combinations). Exact: hypergeometric; approximation: n = N(1 - (1 - Q)^(1/S_x)), "
             f"rounded up; valid when S_x << N - n (here: S_x / (N - n) < 0.01). Fees 0.50 per tip + 0.50 per "
             f"voucher of 12; the paper's profit = the tier's average payout ({', '.join(f'{k}: {v:,.0f}' for k, v in PAYOUTS.items())} EUR) "
             "minus fees (not an expectation). Every n is rounded up; the paper's transcribed tables agree to "
             "the unit except two p = 1/2, tier-13 cells (8,110 and 8,191 there: N Q rounded to nearest, whose "
             "coverage falls just short of Q).", ""]
    for name, p in TABLE_RATES.items():
        lines += [f"## p = {name}", "", "| tier | Q | n exact | n (approximation) | S_x / (N - n) | valid | "
                  "fees (EUR) | paper's profit (EUR) | exact coverage at the approximate n |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for tier in (10, 11, 12, 13):
            for q in TABLE_SAFETY:
                r = plan(p, tier, q)
                lines.append(f"| >= {tier} | {q:.2%} | {r['n_exact']:,} | {r['n_approx']:,} | {r['ratio']:.2g} | "
                             f"{'yes' if r['valid'] else 'no'} | {r['fees']:,.2f} | {r['profit']:,.2f} | "
                             f"{r['coverage_at_approx']:.6f} |")
        lines.append("")
    lines += ["## This config's question, with hit rates measured on real Bundesliga results, and the checks by "
              "simulation (Ray tasks)", "", report]
    return "\n".join(lines) + "\n"


def main(cfg: TotoConfig) -> str:
    import mlflow

    from pipelines.core.ray_session import ensure_ray

    uri = tracking.tracking_uri()
    rates = [("", "given", cfg.hit_rate)]  # (metric prefix, label, p)
    if cfg.data == "bundesliga":
        from tasks.common.football import rule_hit_rates

        for r in rule_hit_rates().values():
            print(f"[toto] Bundesliga rule {r.rule}: {r.hits}/{r.matches} = {r.rate:.4f} "
                  f"(95% {r.low:.4f}-{r.high:.4f})", flush=True)
            rates.append((f"bundesliga/{r.rule}/", f"Bundesliga {r.rule} ({r.matches:,} matches)", r.rate))
    name = time.strftime("toto-%Y%m%d-%H%M%S")
    with tracking.job_run(cfg, "toto", cfg.experiment, name, tags={"data": cfg.data}) as run:
        lines = [f"tier >= {cfg.tier}, safety {cfg.safety:.4%}", *HEADER]
        for prefix, label, p in rates:
            r = plan(p, cfg.tier, cfg.safety)
            lines.append(_row(label, p, r))
            mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in r.items()} | {f"{prefix}hit_rate": p})
        given = plan(cfg.hit_rate, cfg.tier, cfg.safety)
        urn, stress = {}, {}
        k = round(1 / cfg.hit_rate)
        if cfg.monte_carlo_rounds or cfg.stress_rounds:
            ensure_ray(uri)
        if cfg.monte_carlo_rounds and abs(k * cfg.hit_rate - 1) < 1e-9:
            from tasks.toto import coverage_exact

            n = given["n_exact"]
            mc, se = monte_carlo_urn(cfg.hit_rate, cfg.tier, n, cfg.monte_carlo_rounds, cfg.tasks, cfg.seed)
            exact = float(coverage_exact(cfg.hit_rate, cfg.tier, n))
            urn = {"mc_coverage": mc, "mc_stderr": se, "exact_coverage": exact}
            urn["text"] = (f"- Urn model, p = {cfg.hit_rate:.4f}, tier >= {cfg.tier}, n = {n:,} distinct tips: simulated "
                           f"coverage {mc:.4f} ± {se:.4f} over {cfg.monte_carlo_rounds:,} rounds vs exact {exact:.4f} "
                           f"(difference {(mc - exact) / se if se else 0:+.1f} standard errors).")
        elif cfg.monte_carlo_rounds:
            urn["text"] = f"- Urn model not simulated: 1/p = {1 / cfg.hit_rate:.3f} is not an integer."
        if cfg.stress_rounds:
            try:
                n = given["n_approx"]
                stress = stress_test(cfg.hit_rate, cfg.tier, n, cfg.stress_rounds, cfg.tasks, cfg.seed)
                stress["shortfall"] = cfg.safety - stress["coverage"]
                stress["text"] = (
                    f"- Stress test (synthetic matches: outcome probabilities ~ Dirichlet({STRESS_CONCENTRATION:g} x "
                    f"{STRESS_MEAN}); the paper's n = {n:,} tips drawn independently from picks tuned to an average "
                    f"hit rate of {cfg.hit_rate:.4f}, all facing the same realised outcomes): P(a tip with >= "
                    f"{cfg.tier}) = {stress['coverage']:.4f} ± {stress['stderr']:.4f} over {cfg.stress_rounds:,} rounds, "
                    f"against the promised {cfg.safety:.4f}: shortfall {stress['shortfall']:+.4f}. Independent matches "
                    f"with the same tips would give {stress['iid']:.4f} (tips drawn with repetition, not distinct); the "
                    f"rest of the gap is the shared outcomes (upsets hit every tip at once).")
            except ValueError as exc:  # the hit rate cannot be reached by tempering these matches' picks
                stress["text"] = f"- Stress test not run: {exc}"
        mlflow.log_metrics({k: v for k, v in {**urn, **{f"stress/{k}": v for k, v in stress.items()}}.items()
                            if isinstance(v, float)})
        lines += ["", *[s for s in (urn.get("text"), stress.get("text")) if s]]
        report = "\n".join(lines)
        mlflow.log_text(report, "toto.md")
        print(report, flush=True)
        if cfg.tables:
            out = tracking.REPO / cfg.results_dir / "toto.md"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(tables_markdown(report))
            mlflow.log_artifact(str(out), "report")
            print(f"[toto] tables: {out}", flush=True)
    print(f"[toto] done: MLflow run {run.info.run_id}", flush=True)
    return run.info.run_id


def _flags_to_overrides(argv: list[str]) -> list[str]:
    """``--hit-rate 0.5`` (or ``--hit-rate=0.5``) -> ``hit_rate=0.5``: the paper's own CLI words."""
    out, i = [], 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag in FLAGS:
            if not value:
                if i + 1 >= len(argv):
                    out.append(f"{FLAGS[flag]}=")  # validation names the key
                    break
                value, i = argv[i + 1], i + 1
            out.append(f"{FLAGS[flag]}={value}")
        else:
            out.append(argv[i])
        i += 1
    return out


if __name__ == "__main__":
    run_cli(TotoConfig, main, argv=_flags_to_overrides(sys.argv[1:]))
