"""Knowledge distillation from soft targets (Hinton, Vinyals, Dean 2015).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).
Implements: the soft-target loss KL(softmax(z_t / T) || softmax(z_s / T)) scaled by T^2, so that its
gradient magnitude stays comparable to the hard-label term's as T changes (section 2 of the paper),
registered as the loss ``kd``. Combined with cross-entropy through ``tasks.common.losses``
(``{"ce": {"weight": 0.1}, "kd": {"weight": 0.9, "temperature": 4}}`` is mdistiller's CIFAR setting
used by DOT).
Departs from the paper: none. The KL is summed over classes and averaged over the batch, as in
mdistiller's ``kd_loss`` (the paper writes a cross-entropy against the soft targets; the two differ by
the teacher's entropy, a constant with no gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.common.registry import register_loss


@register_loss("kd")
def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p_student = F.log_softmax(logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(1).mean()
    return kl * temperature**2
