"""Learn a value function with a squared, Huber or absolute Bellman loss; log its learning curve.

    python -m pipelines.value --config pipelines/configs/value_random_walk.yaml
    python -m pipelines.value --config pipelines/configs/value_random_walk.yaml agent.loss=huber agent.tau=0.1 \\
        env.outlier_prob=0.01
    python -m pipelines.value --config pipelines/configs/value_baird.yaml           # TD diverges, TDC does not
    python -m pipelines.value --config pipelines/configs/value_cartpole.yaml        # control (QRC, DQN)
    python -m pipelines.value --config pipelines/configs/value_random_walk.yaml --smoke   # what CI runs
    ray job submit --working-dir . --runtime-env-json \\
        '{"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////abs/path/mlflow/mlflow.db"}}' \\
        -- python -m pipelines.value --config pipelines/configs/value_random_walk.yaml

The trial of the robust-Bellman sweeps (``pipelines.sweep`` with ``job: value``): one learner, one
seed, in this process (a prediction run takes a fraction of a second, a CartPole run ~20 s).

- Prediction (``env.name`` random_walk, baird; tasks/common/mdps.py): off-policy linear TD, GTD2- or
  TDC-form learners (tasks/robust_bellman.py) on a behaviour trajectory; logged: the exact RMSVE to
  v_pi every ``eval_every`` steps (``value/rmsve``, capped at the initial RMSVE), its mean over the run
  (``value/rmsve_auc``) and over the last ``final_fraction`` (``value/rmsve_final``), whether the
  weights blew up (``value/diverged``), and the final weights' exact MSBE, HBE (agent.tau) and ABE.
- Control (cartpole, acrobot, mountaincar; gymnasium classic control): QRC / QGTD2 / DQN
  (tasks/robust_control.py); logged: every episode's return (``return/episode`` at its last step),
  the mean return of all episodes (``return/auc``) and of those ending in the last ``final_fraction``
  of steps (``return/final``).
Reward noise (``env.noise_std``, ``env.outlier_prob``/``outlier_size``) is zero-mean and added to what
the learner sees; values and returns are scored without it.
"""
from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines.core import tracking
from pipelines.core.config import JobConfig, Section, run_cli

PREDICTION_ENVS = ("random_walk", "baird")
GYM_IDS = {"cartpole": "CartPole-v1", "acrobot": "Acrobot-v1", "mountaincar": "MountainCar-v0"}


class ValueEnvConfig(Section):
    name: Literal["random_walk", "baird", "cartpole", "acrobot", "mountaincar"] = "random_walk"
    states: int = Field(5, ge=3)  # random walk: 5 as in the TDC paper (Sutton et al. 2009)
    features: Literal["tabular", "inverted", "dependent"] = "dependent"  # random walk representation
    target_left: float = Field(0.5, ge=0, le=1)     # pi(left): the policy whose values are learned
    behaviour_left: float = Field(0.6, gt=0, lt=1)  # mu(left): off-policy, rho in {0.83, 1.25}
    noise_std: float = Field(0.0, ge=0)             # Gaussian reward noise
    outlier_prob: float = Field(0.0, ge=0, le=1)    # rare outliers: +-outlier_size with this probability
    outlier_size: float = Field(50.0, ge=0)         # 50x the random walk's largest reward


class ValueAgentConfig(Section):
    algorithm: Literal["td", "gtd2", "tdc", "dqn", "qrc", "qgtd2"] = "tdc"  # first three predict, last three control
    loss: Literal["squared", "huber", "absolute"] = "squared"  # the Bellman loss (where h enters the update)
    tau: float = Field(1.0, gt=0)       # Huber threshold / absolute's tanh width, in reward units
    alpha: float = Field(2 ** -5, gt=0)  # value stepsize (control: Adam's)
    eta: float = Field(1.0, gt=0)       # h stepsize = alpha * eta (prediction)
    beta: float = Field(0.0, ge=0)      # h regulariser: 1 makes TDC into TDRC (and is QRC's default)
    smooth: bool = True                 # psi = tau tanh(h/tau) (Huber), tanh(h/tau) (absolute); False: clip / sign
    gamma: float = Field(0.99, gt=0, le=1)  # control only; the MDPs carry their own
    epsilon: float = Field(0.1, ge=0, le=1)  # control: epsilon-greedy behaviour
    buffer: int = Field(10_000, ge=1)   # control: replay size
    batch: int = Field(32, ge=1)        # control: minibatch
    warmup: int = Field(500, ge=1)      # control: transitions before the first update
    target_refresh: int = Field(0, ge=0)  # dqn: target-network copy every N steps (0: none)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])  # control network torso


