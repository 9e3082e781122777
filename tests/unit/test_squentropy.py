import math

import pytest
import torch
import torch.nn.functional as F

from tasks.common.losses import LossEnsemble
from tasks.squentropy import rescaled_square, squentropy
from tasks.temperature_scaling import class_logits, fit_temperature


def test_squentropy_hand_computed_value():
    # C = 3, logits [1, 2, 0], label 0: CE = log(e + e^2 + 1) - 1; squares over wrong classes (4 + 0) / 2
    z, y = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([0])
    ce = math.log(math.e + math.e**2 + 1) - 1
    assert squentropy(z, y).item() == pytest.approx(ce + 2.0, rel=1e-6)


def test_squentropy_gradient_is_softmax_minus_onehot_plus_scaled_wrong_logits():
    torch.manual_seed(0)
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 4])
    squentropy(z, y).backward()
    onehot = F.one_hot(y, 5).double()
    expected = (torch.softmax(z, 1) - onehot + 2 / 4 * z * (1 - onehot)) / 4  # / batch for the mean
    torch.testing.assert_close(z.grad, expected.detach())
    assert torch.autograd.gradcheck(lambda t: squentropy(t, y), (z.detach().requires_grad_(),))


def test_squentropy_is_scale_free_in_classes_and_ignores_the_true_logit_square():
    y = torch.tensor([0])
    # changing only the true-class logit changes only the CE part
    a, b = torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([[5.0, 1.0, 1.0]])
    assert (squentropy(b, y) - squentropy(a, y)).item() == pytest.approx(
        (F.cross_entropy(b, y) - F.cross_entropy(a, y)).item(), abs=1e-6)
    # wrong-class squares are averaged over C - 1: 10 classes at 1.0 add exactly 1
    z = torch.ones(1, 10)
    z[0, 0] = 0.0
    assert (squentropy(z, y) - F.cross_entropy(z, y)).item() == pytest.approx(1.0, abs=1e-6)


def test_rescaled_square_hand_value_and_author_mse_equivalence():
    z, y = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([0])
    # k = 2, M = 3: (2 (2 - 3)^2 + 1 + 0.25) / 3
    assert rescaled_square(z, y, k=2.0, M=3.0).item() == pytest.approx((2 + 1.25) / 3)
    # k = M = 1 is the author code's mean((f - onehot)^2)
    torch.manual_seed(1)
    z, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    assert rescaled_square(z, y).item() == pytest.approx(((z - F.one_hot(y, 4)) ** 2).mean().item(), rel=1e-6)
    zz = z.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: rescaled_square(t, y, k=2.0, M=3.0), (zz,))


def test_losses_compose_by_name_in_an_ensemble():
    ens = LossEnsemble.from_config({"sq": {"name": "squentropy", "weight": 0.5},
                                    "ls": {"name": "cross_entropy", "label_smoothing": 0.1, "weight": 0.5}})
    z, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    parts = ens({"logits": z, "target": y})
    expected = 0.5 * squentropy(z, y) + 0.5 * F.cross_entropy(z, y, label_smoothing=0.1)
    torch.testing.assert_close(parts["loss"], expected)
    assert ens.single_score() is False


def test_temperature_scaling_recovers_a_known_temperature_and_keeps_predictions():
    torch.manual_seed(0)
    true_logits = 2.0 * torch.randn(20000, 5)
    y = torch.distributions.Categorical(logits=true_logits).sample()
    # a model 3x too confident: the fitted T must undo it
    t = fit_temperature(3.0 * true_logits, y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert torch.equal((3.0 * true_logits / t).argmax(1), true_logits.argmax(1))


def test_binary_scores_become_two_class_logits():
    s = torch.tensor([0.0, 2.0, -1.0])
    probs = torch.softmax(class_logits(s[:, None]), 1)
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(s))
