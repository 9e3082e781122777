"""Robust control losses: the minibatch losses' gradients are the QRC (TDC-form), QGTD2 and DQN updates."""
import copy

import numpy as np
import pytest
import torch

from tasks.robust_bellman import psi
from tasks.robust_control import ControlSettings, QHNet, losses, run_control


def _linear_net_and_batch(seed=0, n=16, obs=4, actions=3):
    torch.manual_seed(seed)
    net = QHNet(obs, actions, hidden=())  # no torso: q(s) = W s + b, so gradients are closed-form
    g = torch.Generator().manual_seed(seed)
    batch = {"obs": torch.randn(n, obs, generator=g), "next_obs": torch.randn(n, obs, generator=g),
             "action": torch.randint(0, actions, (n,), generator=g), "reward": torch.randn(n, generator=g),
             "terminal": (torch.rand(n, generator=g) < 0.2).float()}
    return net, batch


def _expected_q_grad(net, batch, cfg, form):
    """d loss / d W_q from the update rules written out per transition."""
    with torch.no_grad():
        q, h = net(batch["obs"])
        qn, _ = net(batch["next_obs"])
        a, a_star = batch["action"], qn.argmax(1)
        cont = cfg.gamma * (1 - batch["terminal"])
        delta = batch["reward"] + cont * qn.max(1).values - q.gather(1, a[:, None]).squeeze(1)
        p = psi(h.gather(1, a[:, None]).squeeze(1), cfg.loss, cfg.tau)
        grad = torch.zeros_like(net.q.weight)
        for i in range(len(a)):
            if form == "qrc":   # descent on: -delta grad q(s,a) + gamma psi grad q(s', a*)
                grad[a[i]] -= delta[i] * batch["obs"][i]
                grad[a_star[i]] += cont[i] * p[i] * batch["next_obs"][i]
            else:               # qgtd2: psi (gamma grad q(s', a*) - grad q(s, a))
                grad[a[i]] -= p[i] * batch["obs"][i]
                grad[a_star[i]] += cont[i] * p[i] * batch["next_obs"][i]
        return grad / len(a)


@pytest.mark.parametrize("algorithm", ["qrc", "qgtd2"])
@pytest.mark.parametrize("loss", ["squared", "huber", "absolute"])
def test_value_gradient_is_the_tdc_or_gtd2_form_update(algorithm, loss):
    net, batch = _linear_net_and_batch()
    with torch.no_grad():
        net.h.weight.normal_(0, 2.0)  # a non-trivial Bellman-error estimate, so psi clips for huber
    cfg = ControlSettings(algorithm=algorithm, loss=loss, tau=0.5)
    loss_value, _ = losses(net, None, batch, cfg)
    loss_value.backward()
    torch.testing.assert_close(net.q.weight.grad, _expected_q_grad(net, batch, cfg, algorithm), rtol=1e-5, atol=1e-6)


def test_h_head_regresses_the_td_error_without_touching_the_torso():
    torch.manual_seed(0)
    net = QHNet(4, 2, hidden=(8,))
    _, batch = _linear_net_and_batch(obs=4, actions=2)
    _, h = net(batch["obs"])
    # a loss on the h head alone moves only the h head: the torso gets no gradient from it
    target = torch.randn(len(batch["action"]))
    (0.5 * (target - h.gather(1, batch["action"][:, None]).squeeze(1)) ** 2).mean().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in net.torso.parameters())
    assert net.h.weight.grad.abs().max() > 0 and net.q.weight.grad is None


def test_gtd2_form_huber_step_does_not_grow_with_a_reward_outlier():
    net, batch = _linear_net_and_batch(seed=1)
    cfg = ControlSettings(algorithm="qgtd2", loss="huber", tau=1.0)
    grads = []
    for scale in (1.0, 1e6):
        n = copy.deepcopy(net)
        b = dict(batch, reward=batch["reward"] * scale)
        value, _ = losses(n, None, b, cfg)
        value.backward()
        grads.append(n.q.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])  # psi(h) bounds the step; the reward only enters h's target
    net2, _ = _linear_net_and_batch(seed=1)
    big = dict(batch, reward=batch["reward"] * 1e6)
    value, _ = losses(net2, None, big, ControlSettings(algorithm="qrc"))
    value.backward()
    assert net2.q.weight.grad.abs().max() > 1e3 * grads[0].abs().max()  # the squared TDC form's does


def test_dqn_is_a_huber_semi_gradient_against_the_target_network():
    net, batch = _linear_net_and_batch(seed=2)
    target = copy.deepcopy(net)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    cfg = ControlSettings(algorithm="dqn", target_refresh=10)
    value, _ = losses(net, target, batch, cfg)
    value.backward()
    with torch.no_grad():
        q_sa = net(batch["obs"])[0].gather(1, batch["action"][:, None]).squeeze(1)
        y = batch["reward"] + cfg.gamma * (1 - batch["terminal"]) * target(batch["next_obs"])[0].max(1).values
        expected = torch.nn.functional.smooth_l1_loss(q_sa, y)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert net.h.weight.grad is None  # DQN has no h


def test_settings_reject_unknown_and_meaningless_combinations():
    with pytest.raises(ValueError, match="algorithm"):
        ControlSettings(algorithm="sarsa")
    with pytest.raises(ValueError, match="dqn has no h"):
        ControlSettings(algorithm="dqn", loss="huber")


def test_run_control_learns_online_on_cartpole_and_reports_episodes():
    gym = pytest.importorskip("gymnasium")
    torch.set_num_threads(1)
    env = gym.make("CartPole-v1")
    res = run_control(env, ControlSettings(algorithm="qrc", loss="huber", warmup=64), 600, seed=0)
    assert len(res.returns) > 5 and not res.diverged
    assert np.all(np.diff(res.episode_end) > 0) and res.episode_end[-1] <= 600
    assert res.returns.sum() <= 600  # CartPole pays 1 per step
