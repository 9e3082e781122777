"""A plain multilayer perceptron classifier: the dense baseline student of the distillation methods.

Not a published method of its own: the teacher and student of the Weight Squeezing experiments
(Chumachenko et al., arXiv 2010.06993, section 4) and the dense student MiniMoE is compared with at
equal active compute (Zhang et al., ACL 2023) are MLPs of this shape on small inputs.

Implements: flatten -> [Linear -> ReLU] x len(hidden) -> Linear, He-initialised hidden layers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from tasks.common.registry import register_model


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: Sequence[int] = (256, 256),
                 dropout: float = 0.0):
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = nn.Dropout(dropout)
        for layer in self.layers[:-1]:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = self.dropout(torch.relu(layer(h)))
        return self.layers[-1](h)


mlp = register_model("mlp")(MLP)
