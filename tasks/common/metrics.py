"""Classification metrics from predicted probabilities: accuracy, NLL, Brier score, ECE, and the
reliability diagram that shows where a model is over- or under-confident.

Not a published method of its own: the measurements the loss papers report. ECE is the top-label
expected calibration error of Guo et al. (arXiv 1706.04599), sum_b (n_b / N) |acc_b - conf_b|, with
``bins`` equal-width confidence bins (lower edge open, upper closed, as in the Squentropy author code;
10 bins there) or equal-mass bins (each bin holds ~N / bins predictions; less sensitive to empty bins).
Brier is the multiclass form, mean_i sum_j (p_ij - 1[j = y_i])^2 (0 best, 2 worst).
Every function takes probabilities [N, C] (rows summing to 1) and integer labels [N].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probabilities [N, C] and labels [N] expected, got {p.shape} and {y.shape}")
    if not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("probability rows must sum to 1")
    return p, y.astype(np.int64)


def accuracy(probs, labels) -> float:
    p, y = _check(probs, labels)
    return float((p.argmax(1) == y).mean())


def nll(probs, labels, eps: float = 1e-12) -> float:
    p, y = _check(probs, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], eps, None)).mean())


def brier(probs, labels) -> float:
    p, y = _check(probs, labels)
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(1).mean())


def _bins(confidence: np.ndarray, bins: int, scheme: str) -> list[np.ndarray]:
    """Index sets of the bins: equal-width on (0, 1] or equal-mass by sorted confidence."""
    if scheme == "width":
        edges = np.linspace(0.0, 1.0, bins + 1)
        which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
        return [np.flatnonzero(which == b) for b in range(bins)]
    if scheme == "mass":
        return [b for b in np.array_split(np.argsort(confidence, kind="stable"), bins) if len(b)]
    raise ValueError(f"scheme must be 'width' or 'mass', got {scheme!r}")


def reliability(probs, labels, bins: int = 10, scheme: str = "width") -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) per non-empty bin of the top-label confidence."""
    p, y = _check(probs, labels)
    confidence, correct = p.max(1), (p.argmax(1) == y)
    return [(float(confidence[i].mean()), float(correct[i].mean()), len(i))
            for i in _bins(confidence, bins, scheme) if len(i)]


def ece(probs, labels, bins: int = 10, scheme: str = "width") -> float:
    n = len(labels)
    return float(sum(c * abs(acc - conf) for conf, acc, c in reliability(probs, labels, bins, scheme)) / n)


def summary(probs, labels, bins: int = 10) -> dict[str, float]:
    """Every metric under the names the jobs log: acc, nll, brier, ece (equal width), ece_mass."""
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels), "brier": brier(probs, labels),
            "ece": ece(probs, labels, bins, "width"), "ece_mass": ece(probs, labels, bins, "mass")}


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], out: str | Path, title: str = "",
                        bins: int = 10) -> Path:
    """One panel per curve name ({name: (probs, labels)}): accuracy vs confidence per equal-width bin,
    the gap to the diagonal shaded, the bin's share of predictions as a histogram below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(curves), figsize=(3.4 * len(curves), 4.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = 1.0 / bins
    for k, (name, (probs, labels)) in enumerate(curves.items()):
        top, bottom = axes[0, k], axes[1, k]
        rows = reliability(probs, labels, bins, "width")
        conf = np.array([r[0] for r in rows])
        acc = np.array([r[1] for r in rows])
        share = np.array([r[2] for r in rows]) / len(labels)
        left = np.floor(np.minimum(conf, 1 - 1e-9) / width) * width
        top.bar(left, acc, width=width, align="edge", color="C0", edgecolor="k", lw=0.5, label="accuracy")
        top.bar(left, conf - acc, bottom=acc, width=width, align="edge", color="C3", alpha=0.35,
                label="gap to confidence")
        top.plot([0, 1], [0, 1], "k--", lw=0.8)
        top.set_title(f"{name}\nECE {ece(probs, labels, bins):.4f}", fontsize=9)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy" if k == 0 else "")
        bottom.bar(left, share, width=width, align="edge", color="0.5")
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("share" if k == 0 else "")
        if k == 0:
            top.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
