"""Robust Bellman losses: saddlepoint forms of the squared, Huber and absolute Bellman errors.

Patterson, Liao, White, "Robust Losses for Learning Value Functions", IEEE TPAMI 45(5), 2023
(arXiv 2205.08464).
Implements, for a value estimate v_w and the Bellman error BE(s) = E_pi[r + gamma v(S') - v(s) | s]
(= E_mu[rho delta | s] off-policy), weighted by the behaviour's state distribution d:
- the three objectives ``objective``: MSBE = E_d[BE^2 / 2], HBE = E_d[H_tau(BE)] (Huber, quadratic
  inside |x| <= tau), ABE = E_d[|BE|];
- their saddlepoint forms ``saddle`` through the conjugates x^2/2 = max_h (x h - h^2/2),
  H_tau(x) = max_{|h| <= tau} (x h - h^2/2) and |x| = max_{|h| <= 1} x h: an auxiliary estimator h
  of the Bellman error, whose inner solution ``inner_solution`` is BE, clip(BE, -tau, tau) and
  sign(BE); the loss changes only the set h may range over;
- sample-based linear learners (``LinearLearner``) for off-policy prediction. h regresses rho delta
  on the features, unclipped (it estimates BE); the loss enters where h enters the value update,
  through psi = what the inner solution does to BE (identity, clip to tau, sign):
  ``gtd2`` w += alpha rho psi(h) (x - gamma x') (the saddle's gradient in w; Huber / absolute make
  it bounded), ``tdc`` w += alpha rho (delta x - gamma psi(h) x') (the gradient-correction form),
  ``td`` w += alpha rho delta x (off-policy TD(0), no h); ``beta`` > 0 adds the h regulariser
  -beta h of TDRC (Patterson et al. 2022), so TDRC is ``tdc`` with beta = 1 and eta = 1.
The control learners (Q-learning style, a small network) are in ``tasks/robust_control.py``.

Departs from the paper (whose body we could not read offline; the forms above are the standard
conjugate derivation the abstract names, checked by the tests against the closed forms):
- psi is smoothed by default, tau tanh(h / tau) for Huber and tanh(h / tau) for absolute, as the
  first author's public TDC-Huber code does: sign(h) chatters around BE = 0. ``smooth=False``
  gives the exact clip / sign.
- The Huber TDC form follows that code (delta x unclipped, the correction clipped). Its expected
  update is not the HBE gradient (the delta x term is BE x, not psi(BE) x); the GTD2 form is. Both
  are offered so that the claim can tell them apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.common.mdps import FiniteMDP

LOSSES = ("squared", "huber", "absolute")
ALGORITHMS = ("td", "gtd2", "tdc")


def _check_loss(loss: str, tau: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss: unknown Bellman loss {loss!r}; use one of {LOSSES}")
    if loss != "squared" and not tau > 0:
        raise ValueError(f"tau: the {loss} loss needs tau > 0, got {tau}")


def huber(x: np.ndarray, tau: float) -> np.ndarray:
    """H_tau(x) = x^2/2 for |x| <= tau, tau |x| - tau^2/2 beyond."""
    a = np.abs(x)
    return np.where(a <= tau, 0.5 * x * x, tau * a - 0.5 * tau * tau)


def pointwise_loss(x: np.ndarray, loss: str, tau: float = 1.0) -> np.ndarray:
    """f(BE) of each objective: x^2/2, H_tau(x) or |x|."""
    _check_loss(loss, tau)
    if loss == "squared":
        return 0.5 * np.square(x)
    return huber(x, tau) if loss == "huber" else np.abs(x)


def psi(h, loss: str, tau: float = 1.0, smooth: bool = True):
    """What the inner maximisation does to a Bellman-error estimate h: the factor that multiplies the
    Bellman error's gradient in the value update (identity, clip to +-tau, sign; smoothed with tanh
    by default). Works on floats, numpy arrays and torch tensors."""
    if loss == "squared":
        return h
    if isinstance(h, (float, int, np.ndarray, np.floating)):
        mod = np
    else:  # a torch tensor (the control learners); torch is imported only when one is passed
        import torch as mod
    if loss == "huber":
        return tau * mod.tanh(h / tau) if smooth else mod.clip(h, -tau, tau)
    if loss == "absolute":
        return mod.tanh(h / tau) if smooth else mod.sign(h)
    raise ValueError(f"loss: unknown Bellman loss {loss!r}; use one of {LOSSES}")


# ------------------------------------------------------------------- exact objectives on a finite MDP
def objective(mdp: FiniteMDP, w: np.ndarray, loss: str = "squared", tau: float = 1.0,
              d: np.ndarray | None = None) -> float:
    """MSBE / HBE / ABE of v = X w: sum_s d(s) f(BE(s))."""
    d = mdp.state_distribution() if d is None else d
    return float(d @ pointwise_loss(mdp.bellman_error(w), loss, tau))


def saddle(mdp: FiniteMDP, w: np.ndarray, h: np.ndarray, loss: str = "squared", tau: float = 1.0,
           d: np.ndarray | None = None) -> float:
    """The saddle function L(w, h) = sum_s d(s) [BE(s) h(s) - h(s)^2/2] (squared, Huber), or
    sum_s d(s) BE(s) h(s) (absolute), for h in the loss's set; max over h of L is the objective."""
    _check_loss(loss, tau)
    bound = {"squared": np.inf, "huber": tau, "absolute": 1.0}[loss]
    if np.any(np.abs(h) > bound * (1 + 1e-12)):
        raise ValueError(f"h: the {loss} saddle needs |h| <= {bound}")
    d = mdp.state_distribution() if d is None else d
    be = mdp.bellman_error(w)
    return float(d @ (be * h - (0.0 if loss == "absolute" else 0.5 * h * h)))


