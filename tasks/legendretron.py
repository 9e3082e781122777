"""LegendreTron: a linear model composed with a learned inverse canonical link (a proper loss learned jointly).

Lam, Walder, Penev, Nock, "LegendreTron: Uprising Proper Multiclass Loss Learning", ICML 2023
(arXiv 2301.11695); official code github.com/khflam/legendretron (``lib/models.py``, ``lib/icnn.py``,
``lib/functional.py``, ``experiments/{lt,mlr}_{libsvm,mnist}.py``), whose ICNN comes from CP-Flow
(Huang et al., github.com/CW-Huang/CP-Flow).

Implements, for C classes:

    z     = W x + b                           in R^{C-1}   the linear "inner model"
    u     = T_B o ... o T_1 (z)               in R^{C-1}   T_b(u) = grad_u Phi_b(u)
    Phi_b = softplus(w1) * ICNN_b(u) + softplus(w0) * ||u||^2 / 2       (softplus(w0)-strongly convex)
    log p = log softmax+(u) = [u, 0] - logsumexp([u, 0])               (class C is the reference, logit 0)

Each T_b is the gradient of a strongly convex potential, so it is strictly monotone, symmetric-Jacobian
and invertible; composed with grad LSE+ = softmax+ it is the paper's inverse canonical link, and the
NLL of the result is the proper loss learned with it. ``ICNN`` is the official ``ICNN3`` structure (see
its docstring). ``forward`` returns log-probabilities, so ``F.cross_entropy(model(x), y)`` is exactly
the NLL the paper minimises and ``softmax(model(x))`` is p: the rest of the project treats the output
as logits. The output is in the module's dtype (float64 by default, as in the official code): callers
compute their loss on it in float64; ``x`` is flattened and cast to that dtype inside ``forward``.

Models registered: ``legendretron`` and ``mlr``, the paper's baseline. In the official
``experiments/mlr_libsvm.py`` MLR is the same inner model (``MultinomialLogisticRegression``,
``output_dim = K = max(Y) = C - 1``) followed by ``log_softmax_plus``: C-1 scores plus the fixed
reference logit 0, i.e. ``LegendreTron(..., blocks=0)`` exactly.

Training (the project's loop, not this module): the official scripts add 0.5 * wd * sum ||theta||^2
over *all* parameters (inner model and link) to the NLL and use plain Adam. Its gradient wd * theta
is added before Adam's moments, which is exactly ``torch.optim.Adam(weight_decay=wd)`` (coupled L2,
not AdamW); that is how the project applies it. Official LIBSVM defaults: hidden (dimh) 2, depth 4,
blocks 2, Adam lr 1e-2 with StepLR gamma 0.95 every 4 epochs (stepped per iteration), wd 1e-2,
240 epochs, batch 64, float64. MNIST-family: hidden 4, depth 4, blocks 1, lr 1e-3, gamma 0.7 every 4
epochs, wd 1e-3, 200 epochs, batch 128; the constructor defaults below are these.

Departs from the official code:
- Never calls ``torch.set_default_dtype`` (the official ``lib/functional.py`` sets float64 globally at
  import); the dtype is a constructor argument and every parameter is created in it.
- ActNorm's data-dependent initialisation runs on the first forward *in training mode* (official: the
  first forward in any mode), and its "initialised" flag is a buffer, so it is saved in the state dict
  (official: a Python attribute, so a reloaded model would re-initialise over its trained weights on
  its first forward). Before that first training batch an ActNorm is the fixed map
  (x + 0) * (e^0 + 0.001). Keep the first training batch representative and larger than one row.
- The Hessian-vector graph is built (``create_graph``) whenever grad mode is on, in train *and* eval
  mode, so an eval-mode model stays differentiable (jacobians, gradcheck, input attributions); under
  ``torch.no_grad()`` the gradient map still runs (grad is re-enabled inside) and its output is
  detached. The official code always uses ``create_graph=True``.
- log softmax+ is ``log_softmax`` over [u, 0]; the official version subtracts max(u) without the 0
  logit, which overflows when every u_j < -709. Values are otherwise identical.
- Only the variant the experiments run: softplus activations (no symmetric / Gaussian softplus),
  scalar ``w0`` (no per-coordinate diagonal), ``w1``/``w0`` initialised N(0, 1) as in the official code.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks.common.registry import register_model

_SCALE_MIN = 1e-3  # ActNorm's scale is exp(log_scale) + 0.001 > 0 (official _scaling_min)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept ``torch.float64`` or ``"float64"`` (model.json kwargs are JSON, which has no dtype)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def log_softmax_plus(u: torch.Tensor) -> torch.Tensor:
    """log softmax+(u) = [u, 0] - log(1 + sum_j e^{u_j}): C log-probabilities from C-1 scores."""
    return F.log_softmax(F.pad(u, (0, 1)), dim=-1)


class PosLinear(nn.Linear):
    """x -> (x @ softplus(W).T + b) / fan_in: non-negative weights, so it preserves convexity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.softplus(self.weight), self.bias) / self.in_features


class ActNorm(nn.Module):
    """Per-feature (x + shift) * (exp(log_scale) + 0.001), shift and log_scale set on the first training
    batch so that the output there has zero mean and unit standard deviation (Kingma & Dhariwal's
    ActNorm). The scale is positive, so it is an increasing affine map and preserves convexity."""

    def __init__(self, features: int, learn_shift: bool = True, dtype: torch.dtype = torch.float64):
        super().__init__()
        shift = torch.zeros(features, dtype=dtype)
        if learn_shift:
            self.shift = nn.Parameter(shift)
        else:  # official: the output ActNorm's bias has requires_grad=False (a constant in Phi, no effect on T)
            self.register_buffer("shift", shift)
        self.log_scale = nn.Parameter(torch.zeros(features, dtype=dtype))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.shift.copy_(-x.mean(0))
                self.log_scale.copy_(-torch.log(x.std(0, unbiased=False) + 1e-6))
                self.initialized.fill_(True)
        return (x + self.shift) * (torch.exp(self.log_scale) + _SCALE_MIN)


