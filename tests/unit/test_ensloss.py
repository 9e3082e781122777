import math

import pytest
import torch
import torch.nn.functional as F

from tasks.common.losses import LossEnsemble
from tasks.ensloss import (bce, ensloss, ensloss_derivatives, expected_normal_order_statistics, exponential,
                           focal_binary, hinge, margins)


def test_fixed_binary_losses_hand_values():
    logits, target = torch.tensor([2.0, -0.5]), torch.tensor([1, 1])  # margins 2, -0.5
    assert bce(logits, target).item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(0.5))) / 2)
    assert hinge(logits, target).item() == pytest.approx((0 + 1.5) / 2)
    assert exponential(logits, target).item() == pytest.approx((math.exp(-2) + math.exp(0.5)) / 2)
    # focal with gamma 0 is BCE; BCE equals torch's BCE-with-logits
    assert focal_binary(logits, target, gamma=0.0).item() == pytest.approx(bce(logits, target).item())
    assert bce(logits, target).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target.float()).item())
    # target 0 flips the margin
    assert hinge(torch.tensor([0.5]), torch.tensor([0])).item() == pytest.approx(1.5)


@pytest.mark.parametrize("fn", [bce, hinge, exponential, focal_binary])
def test_fixed_binary_losses_gradcheck(fn):
    torch.manual_seed(0)
    z = (torch.randn(6, 1, dtype=torch.float64) * 2 + 0.3).requires_grad_()
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.autograd.gradcheck(lambda t: fn(t, y), (z,))


def test_derivatives_are_a_calibrated_convex_loss_derivative():
    torch.manual_seed(0)
    s = torch.randn(256) * 2
    g = ensloss_derivatives(s, tail=False)
    order = torch.argsort(s)
    assert torch.all(g[order][1:] >= g[order][:-1])  # non-decreasing in s: some convex loss has them
    assert torch.all(g < 0)  # phi'(s) < 0 everywhere, so phi'(0) < 0: classification-calibrated
    assert torch.all(g >= -1 - 1e-6)  # capped: |phi'| <= 1
    # lambda = 0 draws are -exp(N(0,1)): about half are below -1 and capped
    assert 0.4 < (g <= -1).float().mean().item() < 0.6


def test_superlinear_tail_divides_by_the_margin_above_one():
    s = torch.tensor([-1.0, 0.5, 2.0, 4.0])
    torch.manual_seed(3)
    plain = ensloss_derivatives(s, tail=False) + 1e-6
    torch.manual_seed(3)
    tailed = ensloss_derivatives(s, tail=True) + 1e-6
    torch.testing.assert_close(tailed, torch.where(s > 1, plain / s, plain))


def test_gradient_is_the_drawn_derivative_times_the_label():
    torch.manual_seed(1)
    z = torch.randn(32, 1, requires_grad=True)
    y = torch.randint(0, 2, (32,))
    torch.manual_seed(7)
    ensloss(z, y).backward()
    torch.manual_seed(7)
    s = margins(z.detach(), y)
    g = ensloss_derivatives(s)
    expected = (g * (2 * y - 1).float() / 32)[:, None]
    torch.testing.assert_close(z.grad, expected)


def test_each_batch_draws_a_new_loss_unless_expected_order_statistics_are_asked_for():
    z, y = torch.randn(64, 1), torch.randint(0, 2, (64,))
    s = margins(z, y)
    assert not torch.equal(ensloss_derivatives(s), ensloss_derivatives(s))
    assert torch.equal(ensloss_derivatives(s, draws="expected"), ensloss_derivatives(s, draws="expected"))
    u = expected_normal_order_statistics(5)
    assert torch.all(u[1:] > u[:-1]) and u[2].item() == pytest.approx(0.0, abs=1e-6)
    # Blom's approximation is within 0.02 of the true expected maximum of 5 normals (1.1630)
    assert u[-1].item() == pytest.approx(1.1630, abs=0.02)


def test_box_cox_lambda_changes_the_draws_and_multiclass_logits_are_refused():
    torch.manual_seed(0)
    s = torch.randn(1000)
    g = ensloss_derivatives(s, lam=0.5, tail=False)
    assert torch.all(g < 0) and torch.all(g >= -1 - 1e-6)
    with pytest.raises(ValueError, match="one score per example"):
        ensloss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))


def test_binary_losses_are_single_score_in_an_ensemble():
    assert LossEnsemble.from_config({"e": {"name": "ensloss"}, "b": {"name": "bce", "weight": 0.1}}).single_score()
    with pytest.raises(ValueError, match="mixes single-score"):
        LossEnsemble.from_config({"e": {"name": "ensloss"}, "c": {"name": "cross_entropy"}}).single_score()
