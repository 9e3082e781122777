"""Summarise a sweep's runs into ``docs/results/<name>.md``: per arm mean +- std, paired differences.

    python -m pipelines.report --config pipelines/configs/claims/dot.yaml            # latest sweep
    python -m pipelines.report --config pipelines/configs/claims/dot.yaml parent_run_id=<id>

Reads the child runs of a sweep's parent MLflow run (``pipelines.sweep`` tags each with its arm, grid
cell and seed), pairs them by seed within a cell, and writes the tables with the paired t-test
p-value, wins/losses, and the MLflow run ids; with several cells (datasets, learning rates) a
summary table per metric and a forest plot of the paired differences come first. Nothing in it is
typed by hand.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from pipelines.core import tracking
from pipelines.sweep import cell_label as _cell_label


def _runs(parent: str) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    parent_run = client.get_run(parent)
    return client.search_runs([parent_run.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=5000)


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if abs(x) >= 1000:  # bytes, counts: thousands separators, and no spurious digits on a mean of integers
        return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"
    return f"{x:.{digits}f}"


def _signed(x: float) -> str:
    """A difference with its sign, formatted like ``_fmt``."""
    text = _fmt(x)
    return text if text == "n/a" or text.startswith("-") else f"+{text}"


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
                     + (f"{_signed(r.mean_diff)} ± {_fmt(r.std_diff)} | {_p(r.p_value)} | {r.wins} / {r.losses} |"
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


def collect(parent: str, metrics: list[str]):
    """(values[metric][cell][arm][seed], run ids[cell][arm][seed]) of a sweep's finished child runs."""
    runs = _runs(parent)
    values: dict[str, dict[str, dict[str, dict[int, float]]]] = {m: {} for m in metrics}
    ids: dict[str, dict[str, dict[int, str]]] = {}
    for run in runs:
        tags = run.data.tags
        arm, seed = tags.get("claim.arm"), tags.get("claim.seed")
        if arm is None or seed is None or run.info.status != "FINISHED":
            continue
        cell = tags.get("claim.cell", "all")  # runs from before grids have no cell
        ids.setdefault(cell, {}).setdefault(arm, {})[int(seed)] = run.info.run_id
        for m in metrics:
            if m in run.data.metrics:
                values[m].setdefault(cell, {}).setdefault(arm, {})[int(seed)] = run.data.metrics[m]
    return values, ids


def comparisons_of(claim) -> dict[str, dict[str, str]]:
    """{regime: {arm: its baseline arm}}: the sweep's own, or every arm against ``baseline``."""
    return claim.comparisons or {"all arms": {arm: claim.baseline for arm in claim.arms}}


def pairs_of(claim) -> list[tuple[str, str]]:
    """Every (arm, baseline) comparison the sweep asks for, in order, once each."""
    return list(dict.fromkeys((a, b) for pairs in comparisons_of(claim).values() for a, b in pairs.items() if a != b))


def summary_table(values: dict[str, dict[str, dict[int, float]]], cells: list[str], pairs: list[tuple[str, str]],
                  metric: str) -> list[str]:
    """One row per cell: each baseline's mean and every compared arm's paired difference from its
    baseline (p-value); a last row counts the cells where the arm is significantly higher / lower
    (paired t, p < 0.05)."""
    from tasks.common.stats import mean_std, paired

    bases = list(dict.fromkeys(b for _, b in pairs))
    lines = ["| cell | " + " | ".join(f"**{b}** {metric}" for b in bases) + " | "
             + " | ".join(f"{a} − {b} (p)" for a, b in pairs) + " |",
             "|---|" + "---|" * (len(bases) + len(pairs))]
    counts = {p: [0, 0, 0] for p in pairs}
    for cell in cells:
        row = [f"| {cell} |"]
        for b in bases:
            base = list(values.get(cell, {}).get(b, {}).values())
            m, s = mean_std(base) if base else (float("nan"), float("nan"))
            row.append(f" {_fmt(m)} ± {_fmt(s)} |")
        for a, b in pairs:
            base, mine = values.get(cell, {}).get(b, {}), values.get(cell, {}).get(a, {})
            common = sorted(set(mine) & set(base))
            if not common:
                row.append(" n/a |")
                continue
            r = paired([base[k] for k in common], [mine[k] for k in common])
            significant = r.p_value < 0.05  # nan compares False
            star = "**" if significant else ""
            row.append(f" {star}{_signed(r.mean_diff)}{star} ({_p(r.p_value)}) |")
            counts[a, b][0 if significant and r.mean_diff > 0 else 2 if significant else 1] += 1
        lines.append("".join(row))
    lines.append("| higher / no difference / lower (p < 0.05) |" + " |" * len(bases)
                 + "".join(f" {c[0]} / {c[1]} / {c[2]} |" for c in counts.values()))
    return lines


