"""A plain multilayer perceptron classifier: the dense baseline student of the distillation methods.

Not a published method of its own: the teacher and student of the Weight Squeezing experiments
(Chumachenko et al., arXiv 2010.06993, section 4) and the dense student MiniMoE is compared with at
equal active compute (Zhang et al., ACL 2023) are MLPs of this shape on small inputs.

Implements: flatten -> [Linear -> ReLU (-> BatchNorm)] x len(hidden) -> Linear, He-initialised hidden
layers. ``batch_norm=True`` is EnsLoss's tabular TabMLP (statmlben/ensLoss ``tab_models``: BatchNorm
after each hidden ReLU).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from tasks.common.registry import register_model


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: Sequence[int] = (256, 256),
                 dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = nn.Dropout(dropout)
        # only when asked for: a plain MLP's state dict (Weight Squeezing maps it) stays layers.* alone
        self.norms = nn.ModuleList(nn.BatchNorm1d(w) for w in hidden) if batch_norm else None
        for layer in self.layers[:-1]:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.layers[:-1]):
            h = torch.relu(layer(h))
            h = self.dropout(self.norms[i](h) if self.norms is not None else h)
        return self.layers[-1](h)


mlp = register_model("mlp")(MLP)