class ValueConfig(JobConfig):
    experiment: str = "squeezelab"
    run_name: str | None = None
    seed: int = 0  # the behaviour trajectory, reward noise, network init and exploration
    env: ValueEnvConfig = Field(default_factory=ValueEnvConfig)
    agent: ValueAgentConfig = Field(default_factory=ValueAgentConfig)
    steps: int = Field(10_000, ge=1)  # transitions (prediction) or environment steps (control)
    eval_every: int = Field(100, ge=1)  # prediction: RMSVE every N transitions
    final_fraction: float = Field(0.1, gt=0, le=1)  # the tail of the run that ``final`` metrics average
    threads: int = Field(1, ge=1)  # torch threads (control) = the CPUs a sweep trial reserves

    SMOKE: ClassVar[dict[str, Any]] = {"steps": 1000}

    @model_validator(mode="after")
    def _consistent(self) -> "ValueConfig":
        predicting = self.env.name in PREDICTION_ENVS
        if predicting != (self.agent.algorithm in ("td", "gtd2", "tdc")):
            kind = "prediction (td, gtd2, tdc)" if predicting else "control (dqn, qrc, qgtd2)"
            raise ValueError(f"agent.algorithm: {self.env.name} is a {kind} task, not {self.agent.algorithm}")
        if self.agent.algorithm in ("td", "dqn") and self.agent.loss != "squared":
            raise ValueError(f"agent.loss: {self.agent.algorithm} has no Bellman-error estimator h, so no "
                             "robust form; use gtd2/tdc (prediction) or qrc/qgtd2 (control)")
        if self.env.name == "random_walk" and self.env.states % 2 == 0:
            raise ValueError("env.states: the random walk needs an odd number of states")
        if predicting and self.eval_every > self.steps:
            raise ValueError("eval_every: larger than steps, so nothing would be evaluated")
        return self


def _noise(env: ValueEnvConfig):
    from tasks.common.mdps import RewardNoise

    return RewardNoise(env.noise_std, env.outlier_prob, env.outlier_size)


def _mdp(env: ValueEnvConfig):
    from tasks.common import mdps

    if env.name == "baird":
        return mdps.baird()
    return mdps.random_walk(env.states, env.features, env.target_left, env.behaviour_left)


def _log_series(key: str, steps, values) -> None:
    tracking.log_points((key, v, s) for s, v in zip(steps, values))


def predict(cfg: ValueConfig) -> dict[str, float]:
    from tasks.common.mdps import sample
    from tasks.robust_bellman import LinearLearner, objective, run_prediction

    mdp = _mdp(cfg.env)
    a = cfg.agent
    learner = LinearLearner(a.algorithm, mdp.w0, a.alpha, a.loss, a.tau, a.eta, a.beta, a.smooth)
    rng = np.random.default_rng(cfg.seed)
    transitions = sample(mdp, cfg.steps, rng, _noise(cfg.env))
    t0 = time.perf_counter()
    res = run_prediction(mdp, learner, transitions, cfg.eval_every)
    seconds = time.perf_counter() - t0
    _log_series("value/rmsve", res.steps, res.rmsve)
    tail = max(1, int(round(cfg.final_fraction * (len(res.rmsve) - 1))))
    d = mdp.state_distribution()
    finite = np.all(np.isfinite(res.w))
    out = {"value/rmsve_auc": float(res.rmsve.mean()), "value/rmsve_final": float(res.rmsve[-tail:].mean()),
           "value/rmsve_initial": float(res.rmsve[0]), "value/diverged": float(res.diverged),
           "value/seconds": seconds}
    for loss in ("squared", "huber", "absolute"):
        name = {"squared": "msbe", "huber": "hbe", "absolute": "abe"}[loss]
        out[f"objective/{name}"] = objective(mdp, res.w, loss, a.tau, d) if finite else float("nan")
    print(f"[value] {mdp.name}: {a.algorithm}/{a.loss} alpha {a.alpha:g}: RMSVE {res.rmsve[0]:.3f} -> "
          f"{out['value/rmsve_final']:.3f} (mean {out['value/rmsve_auc']:.3f})"
          f"{', DIVERGED' if res.diverged else ''}  {seconds:.2f} s", flush=True)
    return out


