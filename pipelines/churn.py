"""Train a profit-driven churn model (predict-and-optimize or a baseline), evaluate it in money, log it.

    python -m pipelines.churn --config pipelines/configs/churn_telco.yaml             # PnO on IBM Telco
    python -m pipelines.churn --config pipelines/configs/churn_telco.yaml method=logistic
    python -m pipelines.churn --config pipelines/configs/churn_telco.yaml --smoke     # what CI runs
    python -m pipelines.sweep --config pipelines/configs/claims/churn.yaml            # the paper's claim

One run = one model on one split of one table (tasks/churn.py): the real IBM Telco table (``data.name:
telco``, a CLV derived from monthly charges and contract retention) or the synthetic generator (labelled
synthetic in every result). The model is trained on the train part (``empc`` also reads the validation
part to pick its targeting fraction) and scored on the test part:

- ``test/average_profit``: realised profit per customer of the model's own targeting decisions with each
  customer's CLV (the paper's measure), next to ``test/profit_all`` (target everyone) and
  ``test/profit_hindsight`` (the perfect list) for scale;
- ``test/mp`` and ``test/mp_fraction``: the best targeting fraction when customers are ranked by score;
- ``test/empc`` (EMPC with the mean CLV, gamma ~ Beta(6, 14)) and ``test/auc``;
- a plot of profit against the fraction targeted (``profit_curve.png``).

Methods: ``pno`` (the S1 soft-regret model), ``logistic`` (LR, expected-profit targeting with the
individual CLV), ``cost_sensitive`` (LR on the hindsight decision weighted by money), ``empc`` (LR with
the fraction chosen on validation with the average CLV), ``gbm`` (HistGradientBoosting, expected-profit
targeting), ``oracle`` (synthetic only: the true churn probabilities). ``pno``, ``logistic``,
``cost_sensitive`` and ``empc`` are logged as the run's model (safetensors + model.json with the feature
encoder), which ``pipelines.score`` loads; ``register_as`` names it in the registry.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines.core import tracking
from pipelines.core.config import JobConfig, Section, run_cli

SAVED_METHODS = ("pno", "logistic", "cost_sensitive", "empc")


class ChurnDataConfig(Section):
    name: Literal["telco", "synthetic"] = "telco"
    val_fraction: float = Field(0.25, gt=0, lt=1)   # of what the test part leaves (tasks.churn.split)
    test_fraction: float = Field(0.3, gt=0, lt=1)
    # synthetic only (tasks.churn.synthetic): rows, spread of log CLV, corr(log CLV, churn logit),
    # value-dependent churn drivers (0: a well-specified logistic model), base churn rate
    rows: int = Field(20_000, ge=200)
    clv_dispersion: float = Field(1.0, ge=0)
    clv_churn_corr: float = Field(-0.5, ge=-1, le=1)
    driver_shift: float = 0.0
    churn_rate: float = Field(0.15, gt=0, lt=1)


class CampaignConfig(Section):
    """The retention campaign; unset values take the data set's default (Telco: Verbraken's scaled to
    Telco's CLV, ``TELCO_CAMPAIGN``; synthetic: Verbraken's own, CLV 200 in mind)."""
    gamma: float | None = Field(None, ge=0, le=1)            # share of contacted churners who stay
    incentive: float | None = Field(None, ge=0)              # d: cost of the offer to whoever accepts
    incentive_fraction: float | None = Field(None, ge=0, lt=1)  # delta: offer cost as a fraction of CLV
    contact_cost: float | None = Field(None, ge=0)           # f: cost of one contact


class PnOConfig(Section):
    hidden: int = Field(0, ge=0)            # 0: linear; else one hidden layer
    temperature: float = Field(0.05, gt=0)  # tau of the soft decision
    l2: float = Field(1e-4, ge=0)
    epochs: int = Field(30, ge=1)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(512, ge=1)


class ChurnConfig(JobConfig):
    experiment: str = "churn"
    run_name: str | None = None
    seed: int = 0  # the split, the synthetic table, initialisation and batch order
    data: ChurnDataConfig = Field(default_factory=ChurnDataConfig)
    campaign: CampaignConfig = Field(default_factory=CampaignConfig)
    method: Literal["pno", "logistic", "cost_sensitive", "empc", "gbm", "oracle"] = "pno"
    pno: PnOConfig = Field(default_factory=PnOConfig)
    C: float = Field(1.0, gt=0)  # inverse L2 strength of the scikit-learn LR baselines
    threads: int = Field(1, ge=1)  # torch / OpenMP threads (= the CPUs a sweep trial reserves)
    register_as: str | None = None  # register the model under this name (alias "current")

    SMOKE: ClassVar[dict[str, Any]] = {"data.rows": 2000, "pno.epochs": 3}

    @model_validator(mode="after")
    def _consistent(self) -> "ChurnConfig":
        if self.method == "oracle" and self.data.name != "synthetic":
            raise ValueError("method: oracle needs the true churn probabilities, which only data.name=synthetic has")
        if self.register_as and self.method not in SAVED_METHODS:
            raise ValueError(f"register_as: a {self.method} model is not saved (no pickle-free format); "
                             f"use one of {', '.join(SAVED_METHODS)}")
        return self


def load_table(cfg: ChurnConfig):
    """(frame, campaign) for the configured data set and campaign."""
    from tasks import churn

    if cfg.data.name == "telco":
        frame, default = churn.telco(), churn.TELCO_CAMPAIGN
    else:
        d = cfg.data
        frame = churn.synthetic(d.rows, cfg.seed, clv_dispersion=d.clv_dispersion, clv_churn_corr=d.clv_churn_corr,
                                churn_rate=d.churn_rate, driver_shift=d.driver_shift)
        default = churn.Campaign()
    given = {k: v for k, v in cfg.campaign.model_dump().items() if v is not None}
    return frame, churn.Campaign(**{**default.to_dict(), **given})


def fit_model(cfg: ChurnConfig, campaign, enc, train, val):
    """The configured model fitted on ``train`` (``val``: the EMPC-style fraction)."""
    from tasks import churn

    x, y, clv = enc.transform(train), train[churn.LABEL].to_numpy(), train[churn.CLV].to_numpy()
    if cfg.method == "pno":
        p = cfg.pno
        return churn.fit_pno(x, y, clv, campaign, hidden=p.hidden, temperature=p.temperature, l2=p.l2,
                             epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, seed=cfg.seed, encoder=enc)
    if cfg.method == "logistic":
        return churn.fit_logistic(x, y, clv, campaign, C=cfg.C, seed=cfg.seed, encoder=enc)
    if cfg.method == "cost_sensitive":
        return churn.fit_cost_sensitive(x, y, clv, campaign, C=cfg.C, seed=cfg.seed, encoder=enc)
    if cfg.method == "empc":
        return churn.fit_empc_targeting(x, y, clv, campaign, enc.transform(val), val[churn.LABEL].to_numpy(),
                                        val[churn.CLV].to_numpy(), C=cfg.C, seed=cfg.seed, encoder=enc)
    if cfg.method == "gbm":
        return churn.fit_gbm(x, y, clv, campaign, seed=cfg.seed, threads=cfg.threads)
    return OracleModel(campaign)


class OracleModel:
    """The true churn probabilities of a synthetic table, with expected-profit targeting: an upper bound.
    It scores encoded rows by position, so it takes the frame's ``p_churn`` column instead of features."""
    method = "oracle"

    def __init__(self, campaign):
        self.campaign = campaign

    def predict_proba(self, frame) -> np.ndarray:
        return frame["p_churn"].to_numpy(dtype=np.float64)

    def decide(self, frame, clv) -> np.ndarray:
        from tasks.churn import decide

        return decide(self.predict_proba(frame), clv, self.campaign)


