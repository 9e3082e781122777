"""EnsLoss: stochastic calibrated loss ensembles for binary classification.

Ben Dai, "EnsLoss: Stochastic Calibrated Loss Ensembles for Preventing Overfitting in
Classification", ICML 2025 (arXiv 2409.00908); official code statmlben/ensLoss (``losses.py``).
Implements: the loss ``ensloss`` (registered). SGD only ever uses the loss derivative phi'(s) at the
margins s_i = y_i f(x_i), y in {-1, +1}; a convex loss is classification-calibrated iff phi' is
non-decreasing with phi'(0) < 0 (Bartlett, Jordan, McAuliffe 2006). Every minibatch EnsLoss draws
random derivative values consistent with *some* such loss, instead of fixing one:

    g_j = -BoxCox^{-1}_lambda(u_j), u_j ~ N(0, 1)     (lambda = 0: g_j = -exp(u_j), a log-normal)
    g   = sorted ascending, capped below at -1        (|phi'| <= 1, a Lipschitz loss)
    rank assignment: the smallest margin gets the most negative g, ..., the largest the closest to 0
                                                      (non-decreasing in s: a convex interpolant exists)
    g_i <- g_i / s_i for s_i > 1                      (the superlinear tail of the official code)
    g   <- g - 1e-6                                   (strictly negative, so phi'(0) < 0)
    loss = mean_i( stopgrad(g_i) * s_i )              (its gradient is mean_i g_i grad s_i)

The printed value of this surrogate is meaningless (it can be negative); watch accuracy instead.
Also the fixed binary losses the paper compares with: ``bce`` (logistic), ``hinge``, ``exponential``
(the paper clips its gradients at norm 10) and ``focal_binary`` (gamma = 2).
Ablation (not in the paper): ``draws="expected"`` replaces the random sorted draws with their
expected order statistics (Blom's approximation), separating the ensemble's randomness from its
rank-based reweighting.
Departs from the official code: runs on any device (the code hard-codes CUDA and calls np.maximum on
a tensor); the derivatives come from the torch generator, so a seeded run is repeatable. Binary only,
as in the paper: there is no multiclass generator, and none is invented here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tasks.common.losses import single_score
from tasks.common.registry import register_loss


def margins(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """s = y f(x) with y = 2 * target - 1 in {-1, +1}; ``logits`` is one score per example."""
    if logits.ndim > 1 and logits.shape[1] != 1:
        raise ValueError(f"binary losses take one score per example, got logits of shape {tuple(logits.shape)}")
    return (2.0 * target.to(logits.dtype) - 1.0) * logits.reshape(-1)


def box_cox_inverse(u: torch.Tensor, lam: float) -> torch.Tensor:
    if lam == 0.0:
        return torch.exp(u)
    return torch.clamp(1.0 + lam * u, min=0.0) ** (1.0 / lam)


def expected_normal_order_statistics(n: int, dtype=torch.float32) -> torch.Tensor:
    """Blom's approximation E[u_(k)] ~ Phi^{-1}((k - 0.375) / (n + 0.25)), k = 1..n, ascending."""
    p = (torch.arange(1, n + 1, dtype=torch.float64) - 0.375) / (n + 0.25)
    return (math.sqrt(2.0) * torch.erfinv(2 * p - 1)).to(dtype)


def ensloss_derivatives(s: torch.Tensor, lam: float = 0.0, cap: float = 1.0, tail: bool = True,
                        draws: str = "random") -> torch.Tensor:
    """The per-example derivatives phi'(s_i) EnsLoss uses for the margins ``s`` of one batch."""
    s = s.detach()
    if draws == "random":
        u = torch.randn(s.shape, dtype=s.dtype, device=s.device)
    elif draws == "expected":
        u = expected_normal_order_statistics(len(s), s.dtype).to(s.device)
    else:
        raise ValueError(f"draws must be 'random' or 'expected', got {draws!r}")
    g = torch.sort(-box_cox_inverse(u, lam)).values.clamp(min=-cap)  # ascending: most negative first
    derivative = torch.empty_like(s)
    derivative[torch.argsort(s)] = g  # the smallest margin takes the most negative derivative
    if tail:
        derivative = torch.where(s > 1.0, derivative / s.clamp(min=1.0), derivative)
    return derivative - 1e-6


@register_loss("ensloss")
@single_score
def ensloss(logits: torch.Tensor, target: torch.Tensor, lam: float = 0.0, cap: float = 1.0, tail: bool = True,
            draws: str = "random") -> torch.Tensor:
    s = margins(logits, target)
    return (ensloss_derivatives(s, lam, cap, tail, draws) * s).mean()


@register_loss("bce")
@single_score
def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.softplus(-margins(logits, target)).mean()  # = BCE-with-logits, log(1 + e^{-s})


@register_loss("hinge")
@single_score
def hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - margins(logits, target)).mean()


@register_loss("exponential")
@single_score
def exponential(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.exp(-margins(logits, target)).mean()


@register_loss("focal_binary")
@single_score
def focal_binary(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    s = margins(logits, target)
    p_true = torch.sigmoid(s)  # probability given to the correct class
    return ((1 - p_true) ** gamma * F.softplus(-s)).mean()
