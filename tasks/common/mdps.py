"""Small Markov decision processes written out exactly, for off-policy value prediction.

A ``FiniteMDP`` holds every transition probability, expected reward and per-transition discount, a
behaviour policy mu (which generates the data) and a target policy pi (whose values are learned), and
the features of each state. From these it computes what a learner can only estimate: the target
policy's true values v_pi, the behaviour's state distribution d_mu, and the Bellman error of any
linear value estimate, so that learners are scored by their exact RMSVE and objectives are checked
against closed forms.

Episodic tasks are written as continuing ones: a terminating transition returns to the start state
with discount 0 on that transition (White, "Unifying task specification in RL", 2017), so v_pi and
d_mu come from one linear system each.

- ``random_walk(n)``: the n-state chain of Sutton et al. (2009, the TDC paper): start in the middle,
  left / right, reward -1 on leaving at the left end and +1 at the right end, gamma = 1, with
  ``tabular``, ``inverted`` and ``dependent`` features (the TDC paper's three representations).
- ``baird()``: Baird's (1995) star counterexample as in Sutton & Barto (2018, section 11.2): 7 states,
  8 features, gamma = 0.99, rewards 0, behaviour dashed 6/7 / solid 1/7, target always solid. Off-policy
  TD diverges on it from the classic initial weights (1, ..., 1, 10, 1).
- ``RewardNoise``: zero-mean noise added to every sampled reward, Gaussian and/or rare large outliers
  (+-size with probability p). Zero mean leaves v_pi and the Bellman errors unchanged; it only makes
  the sampled TD errors heavy-tailed, which is the setting robust losses are meant for.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FiniteMDP:
    name: str
    P: np.ndarray         # [S, A, S'] transition probabilities (a termination goes to the start state)
    R: np.ndarray         # [S, A] expected reward
    discount: np.ndarray  # [S, A, S'] gamma of that transition (0 where it terminates)
    mu: np.ndarray        # [S, A] behaviour policy
    pi: np.ndarray        # [S, A] target policy
    X: np.ndarray         # [S, d] features
    w0: np.ndarray        # [d] initial weights of a learner

    @property
    def states(self) -> int:
        return self.P.shape[0]

    @property
    def features(self) -> int:
        return self.X.shape[1]

    def discounted_transitions(self, policy: np.ndarray) -> np.ndarray:
        """P_gamma[s, s'] = sum_a policy(a|s) P(s'|s, a) gamma(s, a, s')."""
        return np.einsum("sa,sat->st", policy, self.P * self.discount)

    def true_values(self) -> np.ndarray:
        """v_pi = (I - P_gamma,pi)^-1 r_pi."""
        r = (self.pi * self.R).sum(1)
        return np.linalg.solve(np.eye(self.states) - self.discounted_transitions(self.pi), r)

    def state_distribution(self) -> np.ndarray:
        """d_mu: the stationary distribution of the behaviour's chain (terminations restart)."""
        chain = np.einsum("sa,sat->st", self.mu, self.P)
        vals, vecs = np.linalg.eig(chain.T)
        d = np.real(vecs[:, np.argmin(np.abs(vals - 1.0))])
        return d / d.sum()

    def bellman_error(self, w: np.ndarray) -> np.ndarray:
        """BE(s) = E_pi[r + gamma v(S') - v(s) | s] = E_mu[rho delta | s] for v = X w."""
        r = (self.pi * self.R).sum(1)
        v = self.X @ w
        return r + self.discounted_transitions(self.pi) @ v - v

    def bellman_error_jacobian(self) -> np.ndarray:
        """dBE(s)/dw = gamma E_pi[x(S') | s] - x(s), a [S, d] matrix (BE is affine in w)."""
        return self.discounted_transitions(self.pi) @ self.X - self.X

    def rmsve(self, w: np.ndarray, v_true: np.ndarray | None = None, d: np.ndarray | None = None) -> float:
        """Root mean squared value error under d_mu: sqrt(sum_s d(s) (x(s).w - v_pi(s))^2)."""
        v_true = self.true_values() if v_true is None else v_true
        d = self.state_distribution() if d is None else d
        return float(np.sqrt(d @ (self.X @ w - v_true) ** 2))


@dataclass(frozen=True)
class RewardNoise:
    """Zero-mean noise on sampled rewards: N(0, std^2), plus +-size with probability ``outlier_prob``."""

    std: float = 0.0
    outlier_prob: float = 0.0
    outlier_size: float = 50.0

    def __post_init__(self) -> None:
        if self.std < 0 or not 0 <= self.outlier_prob <= 1 or self.outlier_size < 0:
            raise ValueError(f"reward noise needs std >= 0, 0 <= outlier_prob <= 1, outlier_size >= 0; got {self}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        noise = rng.normal(0.0, self.std, n) if self.std else np.zeros(n)
        if self.outlier_prob:
            hit = rng.random(n) < self.outlier_prob
            noise += hit * self.outlier_size * rng.choice([-1.0, 1.0], n)
        return noise


@dataclass(frozen=True)
class Transitions:
    """A behaviour trajectory as arrays: x = X[s], xp = X[s'], reward, gamma, rho = pi/mu."""

    s: np.ndarray
    sp: np.ndarray
    reward: np.ndarray
    gamma: np.ndarray
    rho: np.ndarray


def sample(mdp: FiniteMDP, steps: int, rng: np.random.Generator, noise: RewardNoise = RewardNoise(),
           start: int | None = None) -> Transitions:
    """``steps`` transitions of the behaviour policy from ``start`` (default: the state terminations
    return to, else state 0)."""
    S, A = mdp.mu.shape
    s = np.empty(steps, np.int64)
    a = np.empty(steps, np.int64)
    sp = np.empty(steps, np.int64)
    u_a, u_s = rng.random(steps), rng.random(steps)
    cum_mu = np.cumsum(mdp.mu, 1)
    cum_P = np.cumsum(mdp.P, 2)
    state = _start_state(mdp) if start is None else start
    for t in range(steps):  # a Markov chain: one state at a time (10^4 steps take ~20 ms)
        act = min(int(np.searchsorted(cum_mu[state], u_a[t], side="right")), A - 1)
        nxt = min(int(np.searchsorted(cum_P[state, act], u_s[t], side="right")), S - 1)
        s[t], a[t], sp[t] = state, act, nxt
        state = nxt
    reward = mdp.R[s, a] + noise.sample(rng, steps)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(mdp.mu[s, a] > 0, mdp.pi[s, a] / mdp.mu[s, a], 0.0)
    return Transitions(s, sp, reward, mdp.discount[s, a, sp], rho)


def _start_state(mdp: FiniteMDP) -> int:
    terminal_targets = np.nonzero(((mdp.discount == 0) & (mdp.P > 0)).any((0, 1)))[0]
    return int(terminal_targets[0]) if len(terminal_targets) else 0


# ------------------------------------------------------------------------------------------ the MDPs
def random_walk_features(n: int, kind: str) -> np.ndarray:
    """The TDC paper's representations of an n-state chain (rows have unit norm)."""
    if kind == "tabular":
        return np.eye(n)
    if kind == "inverted":  # every feature on except the state's own: generalises in the wrong direction
        return (1.0 - np.eye(n)) / np.sqrt(n - 1)
    if kind == "dependent":  # (n+1)/2 features; the left half switches on a growing prefix, the right half a suffix
        d = (n + 1) // 2
        X = np.zeros((n, d))
        for i in range(n):
            if i < d:
                X[i, :i + 1] = 1.0
            else:
                X[i, i - n + d:] = 1.0
        return X / np.linalg.norm(X, axis=1, keepdims=True)
    raise ValueError(f"features: unknown representation {kind!r}; use tabular, inverted or dependent")


def random_walk(n: int = 5, features: str = "dependent", target_left: float = 0.5,
                behaviour_left: float = 0.6) -> FiniteMDP:
    """The n-state random walk, learning pi(left) = ``target_left`` from mu(left) = ``behaviour_left``."""
    if n < 3 or n % 2 == 0:
        raise ValueError(f"states: the random walk needs an odd number of states >= 3, got {n}")
    for name, p in (("target_left", target_left), ("behaviour_left", behaviour_left)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}: a probability, got {p}")
    if not 0.0 < behaviour_left < 1.0:
        raise ValueError("behaviour_left: the behaviour must try both actions (0 < behaviour_left < 1)")
    mid = n // 2
    P = np.zeros((n, 2, n))
    R = np.zeros((n, 2))
    gamma = np.ones((n, 2, n))
    for s in range(n):
        for a, step in ((0, -1), (1, 1)):
            nxt = s + step
            if 0 <= nxt < n:
                P[s, a, nxt] = 1.0
            else:  # leaves the chain: reward -1 / +1, episode ends, the next one starts in the middle
                P[s, a, mid] = 1.0
                R[s, a] = -1.0 if nxt < 0 else 1.0
                gamma[s, a, mid] = 0.0
    mu = np.tile([behaviour_left, 1 - behaviour_left], (n, 1))
    pi = np.tile([target_left, 1 - target_left], (n, 1))
    X = random_walk_features(n, features)
    return FiniteMDP(f"random_walk{n}-{features}", P, R, gamma, mu, pi, X, np.zeros(X.shape[1]))


def baird(gamma: float = 0.99) -> FiniteMDP:
    """Baird's counterexample: off-policy TD(0) diverges; the true values are all 0."""
    S = 7
    P = np.zeros((S, 2, S))
    P[:, 0, :6] = 1.0 / 6.0   # dashed: one of the six upper states
    P[:, 1, 6] = 1.0          # solid: the lower state
    R = np.zeros((S, 2))
    X = np.zeros((S, 8))
    for i in range(6):
        X[i, i], X[i, 7] = 2.0, 1.0
    X[6, 6], X[6, 7] = 1.0, 2.0
    mu = np.tile([6 / 7, 1 / 7], (S, 1))
    pi = np.tile([0.0, 1.0], (S, 1))
    w0 = np.array([1, 1, 1, 1, 1, 1, 10, 1], dtype=float)
    return FiniteMDP("baird", P, R, np.full((S, 2, S), gamma), mu, pi, X, w0)
