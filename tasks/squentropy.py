"""Squentropy: cross-entropy plus the average square loss over the incorrect classes.

Hui, Belkin, Wright, "Cut your Losses with Squentropy", ICML 2023 (arXiv 2302.03952).
Implements: the loss ``squentropy`` (registered), as the abstract defines it and the author code
(Like-Hui/Squentropy-for-classification, ``loss_type == 'mixed'``) computes it:

    L(f, y) = -log softmax(f)_y + 1/(C-1) * sum_{j != y} f_j^2,    averaged over the batch,

with the squares on the raw logits (not on probabilities, which would be a Brier-style loss), and the
baseline it is compared with, the rescaled square loss of Hui & Belkin ("Evaluation of Neural
Architectures Trained with Square Loss vs Cross-Entropy in Classification Tasks", ICLR 2021,
arXiv 2006.07322), registered as ``rescaled_square``:

    L(f, y) = 1/C * [ k (f_y - M)^2 + sum_{j != y} f_j^2 ],

k = M = 1 being the plain one-hot square loss the author code trains (``mean((f - M onehot)^2)``).
Cross-entropy with label smoothing is ``cross_entropy`` with its ``label_smoothing`` option
(tasks/common/losses.py); post-hoc temperature scaling is tasks/temperature_scaling.py.
Departs from the paper: none in the loss. Hui & Belkin raise (k, M) for many-class problems
(ImageNet-scale); both are options here, left at 1 for the <= 26-class sets this project runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.common.registry import register_loss


def _true_class(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, target[:, None]).squeeze(1)


@register_loss("squentropy")
def squentropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    classes = logits.shape[1]
    if classes < 2:
        raise ValueError("squentropy needs at least two classes (one logit per class)")
    # sum over the incorrect classes = all squares minus the true class's square
    wrong = logits.pow(2).sum(1) - _true_class(logits, target).pow(2)
    return F.cross_entropy(logits, target) + wrong.mean() / (classes - 1)


@register_loss("rescaled_square")
def rescaled_square(logits: torch.Tensor, target: torch.Tensor, k: float = 1.0, M: float = 1.0) -> torch.Tensor:
    true = _true_class(logits, target)
    wrong = logits.pow(2).sum(1) - true.pow(2)
    return ((k * (true - M).pow(2) + wrong) / logits.shape[1]).mean()
