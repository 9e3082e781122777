import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from tasks.common.registry import get_model
from tasks.legendretron import ICNN, ConvexGradientMap, LegendreTron, log_softmax_plus


def _initialised(module: torch.nn.Module, *inputs: torch.Tensor) -> torch.nn.Module:
    """One training forward (ActNorm's data-dependent init), then eval mode."""
    module.train()(*inputs)
    return module.eval()


def _spread(module: torch.nn.Module, scale: float = 1.0) -> None:
    """Random weights of order one, so that the nonlinear parts matter (default inits are small)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("num_classes", [2, 3, 7])
def test_output_is_log_probabilities_of_shape_batch_by_classes(num_classes):
    torch.manual_seed(0)
    model = LegendreTron(num_classes, in_features=5, blocks=2, hidden=2, depth=4)
    x = 3 * torch.randn(6, 5)
    for mode in ("train", "eval"):
        out = getattr(model, mode)()(x)
        assert out.shape == (6, num_classes) and out.dtype == torch.float64
        assert torch.isfinite(out).all() and (out <= 0).all()
        torch.testing.assert_close(out.exp().sum(1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
        # the project treats the output as logits: cross-entropy on it is the NLL, softmax of it is p
        y = torch.arange(6) % num_classes
        torch.testing.assert_close(F.cross_entropy(out, y), F.nll_loss(out, y), rtol=0, atol=1e-13)
        torch.testing.assert_close(out.softmax(1), out.exp(), rtol=0, atol=1e-13)


def test_log_softmax_plus_is_stable_where_every_score_is_very_negative():
    u = torch.tensor([[-1000.0, -2000.0], [3.0, 1.0]], dtype=torch.float64)
    out = log_softmax_plus(u)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], torch.tensor([-1000.0, -2000.0, 0.0], dtype=torch.float64))
    z = torch.tensor([3.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(out[1], torch.cat([z, torch.zeros(1)]) - torch.log(1 + z.exp().sum()))


@pytest.mark.parametrize("dim,hidden,depth", [(4, 4, 4), (4, 2, 4), (1, 4, 2)])
def test_each_block_is_the_gradient_of_a_strongly_convex_potential(dim, hidden, depth):
    torch.manual_seed(1)
    block = ConvexGradientMap(dim, hidden, depth)
    _spread(block)
    block = _initialised(block, 2 * torch.randn(64, dim, dtype=torch.float64))
    m = F.softplus(block.w0).item()  # strong-convexity modulus
    lowest = []
    for u in 2 * torch.randn(8, dim, dtype=torch.float64):
        jac = jacobian(lambda v: block(v[None])[0], u)  # = Hessian of Phi
        torch.testing.assert_close(jac, jac.T, rtol=0, atol=1e-10)
        lowest.append(torch.linalg.eigvalsh(jac).min().item())
    assert min(lowest) >= m - 1e-10
    a, b = 2 * torch.randn(500, dim, dtype=torch.float64), 2 * torch.randn(500, dim, dtype=torch.float64)
    with torch.no_grad():
        inner = ((block(a) - block(b)) * (a - b)).sum(1)
    assert (inner >= m * (a - b).pow(2).sum(1) - 1e-10).all()
    assert (inner > m * (a - b).pow(2).sum(1) + 1e-6).any()  # strictly more: the ICNN term is not flat


def test_block_jacobian_is_not_just_the_quadratic_term():
    torch.manual_seed(2)
    block = ConvexGradientMap(3, 4, 4)
    _spread(block)
    block = _initialised(block, 2 * torch.randn(64, 3, dtype=torch.float64))
    m = F.softplus(block.w0).item()
    jac = jacobian(lambda v: block(v[None])[0], torch.randn(3, dtype=torch.float64))
    assert (jac - m * torch.eye(3, dtype=torch.float64)).abs().max() > 1e-3


@pytest.mark.parametrize("hidden,depth", [(4, 4), (2, 4), (6, 3), (4, 1)])
def test_icnn_is_midpoint_convex_in_its_input(hidden, depth):
    torch.manual_seed(3)
    icnn = ICNN(3, hidden, depth)
    _spread(icnn, 2.0)
    icnn = _initialised(icnn, 2 * torch.randn(128, 3, dtype=torch.float64))
    a, b = 3 * torch.randn(2000, 3, dtype=torch.float64), 3 * torch.randn(2000, 3, dtype=torch.float64)
    with torch.no_grad():
        gap = (icnn(a) + icnn(b)) / 2 - icnn((a + b) / 2)
    assert gap.min() >= -1e-10
    assert gap.max() > 1e-3  # and not affine


def test_actnorm_initialises_on_the_first_training_batch_only_and_the_flag_is_saved():
    torch.manual_seed(4)
    icnn = ICNN(3, 4, 3)
    norm = icnn.norms[0]
    seen = []
    norm.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].detach(), out.detach())))
    x = torch.randn(50, 3, dtype=torch.float64)
    icnn.eval()(x)  # eval mode does not initialise
    assert not norm.initialized and (norm.shift == 0).all()
    icnn.train()(x)
    assert norm.initialized
    out = seen[-1][1]
    scale = torch.exp(norm.log_scale) + 1e-3  # the +0.001 floor makes the std slightly above 1
    torch.testing.assert_close(out.mean(0), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.std(0, unbiased=False), (scale / (scale - 1e-3)).detach(), rtol=1e-5, atol=0)
    before = {k: v.clone() for k, v in icnn.state_dict().items()}
    icnn.train()(5 * torch.randn(50, 3, dtype=torch.float64) + 2)  # a second batch changes nothing
    assert all(torch.equal(before[k], v) for k, v in icnn.state_dict().items())
    fresh = ICNN(3, 4, 3)
    fresh.load_state_dict(icnn.state_dict())
    assert fresh.norms[0].initialized and fresh.output_norm.initialized
    fresh.train()(torch.randn(50, 3, dtype=torch.float64))  # a reloaded model is not re-initialised
    assert torch.equal(fresh.norms[0].shift, icnn.norms[0].shift)


def test_gradcheck_through_the_whole_model_wrt_the_inner_linear_weights():
    torch.manual_seed(5)
    model = LegendreTron(4, in_features=3, blocks=2, hidden=2, depth=3)
    x = torch.randn(5, 3, dtype=torch.float64)
    model.train()(x)  # ActNorm init first; gradcheck then sees a fixed function
    w = model.linear.weight.detach().clone().requires_grad_(True)
    b = model.linear.bias.detach().clone().requires_grad_(True)

    def f(w, b):
        return torch.func.functional_call(model, {"linear.weight": w, "linear.bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (w, b), eps=1e-6, atol=1e-7)
    model.eval()  # eval mode with grad enabled stays differentiable
    assert torch.autograd.gradcheck(f, (w, b), eps=1e-6, atol=1e-7)


def test_default_dtype_is_left_alone():
    assert torch.get_default_dtype() == torch.float32  # after `import tasks.legendretron` at the top
    model = get_model("legendretron", num_classes=3, in_features=2)
    out = model(torch.randn(4, 2))  # float32 input is cast to the model's dtype
    assert out.dtype == torch.float64 and model.linear.weight.dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32 and torch.zeros(1).dtype == torch.float32
    m32 = LegendreTron(3, 2, dtype="float32")  # a JSON-able spelling, for model.json kwargs
    assert all(p.dtype == torch.float32 for p in m32.parameters()) and m32(torch.randn(4, 2)).dtype == torch.float32


def test_mlr_is_blocks_zero_and_equals_the_softmax_plus_closed_form():
    torch.manual_seed(6)
    model = get_model("mlr", num_classes=4, in_features=3)
    assert len(model.blocks) == 0 and model.linear.out_features == 3  # C-1 scores, class C has logit 0
    assert set(model.state_dict()) == set(LegendreTron(4, 3, blocks=0).state_dict())
    x = torch.randn(10, 3, dtype=torch.float64)
    z = x @ model.linear.weight.T + model.linear.bias
    denom = 1 + z.exp().sum(1, keepdim=True)
    p = torch.cat([z.exp(), torch.ones(10, 1, dtype=torch.float64)], 1) / denom
    with torch.no_grad():
        torch.testing.assert_close(model(x), p.log().detach(), rtol=0, atol=1e-14)


def test_eval_output_is_the_same_with_and_without_grad_and_detached_under_no_grad():
    torch.manual_seed(7)
    model = LegendreTron(5, in_features=4, blocks=2, hidden=4, depth=4)
    x = torch.randn(16, 4)
    model = _initialised(model, x)
    with_grad = model(x)
    with torch.no_grad():
        without = model(x)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
    assert torch.is_grad_enabled()  # the internal enable_grad does not leak


def _toy_problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 classes, linear scores eta = A x pushed through a non-softmax link p ~ exp(sign(eta) |eta|^1.7)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    eta = 2 * x @ torch.randn(4, 3, generator=g, dtype=torch.float64)
    p = torch.softmax(eta.sign() * eta.abs().pow(1.7), 1)
    return x, torch.multinomial(p, 1, generator=g).squeeze(1), p


def test_a_short_adam_run_learns_the_toy_problem():
    torch.manual_seed(8)
    x, y, p = _toy_problem(400, seed=0)
    true_nll = -p[torch.arange(400), y].log().mean().item()  # 0.349: the NLL of the generating probabilities
    model = LegendreTron(3, in_features=4, blocks=1, hidden=4, depth=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    model.train()
    first = F.cross_entropy(model(x), y).item()
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
    nll, acc = F.cross_entropy(out, y).item(), (out.argmax(1) == y).double().mean().item()
    # seeds 8-11 give 0.357-0.379 (MLR after the same 200 steps: 0.55-0.60; its optimum: 0.370)
    assert first > nll + 0.5 and nll < true_nll + 0.05 and acc > 0.8, (first, nll, true_nll, acc)


def test_the_official_explicit_l2_penalty_is_adam_weight_decay():
    # official training: loss = NLL + 0.5 * wd * sum over all parameters of ||theta||^2, plain Adam
    torch.manual_seed(9)
    x, y, _ = _toy_problem(64, seed=1)
    explicit = LegendreTron(3, in_features=4, blocks=2, hidden=2, depth=4)
    explicit.train()(x)
    coupled = LegendreTron(3, in_features=4, blocks=2, hidden=2, depth=4)
    coupled.load_state_dict(explicit.state_dict())
    opt_e = torch.optim.Adam(explicit.parameters(), lr=1e-2)
    opt_c = torch.optim.Adam(coupled.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt_e.zero_grad()
        penalty = sum(p.pow(2).sum() for p in explicit.parameters())
        (F.cross_entropy(explicit(x), y) + 0.5 * 0.1 * penalty).backward()
        opt_e.step()
        opt_c.zero_grad()
        F.cross_entropy(coupled(x), y).backward()
        opt_c.step()
    for (name, a), b in zip(explicit.state_dict().items(), coupled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
