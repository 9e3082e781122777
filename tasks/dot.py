"""DOT: the Distillation-Oriented Trainer.

Zhao, Cui, Song, Liang, "DOT: A Distillation-Oriented Trainer", ICCV 2023 (arXiv 2307.08436); official
code megvii-research/mdistiller (``mdistiller/engine/dot.py``, ``trainer.py:DOT``).

Implements: SGD whose two loss gradients keep separate momentum buffers, a smaller momentum
``mu - delta`` for the task (cross-entropy) gradient and a larger ``mu + delta`` for the
distillation gradient, so the distillation loss is optimised with more "inertia"::

    v_task <- (mu - delta) v_task + (g_task + wd * theta)      (weight decay only here)
    v_kd   <- (mu + delta) v_kd   + g_kd
    theta  <- theta - lr * (v_task + v_kd)

With delta = 0 the two buffers sum to the buffer of SGD with momentum on the summed loss, so DOT is
exactly SGD (tests check it step by step).

How it runs inside DeepSpeed (and why this shape): a training step back-propagates the two losses
separately and calls the optimizer twice, first after the distillation backward, then after the task
backward (:func:`two_phase_step`). The first call only stores the gradient it is handed (phase
``"distill"``); the second updates. DeepSpeed reduces (ZeRO-0/1) or reduce-scatters (ZeRO-2) the
gradients before every optimizer call and, under ZeRO 1-3, hands the optimizer its rank's flat fp32
*partition* of the parameters, so each rank keeps ``v_task``, ``v_kd`` and the stored ``g_kd`` for its
own partition only: DOT's two momentum buffers are partitioned exactly like Adam's two moments.
Because each engine step also steps the LR schedule, schedules count two steps per batch.

Departs from the official code:
- a parameter without one of the two gradients simply skips that buffer's update. The official code
  gives a parameter that receives only one of them (feature-KD connectors) momentum
  (mu_task + mu_kd) / 2; with logit KD every student parameter receives both, and inside DeepSpeed
  every parameter always does (it hands zeros for a missing gradient, and under ZeRO the optimizer
  sees flat partitions where "no gradient" is indistinguishable from a zero one);
- the distillation gradient is cloned when stored, so clearing gradients between the two backward
  passes cannot corrupt it (the official code relies on ``zero_grad(set_to_none=True)``).
"""
from __future__ import annotations

from typing import Callable

import torch


class DOT(torch.optim.Optimizer):
    """SGD with separate task / distillation momentum. Each batch: set ``phase = "distill"`` and step with
    the distillation gradient, then ``phase = "task"`` and step with the task gradient
    (:func:`two_phase_step` does both)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 0.0):
        if not (0 <= momentum - delta and momentum + delta < 1):
            raise ValueError(f"momentum +- delta must lie in [0, 1): momentum={momentum}, delta={delta}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))
        # Which gradient the next step() receives. Set by the caller, never toggled here: ZeRO calls
        # step() once per parameter (sub-)group, and skips it when a gradient is not finite, so a
        # self-toggling flag could swap the two momenta for the rest of a run without a sound.
        self.phase = "distill"

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        if closure is not None:
            raise ValueError("DOT takes no closure: it needs the two gradients from separate backward passes")
        if self.phase not in ("distill", "task"):
            raise ValueError(f"DOT.phase must be 'distill' or 'task', got {self.phase!r}")
        if self.phase == "distill":  # store this batch's distillation gradient; the update comes next
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["g_kd"] = p.grad.detach().clone() if p.grad is not None else None
            return None
        for group in self.param_groups:
            mu_task = group["momentum"] - group["delta"]  # mu - Delta
            mu_kd = group["momentum"] + group["delta"]  # mu + Delta
            for p in group["params"]:
                state = self.state[p]
                g_kd = state.pop("g_kd", None)  # None: the distillation step of this batch was skipped
                if p.grad is not None:
                    d = p.grad.add(p, alpha=group["weight_decay"])
                    _momentum(state, "v_task", mu_task, d)
                    p.sub_(state["v_task"], alpha=group["lr"])
                if g_kd is not None:
                    _momentum(state, "v_kd", mu_kd, g_kd)
                    p.sub_(state["v_kd"], alpha=group["lr"])
        return None


def _momentum(state: dict, key: str, mu: float, grad: torch.Tensor) -> None:
    """v <- grad on the first step, else mu * v + grad (torch SGD's convention, dampening 0)."""
    if key not in state:
        state[key] = grad.clone()
    else:
        state[key].mul_(mu).add_(grad)


def two_phase_step(optimizer: DOT, backward: Callable[..., None], step: Callable[[], None],
                   distill_loss: torch.Tensor, task_loss: torch.Tensor) -> None:
    """One DOT update: back-propagate the distillation loss (keeping the graph) and hand its gradient to
    the optimizer, then the task loss. ``backward(loss, retain_graph=...)`` and ``step()`` are a
    DeepSpeed engine's (which clears gradients after each step) or a plain loop's equivalents;
    ``optimizer`` is the DOT instance underneath (DeepSpeed's ZeRO wrappers call it)."""
    optimizer.phase = "distill"
    backward(distill_loss, retain_graph=True)
    step()
    optimizer.phase = "task"
    backward(task_loss)
    step()