def profit_curve_plot(scores, y, clv, campaign, decided: float, out: Path, title: str) -> Path:
    """Realised profit per customer against the fraction targeted (ranked by score), with MP and the
    model's own decision marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.churn import targeting_profit

    order = np.argsort(-np.asarray(scores), kind="stable")
    gain = np.asarray(targeting_profit(np.asarray(y), np.asarray(clv, dtype=np.float64), campaign))[order]
    curve = np.r_[0.0, np.cumsum(gain)] / len(gain)
    frac = np.arange(len(curve)) / len(gain)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(frac, curve, lw=1.5, label="ranked by score")
    best = int(np.argmax(curve))
    ax.scatter([frac[best]], [curve[best]], color="C1", zorder=3, label=f"MP {curve[best]:.2f} at {frac[best]:.1%}")
    ax.axvline(decided, color="C2", ls="--", lw=1, label=f"model's own targeting ({decided:.1%})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="fraction of customers targeted", ylabel="profit per customer", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(cfg: ChurnConfig, parent_run_id: str | None = None,
         report: Callable[[dict[str, float]], None] | None = None) -> str:
    import mlflow
    import torch

    from tasks import churn

    tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    torch.set_num_threads(cfg.threads)
    frame, campaign = load_table(cfg)
    synthetic = bool(frame.attrs.get("synthetic", False))
    train, val, test = churn.split(frame, cfg.seed, cfg.data.val_fraction, cfg.data.test_fraction)
    enc = churn.FeatureEncoder.fit(train)
    name = cfg.run_name or time.strftime(f"churn-{cfg.data.name}-{cfg.method}-%Y%m%d-%H%M%S")
    tags = {"dataset": cfg.data.name, "method": cfg.method, "data.synthetic": str(synthetic)}
    with tracking.job_run(cfg, "churn", cfg.experiment, name, parent_run_id=parent_run_id, tags=tags) as run:
        print(f"[churn] {name}: {cfg.method} on {cfg.data.name}{' (synthetic)' if synthetic else ''}: "
              f"{len(train):,} train / {len(val):,} val / {len(test):,} test customers, "
              f"{train[churn.LABEL].mean():.1%} churners; MLflow run {run.info.run_id}", flush=True)
        t0 = time.perf_counter()
        model = fit_model(cfg, campaign, enc, train, val)
        seconds = time.perf_counter() - t0
        x_test = test if cfg.method == "oracle" else enc.transform(test)
        y, clv = test[churn.LABEL].to_numpy(), test[churn.CLV].to_numpy(dtype=np.float64)
        result = churn.evaluate(model, x_test, y, clv, campaign, synthetic=synthetic)
        pi = np.asarray(churn.targeting_profit(y, clv, campaign))
        metrics = {f"test/{k}": float(v) for k, v in result.items() if k != "synthetic"}
        metrics.update({"test/profit_all": float(pi.mean()), "test/profit_hindsight": float(np.maximum(pi, 0).mean()),
                        "test/churn_rate": float(y.mean()), "test/clv_mean": float(clv.mean()),
                        "fit_seconds": seconds})
        mlflow.log_metrics(metrics)
        print(f"[churn] test: average profit {result['average_profit']:.3f} per customer "
              f"(targeting {result['targeted']:.1%}; everyone {metrics['test/profit_all']:.3f}, hindsight "
              f"{metrics['test/profit_hindsight']:.3f}); MP {result['mp']:.3f} at {result['mp_fraction']:.1%}; "
              f"EMPC {result['empc']:.3f}; AUC {result['auc']:.4f}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            title = f"{cfg.method} on {cfg.data.name}{' (synthetic)' if synthetic else ''}, test split"
            plot = profit_curve_plot(model.predict_proba(x_test), y, clv, campaign, result["targeted"],
                                     Path(tmp) / "profit_curve.png", title)
            mlflow.log_artifact(str(plot))
            if cfg.method in SAVED_METHODS:
                out = model.save(Path(tmp) / "model")
                mlflow.log_artifacts(str(out), tracking.MODEL_DIR)
                print(f"[churn] model logged as {tracking.MODEL_DIR}/ (safetensors + model.json with the "
                      "feature encoder): score tables with pipelines.score", flush=True)
        if cfg.register_as:
            tracking.register(run.info.run_id, cfg.register_as, alias="current")
        if report:
            report(metrics)
    print(f"[churn] done: MLflow run {run.info.run_id}", flush=True)
    return run.info.run_id


if __name__ == "__main__":
    run_cli(ChurnConfig, main)