def inner_solution(mdp: FiniteMDP, w: np.ndarray, loss: str = "squared", tau: float = 1.0) -> np.ndarray:
    """argmax_h L(w, h): BE, clip(BE, -tau, tau) or sign(BE)."""
    return psi(mdp.bellman_error(w), loss, tau, smooth=False)


def objective_gradient(mdp: FiniteMDP, w: np.ndarray, loss: str = "squared", tau: float = 1.0,
                       d: np.ndarray | None = None) -> np.ndarray:
    """d objective / dw = sum_s d(s) psi(BE(s)) dBE(s)/dw (the envelope theorem on the saddle)."""
    d = mdp.state_distribution() if d is None else d
    return mdp.bellman_error_jacobian().T @ (d * inner_solution(mdp, w, loss, tau))


# ------------------------------------------------------------------------- linear off-policy learners
@dataclass
class LinearLearner:
    """Off-policy linear prediction: TD, GTD2-form and TDC-form saddlepoint learners (see module doc).

    ``alpha`` is the value stepsize, ``alpha * eta`` the h stepsize, ``beta`` the h regulariser."""

    algorithm: str
    w: np.ndarray
    alpha: float
    loss: str = "squared"
    tau: float = 1.0
    eta: float = 1.0
    beta: float = 0.0
    smooth: bool = True
    h: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: unknown prediction algorithm {self.algorithm!r}; use one of {ALGORITHMS}")
        if self.algorithm == "td" and self.loss != "squared":
            raise ValueError("loss: TD has no auxiliary h, so it has no robust form; use gtd2 or tdc")
        _check_loss(self.loss, self.tau)
        if not (self.alpha > 0 and self.eta > 0 and self.beta >= 0):
            raise ValueError("alpha and eta must be > 0 and beta >= 0")
        self.w = np.array(self.w, dtype=float)
        self.h = np.zeros_like(self.w) if self.h is None else np.array(self.h, dtype=float)

    def direction(self, x: np.ndarray, xp: np.ndarray, r: float, gamma: float, rho: float):
        """(dw, dh): the ascent directions of one transition (the update is w += alpha dw,
        h += alpha eta dh)."""
        delta = r + gamma * (xp @ self.w) - x @ self.w
        if self.algorithm == "td":
            return rho * delta * x, np.zeros_like(self.h)
        h_s = x @ self.h
        correction = psi(h_s, self.loss, self.tau, self.smooth)
        if self.algorithm == "gtd2":
            dw = rho * correction * (x - gamma * xp)
        else:
            dw = rho * (delta * x - gamma * correction * xp)
        dh = rho * (delta - h_s) * x - self.beta * self.h
        return dw, dh

    def update(self, x: np.ndarray, xp: np.ndarray, r: float, gamma: float, rho: float) -> None:
        dw, dh = self.direction(x, xp, r, gamma, rho)
        self.w += self.alpha * dw
        self.h += self.alpha * self.eta * dh

    def expected_direction(self, mdp: FiniteMDP, d: np.ndarray | None = None):
        """E_{d, mu}[(dw, dh)] with the reward noise-free: the update's mean field, computed exactly."""
        d = mdp.state_distribution() if d is None else d
        dw, dh = np.zeros_like(self.w), np.zeros_like(self.h)
        S, A = mdp.mu.shape
        for s in range(S):
            for a in range(A):
                if mdp.mu[s, a] == 0:
                    continue
                rho = mdp.pi[s, a] / mdp.mu[s, a]
                for sp in np.nonzero(mdp.P[s, a])[0]:
                    p = d[s] * mdp.mu[s, a] * mdp.P[s, a, sp]
                    gw, gh = self.direction(mdp.X[s], mdp.X[sp], mdp.R[s, a], mdp.discount[s, a, sp], rho)
                    dw += p * gw
                    dh += p * gh
        return dw, dh


@dataclass
class PredictionResult:
    steps: np.ndarray      # evaluation points (transitions seen)
    rmsve: np.ndarray      # exact RMSVE at each point, capped at the initial RMSVE
    diverged: bool         # the weights left the finite range (or passed 1e6 in magnitude)
    w: np.ndarray          # final weights
    h: np.ndarray


def run_prediction(mdp: FiniteMDP, learner: LinearLearner, transitions, eval_every: int = 100,
                   blowup: float = 1e6) -> PredictionResult:
    """Feed the transitions to the learner one at a time; the exact RMSVE every ``eval_every`` steps.
    Every point is capped at the initial RMSVE (the error of not having learned), and a run whose
    weights blow up stops there with the rest of its curve at that cap: a diverged run counts as no
    better than its start, not as an infinity that would swamp every mean."""
    v_true, d = mdp.true_values(), mdp.state_distribution()
    X = mdp.X
    steps = len(transitions.s)
    points = np.arange(0, steps + 1, eval_every)
    curve = np.empty(len(points))
    start = mdp.rmsve(learner.w, v_true, d)
    curve[0] = start
    diverged = False
    s, sp, r, g, rho = (transitions.s, transitions.sp, transitions.reward.tolist(), transitions.gamma.tolist(),
                        transitions.rho.tolist())
    k = 1
    for t in range(steps):
        learner.update(X[s[t]], X[sp[t]], r[t], g[t], rho[t])
        if (t + 1) % eval_every == 0:
            if not np.all(np.isfinite(learner.w)) or np.abs(learner.w).max() > blowup:
                diverged = True
                curve[k:] = start
                break
            curve[k] = min(mdp.rmsve(learner.w, v_true, d), start)
            k += 1
    return PredictionResult(points, curve, diverged, learner.w, learner.h)
