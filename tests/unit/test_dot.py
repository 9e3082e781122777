import copy

import pytest
import torch
import torch.nn as nn

from tasks.dot import DOT, two_phase_step
from tasks.kd import kd_loss


def _setup(seed=0):
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    data = [(torch.randn(12, 8), torch.randint(0, 5, (12,))) for _ in range(6)]
    return student, teacher, data


def _losses(model, teacher, x, y):
    logits = model(x)
    return 0.1 * nn.functional.cross_entropy(logits, y), 0.9 * kd_loss(logits, teacher(x), 4.0)


def _plain_backward(loss, retain_graph=False):
    loss.backward(retain_graph=retain_graph)


def test_delta_zero_is_sgd_with_momentum_on_the_summed_loss_step_by_step():
    student, teacher, data = _setup()
    twin = copy.deepcopy(student)
    dot = DOT(student.parameters(), lr=0.05, momentum=0.9, delta=0.0, weight_decay=5e-4)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def dot_step():
        dot.step()
        dot.zero_grad(set_to_none=True)

    for x, y in data:
        task, distill = _losses(student, teacher, x, y)
        two_phase_step(dot, _plain_backward, dot_step, distill, task)
        sgd.zero_grad()
        sum(_losses(twin, teacher, x, y)).backward()
        sgd.step()
        for a, b in zip(student.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # same update, float-rounding apart


def test_momentum_buffers_follow_the_dot_recursion():
    student, teacher, data = _setup(1)
    delta, lr, wd = 0.075, 0.05, 5e-4
    dot = DOT(student.parameters(), lr=lr, momentum=0.9, delta=delta, weight_decay=wd)
    params = list(student.parameters())
    v_task = [None] * len(params)
    v_kd = [None] * len(params)
    for x, y in data:
        task, distill = _losses(student, teacher, x, y)
        g_kd = torch.autograd.grad(distill, params, retain_graph=True)
        g_task = torch.autograd.grad(task, params)
        expected = []
        for i, p in enumerate(params):
            d = g_task[i] + wd * p.detach()
            v_task[i] = d if v_task[i] is None else (0.9 - delta) * v_task[i] + d
            v_kd[i] = g_kd[i] if v_kd[i] is None else (0.9 + delta) * v_kd[i] + g_kd[i]
            expected.append(p.detach() - lr * v_task[i] - lr * v_kd[i])

        def step():
            dot.step()
            dot.zero_grad(set_to_none=True)

        task, distill = _losses(student, teacher, x, y)
        two_phase_step(dot, _plain_backward, step, distill, task)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)


def test_dot_differs_from_sgd_when_delta_is_nonzero():
    student, teacher, data = _setup(2)
    twin = copy.deepcopy(student)
    opts = [DOT(m.parameters(), lr=0.05, delta=d) for m, d in ((student, 0.075), (twin, 0.0))]
    for x, y in data:
        for model, opt in zip((student, twin), opts):
            task, distill = _losses(model, teacher, x, y)
            two_phase_step(opt, _plain_backward, lambda o=opt: (o.step(), o.zero_grad()), distill, task)
    diff = max((a - b).abs().max().item() for a, b in zip(student.parameters(), twin.parameters()))
    assert diff > 1e-4


def test_phase_is_set_by_the_caller_so_a_skipped_step_cannot_swap_the_momenta():
    student, teacher, data = _setup(3)
    twin = copy.deepcopy(student)
    opts = [DOT(m.parameters(), lr=0.05, delta=0.075) for m in (student, twin)]
    x, y = data[0]
    # the student's optimizer misses one distillation step (as DeepSpeed skips a non-finite one)
    task, distill = _losses(student, teacher, x, y)
    distill.backward(retain_graph=True)
    opts[0].zero_grad(set_to_none=True)
    opts[0].phase = "task"
    task.backward()
    opts[0].step()
    opts[0].zero_grad(set_to_none=True)
    assert all("v_kd" not in opts[0].state[p] for p in student.parameters())  # nothing stored wrongly
    # afterwards both run the same protocol: the student's buffers stay in their roles
    for model, opt in zip((student, twin), opts):
        for xb, yb in data[1:]:
            task, distill = _losses(model, teacher, xb, yb)
            two_phase_step(opt, _plain_backward, lambda o=opt: (o.step(), o.zero_grad(set_to_none=True)),
                           distill, task)
    assert opts[0].phase == "task" and all("v_kd" in opts[0].state[p] for p in student.parameters())


def test_bad_settings_are_refused():
    student, _, _ = _setup()
    with pytest.raises(ValueError, match="momentum"):
        DOT(student.parameters(), lr=0.1, momentum=0.95, delta=0.075)
    opt = DOT(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    opt.phase = "both"
    with pytest.raises(ValueError, match="phase"):
        opt.step()