class ICNN(nn.Module):
    """Input-convex network u in R^dim -> R (the official ``ICNN3``, from CP-Flow).

        z_1 = softplus(A_0 u + a_0)                                         width hidden
        for l = 1 .. depth-1:
            z = softplus(ActNorm_l(PosLinear_l(z_l) + B_l u + b_l))          width hidden // 2
            z_{l+1} = [z, softplus(C_l u + c_l)]                             skip ("aug") from the input
        ICNN(u) = ActNorm_out(PosLinear_out(z_depth) + d^T u)               no biases, frozen shift

    Convex in u: every hidden unit is a convex non-decreasing function (softplus) of a non-negative
    combination of convex units plus an affine function of u, and the ActNorms are increasing affine maps.
    """

    def __init__(self, dim: int, hidden: int = 4, depth: int = 4, dtype: torch.dtype = torch.float64):
        super().__init__()
        if hidden < 2 or hidden % 2:
            raise ValueError(f"hidden must be even and >= 2 (layers are [hidden/2 | hidden/2]), got {hidden}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        half, kw = hidden // 2, {"dtype": dtype}
        self.input_layer = nn.Linear(dim, hidden, **kw)  # A_0, a_0: unconstrained (affine in u)
        self.hidden_z = nn.ModuleList(PosLinear(hidden, half, **kw) for _ in range(depth - 1))
        self.hidden_u = nn.ModuleList(nn.Linear(dim, half, **kw) for _ in range(depth - 1))
        self.skip_u = nn.ModuleList(nn.Linear(dim, half, **kw) for _ in range(depth - 1))
        self.norms = nn.ModuleList(ActNorm(half, dtype=dtype) for _ in range(depth - 1))
        self.output_z = PosLinear(hidden, 1, bias=False, **kw)
        self.output_u = nn.Linear(dim, 1, bias=False, **kw)
        self.output_norm = ActNorm(1, learn_shift=False, dtype=dtype)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = F.softplus(self.input_layer(u))
        for wz, wu, skip, norm in zip(self.hidden_z, self.hidden_u, self.skip_u, self.norms):
            z = torch.cat([F.softplus(norm(wz(z) + wu(u))), F.softplus(skip(u))], dim=1)
        return self.output_norm(self.output_z(z) + self.output_u(u))  # [B, 1]


class ConvexGradientMap(nn.Module):
    """T(u) = grad_u Phi(u), Phi(u) = softplus(w1) * ICNN(u) + softplus(w0) * ||u||^2 / 2.

    Phi is softplus(w0)-strongly convex, so T is strictly monotone, (T(a) - T(b)).(a - b) >=
    softplus(w0) ||a - b||^2, with a symmetric Jacobian (the Hessian of Phi) whose eigenvalues are
    >= softplus(w0). (The official ``DeepConvexFlow``, identity-diagonal variant.)
    """

    def __init__(self, dim: int, hidden: int = 4, depth: int = 4, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.icnn = ICNN(dim, hidden, depth, dtype=dtype)
        self.w1 = nn.Parameter(torch.randn(1, dtype=dtype))  # weight of the ICNN, softplus'd (official bias_w1 = 0)
        self.w0 = nn.Parameter(torch.randn(1, dtype=dtype))  # strong-convexity modulus, softplus'd

    def potential(self, u: torch.Tensor) -> torch.Tensor:
        """Phi(u), shape [B]."""
        return (F.softplus(self.w1) * self.icnn(u)).squeeze(1) + F.softplus(self.w0) * u.pow(2).sum(1) / 2

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        differentiable = torch.is_grad_enabled()  # grad mode of the caller: build the double-backward graph?
        with torch.enable_grad():
            u_in = u if u.requires_grad else u.detach().requires_grad_(True)
            (t,) = torch.autograd.grad(self.potential(u_in).sum(), u_in, create_graph=differentiable)
        return t if differentiable else t.detach()


class LegendreTron(nn.Module):
    """x -> log softmax+(T_B o ... o T_1(W x + b)): log-probabilities [B, num_classes] in ``dtype``."""

    def __init__(self, num_classes: int, in_features: int, blocks: int = 1, hidden: int = 4, depth: int = 4,
                 dtype: torch.dtype | str = torch.float64):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        dtype = _as_dtype(dtype)
        self.linear = nn.Linear(in_features, num_classes - 1, dtype=dtype)  # inner model: C-1 scores
        self.blocks = nn.ModuleList(ConvexGradientMap(num_classes - 1, hidden, depth, dtype=dtype)
                                    for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.linear(x.flatten(1).to(self.linear.weight.dtype))
        for block in self.blocks:
            u = block(u)
        return log_softmax_plus(u)


legendretron = register_model("legendretron")(LegendreTron)


@register_model("mlr")
def mlr(num_classes: int, in_features: int, dtype: torch.dtype | str = torch.float64) -> LegendreTron:
    """The paper's baseline, multinomial logistic regression: C-1 linear scores, reference logit 0, softmax+."""
    return LegendreTron(num_classes, in_features, blocks=0, dtype=dtype)