def control(cfg: ValueConfig) -> dict[str, float]:
    import gymnasium as gym
    import torch

    from tasks.robust_control import ControlSettings, run_control

    torch.set_num_threads(cfg.threads)
    a = cfg.agent
    settings = ControlSettings(a.algorithm, a.loss, a.tau, a.alpha, a.beta, a.gamma, a.epsilon, a.buffer, a.batch,
                               a.warmup, a.target_refresh, tuple(a.hidden))
    env = gym.make(GYM_IDS[cfg.env.name])
    every = max(1, cfg.steps // 10)
    state = {"next": every, "returns": []}

    def progress(step: int, ret: float) -> None:  # a line per tenth of the run: long runs show they are alive
        state["returns"].append(ret)
        if step >= state["next"]:
            recent = state["returns"][-10:]
            print(f"[value] step {step}/{cfg.steps}: mean return of the last {len(recent)} episodes "
                  f"{np.mean(recent):.1f}", flush=True)
            state["next"] += every

    t0 = time.perf_counter()
    res = run_control(env, settings, cfg.steps, cfg.seed, _noise(cfg.env), progress)
    seconds = time.perf_counter() - t0
    env.close()
    if len(res.returns):
        _log_series("return/episode", res.episode_end, res.returns)
    late = res.returns[res.episode_end > cfg.steps * (1 - cfg.final_fraction)]
    # an episode still running at the end counts by the one that ended last, so a run that never
    # finishes an episode in the tail (a balanced pole) is not scored as empty
    if not len(late) and len(res.returns):
        late = res.returns[-1:]
    out = {"return/auc": float(res.returns.mean()) if len(res.returns) else float("nan"),
           "return/final": float(late.mean()) if len(late) else float("nan"),
           "return/episodes": float(len(res.returns)), "control/diverged": float(res.diverged),
           "value/seconds": seconds}
    print(f"[value] {cfg.env.name}: {a.algorithm}/{a.loss} alpha {a.alpha:g}: {len(res.returns)} episodes, "
          f"final return {out['return/final']:.1f} (mean {out['return/auc']:.1f}){', DIVERGED' if res.diverged else ''}"
          f"  {seconds:.1f} s", flush=True)
    return out


def main(cfg: ValueConfig, parent_run_id: str | None = None,
         report: Callable[[dict[str, float]], None] | None = None) -> str:
    """Run, log and return the MLflow run id (a child run under ``parent_run_id``); ``report``
    receives the final metrics (a Tune trial passes tune.report)."""
    import mlflow

    tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    name = cfg.run_name or time.strftime(f"value-{cfg.env.name}-{cfg.agent.algorithm}-%Y%m%d-%H%M%S")
    tags = {"env": cfg.env.name, "algorithm": cfg.agent.algorithm, "loss": cfg.agent.loss,
            "data.synthetic": "True"}  # simulated environments, not recorded data
    with tracking.job_run(cfg, "value", cfg.experiment, name, parent_run_id=parent_run_id, tags=tags) as run:
        out = predict(cfg) if cfg.env.name in PREDICTION_ENVS else control(cfg)
        mlflow.log_metrics({k: v for k, v in out.items() if np.isfinite(v)})
        if report:
            report(out)
    print(f"[value] done: MLflow run {run.info.run_id}", flush=True)
    return run.info.run_id


if __name__ == "__main__":
    run_cli(ValueConfig, main)
