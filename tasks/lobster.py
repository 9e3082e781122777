"""LOBSTER: loss-based sensitivity regularisation, and the plateau -> rewind -> threshold pruning schedule.

Tartaglione, Bragagnolo, Fiandrotti, Grangetto, "LOss-Based SensiTivity rEgulaRization: towards deep
sparse neural networks", Neural Networks 2022 (arXiv 2011.09905).
Implements:
- ``lobster_step``: after every optimiser step, each parameter of the regularised layers (Linear,
  Conv2d, BatchNorm; weights and biases) shrinks by lambda * p * relu(1 - |dL/dp|): parameters the
  loss is insensitive to decay geometrically, sensitive ones (|grad| >= 1) are left alone. As in the
  official code the term is NOT scaled by the learning rate (lambda is per step), and pruned
  parameters are multiplied by their mask so that they stay exactly zero.
- ``decay_step``: the ablation, the same shrink without the sensitivity factor (p -= lambda p).
- ``Plateau``: the official plateau detector on the validation loss (an epoch is good when
  loss < best (1 + 1%); ``patience`` bad epochs in a row make a plateau) that keeps the best weights
  to rewind to.
- ``find_threshold``: the official bisection for a global magnitude threshold whose validation loss
  stays within (1 + tolerance) of the loss before pruning (see its docstring for the search range and
  stopping rule, both as the official code).
- ``masks_of`` / ``apply_masks`` / ``remaining``: the masks (p != 0, recomputed at every epoch start
  in the official code) and the remaining-parameter fraction.

Departs from the paper: none in the update. The bisection follows the official code, including that
its final midpoint is not re-checked against the bound (so a pruning step can overshoot the tolerance
by up to the 5% stopping width), and is capped at ``max_evals`` evaluations so that a pruning event
has a bounded cost. Under data parallelism
(DeepSpeed ZeRO-0 or DDP) every rank sees the same all-reduced gradient after backward, so
``lobster_step`` applied on every rank keeps the replicas identical; callers pass the gradients
explicitly where the framework does not leave them in ``p.grad`` (``grads=``).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def regularised(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every weight and bias of the layers LOBSTER regularises and prunes."""
    for module_name, module in model.named_modules():
        if isinstance(module, LAYERS):
            for pname, p in module.named_parameters(recurse=False):
                yield (f"{module_name}.{pname}" if module_name else pname), p


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: (p != 0)} as float masks: what is already pruned stays pruned."""
    return {name: (p.detach() != 0).to(p.dtype) for name, p in regularised(model)}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, p in regularised(model):
        if name in masks:
            p.mul_(masks[name])


@torch.no_grad()
def lobster_step(model: nn.Module, lmbda: float, masks: dict[str, torch.Tensor] | None = None,
                 grads: dict[str, torch.Tensor] | None = None) -> None:
    """p <- p - lmbda * p * relu(1 - |g|), then p <- p * mask. Call right after optimizer.step();
    ``grads`` (name -> gradient) replaces p.grad where the framework keeps gradients elsewhere."""
    for name, p in regularised(model):
        g = grads.get(name) if grads is not None else p.grad
        if g is None:  # a parameter that took no part in this batch's loss: no sensitivity measured
            continue
        p.sub_(lmbda * p * (1.0 - g.abs()).clamp_min(0.0))
        if masks is not None and name in masks:
            p.mul_(masks[name])


@torch.no_grad()
def decay_step(model: nn.Module, lmbda: float, masks: dict[str, torch.Tensor] | None = None) -> None:
    """The ablation: p <- p - lmbda * p on the same parameters, no sensitivity."""
    for name, p in regularised(model):
        p.sub_(lmbda * p)
        if masks is not None and name in masks:
            p.mul_(masks[name])


def remaining(model: nn.Module) -> tuple[int, int]:
    """(non-zero, total) over the regularised parameters."""
    nonzero = total = 0
    for _, p in regularised(model):
        nonzero += int((p != 0).sum())
        total += p.numel()
    return nonzero, total


@torch.no_grad()
def magnitude_threshold(model: nn.Module, threshold: float) -> None:
    """Zero every regularised parameter with |p| < threshold (one global threshold, as the paper)."""
    for _, p in regularised(model):
        p.mul_((p.abs() >= threshold).to(p.dtype))


def _weight_magnitudes(model: nn.Module) -> list[torch.Tensor]:
    """|w| != 0 of every regularised layer's weight (the official search range ignores biases)."""
    out = []
    for name, p in regularised(model):
        if name.rsplit(".", 1)[-1] == "weight":
            a = p.detach().abs().flatten()
            if (a > 0).any():
                out.append(a[a > 0])
    return out


