import pytest
import torch

from pipelines.core.training import OptimConfig, build_optimizer


def lrs(cfg: OptimConfig, total: int) -> list[float]:
    opt, sched = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))], total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_is_stepLR_counted_in_epochs():
    # 10 epochs of 3 steps, x0.5 every 4 epochs = every 12 optimiser steps (LegendreTron's StepLR form)
    cfg = OptimConfig(epochs=10, lr=1.0, schedule="step", step_gamma=0.5, step_epochs=4)
    assert lrs(cfg, 30) == [1.0] * 12 + [0.5] * 12 + [0.25] * 6


def test_cosine_ends_near_zero_and_onecycle_warms_up():
    cos = lrs(OptimConfig(epochs=1, lr=1.0, schedule="cosine"), 100)
    assert cos[0] == 1.0 and cos[-1] == pytest.approx(0.0, abs=1e-3) and cos == sorted(cos, reverse=True)
    one = lrs(OptimConfig(epochs=1, lr=1.0, schedule="onecycle", warmup_fraction=0.1), 100)
    assert one[0] == pytest.approx(0.1) and max(one) == pytest.approx(1.0) and one.index(max(one)) == 9


def test_adam_is_coupled_l2_and_adamw_decoupled():
    # zero loss gradient, weight 1: Adam sees the L2 gradient wd * w and moves by lr (its normalised
    # step); AdamW shrinks the weight by lr * wd outside the moments
    def one_step(name):
        w = torch.nn.Parameter(torch.ones(1))
        opt, _ = build_optimizer(OptimConfig(optimizer=name, lr=0.01, weight_decay=0.1, schedule="constant"), [w], 1)
        w.grad = torch.zeros(1)
        opt.step()
        return w.item()

    assert one_step("adam") == pytest.approx(0.99, abs=1e-6)
    assert one_step("adamw") == pytest.approx(0.999, abs=1e-6)