def forest(values: dict[str, dict[str, dict[str, dict[int, float]]]], cells: list[str],
           pairs: list[tuple[str, str]], metrics: list[str], out: Path, title: str) -> Path:
    """A panel per metric: every compared arm's paired difference from its baseline per cell, with its
    95% t-interval; a point right of zero means higher than the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics) + 1.2, 0.9 + 0.42 * len(cells)),
                             squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        for j, (arm, baseline) in enumerate(pairs):
            for i, cell in enumerate(cells):
                base, mine = values[metric].get(cell, {}).get(baseline, {}), values[metric].get(cell, {}).get(arm, {})
                d = np.array([mine[k] - base[k] for k in sorted(set(base) & set(mine))])
                if not len(d):
                    continue
                half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
                y = i + (j - (len(pairs) - 1) / 2) * 0.8 / len(pairs)
                ax.errorbar(d.mean(), y, xerr=half, fmt="o", ms=3.5, color=f"C{j}", capsize=2, lw=1,
                            label=f"{arm} − {baseline}" if i == 0 else None)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(metric, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_yticks(range(len(cells)), cells)
    axes[0, 0].invert_yaxis()
    return _save(fig, axes, f"{title}\npaired difference per cell, mean and 95% interval over seeds", out)


def _save(fig, axes, title: str, out: Path) -> Path:
    """One legend (the first panel's) right of the panels, the title on top; written and closed."""
    import matplotlib.pyplot as plt

    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _sensitivity_groups(claim) -> dict[str, list[tuple[float, str]]]:
    """{label of the other grid axes' values: [(value of the sensitivity axis, cell label), ...]}."""
    groups: dict[str, list[tuple[float, str]]] = {}
    for cell in claim.cells():
        rest = {k: v for k, v in cell.items() if k != claim.sensitivity}
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in rest.items()) or "all"
        groups.setdefault(label, []).append((float(cell[claim.sensitivity]), _cell_label(cell)))
    return groups


def sensitivity_plot(values: dict[str, dict[str, dict[str, dict[int, float]]]], claim, metrics: list[str],
                     out: Path) -> Path:
    """A panel per (metric, other cell): each arm's mean +- standard error over seeds against the
    sensitivity axis (log scale when its values are positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = _sensitivity_groups(claim)
    fig, axes = plt.subplots(len(metrics), len(groups), figsize=(3.6 * len(groups) + 1.6, 2.8 * len(metrics)),
                             squeeze=False)
    for r, metric in enumerate(metrics):
        for c, (group, points) in enumerate(groups.items()):
            ax = axes[r, c]
            for j, arm in enumerate(claim.arms):
                xs, ms, ses = [], [], []
                for x, cell in points:
                    v = np.array(list(values[metric].get(cell, {}).get(arm, {}).values()))
                    if len(v):
                        xs.append(x)
                        ms.append(v.mean())
                        ses.append(v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0)
                if xs:
                    ms, ses = np.array(ms), np.array(ses)
                    ax.plot(xs, ms, "-o", ms=3, lw=1.2, color=f"C{j}", label=arm)
                    ax.fill_between(xs, ms - ses, ms + ses, color=f"C{j}", alpha=0.15, lw=0)
            if all(x > 0 for x, _ in points):
                ax.set_xscale("log", base=2)
            ax.set_title(group if len(groups) > 1 else claim.name, fontsize=8)
            ax.set_xlabel(claim.sensitivity.rsplit(".", 1)[-1], fontsize=8)
            ax.set_ylabel(metric, fontsize=8)
            ax.tick_params(labelsize=7)
    return _save(fig, axes, f"{claim.title}\nmean ± standard error over seeds", out)


def sensitivity_table(values: dict[str, dict[str, dict[int, float]]], points: list[tuple[float, str]],
                      pairs: list[tuple[str, str]], arms: list[str], metric: str, axis: str) -> list[str]:
    """One row per arm: the metric averaged over the axis's whole range per seed (mean +- std over
    seeds), its paired difference from the arm's baseline, and the best value with where it lies."""
    import numpy as np

    from tasks.common.stats import mean_std, paired

    def per_seed(arm: str) -> dict[int, float]:
        cells = [values.get(cell, {}).get(arm, {}) for _, cell in points]
        seeds = set.intersection(*(set(c) for c in cells)) if cells else set()
        return {k: float(np.mean([c[k] for c in cells])) for k in seeds}

    base_of = dict(pairs)
    name = axis.rsplit(".", 1)[-1]
    lines = [f"| arm | {metric} over the {name} range, mean ± std | vs | paired Δ (p) | best mean | at {name} |",
             "|---|---|---|---|---|---|"]
    for arm in arms:
        mine = per_seed(arm)
        if not mine:
            continue
        m, s = mean_std(list(mine.values()))
        means = [(float(np.mean(list(values[cell][arm].values()))), x) for x, cell in points
                 if values.get(cell, {}).get(arm)]
        best = min(means) if metric_lower_is_better(metric) else max(means)
        row = f"| {arm} | {_fmt(m)} ± {_fmt(s)} |"
        base = base_of.get(arm)
        if base:
            theirs = per_seed(base)
            common = sorted(set(mine) & set(theirs))
            r = paired([theirs[k] for k in common], [mine[k] for k in common]) if common else None
            star = "**" if r and r.p_value < 0.05 else ""
            row += (f" {base} | {star}{_signed(r.mean_diff)}{star} ({_p(r.p_value)}) |" if r else f" {base} | n/a |")
        else:
            row += " | |"
        lines.append(row + f" {_fmt(best[0])} | {best[1]:g} |")
    return lines