def find_threshold(model: nn.Module, val_loss: Callable[[nn.Module], float], tolerance: float,
                   max_evals: int = 30) -> tuple[float, float, int]:
    """The official bisection for the global threshold T: val_loss(model thresholded at T) should stay
    within L0 (1 + tolerance), L0 = val_loss(model). Returns (T, loss at T, evaluations); the model is
    left unchanged. As the official code: the range is [mean, max] of the non-zero weight magnitudes
    when thresholding at their mean (the mean of the per-layer means) is tolerable, else [min, mean];
    bisect until the two ends' losses differ by < 5% of the bound, then return the midpoint (a
    midpoint that stops moving returns the tolerable end)."""
    state = copy.deepcopy(model.state_dict())
    base = val_loss(model)
    bound = base * (1.0 + tolerance)
    evals = 1

    def loss_at(t: float) -> float:
        nonlocal evals
        model.load_state_dict(state)
        magnitude_threshold(model, t)
        evals += 1
        loss = val_loss(model)
        model.load_state_dict(state)
        return loss

    mags = _weight_magnitudes(model)
    if not mags:
        return 0.0, base, evals
    mean = float(torch.stack([m.mean() for m in mags]).mean())
    loss_mean = loss_at(mean)
    if loss_mean < bound:
        a, loss_a, b, loss_b = mean, loss_mean, max(float(m.max()) for m in mags), float("inf")
    else:
        a, loss_a, b, loss_b = min(float(m.min()) for m in mags), base, mean, loss_mean
    previous = float("inf")
    t = None
    while abs(loss_a - loss_b) >= 0.05 * bound and evals < max_evals:
        center = 0.5 * (a + b)
        if abs(previous - center) <= 1e-10:
            t = a
            break
        previous = center
        loss_c = loss_at(center)
        if loss_c <= bound:
            a, loss_a = center, loss_c
        else:
            b, loss_b = center, loss_c
    if t is None:
        t = 0.5 * (a + b)
    return t, loss_at(t), evals + 1


@dataclass
class Plateau:
    """The official plateau detector: ``patience`` epochs in a row without improving the best
    validation loss by more than ``rel`` make a plateau; the best weights are kept for the rewind."""

    patience: int = 20
    rel: float = 0.01
    best: float = float("inf")
    bad: int = 0
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def update(self, loss: float, model: nn.Module) -> bool:
        """Record an epoch's validation loss; True when a plateau is reached (then call reset)."""
        if loss < self.best * (1.0 + self.rel):
            if loss < self.best:
                self.best = loss
                self.best_state = copy.deepcopy(model.state_dict())
            self.bad = 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def rewind(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def reset(self) -> None:
        """Start a new phase (after pruning): the next epoch sets the best, as the official code."""
        self.best, self.bad, self.best_state = float("inf"), 0, None


@dataclass
class PruningSchedule:
    """The official schedule around training: at each validation-loss plateau, rewind to the best
    weights, prune at the largest tolerable global threshold, and start a new phase from there."""

    patience: int = 20
    tolerance: float = 0.05
    max_evals: int = 30
    events: int = 0
    plateau: Plateau = field(init=False)

    def __post_init__(self) -> None:
        self.plateau = Plateau(self.patience)

    def epoch_end(self, model: nn.Module, loss: float, val_loss: Callable[[nn.Module], float]) -> dict | None:
        """Record an epoch's validation ``loss``; on a plateau prune ``model`` in place and return
        {threshold, loss, evaluations, remaining}; else None."""
        if not self.plateau.update(loss, model):
            return None
        self.plateau.rewind(model)
        threshold, pruned_loss, evals = find_threshold(model, val_loss, self.tolerance, self.max_evals)
        magnitude_threshold(model, threshold)
        self.plateau.reset()
        self.events += 1
        nonzero, total = remaining(model)
        return {"threshold": threshold, "loss": pruned_loss, "evaluations": evals, "remaining": nonzero / total}
