"""Post-hoc temperature scaling: one scalar T fitted on held-out logits by minimising the NLL.

Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017 (arXiv 1706.04599).
Implements: T* = argmin_T NLL(softmax(z / T), y) on a validation split, applied to test logits;
accuracy is unchanged (arg-max is invariant to T > 0). The post-hoc calibration baseline that
Squentropy's calibration claim is read against.
Departs from the paper: the 1-D problem is solved in log T (T stays positive) by bounded scalar
minimisation over T in [0.05, 20] instead of L-BFGS; the optimum is the same and deterministic.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_logits(logits: torch.Tensor) -> torch.Tensor:
    """[N, C] logits as they are; a binary model's single score s (shape [N] or [N, 1]) as [0, s],
    whose softmax is (1 - sigmoid(s), sigmoid(s))."""
    if logits.ndim == 1 or logits.shape[1] == 1:
        s = logits.reshape(-1, 1)
        return torch.cat([torch.zeros_like(s), s], 1)
    return logits


def nll_at(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return F.cross_entropy(class_logits(logits).double() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, low: float = 0.05, high: float = 20.0) -> float:
    """The T that minimises the NLL of ``logits / T`` on ``labels`` (a validation split)."""
    from scipy.optimize import minimize_scalar

    z = class_logits(logits.detach()).double()
    res = minimize_scalar(lambda log_t: nll_at(z, labels, float(np.exp(log_t))),
                          bounds=(np.log(low), np.log(high)), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))
