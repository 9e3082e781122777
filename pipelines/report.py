"""Summarise a claim's runs into ``docs/results/<name>.md``: per arm mean +- std, paired differences.

    python -m pipelines.report --config pipelines/configs/claims/dot.yaml            # latest sweep
    python -m pipelines.report --config pipelines/configs/claims/dot.yaml parent_run_id=<id>

Reads the child runs of a claim's parent MLflow run (``pipelines.claim`` tags each with its arm and
seed), pairs them by seed, and writes the table with the paired t-test p-value, wins/losses, and the
MLflow run ids; nothing in it is typed by hand.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from pipelines.core import tracking



def _runs(parent: str) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    parent_run = client.get_run(parent)
    return client.search_runs([parent_run.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=5000)


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:,.0f}" if float(x).is_integer() and abs(x) >= 1000 else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3g}"


def table(values: dict[str, dict[int, float]], pairs: dict[str, str], metric: str) -> list[str]:
    """Markdown rows: arm, n, mean +- std, and the paired difference with its baseline."""
    from tasks.common.stats import mean_std, paired

    lines = [f"| arm | n | {metric} mean ± std | vs | paired Δ mean ± std | p (paired t) | seeds higher / lower |",
             "|---|---|---|---|---|---|---|"]
    for arm, base in pairs.items():
        seeds = sorted(values.get(arm, {}))
        m, s = mean_std([values[arm][k] for k in seeds]) if seeds else (float("nan"), float("nan"))
        if base == arm:
            lines.append(f"| **{arm}** (baseline) | {len(seeds)} | {_fmt(m)} ± {_fmt(s)} | | | | |")
            continue
        common = [k for k in seeds if k in values.get(base, {})]
        r = paired([values[base][k] for k in common], [values[arm][k] for k in common]) if common else None
        lines.append(f"| {arm} | {len(seeds)} | {_fmt(m)} ± {_fmt(s)} | {base} | "
                     + (f"{r.mean_diff:+.4f} ± {_fmt(r.std_diff)} | {_p(r.p_value)} | {r.wins} / {r.losses} |"
                        if r else "n/a | n/a | n/a |"))
    return lines


def plot(values: dict[str, dict[int, float]], arms: list[str], metric: str, out: Path, title: str) -> Path:
    """Every seed's value per arm, paired seeds joined by a line: the spread and the pairing at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.4 * len(arms)), 3.8))
    seeds = sorted({s for a in arms for s in values.get(a, {})})
    for seed in seeds:
        xs = [i for i, a in enumerate(arms) if seed in values.get(a, {})]
        ax.plot(xs, [values[arms[i]][seed] for i in xs], "-o", color="0.6", lw=0.8, ms=3, zorder=1)
    for i, a in enumerate(arms):
        v = list(values.get(a, {}).values())
        if v:
            ax.hlines(sum(v) / len(v), i - 0.25, i + 0.25, color="C3", lw=2, zorder=2)
    ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{title}\nlines join paired seeds; red bar: mean", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write(parent: str, claim) -> Path:
    runs = _runs(parent)
    metrics = [claim.metric, *claim.metrics]
    values: dict[str, dict[str, dict[int, float]]] = {m: {} for m in metrics}
    ids: dict[str, dict[int, str]] = {}
    for run in runs:
        arm, seed = run.data.tags.get("claim.arm"), run.data.tags.get("claim.seed")
        if arm is None or seed is None or run.info.status != "FINISHED":
            continue
        ids.setdefault(arm, {})[int(seed)] = run.info.run_id
        for m in metrics:
            if m in run.data.metrics:
                values[m].setdefault(arm, {})[int(seed)] = run.data.metrics[m]
    comparisons = claim.comparisons or {"all arms": {arm: claim.baseline for arm in claim.arms}}
    lines = [f"# {claim.title}", "", f"Paper: {claim.paper}", "",
             f"Claim config: `pipelines/configs/claims/{claim.name}.yaml` (job `pipelines.{claim.job}`, base "
             f"`{claim.config}`); seeds {sorted({s for a in ids.values() for s in a})}, paired across arms.",
             f"MLflow parent run `{parent}` (experiment `{claim.experiment}`)"
             + (" — **smoke run: tiny data, not evidence**" if claim.smoke else "") + ".", "",
             "Reproduce:", "", "```", f"python -m pipelines.claim --config pipelines/configs/claims/{claim.name}.yaml",
             "```", ""]
    if claim.notes:
        lines += [claim.notes.strip(), ""]
    lines += ["## Arms", ""] + [f"- `{arm}`: `{' '.join(ov) or '(base config)'}`" for arm, ov in claim.arms.items()]
    lines += ["", f"Shared overrides: `{' '.join(claim.overrides) or 'none'}`", ""]
    results = tracking.REPO / claim.results_dir
    results.mkdir(parents=True, exist_ok=True)
    stem = f"{claim.name}{'-smoke' if claim.smoke else ''}"
    for k, (regime, pairs) in enumerate(comparisons.items()):
        ordered = {b: b for b in dict.fromkeys(pairs.values())} | pairs
        lines += [f"## {regime}", ""]
        png = plot(values[claim.metric], list(ordered), claim.metric, results / f"{stem}-{k}.png",
                   f"{claim.name}: {regime}")
        lines += [f"![{regime}]({png.name})", ""]
        for m in metrics:
            lines += [f"### {m}", ""] + table(values[m], ordered, m) + [""]
    lines += ["## Runs", "", "| arm | seed | MLflow run |", "|---|---|---|"]
    lines += [f"| {arm} | {seed} | `{rid}` |" for arm in ids for seed, rid in sorted(ids[arm].items())]
    out = results / f"{stem}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"[report] {out}", flush=True)
    return out


def _latest_parent(claim) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(claim.experiment)
    runs = client.search_runs([exp.experiment_id] if exp else [], order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`claim.name` = '{claim.name}' and tags.`squeezelab.job` = 'claim'",
                              max_results=1) if exp else []
    if not runs:
        sys.exit(f"no claim run named {claim.name!r} in experiment {claim.experiment!r}")
    return runs[0].info.run_id


if __name__ == "__main__":
    from pipelines.claim import ClaimConfig
    from pipelines.core.config import load_config

    args = sys.argv[1:]
    if "--config" not in args:
        sys.exit(__doc__)
    i = args.index("--config")
    path, rest = args[i + 1], args[:i] + args[i + 2:]
    parent = next((a.split("=", 1)[1] for a in rest if a.startswith("parent_run_id=")), None)
    smoke = "--smoke" in rest
    claim = load_config(ClaimConfig, path, [], smoke)
    write(parent or _latest_parent(claim), claim)
