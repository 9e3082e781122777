"""Robust Bellman losses for control: Q-learning with a Bellman-error estimator h (QRC) and its Huber and
absolute forms, against DQN's Huber-on-the-TD-error.

Patterson, Liao, White, "Robust Losses for Learning Value Functions", IEEE TPAMI 45(5), 2023
(arXiv 2205.08464); QRC from Patterson, White, White, "A Generalized Projected Bellman Error for
Off-policy Value Estimation in Reinforcement Learning", JMLR 2022.
Implements, on a network with a shared torso and two heads q(s, .) and h(s, .):
- ``qrc``: per transition, target y = r + gamma max_a' q(s', a') (Q-learning), delta = y - q(s, a),
  h(s, a) regresses delta (the Bellman-error estimate, unclipped), and the value update is the TDC
  form delta grad q(s, a) - gamma psi(h) grad q(s', a*), with psi the robust loss's map from
  ``tasks/robust_bellman.py`` (identity for the squared Bellman error, tau tanh(h/tau) Huber,
  tanh(h/tau) absolute); beta adds the h regulariser (weight decay on the h head, beta = 1 as QRC).
- ``qgtd2``: the GTD2 form psi(h) (grad q(s, a) - gamma grad q(s', a*)), whose step is bounded for
  Huber and absolute.
- ``dqn``: the semi-gradient baseline the paper criticises: Huber loss (threshold 1) on the TD error
  against a target network refreshed every ``target_refresh`` steps.
Experience replay, epsilon-greedy behaviour and Adam, as the first author's control code.

Departs from the paper: its exact control algorithm and settings were not readable offline; this is
QRC (the authors' earlier, published algorithm) with the robust psi placed where h enters the value
update, which is what the saddlepoint derivation gives. The h head reads the torso's features without
passing gradients into them (a choice of ours: the value loss alone shapes the representation).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tasks.robust_bellman import LOSSES, psi

CONTROL_ALGORITHMS = ("dqn", "qrc", "qgtd2")


class QHNet(nn.Module):
    """A ReLU MLP torso with a q head and an h head (one output per action each)."""

    def __init__(self, observations: int, actions: int, hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        width = observations
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.torso = nn.Sequential(*layers)
        self.q = nn.Linear(width, actions)
        self.h = nn.Linear(width, actions)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.torso(obs)
        return self.q(z), self.h(z.detach())


@dataclass
class ControlSettings:
    algorithm: str = "qrc"
    loss: str = "squared"
    tau: float = 1.0
    alpha: float = 1e-3          # Adam stepsize
    beta: float = 1.0            # h regulariser (QRC's default)
    gamma: float = 0.99
    epsilon: float = 0.1         # epsilon-greedy behaviour
    buffer: int = 10_000
    batch: int = 32
    warmup: int = 500            # transitions before the first update
    target_refresh: int = 0      # dqn: steps between target-network copies (0: none)
    hidden: tuple[int, ...] = (64, 64)

    def __post_init__(self) -> None:
        if self.algorithm not in CONTROL_ALGORITHMS:
            raise ValueError(f"algorithm: unknown control algorithm {self.algorithm!r}; use one of {CONTROL_ALGORITHMS}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: unknown Bellman loss {self.loss!r}; use one of {LOSSES}")
        if self.algorithm == "dqn" and self.loss != "squared":
            raise ValueError("loss: dqn has no h estimator; its Huber is on the TD error (leave loss squared)")


def losses(net: QHNet, target_net: QHNet | None, batch: dict[str, torch.Tensor], cfg: ControlSettings):
    """(total loss, parts) of one minibatch; its gradient is the algorithm's (descent) update."""
    q, h = net(batch["obs"])
    q_sa = q.gather(1, batch["action"][:, None]).squeeze(1)
    cont = cfg.gamma * (1.0 - batch["terminal"])
    if cfg.algorithm == "dqn":
        with torch.no_grad():
            q_next = (target_net or net)(batch["next_obs"])[0].max(1).values
        delta = batch["reward"] + cont * q_next - q_sa
        loss = nn.functional.smooth_l1_loss(q_sa, (q_sa + delta).detach())
        return loss, {"td_error": delta.detach().abs().mean()}
    q_next_all, _ = net(batch["next_obs"])
    q_next = q_next_all.max(1).values          # V(s') under the greedy target policy, with its gradient
    delta = batch["reward"] + cont * q_next - q_sa
    h_sa = h.gather(1, batch["action"][:, None]).squeeze(1)
    correction = psi(h_sa.detach(), cfg.loss, cfg.tau)
    if cfg.algorithm == "qrc":   # grad = -delta grad q(s,a) + gamma psi(h) grad V(s')
        value_loss = 0.5 * (batch["reward"] + cont * q_next.detach() - q_sa) ** 2 + cont * correction * q_next
    else:                        # qgtd2: grad = psi(h) (gamma grad V(s') - grad q(s,a))
        value_loss = correction * delta
    h_loss = 0.5 * (delta.detach() - h_sa) ** 2
    decay = 0.5 * cfg.beta * sum((p ** 2).sum() for p in net.h.parameters())
    loss = value_loss.mean() + h_loss.mean() + decay
    return loss, {"td_error": delta.detach().abs().mean(), "h": h_sa.detach().abs().mean()}


