import math

import pytest
import torch

from tasks.common.losses import LossEnsemble, Term
from tasks.kd import kd_loss


def test_kd_is_zero_when_student_matches_teacher_and_has_the_closed_form_value():
    z = torch.randn(4, 7)
    assert kd_loss(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    # two classes, T = 2: p_t = softmax([2, 0] / 2), p_s = softmax([0, 0]) -> T^2 * KL(p_t || p_s)
    pt = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl = sum(p * math.log(p / 0.5) for p in pt.tolist())
    assert kd_loss(torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), 2.0).item() == pytest.approx(4 * kl, rel=1e-5)


def test_t_squared_keeps_the_gradient_scale_at_high_temperature():
    # for large T the gradient of KL(T) * T^2 w.r.t. the student logits tends to (z_s - z_t) / n_classes
    zs = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    zt = torch.tensor([[0.0, 0.5, -0.4]])
    kd_loss(zs, zt, 100.0).backward()
    centred = (zs - zt) - (zs - zt).mean()
    torch.testing.assert_close(zs.grad, centred.detach() / 3, atol=1e-3, rtol=0)


def test_teacher_gets_no_gradient():
    zs, zt = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    kd_loss(zs, zt).backward()
    assert zt.grad is None and zs.grad is not None


def test_ensemble_returns_weighted_total_unweighted_parts_and_group_totals():
    ens = LossEnsemble.from_config({"ce": {"name": "cross_entropy", "weight": 0.1},
                                    "kd": {"weight": 0.9, "group": "distill", "temperature": 4}})
    logits, teacher = torch.randn(5, 3), torch.randn(5, 3)
    target = torch.tensor([0, 1, 2, 0, 1])
    parts = ens({"logits": logits, "teacher_logits": teacher, "target": target})
    ce = torch.nn.functional.cross_entropy(logits, target)
    kd = kd_loss(logits, teacher, 4.0)
    torch.testing.assert_close(parts["loss/ce"], ce)
    torch.testing.assert_close(parts["loss/kd"], kd)
    torch.testing.assert_close(parts["loss"], 0.1 * ce + 0.9 * kd)
    torch.testing.assert_close(ens.total(parts, "distill"), 0.9 * kd)
    assert ens.needs() == {"logits", "target", "teacher_logits"}
    assert ens.groups() == {"task", "distill"}


def test_ensemble_errors_name_the_term():
    with pytest.raises(ValueError, match="'kd'.*no option.*temp"):
        LossEnsemble({"kd": Term("kd", options={"temp": 4})})
    with pytest.raises(KeyError, match="unknown loss 'nope'"):
        LossEnsemble({"x": Term("nope")})
    with pytest.raises(ValueError, match="group"):
        LossEnsemble({"ce": Term("cross_entropy", group="other")})
    with pytest.raises(KeyError, match="needs step output.*teacher_logits"):
        LossEnsemble({"kd": Term("kd")})({"logits": torch.zeros(1, 2)})
