import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks.common.registry import data_kwargs, get_model, lookup
from tasks.minimoe import MiniMoEMLP, MoEFFN, active_parameters, relation_kd_loss


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_each_token_goes_to_one_expert_scaled_by_its_gate_probability():
    torch.manual_seed(0)
    ffn = MoEFFN(8, 16, num_experts=4).eval()
    x = torch.randn(2, 5, 8)  # any leading shape: 10 tokens
    out, _ = ffn(x)
    assert out.shape == x.shape
    tokens = x.reshape(-1, 8)
    p = (tokens @ ffn.router.weight.T + ffn.router.bias).softmax(-1)
    top = p.argmax(-1)
    assert ffn.tokens_per_expert.sum() == 10
    assert torch.equal(ffn.tokens_per_expert, torch.bincount(top, minlength=4))
    for i, tok in enumerate(tokens):  # by hand: p[e*] * (W2_e gelu(W1_e x + b1_e) + b2_e)
        e = top[i]
        h = F.gelu(ffn.w1[e] @ tok + ffn.b1[e])
        assert torch.allclose(out.reshape(-1, 8)[i], p[i, e] * (ffn.w2[e] @ h + ffn.b2[e]), atol=1e-6)


def test_one_expert_is_exactly_a_dense_ffn():
    torch.manual_seed(0)
    ffn = MoEFFN(8, 16, num_experts=1).train()  # noise cannot matter: there is no router
    assert ffn.router is None
    x = torch.randn(6, 8)
    out, lb = ffn(x)
    dense = F.linear(F.gelu(F.linear(x, ffn.w1[0], ffn.b1[0])), ffn.w2[0], ffn.b2[0])
    assert torch.equal(out, dense)
    assert lb.item() == 1.0  # the official dense path's constant load balance


def _router_with_probs(p: torch.Tensor) -> tuple[MoEFFN, torch.Tensor]:
    """A block whose router maps token i to exactly probabilities p[i] (identity router, x = log p)."""
    e = p.shape[1]
    ffn = MoEFFN(e, 4, num_experts=e).eval()
    with torch.no_grad():
        ffn.router.weight.copy_(torch.eye(e))
        ffn.router.bias.zero_()
    return ffn, p.log()


def test_load_balance_on_hand_computed_assignments():
    # p per token, argmax -> experts 0, 0, 1, 0: me = (0.65, 0.35), ce = (0.75, 0.25)
    ffn, x = _router_with_probs(torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]]))
    _, lb = ffn(x)
    assert lb.item() == pytest.approx(2 * (0.65 * 0.75 + 0.35 * 0.25))  # = 1.15
    assert ffn.tokens_per_expert.tolist() == [3, 1]

    # perfectly balanced, one-hot routing: me = ce = 1/E -> lb = 1
    near_one_hot = torch.full((4, 4), 1e-6) + torch.eye(4) * (1 - 4e-6)
    ffn, x = _router_with_probs(near_one_hot)
    assert ffn(x)[1].item() == pytest.approx(1.0, abs=1e-4)
    assert ffn.tokens_per_expert.tolist() == [1, 1, 1, 1]

    # every token to expert 2 with p = 1: me = ce = e_2 -> lb = E
    ffn, x = _router_with_probs(near_one_hot[[2, 2, 2, 2, 2]])
    assert ffn(x)[1].item() == pytest.approx(4.0, abs=1e-4)
    assert ffn.tokens_per_expert.tolist() == [0, 0, 5, 0]


def test_router_gets_gradient_through_the_gate_and_load_balance():
    torch.manual_seed(0)
    ffn = MoEFFN(8, 16, num_experts=4).train()
    x = torch.randn(32, 8)
    out, _ = ffn(x)
    out.pow(2).sum().backward()  # task loss only: argmax is flat, so this gradient is the gate's
    assert ffn.router.weight.grad.abs().sum() > 0
    ffn.zero_grad()
    ffn(x)[1].backward()  # load balance alone reaches the router through me
    assert ffn.router.weight.grad.abs().sum() > 0


def test_eval_is_deterministic_and_training_noise_stays_within_eps():
    torch.manual_seed(0)
    ffn = MoEFFN(8, 16, num_experts=4, noise=0.1)
    x = torch.randn(4000, 8)
    clean = ffn.router(x).detach()
    ffn.eval()
    logits, _, _ = ffn.route(x)
    assert torch.equal(logits, clean)
    assert torch.equal(ffn(x)[0], ffn(x)[0])
    ffn.train()
    noise = (ffn.route(x)[0] - clean).detach()
    assert noise.abs().max() <= 0.1 + 1e-6
    assert noise.max() > 0.099 and noise.min() < -0.099  # spread over the whole of U(-0.1, 0.1)
    assert not torch.equal(ffn.route(x)[0], ffn.route(x)[0])  # fresh noise each call


