"""Weight Squeezing: a student whose weights are learned maps of a frozen teacher's weights.

Chumachenko, Gavrilov, Balagansky, Kalaidin, "Weight Squeezing: Reparameterization for Knowledge
Transfer and Model Compression" (arXiv 2010.06993v3; an earlier version was titled "... for
Compression and Fast Inference").

What was checked against the paper, and what was not. Only the abstract and the opening of the
introduction could be read (mirrors of arxiv.org/abs/2010.06993, e.g.
api-inference.pages.dev/papers/2010.06993.md; the earlier version's abstract on deep.ai); no
official or third-party code was found. Verified: knowledge is transferred "by learning the mapping
from [the teacher's] weights to smaller student model weights"; it was "applied to a pre-trained
text classification model based on BERT-Medium"; Gated Weight Squeezing "combined fine-tuning of
BERT-Medium model and learning mapping from BERT-Base weights"; the earlier version combined Weight
Squeezing with Knowledge Distillation and compared it with low-rank factorisation. NOT verified, a
reconstruction: the bilinear form of the map (W_s = L W_t R, b_s = L b_t), tying the input map of a
layer to the output map of the one before, the initialisations, and the form of the gate (W = g *
W_own + (1 - g) * L W_t R, g = sigmoid(gamma)).

Implements, for the MLP of ``tasks.mlp`` (Linear -> ReLU ... -> Linear):
- ``SqueezedMLP``: layer i of the student computes its weight on the fly as W_i = L_i W_t,i R_i and
  its bias as b_i = L_i b_t,i (+ an optional free bias). L_i (p_i x n_i) maps the teacher's n_i
  output neurons to the student's p_i; R_i (m_i x q_i) maps the student's q_i inputs back into the
  teacher's m_i. The first layer has no R (the input features are the data's), the last no L (the
  classes are the task's). The teacher's weights are buffers; only the maps are parameters.
- the gated variant: the student also owns weights W_own, b_own, and a gate g = sigmoid(gamma) per
  layer (``gate="matrix"``) or per weight (``gate="element"``) mixes W = g W_own + (1 - g) L W_t R.
- ``materialise``: the computed student as a plain ``tasks.mlp.MLP`` (teacher discarded), and
  ``mlp_kwargs`` to save it under the registry name ``"mlp"``; ``squeeze_mlp`` is the factory a job
  calls. Train it with the task loss plus ``kd`` (``tasks.kd``), as the earlier version did.

Choices where the paper could not be read (departures until someone checks the PDF):
- ``tie_maps=True`` (default): R_i = L_{i-1}^T. A hidden dimension is one basis shared by the layer
  that writes it and the one that reads it, so each hidden width has one map, and with "select"
  the student is then exactly the pruned teacher; ``tie_maps=False`` learns R_i separately.
- ``init="select"`` (default): L_i has one-hot rows picking the p_i teacher neurons of largest
  incoming-weight norm, largest first, so training starts from a magnitude-pruned teacher (and at
  full width from a permuted, i.e. function-identical, teacher). ``init="orthogonal"``: random
  orthonormal rows scaled by (n/p)^(1/4), so that the round trip L^T L keeps a vector's expected norm.
- only equal depth: the teacher's layer i feeds the student's layer i (the paper's BERT-Base ->
  BERT-Medium gate needs a layer mapping, which an MLP of this repo never has).
- gate: gamma starts at ``gate_init`` = 0 (g = 0.5, equal mix); one gate per layer covers W and b.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tasks.mlp import MLP

Init = Literal["select", "orthogonal"]


def _select_map(teacher_weight: torch.Tensor, width: int) -> torch.Tensor:
    """One-hot rows choosing the ``width`` teacher neurons with the largest incoming-weight norm."""
    n = teacher_weight.shape[0]
    keep = teacher_weight.norm(dim=1).topk(width).indices  # largest first: a permutation when width == n
    return F.one_hot(keep, n).to(teacher_weight.dtype)


def _orthogonal_map(width: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random orthonormal rows Q (width x n), scaled by (n / width)^(1/4).

    ||Q x||^2 is (width / n) ||x||^2 in expectation and Q^T is an isometry, so the round trip
    L^T L x = c^2 Q^T Q x through a tied hidden map keeps a vector's norm for c^4 = n / width.
    """
    m = torch.empty(width, n, dtype=dtype)
    nn.init.orthogonal_(m)
    return m * (n / width) ** 0.25


