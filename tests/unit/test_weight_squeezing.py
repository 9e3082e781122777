import pytest
import torch

from tasks.common.registry import get_model
from tasks.mlp import MLP
from tasks.weight_squeezing import SqueezedMLP, materialise, mlp_kwargs, squeeze_mlp

IN, CLASSES, T_HIDDEN, S_HIDDEN = 12, 5, (32, 24), (8, 6)


def teacher_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    t = MLP(CLASSES, IN, T_HIDDEN)
    with torch.no_grad():  # non-zero biases, so that b_s = L b_t is exercised too
        for layer in t.layers:
            layer.bias.normal_(0, 0.1)
    return t.eval()


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def numel(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("kwargs", [
    {},
    {"tie_maps": False, "free_bias": True},
    {"init": "orthogonal"},
    {"gated": True},
    {"gated": True, "gate": "element", "tie_maps": False},
])
def test_materialised_mlp_computes_the_same_logits(kwargs):
    s = squeeze_mlp(teacher_mlp(), S_HIDDEN, **kwargs).eval()
    perturb(s)
    m = materialise(s).eval()
    x = torch.randn(16, IN)
    out_s, out_m = s(x), m(x)
    assert isinstance(m, MLP) and not any(n.startswith("teacher") for n, _ in m.named_buffers())
    assert (out_s - out_m).abs().max().item() < 1e-6
    # saved and rebuilt through the registry like any other model
    rebuilt = get_model("mlp", **mlp_kwargs(s))
    rebuilt.load_state_dict(m.state_dict())
    assert torch.equal(rebuilt.eval()(x), out_m)


def test_select_at_full_width_is_the_teacher_permuted():
    t = teacher_mlp()
    s = squeeze_mlp(t, T_HIDDEN, init="select")
    for i, L in enumerate(s.out_maps):  # L_i is a permutation, and not the identity (largest norm first)
        assert torch.equal(L @ L.T, torch.eye(T_HIDDEN[i]))
        assert torch.equal(L.sum(0), torch.ones(T_HIDDEN[i]))
        assert not torch.equal(L, torch.eye(T_HIDDEN[i]))
    x = torch.randn(64, IN)
    assert (s(x) - t(x)).abs().max().item() < 1e-5  # only the summation order differs


def test_select_below_full_width_is_the_magnitude_pruned_teacher():
    t = teacher_mlp()
    s = squeeze_mlp(t, S_HIDDEN, init="select")
    pruned = MLP(CLASSES, IN, S_HIDDEN).eval()
    keep_prev = torch.arange(IN)
    with torch.no_grad():
        for i, (tl, pl) in enumerate(zip(t.layers, pruned.layers)):
            keep = (tl.weight.norm(dim=1).topk(S_HIDDEN[i]).indices if i < len(S_HIDDEN)
                    else torch.arange(CLASSES))
            pl.weight.copy_(tl.weight[keep][:, keep_prev])
            pl.bias.copy_(tl.bias[keep])
            keep_prev = keep
    for (w, b), pl in zip(s.layer_weights(), pruned.layers):  # one-hot maps select exactly
        assert torch.equal(w, pl.weight) and torch.equal(b, pl.bias)
    x = torch.randn(64, IN)
    assert torch.equal(s(x), pruned(x))


def test_orthogonal_init_has_scaled_orthonormal_rows():
    s = squeeze_mlp(teacher_mlp(), S_HIDDEN, init="orthogonal")
    for L, p, n in zip(s.out_maps, S_HIDDEN, T_HIDDEN):
        c2 = (n / p) ** 0.5  # c = (n / p)^(1/4)
        assert torch.allclose(L @ L.T, c2 * torch.eye(p), atol=1e-5)


def test_teacher_is_frozen_and_only_the_maps_learn():
    t = teacher_mlp()
    s = squeeze_mlp(t, S_HIDDEN, init="orthogonal")
    t_w0 = t.layers[0].weight.detach().clone()
    names = dict(s.named_parameters())
    assert not any("teacher" in n for n in names)
    assert {n for n, _ in s.named_buffers()} == {f"teacher_{k}_{i}" for k in ("weight", "bias") for i in range(3)}
    # tied maps: L_0 (8x32) and L_1 (6x24) are all there is
    assert numel(s.parameters()) == 8 * 32 + 6 * 24
    torch.nn.functional.cross_entropy(s(torch.randn(16, IN)), torch.randint(0, CLASSES, (16,))).backward()
    for n, p in names.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in t.parameters())
    assert all(not b.requires_grad for b in s.buffers())
    with torch.no_grad():  # a copy, not a view: changing the teacher later does not move the student
        t.layers[0].weight.zero_()
    assert torch.equal(s.teacher_weight(0), t_w0)


def test_parameter_counts_of_the_variants():
    maps = 8 * 32 + 6 * 24                       # L_0, L_1
    in_maps = 32 * 8 + 24 * 6                    # R_1, R_2 when untied
    own = (12 * 8 + 8) + (8 * 6 + 6) + (6 * 5 + 5)
    t = teacher_mlp()
    assert numel(squeeze_mlp(t, S_HIDDEN, tie_maps=False).parameters()) == maps + in_maps
    assert numel(squeeze_mlp(t, S_HIDDEN, free_bias=True).parameters()) == maps + 8 + 6 + 5
    assert numel(squeeze_mlp(t, S_HIDDEN, gated=True).parameters()) == maps + own + 3
    assert numel(squeeze_mlp(t, S_HIDDEN, gated=True, gate="element").parameters()) == maps + 2 * own


@pytest.mark.parametrize("gate", ["matrix", "element"])
def test_gate_interpolates_between_own_student_and_squeezed_student(gate):
    t = teacher_mlp()
    torch.manual_seed(3)
    own = MLP(CLASSES, IN, S_HIDDEN).eval()
    gated = squeeze_mlp(t, S_HIDDEN, init="orthogonal", gated=True, student_init=own, gate=gate).eval()
    plain = squeeze_mlp(t, S_HIDDEN, init="orthogonal").eval()
    plain.load_state_dict(gated.state_dict(), strict=False)  # the same maps
    x = torch.randn(32, IN)

    def set_gamma(value: float) -> None:
        with torch.no_grad():
            for g in [*gated.weight_gates, *(gated.bias_gates or [])]:
                g.fill_(value)

    set_gamma(1e4)    # g = sigmoid(+inf) = 1: the own-weights student
    assert torch.equal(gated(x), own(x))
    set_gamma(-1e4)   # g = 0: pure Weight Squeezing
    assert torch.equal(gated(x), plain(x))
    set_gamma(0.0)    # g = 1/2: the average of the two weight sets, layer by layer
    for (w, b), (wp, bp), lo in zip(gated.layer_weights(), plain.layer_weights(), own.layers):
        assert torch.allclose(w, 0.5 * (wp + lo.weight)) and torch.allclose(b, 0.5 * (bp + lo.bias))
    # the gate and both weight sources learn
    torch.nn.functional.cross_entropy(gated(x), torch.randint(0, CLASSES, (32,))).backward()
    for n, p in gated.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_bad_shapes_are_refused():
    t = teacher_mlp()
    with pytest.raises(ValueError, match="one width per teacher hidden layer"):
        SqueezedMLP(t, [8])
    with pytest.raises(ValueError, match="student widths"):
        SqueezedMLP(t, [64, 6])
    with pytest.raises(ValueError, match="student_init"):
        SqueezedMLP(t, S_HIDDEN, gated=True, student_init=MLP(CLASSES, IN, (9, 6)))
