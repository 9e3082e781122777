"""LOBSTER: the update against hand-computed values, masks that keep zeros, the threshold bisection and
the plateau detector."""
import pytest
import torch
from torch import nn

from tasks.lobster import (Plateau, apply_masks, decay_step, find_threshold, lobster_step, magnitude_threshold,
                           masks_of, regularised, remaining)


def _one_layer(weights, grads):
    layer = nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weights]))
    layer.weight.grad = torch.tensor([grads])
    return layer


def test_update_matches_the_hand_computed_shrink_and_is_not_learning_rate_scaled():
    layer = _one_layer([1.0, -2.0, 0.5, 0.8], [0.5, 2.0, 0.0, -0.25])
    lobster_step(layer, 0.1)
    # p - 0.1 p relu(1 - |g|): 1 - 0.05; |g| >= 1 leaves -2 alone; g = 0 is the full decay; 0.8 - 0.06
    torch.testing.assert_close(layer.weight, torch.tensor([[0.95, -2.0, 0.45, 0.74]]))


def test_insensitive_parameters_decay_geometrically_like_the_plain_decay_ablation():
    a = _one_layer([1.0, 3.0], [0.0, 0.0])
    b = _one_layer([1.0, 3.0], [0.0, 0.0])
    for _ in range(50):
        lobster_step(a, 0.01)
        decay_step(b, 0.01)
    torch.testing.assert_close(a.weight, torch.tensor([[1.0, 3.0]]) * 0.99 ** 50)
    torch.testing.assert_close(a.weight, b.weight)


def test_batchnorm_and_biases_are_regularised_too():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    names = [n for n, _ in regularised(model)]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]


def test_pruned_parameters_stay_zero_through_training_with_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    magnitude_threshold(model, 0.15)
    masks = masks_of(model)
    zeros = {n: (p == 0).clone() for n, p in regularised(model)}
    assert sum(int(z.sum()) for z in zeros.values()) > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(20):
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        lobster_step(model, 1e-3, masks)
    for name, p in regularised(model):
        assert torch.all(p[zeros[name]] == 0), name
    nz, total = remaining(model)
    assert nz == sum(int((~z).sum()) for z in zeros.values()) and total == sum(p.numel() for _, p in regularised(model))


def test_explicit_gradients_replace_p_grad():
    layer = _one_layer([1.0, 1.0], [5.0, 5.0])
    lobster_step(layer, 0.5, grads={"weight": torch.tensor([[0.0, 5.0]])})
    torch.testing.assert_close(layer.weight, torch.tensor([[0.5, 1.0]]))


def test_threshold_bisection_finds_the_largest_tolerable_threshold():
    model = nn.Linear(100, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linspace(0.01, 1.0, 100)[None])
    target = model.weight.detach().clone()

    def val_loss(m):  # grows with the magnitude removed: tolerating +10% allows removing a mass of 0.1 L0
        return 1.0 + float((target - m.weight.detach()).abs().sum())

    t, loss, evals = find_threshold(model, val_loss, tolerance=0.1)
    bound = 1.0 * 1.1
    # the official stopping rule: the ends' losses within 5% of the bound, the midpoint returned unchecked
    assert loss <= bound * 1.05 and evals <= 31
    assert float(target[target < t].sum()) <= 0.1 + 0.05 * bound
    assert float(target[target < t + 0.03].sum()) > 0.1  # near the largest tolerable threshold
    torch.testing.assert_close(model.weight, target)  # the model is left as it was
    apply_masks(model, {"weight": (model.weight.abs() >= t).float()})
    assert val_loss(model) == pytest.approx(loss)


def test_plateau_fires_after_patience_bad_epochs_and_rewinds_to_the_best():
    model = nn.Linear(2, 1)
    plateau = Plateau(patience=3)
    assert not plateau.update(1.0, model)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not plateau.update(1.005, model)   # within 1% of the best: still good
    fired = [plateau.update(1.2, model) for _ in range(3)]
    assert fired == [False, False, True]
    plateau.rewind(model)
    torch.testing.assert_close(model.weight, best["weight"])