def test_registered_student_counts_and_equal_active_compute():
    moe = get_model("minimoe_mlp", num_classes=10, in_features=784, num_experts=4)
    dense = get_model("minimoe_mlp", num_classes=10, in_features=784, num_experts=1)
    # embed 784*64+64, per layer expert 2*(64*64+64) + LN 128 (+ router 64*4+4 for E=4), head 64*10+10
    assert _count(dense) == 50_240 + 2 * (8_320 + 128) + 650 == 67_786
    assert _count(moe) == 50_240 + 2 * (4 * 8_320 + 128 + 260) + 650 == 118_226
    assert active_parameters(moe) == _count(dense) == active_parameters(dense)
    assert active_parameters(moe, include_router=True) - _count(dense) == 2 * 260  # routing overhead
    assert data_kwargs("minimoe_mlp", (1, 28, 28), 10) == {"num_classes": 10, "in_features": 784}
    params = inspect.signature(lookup("model", "minimoe_mlp")).parameters
    assert list(params)[:2] == ["num_classes", "in_features"]


def test_student_forward_load_balance_and_utilisation():
    torch.manual_seed(0)
    model = MiniMoEMLP(num_classes=3, in_features=12, d_model=8, d_ff=8, num_layers=3, num_experts=4)
    with pytest.raises(RuntimeError, match="forward"):
        model.load_balance()
    logits = model(torch.randn(50, 3, 4))  # images are flattened to one token each
    assert logits.shape == (50, 3)
    util = model.expert_utilisation()
    assert util.shape == (3, 4)
    assert torch.allclose(util.sum(1), torch.ones(3))
    lb = model.load_balance()
    assert lb.requires_grad and 1.0 - 1e-6 <= lb.item() <= 4.0  # Switch balance is in [1, E]
    lb.backward()
    assert all(ffn.router.weight.grad is not None for ffn in model.ffns)


def _qkv(b, s, h, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, generator=g) for _ in range(3))


def test_relation_loss_is_zero_for_identical_and_positive_otherwise():
    t = _qkv(2, 5, 16, 0)
    assert relation_kd_loss(t, t, num_relation_heads=4).item() == pytest.approx(0.0, abs=1e-7)  # float rounding
    s = tuple(x.clone().requires_grad_() for x in _qkv(2, 5, 8, 1))  # student hidden 8 != teacher 16
    loss = relation_kd_loss(t, s, num_relation_heads=4)
    assert loss.item() > 0.01
    loss.backward()
    assert all(x.grad.abs().sum() > 0 for x in s)
    with pytest.raises(ValueError, match="relation heads"):
        relation_kd_loss(t, s, num_relation_heads=3)


def test_relation_loss_known_value():
    # one head, hidden 1: teacher X = [1, 0] -> rows softmax([1, 0]) and [0.5, 0.5]; student X = 0 -> uniform
    t = (torch.tensor([[[1.0], [0.0]]]),) * 3
    s = (torch.zeros(1, 2, 1),) * 3
    q = math.e / (math.e + 1)
    kl_row0 = q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q))
    assert relation_kd_loss(t, s, 1).item() == pytest.approx(kl_row0 / 2, abs=1e-6)  # mean over 2 rows


def test_relation_loss_ignores_padding():
    t, s = _qkv(1, 4, 16, 0), _qkv(1, 4, 8, 1)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = relation_kd_loss(t, s, 4, mask)
    # rewriting the padded position changes nothing
    t2 = tuple(torch.cat([x[:, :3], torch.full((1, 1, x.shape[-1]), 7.0)], 1) for x in t)
    s2 = tuple(torch.cat([x[:, :3], torch.full((1, 1, x.shape[-1]), -3.0)], 1) for x in s)
    assert torch.allclose(relation_kd_loss(t2, s2, 4, mask), loss, atol=1e-7)
    # and equals the loss on the unpadded sequence
    trimmed = relation_kd_loss(tuple(x[:, :3] for x in t), tuple(x[:, :3] for x in s), 4)
    assert torch.allclose(trimmed, loss, atol=1e-6)
    assert not torch.allclose(relation_kd_loss(t, s, 4), loss)  # without the mask the pad counts
