"""Rank generative models from samples only: black-box proper losses vs a plug-in likelihood score.

    python benchmarks/proper_losses_ranking.py                  # what `make bench-proper-losses` runs
    python benchmarks/proper_losses_ranking.py --seeds 10 --draws 10000        # more samples: less plug-in bias

The check behind tasks/proper_losses.py (Kimpara, Frongillo, Waggoner, ICML 2023): a black-box proper
loss, computed from model samples and held-out data only, ranks models as the true divergence does,
while the natural plug-in (a histogram of the model's samples, smoothed, scored by held-out
log-likelihood) is biased at a finite sample size and can rank them wrongly.

Target (synthetic): an order-1 Markov chain over 12 symbols, strings of length 3 (1,728 outcomes).
Models: bigram estimators fit on n in {50, 500, 5000} strings from the target with add-beta smoothing,
beta in {0.01, 0.1, 1} (9 models whose true distributions are computed exactly). Every score uses the
same `--draws` model samples and held-out target samples per model:
- `power`: the degree-2 black-box power loss (all-pairs collision loss), rounds of 500 + 500 draws;
- `plug-in`: histogram of the model's draws, add-1 smoothed, mean held-out negative log-likelihood;
- `geometric CE`: the sampling cross-entropy estimator (draw until the held-out outcome appears,
  capped at `--max-draws`; its cost is sum_y q_y / p_y draws per outcome, reported).
Each is compared with the exact ||p - q||^2 (what `power` estimates, up to a constant) and KL(q || p)
(what the cross-entropy scores estimate, up to a constant) by Spearman rank correlation over the 9
models, per seed (new training sets, new samples), with paired differences from the plug-in. The
last line is the ratio of the mean Spearman correlations of the power loss and of the plug-in score
(the two that see the same number of model draws).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYMBOLS, LENGTH = 12, 3


def markov_chain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(initial distribution, transition matrix) of the target: peaked rows, so smoothing matters."""
    return rng.dirichlet(np.full(SYMBOLS, 0.5)), rng.dirichlet(np.full(SYMBOLS, 0.3), size=SYMBOLS)


def distribution(init: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """Exact probabilities of all 12^3 strings, indexed a * 144 + b * 12 + c."""
    return (init[:, None, None] * trans[:, :, None] * trans[None, :, :]).reshape(-1)


def sampler(probs: np.ndarray):
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0

    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        return np.searchsorted(cdf, rng.random(n), side="right")

    return sample


def fit_bigram(strings: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    a, b, c = strings // 144, strings // 12 % 12, strings % 12
    init = np.bincount(a, minlength=SYMBOLS) + beta
    pairs = np.zeros((SYMBOLS, SYMBOLS)) + beta
    np.add.at(pairs, (a, b), 1)
    np.add.at(pairs, (b, c), 1)
    return init / init.sum(), pairs / pairs.sum(1, keepdims=True)


def plug_in(model_draws: np.ndarray, heldout: np.ndarray) -> float:
    hist = np.bincount(model_draws, minlength=SYMBOLS**LENGTH) + 1.0
    return float(-np.log(hist[heldout] / hist.sum()).mean())


def spearman(x, y) -> float:
    from scipy import stats

    return float(stats.spearmanr(x, y).statistic)


def one_seed(seed: int, draws: int, max_draws: int) -> dict[str, float]:
    from tasks.proper_losses import evaluate, geometric_cross_entropy

    rng = np.random.default_rng(seed)
    q = distribution(*markov_chain(np.random.default_rng(12345)))  # one target; seeds vary all else
    draw_q = sampler(q)
    heldout = draw_q(draws, rng)
    models = [distribution(*fit_bigram(draw_q(n, rng), beta)) for n in (50, 500, 5000) for beta in (0.01, 0.1, 1.0)]
    scores: dict[str, list[float]] = {"power": [], "plug-in": [], "geometric CE": [], "sq": [], "kl": []}
    ce_draws = []
    for p in models:
        draw_p = sampler(p)
        scores["power"].append(evaluate(draw_p, heldout, "power", m=500, k=500, rng=rng).mean)
        scores["plug-in"].append(plug_in(draw_p(draws, rng), heldout))
        ce = geometric_cross_entropy(draw_p, heldout[:500], rng, max_draws=max_draws, on_cap="flag")
        scores["geometric CE"].append(ce.value)
        ce_draws.append(ce.draws_made)
        scores["sq"].append(float(((p - q) ** 2).sum()))
        scores["kl"].append(float((q * (np.log(q) - np.log(p))).sum()))
    return {"power": spearman(scores["power"], scores["sq"]),
            "plug-in": spearman(scores["plug-in"], scores["kl"]),
            "geometric CE": spearman(scores["geometric CE"], scores["kl"]),
            "ce_draws_per_outcome": float(np.mean(ce_draws)) / 500}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--draws", type=int, default=2_000, help="model and held-out samples per model")
    parser.add_argument("--max-draws", type=int, default=200_000, help="cap of the geometric CE per outcome")
    args = parser.parse_args()
    from tasks.common.stats import mean_std, paired

    t0 = time.perf_counter()
    rows = [one_seed(s, args.draws, args.max_draws) for s in range(args.seeds)]
    print(f"target: synthetic Markov chain, {SYMBOLS}^{LENGTH} outcomes; 9 bigram models; {args.draws:,} model "
          f"and held-out draws per model; {args.seeds} seeds; {time.perf_counter() - t0:.1f} s")
    print("Spearman correlation of each score with the exact divergence it estimates (1 = same ranking):")
    for name, truth in (("power", "||p - q||^2"), ("geometric CE", "KL(q || p)"), ("plug-in", "KL(q || p)")):
        m, s = mean_std([r[name] for r in rows])
        print(f"  {name:13s} vs {truth:11s}: {m:.3f} ± {s:.3f}  (per seed: "
              + ", ".join(f"{r[name]:.2f}" for r in rows) + ")")
    print(f"  geometric CE model draws per held-out outcome: {np.mean([r['ce_draws_per_outcome'] for r in rows]):,.0f}")
    for name in ("power", "geometric CE"):
        d = paired([r["plug-in"] for r in rows], [r[name] for r in rows])
        print(f"paired difference {name} - plug-in: {d.mean_diff:+.3f} ± {d.std_diff:.3f}, p = {d.p_value:.3g} "
              f"({d.wins} seeds higher, {d.losses} lower)")
    ratio = np.mean([r["power"] for r in rows]) / np.mean([r["plug-in"] for r in rows])
    print(f"ratio of mean Spearman, black-box power loss / plug-in: {ratio:.2f}x")


if __name__ == "__main__":
    main()