def _common_steps(curves, bins: int = 50):
    """(steps, [runs, steps] values) of curves logged at the same steps, or, where runs log at their
    own steps (episode ends), each run's mean per bin of 50 equal bins, carried forward over empty
    bins."""
    import numpy as np

    if all(len(c[0]) == len(curves[0][0]) and np.array_equal(c[0], curves[0][0]) for c in curves):
        return curves[0][0], np.array([c[1] for c in curves])
    edges = np.linspace(0, max(c[0].max() for c in curves), bins + 1)
    out = np.empty((len(curves), bins))
    for i, (steps, vals) in enumerate(curves):
        which = np.clip(np.searchsorted(edges, steps, side="left") - 1, 0, bins - 1)
        last = vals[0]
        for b in range(bins):
            hit = vals[which == b]
            last = hit.mean() if len(hit) else last
            out[i, b] = last
    return edges[1:], out


def best_curves(values: dict[str, dict[str, dict[int, float]]], ids: dict[str, dict[str, dict[int, str]]],
                claim, out: Path) -> Path:
    """A panel per other cell: each arm's learning curve (``claim.curve``, mean +- standard error over
    seeds) at the value of the sensitivity axis where its headline metric was best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import numpy as np

    client = mlflow.MlflowClient(tracking.tracking_uri())
    lower = metric_lower_is_better(claim.metric)
    groups = _sensitivity_groups(claim)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups) + 1.6, 3.2), squeeze=False)
    name = claim.sensitivity.rsplit(".", 1)[-1]
    for ax, (group, points) in zip(axes[0], groups.items()):
        for j, arm in enumerate(claim.arms):
            scored = [(float(np.mean(list(values[cell][arm].values()))), x, cell) for x, cell in points
                      if values.get(cell, {}).get(arm)]
            if not scored:
                continue
            _, x, cell = min(scored) if lower else max(scored)
            curves = []
            for run_id in ids.get(cell, {}).get(arm, {}).values():
                hist = sorted(client.get_metric_history(run_id, claim.curve), key=lambda m: m.step)
                if hist:
                    curves.append((np.array([m.step for m in hist]), np.array([m.value for m in hist])))
            if not curves:
                continue
            steps, y = _common_steps(curves)
            m = y.mean(0)
            se = y.std(0, ddof=1) / np.sqrt(len(y)) if len(y) > 1 else np.zeros_like(m)
            ax.plot(steps, m, lw=1.2, color=f"C{j}", label=f"{arm} ({name} {x:g})")
            ax.fill_between(steps, m - se, m + se, color=f"C{j}", alpha=0.15, lw=0)
        ax.set_title(group, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(claim.curve, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, frameon=False)
    fig.suptitle(f"{claim.title}\neach arm at its best {name} (by {claim.metric}); mean ± standard error over "
                 "seeds", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def metric_lower_is_better(metric: str) -> bool:
    """Errors, losses and divergence counts are better low; accuracies and returns high."""
    name = metric.rsplit("/", 1)[-1]
    return any(k in name for k in ("err", "loss", "nll", "ece", "brier", "rmsve", "msbe", "diverged", "ppl"))


def write(parent: str, claim) -> Path:
    metrics = [claim.metric, *claim.metrics]
    values, ids = collect(parent, metrics)
    cells = [c for c in map(_cell_label, claim.cells()) if c in ids] or sorted(ids)
    comparisons = comparisons_of(claim)
    seeds = sorted({s for c in ids.values() for a in c.values() for s in a})
    lines = [f"# {claim.title}", ""] + ([f"Paper: {claim.paper}", ""] if claim.paper else []) + [
             f"Sweep config: `pipelines/configs/claims/{claim.name}.yaml` (job `pipelines.{claim.job}`, base "
             f"`{claim.config}`); seeds {seeds}, paired across arms"
             + (f"; grid {', '.join(f'`{k}` {v}' for k, v in claim.grid.items())}" if claim.grid else "") + ".",
             f"MLflow parent run `{parent}` (experiment `{claim.experiment}`)"
             + (" — **smoke run: tiny data, not evidence**" if claim.smoke else "") + ".", "",
             "Reproduce:", "", "```", f"python -m pipelines.sweep --config pipelines/configs/claims/{claim.name}.yaml",
             "```", ""]
    if claim.notes:
        lines += [claim.notes.strip(), ""]
    lines += ["## Arms", ""] + [f"- `{arm}`: `{' '.join(ov) or '(base config)'}`" for arm, ov in claim.arms.items()]
    lines += ["", f"Shared overrides: `{' '.join(claim.overrides) or 'none'}`", ""]
    results = tracking.REPO / claim.results_dir
    results.mkdir(parents=True, exist_ok=True)
    stem = f"{claim.name}{'-smoke' if claim.smoke else ''}"
    if claim.sensitivity:
        png = sensitivity_plot(values, claim, metrics, results / f"{stem}-sensitivity.png")
        lines += [f"## Sensitivity to `{claim.sensitivity}`", "", f"![sensitivity]({png.name})", "",
                  f"Each arm's metric averaged over the whole `{claim.sensitivity}` range per seed, then "
                  "compared with its baseline over paired seeds (bold: p < 0.05); a lower range mean for "
                  "an error (higher for a return) means good results over more of the range.", ""]
        if claim.curve:
            png = best_curves(values[claim.metric], ids, claim, results / f"{stem}-curves.png")
            lines += [f"![learning curves]({png.name})", ""]
        groups = _sensitivity_groups(claim)
        for group, points in groups.items():
            if len(groups) > 1:
                lines += [f"### {group}", ""]
            for m in metrics:
                lines += [f"**{m}**", ""] + sensitivity_table(values[m], points, pairs_of(claim), list(claim.arms),
                                                              m, claim.sensitivity) + [""]
    if len(cells) > 1:
        pairs = pairs_of(claim)
        png = forest(values, cells, pairs, metrics, results / f"{stem}-summary.png", claim.name)
        lines += [f"## Summary over {len(cells)} cells", "", f"![summary]({png.name})", "",
                  "Differences are paired over seeds within a cell; p from the paired t-test; "
                  "bold: p < 0.05.", ""]
        for m in metrics:
            lines += [f"### {m}", ""] + summary_table(values[m], cells, pairs, m) + [""]
    for cell in cells:
        if len(cells) > 1:
            lines += [f"## {cell}", ""]
        for k, (regime, pairs) in enumerate(comparisons.items()):
            ordered = {b: b for b in dict.fromkeys(pairs.values())} | pairs
            if len(comparisons) > 1 or len(cells) == 1:
                lines += [f"{'###' if len(cells) > 1 else '##'} {regime}", ""]
            if len(cells) == 1:  # the per-seed picture; many cells get the summary plot instead
                png = plot(values[claim.metric].get(cell, {}), list(ordered), claim.metric,
                           results / f"{stem}-{k}.png", f"{claim.name}: {regime}")
                lines += [f"![{regime}]({png.name})", ""]
            for m in metrics:
                lines += [f"**{m}**" if len(cells) > 1 else f"### {m}", ""] \
                    + table(values[m].get(cell, {}), ordered, m) + [""]
    lines += ["## Runs", "", "| cell | arm | seed | MLflow run |", "|---|---|---|---|"]
    lines += [f"| {cell} | {arm} | {seed} | `{rid}` |" for cell in cells for arm in ids.get(cell, {})
              for seed, rid in sorted(ids[cell][arm].items())]
    out = results / f"{stem}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"[report] {out}", flush=True)
    return out


def _latest_parent(claim) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(claim.experiment)
    # the parent's job is "sweep" ("claim" for sweeps run before it was renamed); trials carry their own job
    runs = [r for job in ("sweep", "claim") for r in client.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1,
        filter_string=f"tags.`claim.name` = '{claim.name}' and tags.`squeezelab.job` = '{job}'")] if exp else []
    runs.sort(key=lambda r: r.info.start_time, reverse=True)
    if not runs:
        sys.exit(f"no claim run named {claim.name!r} in experiment {claim.experiment!r}")
    return runs[0].info.run_id


if __name__ == "__main__":
    from pipelines.sweep import SweepConfig
    from pipelines.core.config import load_config

    args = sys.argv[1:]
    if "--config" not in args:
        sys.exit(__doc__)
    i = args.index("--config")
    path, rest = args[i + 1], args[:i] + args[i + 2:]
    parent = next((a.split("=", 1)[1] for a in rest if a.startswith("parent_run_id=")), None)
    smoke = "--smoke" in rest
    claim = load_config(SweepConfig, path, [], smoke)
    write(parent or _latest_parent(claim), claim)