class Replay:
    """A ring buffer of transitions as float32 / int64 arrays."""

    def __init__(self, size: int, observations: int):
        self.obs = np.zeros((size, observations), np.float32)
        self.next_obs = np.zeros_like(self.obs)
        self.action = np.zeros(size, np.int64)
        self.reward = np.zeros(size, np.float32)
        self.terminal = np.zeros(size, np.float32)
        self.size, self.n, self.i = size, 0, 0

    def add(self, obs, action, reward, next_obs, terminal) -> None:
        self.obs[self.i], self.action[self.i], self.reward[self.i] = obs, action, reward
        self.next_obs[self.i], self.terminal[self.i] = next_obs, terminal
        self.i = (self.i + 1) % self.size
        self.n = min(self.n + 1, self.size)

    def sample(self, rng: np.random.Generator, k: int) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.n, k)
        return {"obs": torch.from_numpy(self.obs[idx]), "next_obs": torch.from_numpy(self.next_obs[idx]),
                "action": torch.from_numpy(self.action[idx]), "reward": torch.from_numpy(self.reward[idx]),
                "terminal": torch.from_numpy(self.terminal[idx])}


@dataclass
class ControlResult:
    episode_end: np.ndarray   # env step at which each episode ended
    returns: np.ndarray       # undiscounted return of each episode (rewards as the env gives them, noise-free)
    diverged: bool


def run_control(env, cfg: ControlSettings, steps: int, seed: int, reward_noise=None,
                progress=None) -> ControlResult:
    """Learn online for ``steps`` environment steps; returns every finished episode's return.

    ``env`` is a gymnasium environment with a discrete action space; ``reward_noise`` (a
    ``tasks.common.mdps.RewardNoise``) perturbs the rewards the learner sees, not the returns scored."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_obs, n_act = env.observation_space.shape[0], env.action_space.n
    net = QHNet(n_obs, n_act, tuple(cfg.hidden))
    target_net = copy.deepcopy(net) if cfg.algorithm == "dqn" and cfg.target_refresh else None
    opt = torch.optim.Adam(net.parameters(), lr=cfg.alpha)
    replay = Replay(cfg.buffer, n_obs)
    noise = reward_noise.sample(rng, steps) if reward_noise is not None else np.zeros(steps)
    obs, _ = env.reset(seed=seed)
    ends, returns, ret, diverged = [], [], 0.0, False
    for t in range(steps):
        if rng.random() < cfg.epsilon:
            action = int(rng.integers(n_act))
        else:
            with torch.no_grad():
                action = int(net(torch.as_tensor(obs, dtype=torch.float32)[None])[0].argmax())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        ret += reward
        replay.add(obs, action, reward + noise[t], next_obs, float(terminated))
        obs = next_obs
        if terminated or truncated:
            ends.append(t + 1)
            returns.append(ret)
            if progress:
                progress(t + 1, ret)
            ret = 0.0
            obs, _ = env.reset()
        if replay.n >= max(cfg.warmup, cfg.batch):
            loss, _ = losses(net, target_net, replay.sample(rng, cfg.batch), cfg)
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if target_net is not None and (t + 1) % cfg.target_refresh == 0:
            target_net.load_state_dict(net.state_dict())
    return ControlResult(np.array(ends), np.array(returns, dtype=float), diverged)