class SqueezedMLP(nn.Module):
    """An MLP student whose layer i has weight L_i W_t,i R_i, computed from a frozen teacher MLP."""

    def __init__(self, teacher: MLP, hidden: Sequence[int], init: Init = "select", tie_maps: bool = True,
                 free_bias: bool = False, gated: bool = False, student_init: MLP | None = None,
                 gate: Literal["matrix", "element"] = "matrix", gate_init: float = 0.0,
                 dropout: float | None = None):
        super().__init__()
        t_layers = list(teacher.layers)
        hidden = [int(h) for h in hidden]
        if len(hidden) != len(t_layers) - 1:
            raise ValueError(f"the student needs one width per teacher hidden layer "
                             f"({len(t_layers) - 1}), got {len(hidden)}")
        if init not in ("select", "orthogonal"):
            raise ValueError(f"init must be 'select' or 'orthogonal', got {init!r}")
        self.in_features = t_layers[0].in_features
        self.num_classes = t_layers[-1].out_features
        self.hidden = hidden
        self.tie_maps = tie_maps
        self.gated = gated
        self.dropout = nn.Dropout(teacher.dropout.p if dropout is None else dropout)
        widths = [self.in_features, *hidden, self.num_classes]  # the student's
        for p, layer in zip(hidden, t_layers):
            if not 0 < p <= layer.out_features:  # squeezing: p_i <= n_i
                raise ValueError(f"student widths must be in 1..teacher width, got {hidden} for teacher "
                                 f"{[lay.out_features for lay in t_layers[:-1]]}")
        n_layers = len(t_layers)

        # W_t, b_t: buffers, so they move with .to() and land in checkpoints but get no gradient
        for i, layer in enumerate(t_layers):
            self.register_buffer(f"teacher_weight_{i}", layer.weight.detach().clone())
            self.register_buffer(f"teacher_bias_{i}", layer.bias.detach().clone())

        # L_i for every hidden layer (p_i x n_i); the last layer keeps the teacher's classes
        out_maps = []
        for i in range(n_layers - 1):
            w_t = self.teacher_weight(i)
            out_maps.append(_select_map(w_t, hidden[i]) if init == "select"
                            else _orthogonal_map(hidden[i], w_t.shape[0], w_t.dtype))
        self.out_maps = nn.ParameterList(nn.Parameter(m) for m in out_maps)
        # R_i for every layer but the first (m_i x q_i); tied: R_i = L_{i-1}^T, so nothing to store
        self.in_maps = (None if tie_maps else
                        nn.ParameterList(nn.Parameter(m.detach().T.clone()) for m in out_maps))
        # optional free bias: b_i = L_i b_t,i + beta_i, beta starting at 0 so init is unchanged
        self.free_biases = (nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in widths[1:])
                            if free_bias else None)

        if gated:
            own = student_init if student_init is not None else MLP(self.num_classes, self.in_features, hidden)
            if [lay.weight.shape for lay in own.layers] != [(b, a) for a, b in pairwise(widths)]:
                raise ValueError("student_init must be an MLP with the student's widths "
                                 f"{widths}, got {[tuple(lay.weight.shape) for lay in own.layers]}")
            self.own_weights = nn.ParameterList(nn.Parameter(lay.weight.detach().clone()) for lay in own.layers)
            self.own_biases = nn.ParameterList(nn.Parameter(lay.bias.detach().clone()) for lay in own.layers)
            if gate == "matrix":  # one gamma per layer, shared by W and b
                shapes = [((), ()) for _ in own.layers]
            elif gate == "element":  # one gamma per weight and per bias entry
                shapes = [(tuple(lay.weight.shape), tuple(lay.bias.shape)) for lay in own.layers]
            else:
                raise ValueError(f"gate must be 'matrix' or 'element', got {gate!r}")
            self.weight_gates = nn.ParameterList(nn.Parameter(torch.full(w, gate_init)) for w, _ in shapes)
            self.bias_gates = (None if gate == "matrix" else
                               nn.ParameterList(nn.Parameter(torch.full(b, gate_init)) for _, b in shapes))

    def teacher_weight(self, i: int) -> torch.Tensor:
        return getattr(self, f"teacher_weight_{i}")

    def teacher_bias(self, i: int) -> torch.Tensor:
        return getattr(self, f"teacher_bias_{i}")

    def in_map(self, i: int) -> torch.Tensor | None:
        """R_i: None for the first layer (the input features are the data's)."""
        if i == 0:
            return None
        return self.out_maps[i - 1].T if self.tie_maps else self.in_maps[i - 1]

    def out_map(self, i: int) -> torch.Tensor | None:
        """L_i: None for the last layer (the classes are the task's)."""
        return self.out_maps[i] if i < len(self.out_maps) else None

    def squeezed(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's pure Weight Squeezing weight and bias: L_i W_t,i R_i and L_i b_t,i (+ beta_i)."""
        w, b = self.teacher_weight(i), self.teacher_bias(i)
        left, right = self.out_map(i), self.in_map(i)
        if left is not None:
            w, b = left @ w, left @ b
        if right is not None:
            w = w @ right
        if self.free_biases is not None:
            b = b + self.free_biases[i]
        return w, b

    def layer_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The student's (weight, bias) per layer, as a plain Linear would hold them."""
        out = []
        for i in range(len(self.hidden) + 1):
            w, b = self.squeezed(i)
            if self.gated:  # W = g W_own + (1 - g) L W_t R, g = sigmoid(gamma)
                g_w = torch.sigmoid(self.weight_gates[i])
                g_b = g_w if self.bias_gates is None else torch.sigmoid(self.bias_gates[i])
                w = g_w * self.own_weights[i] + (1 - g_w) * w
                b = g_b * self.own_biases[i] + (1 - g_b) * b
            out.append((w, b))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # same computation as MLP.forward, so a materialised MLP gives bit-identical logits
        *hidden_layers, (w_last, b_last) = self.layer_weights()
        h = x.flatten(1)
        for w, b in hidden_layers:
            h = self.dropout(torch.relu(F.linear(h, w, b)))
        return F.linear(h, w_last, b_last)


def squeeze_mlp(teacher: MLP, hidden: Sequence[int], init: Init = "select", gated: bool = False,
                student_init: MLP | None = None, **kwargs) -> SqueezedMLP:
    """The student a training job optimises: an nn.Module whose forward(x) gives logits.

    ``kwargs`` go to ``SqueezedMLP`` (tie_maps, free_bias, gate, gate_init, dropout). The teacher is
    copied into buffers, so later changes to ``teacher`` do not reach the student.
    """
    return SqueezedMLP(teacher, hidden, init=init, gated=gated, student_init=student_init, **kwargs)


def mlp_kwargs(squeezed: SqueezedMLP) -> dict:
    """Constructor arguments of the materialised student: ``get_model("mlp", **mlp_kwargs(s))``."""
    return {"num_classes": squeezed.num_classes, "in_features": squeezed.in_features,
            "hidden": list(squeezed.hidden), "dropout": squeezed.dropout.p}


@torch.no_grad()
def materialise(squeezed: SqueezedMLP) -> MLP:
    """The student as an ordinary MLP holding the computed weights; the teacher is left behind."""
    weights = squeezed.layer_weights()
    mlp = MLP(**mlp_kwargs(squeezed)).to(device=weights[0][0].device, dtype=weights[0][0].dtype)
    for layer, (w, b) in zip(mlp.layers, weights):
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return mlp.train(squeezed.training)
