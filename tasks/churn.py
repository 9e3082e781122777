"""Profit-driven churn prevention by predict-and-optimize: a churn model trained on the campaign's profit.

Gómez-Vargas, Maldonado, Vairetti, "A predict-and-optimize approach to profit-driven churn prevention"
(arXiv 2310.07047; EJOR 324(2):555-566, 2025).
Implements, in the paper's setting (individual customer lifetime values, CLVs, instead of the one average
CLV of EMPC-type methods):
- the retention-campaign profit model of Verbraken, Verbeke, Baesens (IEEE TKDE 2013), per customer:
  targeting i earns pi_i(y_i) = y_i [gamma (c_i - d_i) - f] - (1 - y_i)(d_i + f) relative to not targeting
  (y_i = 1 churner, c_i CLV, gamma acceptance rate of churners, d_i = d + delta c_i incentive, f contact
  cost; contacted non-churners take the incentive); expected profit p pi_i(1) + (1 - p) pi_i(0);
  hindsight-optimal targeting z*_i = 1[pi_i(y_i) > 0]; decisions 1[expected profit > 0];
- the predict-and-optimize (PnO) model: a linear (or one-hidden-layer) churn model p_i = sigmoid(f_w(x_i))
  trained by Adam on a differentiable surrogate of the regret of its own targeting decisions (below);
- baselines: logistic regression with threshold targeting (expected profit > 0 with the individual CLV),
  cost-sensitive LR (example-dependent costs from the CLVs), scikit-learn HistGradientBoosting with the same
  threshold targeting, and EMPC-style targeting (the fraction T that maximises validation profit with the
  AVERAGE CLV, applied as a score threshold);
- metrics: average profit per customer of a model's own decisions (individual CLVs, actual labels),
  maximum profit MP (best targeting fraction when customers are sorted by score), EMPC (Verbraken 2013,
  gamma ~ Beta(6, 14), on the ROC convex hull in closed form, or by quadrature over gamma), AUC;
- data: the real IBM Telco table (``telco``) with a CLV column derived below, and a synthetic generator
  with controllable CLV dispersion and CLV-churn correlation (``synthetic``); a JSON-serialisable feature
  encoder and a row validator for batch scoring; model files as safetensors + model.json (no pickle).

Departs from the paper (whose body was not readable offline: only its abstract, so the loss and the
hyperparameters are ours; our research note, section 8, marks the regret formulation [reconstruction]):
- Surrogate. We minimise S1, the soft-decision regret with temperature tau:
      R~(w) = (1/n) sum_i [max(pi_i, 0) - sigmoid(pi^_i / (tau s)) pi_i] / s,
      pi^_i = p_i pi_i(1) + (1 - p_i) pi_i(0)   (the model's expected profit of targeting i),
  with s the mean training CLV (a money scale, so tau is unit-free), plus an L2 penalty (and optionally
  ``bce_weight`` x cross-entropy, 0 by default). Why S1 and not S2 (sum_i p_i (-pi_i)): S1 keeps p_i a
  churn probability and makes the decision the paper's "predict, then optimise" step, 1[pi^_i > 0], which
  uses each customer's CLV at scoring time; S2 turns p_i into a targeting propensity that sees the CLV only
  through the features, and is example-dependent cost-sensitive classification (our cost-sensitive LR
  baseline is its convex, log-loss version). With hard decisions (tau -> 0) R~ is exactly the regret of the
  model's decisions; sigmoid(.) < 1 keeps R~ >= 0.
- Warm start (ours): full-batch L-BFGS on cross-entropy before the regret (for a linear net: the logistic
  fit). The regret is flat in w for customers far from their decision boundary, so a random start learns
  little; from the logistic fit Adam moves the boundary where the money is.
- CLV. The paper's CLVs come from its investment-fund data; Telco has none, so ``telco`` derives one
  (documented at ``telco``). Campaign parameters for Telco are Verbraken's defaults scaled to that CLV.
- EMPC is Verbraken's, which needs one CLV: we pass the mean CLV (as empulse does) and label it so; the
  paper's point is that this aggregation loses money, which ``average_profit`` (individual CLVs) shows.
- No budget constraint: every decision is the unconstrained per-customer one.

What to expect (measured, one split per seed; average profit per customer on the test split):
- synthetic, std of log CLV 1.5, corr(log CLV, churn logit) -0.5, value-dependent churn drivers
  (``driver_shift=3``), seeds 0-9: PnO 0.89, LR-threshold 0.24, cost-sensitive LR 0.89, GBM 0.81,
  EMPC-style -1.32, oracle (true probabilities) 1.07; PnO ahead of LR on all ten seeds.
- the same without value-dependent drivers (a well-specified linear-logistic model): LR 1.23, PnO 1.16
  (LR ahead on 9 of 10), oracle 1.24. LR with individual-CLV thresholds is then already near the oracle, and
  PnO, which weights customers by money (effective sample ~ n / exp(var log CLV)), pays in variance.
  The paper's claim holds here only where the misspecification depends on value.
- Telco (``TELCO_CAMPAIGN``, seeds 0-4, 2,113 test customers): LR 31.5, cost-sensitive LR 31.5, PnO 31.3,
  GBM 29.1, EMPC-style 29.0, target everyone 18.9, hindsight 47.2 dollars; AUC LR 0.845, PnO 0.832.
  corr(CLV, churn) is -0.05 on Telco: no gain is expected and none is seen.

Data shapes: ``x`` float32 [n, D] from ``FeatureEncoder.transform``, ``y`` 0/1 [n], ``clv`` float [n].

A fitted ``ChurnModel`` holds its weights as numpy arrays and scores with numpy; torch is imported only
to fit. A batch-scoring actor (pipelines/score.py) then needs no torch, ~180 MB less per actor.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.common.datasets import debian_data_path
from tasks.common.model_io import WEIGHTS, read_spec, write_spec
from tasks.common.tables import split_indices
from tasks.common.text import MODELDATA, read_r_lazy

if TYPE_CHECKING:
    import torch
    from torch import nn

LABEL = "churn"  # 0/1, 1 = churner
CLV = "clv"      # individual customer lifetime value (money, >= 0)
EMPC_ALPHA, EMPC_BETA = 6.0, 14.0  # gamma ~ Beta(6, 14), mean 0.3 (Verbraken et al. 2013)


# ------------------------------------------------------------------------------------- campaign model
@dataclass(frozen=True)
class Campaign:
    """Retention-campaign parameters (Verbraken et al. 2013); defaults are theirs (CLV 200 in mind)."""
    gamma: float = 0.3               # share of contacted churners who accept the offer and stay (mean of Beta(6, 14))
    incentive: float = 10.0          # d: fixed cost of the offer to whoever accepts it
    incentive_fraction: float = 0.0  # delta: offer cost as a fraction of the customer's CLV (d_i = d + delta c_i)
    contact_cost: float = 1.0        # f: cost of contacting one customer

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.incentive < 0 or self.contact_cost < 0 or not 0.0 <= self.incentive_fraction < 1.0:
            raise ValueError(f"need incentive >= 0, contact_cost >= 0, 0 <= incentive_fraction < 1: {self}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _num(a):
    """numpy float64 unless ``a`` is a tensor (then unchanged, so that profits stay differentiable)."""
    torch = sys.modules.get("torch")  # no tensor exists where torch was never imported
    if torch is not None and isinstance(a, torch.Tensor):
        return a
    return float(a) if np.ndim(a) == 0 else np.asarray(a, dtype=np.float64)


def incentive_cost(clv, campaign: Campaign):
    """d_i = d + delta c_i."""
    return campaign.incentive + campaign.incentive_fraction * _num(clv)


def targeting_profit(y, clv, campaign: Campaign):
    """pi_i(y_i): profit of targeting customer i relative to not targeting, given the label.

    Churner: gamma (c_i - d_i) - f (accepts with probability gamma); non-churner: -(d_i + f).
    """
    y, c = _num(y), _num(clv)
    d, f = incentive_cost(c, campaign), campaign.contact_cost
    return y * (campaign.gamma * (c - d) - f) - (1 - y) * (d + f)


def expected_profit(p, clv, campaign: Campaign):
    """E[pi_i] = p_i pi_i(1) + (1 - p_i) pi_i(0) for churn probability p_i."""
    p = _num(p)
    return p * targeting_profit(1.0, clv, campaign) + (1 - p) * targeting_profit(0.0, clv, campaign)


def hindsight_targets(y, clv, campaign: Campaign) -> np.ndarray:
    """z*_i = 1[pi_i(y_i) > 0]: the targeting that maximises realised profit, knowing the labels."""
    return np.asarray(targeting_profit(y, clv, campaign)) > 0


def decide(p, clv, campaign: Campaign) -> np.ndarray:
    """Target i when its expected profit under churn probability p_i is positive (the optimise step)."""
    return np.asarray(expected_profit(p, clv, campaign)) > 0


# ------------------------------------------------------------------------------------------------ data
TELCO_PACKAGE = "r-cran-modeldata"
TELCO_NUMERIC = ("female", "senior_citizen", "partner", "dependents", "tenure", "phone_service",
                 "paperless_billing", "monthly_charges", "total_charges")
TELCO_CATEGORICAL = ("multiple_lines", "internet_service", "online_security", "online_backup",
                     "device_protection", "tech_support", "streaming_tv", "streaming_movies", "contract",
                     "payment_method")
TELCO_ROWS, TELCO_CHURNERS = 7043, 1869
# CLV constants (see ``telco``)
TELCO_MARGIN = 0.30                 # contribution margin on the monthly charge: an assumption, the table has no costs
TELCO_ANNUAL_DISCOUNT = 0.10        # 10%/year cost of capital -> monthly (1.10)^(1/12) - 1
TELCO_HORIZON_MONTHS = 60           # 5-year horizon: a common cap that keeps near-1 retention from exploding
TELCO_RETENTION = {"Month-to-month": 0.976, "One year": 0.997, "Two year": 0.9995}  # monthly, by contract
# Verbraken's defaults (d = 10, f = 1 at CLV = 200) scaled by 3.5 ~ this table's mean CLV (670) / 200
TELCO_CAMPAIGN = Campaign(gamma=0.3, incentive=35.0, incentive_fraction=0.0, contact_cost=3.5)


def telco_retention_estimates(frame) -> dict[str, float]:
    """Monthly retention 1 - lambda per contract, lambda = churners / customer-months (sum of tenure): the
    maximum-likelihood hazard of an exponential survival model with non-churners censored at their tenure.
    ``TELCO_RETENTION`` holds these values (0.97632, 0.99732, 0.99950 on the full table) rounded."""
    out = {}
    for contract, group in frame.groupby("contract", observed=True):
        out[str(contract)] = 1.0 - float(group[LABEL].sum()) / float(group["tenure"].astype(float).sum())
    return out


def telco_clv(monthly_charges, contract) -> np.ndarray:
    """CLV_i = margin x monthly_charges_i x sum_{t=1..H} (r / (1 + i))^t with r = TELCO_RETENTION[contract]."""
    m = TELCO_MARGIN * np.asarray(monthly_charges, dtype=np.float64)
    i = (1.0 + TELCO_ANNUAL_DISCOUNT) ** (1.0 / 12.0) - 1.0
    r = np.array([TELCO_RETENTION[str(c)] for c in contract], dtype=np.float64)
    q = r / (1.0 + i)
    return m * q * (1.0 - q ** TELCO_HORIZON_MONTHS) / (1.0 - q)


def telco():
    """The IBM Watson Telco Customer Churn table (``wa_churn`` of Debian r-cran-modeldata), 7,043 customers,
    1,869 churners, with an individual CLV. Fetched without root like every Debian data set here
    (``debian_data_path``: apt-get download + dpkg -x into $SQUEEZELAB_CACHE) and read without R.

    Columns: ``TELCO_NUMERIC`` (0/1 flags as float, tenure in months, charges in dollars),
    ``TELCO_CATEGORICAL`` (str), ``churn`` (int 0/1) and ``clv`` (float, dollars).

    total_charges: 11 rows are blank (NaN here). All 11 have tenure 0 (signed up, never billed; all are
    non-churners), so their total charges are 0: we set 0.0 and drop no row. (Elsewhere total_charges is
    tenure x monthly_charges within a few percent.)

    CLV (the table has none; the paper's data had one per customer). The discounted margin of the expected
    remaining relationship, for a customer who stays in the campaign's sense:
        CLV_i = m_i sum_{t=1..60} (r_k / (1 + i))^t = m_i q (1 - q^60) / (1 - q),  q = r_k / (1 + i)
    - m_i = 0.30 x monthly_charges_i: a 30% contribution margin (assumed; telecom operators report EBITDA
      margins of roughly 30-40%, and the table holds no cost data);
    - r_k: the monthly retention rate of the customer's contract type k, from the exponential-survival
      hazard estimate on this table (``telco_retention_estimates``): month-to-month 0.976, one year 0.997,
      two year 0.9995. A group rate, not the customer's own label, so the CLV leaks no label; it uses all
      7,043 rows once, three numbers, as a fixed constant of the data set;
    - i = 1.10^(1/12) - 1 = 0.797% per month: a 10% annual cost of capital;
    - a 60-month horizon, because r close to 1 would otherwise give two-year customers decades of value.
    Result: CLV 147..1,670 dollars, mean 670 (the sum is 26.1 months of margin for month-to-month, 44.1 for
    one-year and 46.9 for two-year contracts). corr(CLV, churn) = -0.05: on Telco the CLV carries almost
    no churn signal, unlike the synthetic sets with clv_churn_corr < 0.
    """
    import pandas as pd

    rdx = debian_data_path(TELCO_PACKAGE, MODELDATA + ".rdx")
    raw = read_r_lazy(str(rdx)[: -len(".rdx")], "wa_churn")
    frame = pd.DataFrame(index=pd.RangeIndex(len(raw)))
    for col in TELCO_NUMERIC:
        frame[col] = raw[col].to_numpy(dtype=np.float64, na_value=np.nan)
    blank = np.isnan(frame["total_charges"].to_numpy())
    if not (frame.loc[blank, "tenure"] == 0).all():
        raise ValueError("wa_churn: a blank total_charges with tenure > 0; the blank-means-never-billed rule fails")
    frame.loc[blank, "total_charges"] = 0.0
    for col in TELCO_CATEGORICAL:
        frame[col] = raw[col].astype(str).to_numpy(dtype=object)
    frame[LABEL] = (raw["churn"].astype(str) == "Yes").to_numpy().astype(np.int64)
    frame[CLV] = telco_clv(frame["monthly_charges"], frame["contract"])
    frame.attrs.update(source=f"Debian {TELCO_PACKAGE} wa_churn (IBM Telco), CLV derived (tasks.churn.telco)",
                       synthetic=False, numeric=list(TELCO_NUMERIC), categorical=list(TELCO_CATEGORICAL))
    return frame


def synthetic(n: int = 20_000, seed: int = 0, *, clv_dispersion: float = 1.0, clv_churn_corr: float = -0.5,
              churn_rate: float = 0.15, driver_shift: float = 0.0, nonlinearity: float = 0.0, signal: float = 2.0,
              n_features: int = 10, clv_mean: float = 200.0):
    """A synthetic churn table (a ``synthetic`` column and ``attrs["synthetic"]``, both True).

    Draws, in this order, from ``numpy.random.default_rng(seed)``: features x ~ N(0, I_D) [n, D]; a value
    latent v ~ N(0, 1) [n]; two unit directions w_A, w_B; the churn labels. Then
        clv   = exp(mu + clv_dispersion v)            lognormal, E[clv] = clv_mean (mu = log clv_mean - s^2/2);
                                                      clv_dispersion = std of log CLV
        t_i   = W_i'x,  W_i = unit((1 - a_i) w_A + a_i w_B),  a_i = sigmoid(driver_shift v_i)
        u     = (t + nonlinearity h) / sqrt(1 + nonlinearity^2),  h = (x0 x1 + x2^2 - 1) / sqrt(3)
        eta   = b + signal (rho v + sqrt(1 - rho^2) u),  rho = clv_churn_corr
        churn ~ Bernoulli(sigmoid(eta))               (column ``p_churn``; b solves mean(p) = churn_rate)
    t, h and v are uncorrelated with unit variance, so rho is exactly the correlation of log CLV with the churn
    logit. Two ways to make a linear model in (x, log1p(clv)) misspecified:
    - ``driver_shift`` > 0: value-dependent churn drivers. Low-value customers churn along w_A, high-value
      ones along w_B (an x-by-value interaction): the case where fitting the money rather than the
      head count should pay;
    - ``nonlinearity`` > 0: a value-independent nonlinearity h (no linear part).
    With both 0 a linear-logistic model in (x, log clv) is well specified. Features: x0..x{D-1}; the CLV is
    a column (the encoder adds log1p(clv) as a feature).
    """
    import pandas as pd
    from scipy.optimize import brentq

    if not -1.0 <= clv_churn_corr <= 1.0 or not 0.0 < churn_rate < 1.0 or clv_dispersion < 0 or n_features < 3:
        raise ValueError("need -1 <= clv_churn_corr <= 1, 0 < churn_rate < 1, clv_dispersion >= 0, n_features >= 3")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_features))
    v = rng.standard_normal(n)
    w = rng.standard_normal((2, n_features))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    a = 1.0 / (1.0 + np.exp(-driver_shift * v))
    drivers = (1.0 - a)[:, None] * w[0] + a[:, None] * w[1]
    t = np.einsum("ij,ij->i", x, drivers / np.linalg.norm(drivers, axis=1, keepdims=True))
    h = (x[:, 0] * x[:, 1] + x[:, 2] ** 2 - 1.0) / math.sqrt(3.0)
    u = (t + nonlinearity * h) / math.sqrt(1.0 + nonlinearity ** 2)
    raw = signal * (clv_churn_corr * v + math.sqrt(1.0 - clv_churn_corr ** 2) * u)
    b = brentq(lambda b: float(np.mean(1.0 / (1.0 + np.exp(-(raw + b))))) - churn_rate, -60.0, 60.0)
    p = 1.0 / (1.0 + np.exp(-(raw + b)))
    y = (rng.random(n) < p).astype(np.int64)
    names = [f"x{j}" for j in range(n_features)]
    frame = pd.DataFrame(x, columns=names)
    frame[LABEL], frame[CLV] = y, np.exp(math.log(clv_mean) - clv_dispersion ** 2 / 2.0 + clv_dispersion * v)
    frame["p_churn"], frame["synthetic"] = p, True
    frame.attrs.update(source=(f"synthetic: tasks.churn.synthetic(n={n}, seed={seed}, clv_dispersion={clv_dispersion}, "
                               f"clv_churn_corr={clv_churn_corr}, churn_rate={churn_rate}, "
                               f"driver_shift={driver_shift}, "
                               f"nonlinearity={nonlinearity}, signal={signal}, n_features={n_features}, "
                               f"clv_mean={clv_mean})"),
                       synthetic=True, numeric=names, categorical=[])
    return frame


def split(frame, seed: int = 0, val_fraction: float = 0.25, test_fraction: float = 0.3):
    """(train, val, test) frames, stratified on churn (``tasks.common.tables.split_indices``): a test part
    chosen by 10_000 + seed, then ``val_fraction`` of the rest by seed (defaults: 52.5 / 17.5 / 30 %)."""
    parts = split_indices(frame[LABEL].to_numpy(), seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    out = []
    for idx in parts:
        part = frame.iloc[idx].reset_index(drop=True)
        part.attrs = dict(frame.attrs)
        out.append(part)
    return tuple(out)


# --------------------------------------------------------------------------- features and validation
@dataclass
class FeatureEncoder:
    """Numeric columns standardised, categorical columns one-hot over the training levels (all of them, no
    reference level), optionally log1p(clv) as one more numeric feature. Everything is plain data, so
    ``to_json``/``from_json`` rebuild it exactly without pickle."""
    numeric: list[str]
    categorical: dict[str, list[str]]  # column -> levels, in one-hot order
    mean: list[float]                  # per numeric feature (numeric columns, then log1p(clv) if clv_feature)
    std: list[float]
    clv_feature: bool = True
    clv_column: str = CLV

    @classmethod
    def fit(cls, frame, numeric=None, categorical=None, *, clv_feature: bool = True) -> "FeatureEncoder":
        """Fit on training rows; column lists default to ``frame.attrs`` (set by ``telco`` and ``synthetic``)."""
        numeric = list(frame.attrs["numeric"] if numeric is None else numeric)
        categorical = list(frame.attrs["categorical"] if categorical is None else categorical)
        if frame[categorical].isna().any().any():
            raise ValueError("missing categorical values in the training frame; fit on validated rows")
        cats = {c: sorted({str(v) for v in frame[c]}) for c in categorical}
        enc = cls(numeric, cats, [], [], clv_feature)
        raw = enc._numeric_block(frame)
        if not np.isfinite(raw).all():
            raise ValueError("missing or infinite numeric values (or clv < -1) in the training frame")
        std = raw.std(axis=0)
        enc.mean = [float(v) for v in raw.mean(axis=0)]
        enc.std = [float(s) if s > 0 else 1.0 for s in std]
        return enc

    @property
    def feature_names(self) -> list[str]:
        names = list(self.numeric) + ([f"log1p({self.clv_column})"] if self.clv_feature else [])
        return names + [f"{c}={level}" for c, levels in self.categorical.items() for level in levels]

    @property
    def required_columns(self) -> list[str]:
        return list(self.numeric) + list(self.categorical) + [self.clv_column]

    def _numeric_block(self, frame) -> np.ndarray:
        cols = [frame[c].to_numpy(dtype=np.float64) for c in self.numeric]
        if self.clv_feature:
            cols.append(np.log1p(frame[self.clv_column].to_numpy(dtype=np.float64)))
        return np.stack(cols, axis=1) if cols else np.zeros((len(frame), 0))

    def transform(self, frame) -> np.ndarray:
        """float32 [n, D]; expects rows that passed ``validate_rows`` (an unknown level raises)."""
        blocks = [(self._numeric_block(frame) - np.asarray(self.mean)) / np.asarray(self.std)]
        import pandas as pd

        for c, levels in self.categorical.items():
            idx = pd.Categorical(frame[c], categories=levels).codes.astype(np.int64)  # -1: not a known level
            if (idx < 0).any():
                unknown = sorted({str(v) for v in frame[c].to_numpy(dtype=object)[idx < 0]})[:5]
                raise ValueError(f"unknown level(s) {unknown} in {c!r}; run validate_rows first")
            one = np.zeros((len(frame), len(levels)))
            one[np.arange(len(frame)), idx] = 1.0
            blocks.append(one)
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, spec: dict[str, Any]) -> "FeatureEncoder":
        return cls(**spec)


def _blank(v) -> bool:
    """None, NaN, pandas NA/NaT, or an empty / blank string."""
    import pandas as pd

    if isinstance(v, str):
        return not v.strip()
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # an array-like cell: not blank (and the wrong type)
        return False


def _as_number(v) -> float | None:
    """A real number from a cell, or None when the cell is of the wrong type (str that is no number, ...)."""
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def validate_rows(frame, encoder: FeatureEncoder):
    """(valid, rejected): every input row lands in exactly one, in input order; nothing is dropped.

    ``rejected`` holds the rejected rows as they came plus a ``reason`` column listing every problem of the
    row, "; "-separated, each "<kind>: <column>[=value]" with kind one of
    - ``missing column``: a required column (``encoder.required_columns``) is absent: every row is rejected;
    - ``wrong type``: a numeric cell that is no number (a non-numeric string, an object), or a categorical
      cell that is not a string;
    - ``missing value``: None / NaN / an empty or blank string in a required column (the raw IBM CSV has
      blank total_charges); +-inf in a numeric column counts as missing too;
    - ``unknown category``: a categorical level the encoder never saw. Policy: reject, never guess. An
      all-zero one-hot would score the customer as no known level at all, silently; a scoring job should
      surface drift (a new contract type) instead, and the reject file shows it;
    - ``invalid clv``: a negative CLV (the profit model and log1p need clv >= 0).
    Numbers given as numeric strings ("29.85") are accepted and converted. ``valid`` has the numeric
    required columns as float64 and the categorical ones as str, ready for ``encoder.transform``.
    """
    import pandas as pd
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    n = len(frame)
    reasons: dict[int, list[str]] = {}                       # row position -> problems, only for bad rows

    def flag(rows, message) -> None:
        for k in np.flatnonzero(rows) if isinstance(rows, np.ndarray) else rows:
            reasons.setdefault(int(k), []).append(message if isinstance(message, str) else message(int(k)))

    missing_cols = [c for c in encoder.required_columns if c not in frame.columns]
    for c in missing_cols:
        flag(np.ones(n, dtype=bool), f"missing column: {c}")
    converted: dict[str, np.ndarray] = {}
    numeric = [c for c in list(encoder.numeric) + [encoder.clv_column] if c not in missing_cols]
    for c in numeric:
        column = frame[c]
        if is_bool_dtype(column) or is_numeric_dtype(column):   # the fast path: a typed column
            values, wrong = column.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(n, dtype=bool)
        else:                                                    # object / str: cell by cell
            cells = column.tolist()
            parsed = [np.nan if _blank(v) else _as_number(v) for v in cells]
            wrong = np.array([v is None for v in parsed], dtype=bool)
            values = np.array([np.nan if v is None else v for v in parsed], dtype=np.float64)
            flag(wrong, lambda k, c=c, cells=cells: f"wrong type: {c}={cells[k]!r}")
        flag(~np.isfinite(values) & ~wrong, f"missing value: {c}")
        if c == encoder.clv_column:
            flag(values < 0, lambda k, c=c, values=values: f"invalid clv: {c}={float(values[k])!r}")
        converted[c] = values
    for c, levels in encoder.categorical.items():
        if c in missing_cols:
            continue
        cells = frame[c].to_numpy(dtype=object)
        for k in np.flatnonzero(~frame[c].isin(levels).to_numpy()):  # only the cells that are not a known level
            v = cells[k]
            kind = "missing value" if _blank(v) else "wrong type" if not isinstance(v, str) else "unknown category"
            flag([k], f"{kind}: {c}" if kind == "missing value" else f"{kind}: {c}={v!r}")
        converted[c] = cells
    bad = np.zeros(n, dtype=bool)
    bad[list(reasons)] = True
    rejected = frame.iloc[np.flatnonzero(bad)].copy()
    rejected["reason"] = pd.Series(["; ".join(reasons[k]) for k in np.flatnonzero(bad)], index=rejected.index,
                                   dtype=object)
    keep = np.flatnonzero(~bad)
    valid = frame.iloc[keep].copy()
    for c, values in converted.items():
        valid[c] = values[keep]  # float64, or the known levels (str) as objects
    return valid, rejected


# ---------------------------------------------------------------------------------- PnO surrogate loss
def soft_regret(logits: torch.Tensor, y: torch.Tensor, clv: torch.Tensor, campaign: Campaign,
                temperature: float, scale: float) -> torch.Tensor:
    """S1: mean_i [max(pi_i, 0) - sigmoid(pi^_i / (tau s)) pi_i] / s (module docstring), >= 0.

    logits f_w(x_i) [n]; p_i = sigmoid(logits); pi^_i the expected profit of targeting i under p_i;
    pi_i the realised profit of targeting i; s = ``scale`` (money); tau = ``temperature`` (unit-free).
    As tau -> 0 the soft decision becomes 1[pi^_i > 0] and R~ the regret of the model's decisions.
    """
    import torch

    p = torch.sigmoid(logits)
    pi1, pi0 = targeting_profit(1.0, clv, campaign), targeting_profit(0.0, clv, campaign)
    predicted = p * pi1 + (1 - p) * pi0                       # pi^_i
    realised = y * pi1 + (1 - y) * pi0                         # pi_i(y_i)
    soft_target = torch.sigmoid(predicted / (temperature * scale))
    return (realised.clamp(min=0) - soft_target * realised).mean() / scale


# ----------------------------------------------------------------------------------------------- models
# not in the model registry: the registry holds classifiers built from a dataset's shape (num_classes,
# in_channels); a churn net is a one-logit scorer that only ChurnModel.load rebuilds
def churn_net(in_features: int, hidden: int = 0) -> nn.Module:
    """The churn logit f_w(x): linear (hidden = 0) or one ReLU hidden layer; output [n, 1]."""
    from torch import nn

    if hidden <= 0:
        return nn.Linear(in_features, 1)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def _weight_shapes(in_features: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """``churn_net``'s parameters by state-dict name: what a weights file must hold, exactly."""
    if hidden <= 0:
        return {"weight": (1, in_features), "bias": (1,)}
    return {"0.weight": (hidden, in_features), "0.bias": (hidden,), "2.weight": (1, hidden), "2.bias": (1,)}


class ChurnModel:
    """A fitted churn scorer: ``churn_net``'s weights (float32 numpy arrays by state-dict name; a torch
    module given to the constructor is copied into them), the campaign, a decision rule and (optionally)
    the feature encoder. ``rule == "profit"``: target when the expected profit under predict_proba is > 0
    with the customer's own CLV (PnO, LR, GBM); ``rule == "threshold"``: target when the score >=
    ``threshold`` (cost-sensitive LR: 0.5; EMPC-style: chosen on validation). Scores with numpy (no torch
    needed to load or score). Saved as safetensors + model.json."""

    def __init__(self, weights, campaign: Campaign, *, method: str, in_features: int, hidden: int = 0,
                 rule: str = "profit", threshold: float | None = None, encoder: FeatureEncoder | None = None,
                 info: dict[str, Any] | None = None):
        if rule not in ("profit", "threshold") or (rule == "threshold") != (threshold is not None):
            raise ValueError(f"rule 'profit' (no threshold) or 'threshold' (with one), got {rule!r}, {threshold!r}")
        if hasattr(weights, "state_dict"):  # a torch module, fresh from a fit
            weights = {k: v.detach().cpu().numpy() for k, v in weights.state_dict().items()}
        want = _weight_shapes(in_features, hidden)
        got = {k: tuple(np.shape(v)) for k, v in weights.items()}
        if got != want:
            raise ValueError(f"churn_net({in_features}, hidden={hidden}) weights must be {want}, got {got}")
        self.weights = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}  # own copies
        self.campaign, self.method = campaign, method
        self.in_features, self.hidden, self.rule, self.threshold = in_features, hidden, rule, threshold
        self.encoder, self.info = encoder, dict(info or {})

    def logits(self, x) -> np.ndarray:
        """float32 [n]: f_w(x), ``churn_net``'s forward pass in numpy."""
        w = self.weights
        if self.hidden <= 0:
            return (x @ w["weight"].T + w["bias"]).reshape(-1)
        h = np.maximum(x @ w["0.weight"].T + w["0.bias"], 0)
        return (h @ w["2.weight"].T + w["2.bias"]).reshape(-1)

    def predict_proba(self, x, batch_size: int = 65_536) -> np.ndarray:
        """float64 [n]: churn probability (the targeting score for cost-sensitive LR), in batches of
        ``batch_size`` rows. The same rows and batch size give bit-identical scores; another batch size can
        change the last float32 bits of the logits (BLAS picks kernels by shape)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be [n, {self.in_features}], got {x.shape}")
        z = np.concatenate([self.logits(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
                           or [np.zeros(0, np.float32)]).astype(np.float64)
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without exp's overflow for large |z|

    def decide(self, x, clv) -> np.ndarray:
        """bool [n]: whom to target."""
        return self._targets(self.predict_proba(x), clv)

    def _targets(self, p: np.ndarray, clv) -> np.ndarray:
        return p >= self.threshold if self.rule == "threshold" else decide(p, clv, self.campaign)

    def score_frame(self, frame):
        """(scored, rejected) for a batch of raw rows: ``validate_rows`` with the saved encoder, then columns
        ``churn_probability``, ``expected_profit`` (under that probability and the row's CLV) and ``target``."""
        if self.encoder is None:
            raise ValueError("this model has no encoder; score encoded arrays with predict_proba / decide")
        valid, rejected = validate_rows(frame, self.encoder)
        x, clv = self.encoder.transform(valid), valid[self.encoder.clv_column].to_numpy(dtype=np.float64)
        p = self.predict_proba(x)
        valid["churn_probability"] = p
        valid["expected_profit"] = expected_profit(p, clv, self.campaign)
        valid["target"] = self._targets(p, clv)
        return valid, rejected

    def save(self, directory) -> Path:
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.weights, str(directory / WEIGHTS))
        return write_spec(directory, "churn_net", {"in_features": self.in_features, "hidden": self.hidden},
                          method=self.method, campaign=self.campaign.to_dict(), rule=self.rule,
                          threshold=self.threshold, info=self.info,
                          encoder=None if self.encoder is None else self.encoder.to_json())

    @classmethod
    def load(cls, directory) -> "ChurnModel":
        from safetensors.numpy import load_file

        spec = read_spec(directory)
        if spec.get("model") != "churn_net":
            raise ValueError(f"{directory} holds a {spec.get('model')!r}, not a churn_net")
        enc = spec.get("encoder")
        return cls(load_file(str(Path(directory) / WEIGHTS)), Campaign(**spec["campaign"]), method=spec["method"],
                   rule=spec["rule"], threshold=spec["threshold"],
                   encoder=None if enc is None else FeatureEncoder.from_json(enc), info=spec.get("info"),
                   **spec["kwargs"])


def _tensors(x, y, clv):
    import torch

    x = torch.tensor(np.asarray(x, dtype=np.float32))          # copies: pandas hands out read-only arrays
    y = torch.tensor(np.asarray(y, dtype=np.float32)).reshape(-1)
    c = torch.tensor(np.asarray(clv, dtype=np.float32)).reshape(-1)
    if not len(x) == len(y) == len(c):
        raise ValueError(f"x, y, clv lengths differ: {len(x)}, {len(y)}, {len(c)}")
    return x, y, c


class _threads:
    """Run torch on ``n`` intra-op threads inside the block: a linear model's matrices are tiny, and on a
    shared 2-core machine extra threads cost more in contention than they give."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)


def fit_pno(x, y, clv, campaign: Campaign, *, hidden: int = 0, temperature: float = 0.05, l2: float = 1e-4,
            bce_weight: float = 0.0, warmup_steps: int = 100, epochs: int = 30, lr: float = 0.01,
            batch_size: int = 512, seed: int = 0, encoder: FeatureEncoder | None = None) -> ChurnModel:
    """The PnO model. Warm start: up to ``warmup_steps`` full-batch L-BFGS iterations on cross-entropy + L2 (for
    a linear net, the logistic-regression fit). Then ``epochs`` of Adam on minibatches of
        S1 (``soft_regret``, tau = ``temperature``, s = mean training CLV) + bce_weight x BCE + l2 ||W||^2
    (W: weights, not biases). Deterministic in ``seed`` (initialisation and batch order; the global torch
    generator is left as it was). Defaults, chosen on synthetic seeds 100-104 (never on the seeds tests and
    reports use): tau 0.05 (at CLV 200 and Verbraken's campaign the soft decision spans about +-0.15 in p
    around the boundary, less for larger CLVs; 0.02 and 0.1 did no better); lr 0.01, batch 512, 30 epochs
    (profit on the training set had levelled off); l2 1e-4 (about scikit-learn's C = 1 at n ~ 5,000);
    bce_weight 0: a cross-entropy anchor pulls the model back to the logistic fit (0.1 undid most of the
    gain where there was one), and the warm start already gives p its meaning away from the boundary."""
    import torch
    import torch.nn.functional as F

    x_t, y_t, c_t = _tensors(x, y, clv)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = churn_net(x_t.shape[1], hidden)
    gen = torch.Generator().manual_seed(seed)
    scale = float(c_t.mean())
    weights = [p for name, p in net.named_parameters() if name.endswith("weight")]

    def penalty() -> torch.Tensor:
        return l2 * sum((w ** 2).sum() for w in weights)

    net.train()
    with _threads(1):
        if warmup_steps > 0:
            opt = torch.optim.LBFGS(net.parameters(), lr=1.0, max_iter=warmup_steps, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = F.binary_cross_entropy_with_logits(net(x_t).reshape(-1), y_t) + penalty()
                loss.backward()
                return loss

            opt.step(closure)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for _ in range(epochs):
            for idx in torch.randperm(len(x_t), generator=gen).split(batch_size):
                logits = net(x_t[idx]).reshape(-1)
                loss = soft_regret(logits, y_t[idx], c_t[idx], campaign, temperature, scale) + penalty()
                if bce_weight:
                    loss = loss + bce_weight * F.binary_cross_entropy_with_logits(logits, y_t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    info = dict(temperature=temperature, l2=l2, bce_weight=bce_weight, warmup_steps=warmup_steps, epochs=epochs,
                lr=lr, batch_size=batch_size, seed=seed, scale=scale, surrogate="S1 soft-decision regret")
    return ChurnModel(net, campaign, method="pno", in_features=x_t.shape[1], hidden=hidden, encoder=encoder, info=info)


def _linear_from_sklearn(lr_model, in_features: int) -> dict[str, np.ndarray]:
    """A linear ``churn_net``'s weights from a fitted scikit-learn LogisticRegression."""
    return {"weight": np.asarray(lr_model.coef_, dtype=np.float32).reshape(1, in_features),
            "bias": np.asarray(lr_model.intercept_, dtype=np.float32).reshape(1)}


def _sklearn_lr(x, labels, sample_weight=None, C: float = 1.0, seed: int = 0):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(
        np.asarray(x, dtype=np.float64), np.asarray(labels), sample_weight=sample_weight)


def fit_logistic(x, y, clv, campaign: Campaign, *, C: float = 1.0, seed: int = 0,
                 encoder: FeatureEncoder | None = None) -> ChurnModel:
    """Baseline (A): logistic regression (scikit-learn, L2, C = 1) on the churn label; targets when the
    expected profit with the customer's own CLV is > 0. ``clv`` is unused in fitting (kept for one signature)."""
    model = _sklearn_lr(x, np.asarray(y), C=C, seed=seed)
    d = np.asarray(x).shape[1]
    return ChurnModel(_linear_from_sklearn(model, d), campaign, method="logistic", in_features=d, encoder=encoder,
                      info=dict(C=C, seed=seed))


def fit_cost_sensitive(x, y, clv, campaign: Campaign, *, C: float = 1.0, seed: int = 0,
                       encoder: FeatureEncoder | None = None) -> ChurnModel:
    """Baseline (C): cost-sensitive LR with example-dependent costs. Label z_i = 1[pi_i(y_i) > 0] (the
    hindsight decision), weight |pi_i(y_i)| (what a wrong decision on i costs; normalised to mean 1), score >= 0.5
    targets. Its score is a targeting propensity, not a churn probability. This is the convex (log-loss)
    version of the S2 surrogate sum_i p_i (-pi_i)."""
    pi = np.asarray(targeting_profit(y, clv, campaign))
    w = np.abs(pi)
    model = _sklearn_lr(x, (pi > 0).astype(np.int64), sample_weight=w / w.mean(), C=C, seed=seed)
    d = np.asarray(x).shape[1]
    return ChurnModel(_linear_from_sklearn(model, d), campaign, method="cost_sensitive_lr", in_features=d,
                      rule="threshold", threshold=0.5, encoder=encoder, info=dict(C=C, seed=seed))


def fit_empc_targeting(x, y, clv, campaign: Campaign, x_val, y_val, clv_val, *, C: float = 1.0, seed: int = 0,
                       encoder: FeatureEncoder | None = None) -> ChurnModel:
    """Baseline (B): EMPC-style targeting. LR as in (A); on validation, the targeting fraction T that maximises
    profit with the AVERAGE training CLV for everyone (``max_profit``); applied as a score threshold (the
    validation score at that cut), so a batch's decisions do not depend on the rest of the batch."""
    base = fit_logistic(x, y, clv, campaign, C=C, seed=seed)
    mean_clv = float(np.mean(clv))
    s = base.predict_proba(x_val)
    _, fraction = max_profit(s, y_val, np.full(len(s), mean_clv), campaign)
    k = int(round(fraction * len(s)))
    threshold = float(np.sort(s)[::-1][k - 1]) if k > 0 else math.inf
    info = dict(C=C, seed=seed, fraction=fraction, mean_clv=mean_clv)
    return ChurnModel(base.weights, campaign, method="empc_targeting", in_features=base.in_features, rule="threshold",
                      threshold=threshold, encoder=encoder, info=info)


class GradientBoostingBaseline:
    """Baseline: scikit-learn HistGradientBoostingClassifier on the churn label, expected-profit targeting
    with the individual CLV. In-process only: it has no pickle-free file format, so no ``save``.
    ``threads``: OpenMP threads for fit and predict (None: scikit-learn's default, all cores; on a shared
    small machine 1 avoids spin-waiting against other processes)."""
    method = "gbm"

    def __init__(self, campaign: Campaign, seed: int = 0, threads: int | None = None, **kwargs):
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.campaign, self.threads = campaign, threads
        self.model = HistGradientBoostingClassifier(random_state=seed, **kwargs)

    def _limits(self):
        from contextlib import nullcontext

        from threadpoolctl import threadpool_limits

        return nullcontext() if self.threads is None else threadpool_limits(self.threads)

    def fit(self, x, y, clv=None) -> "GradientBoostingBaseline":
        with self._limits():
            self.model.fit(np.asarray(x, dtype=np.float64), np.asarray(y))
        return self

    def predict_proba(self, x) -> np.ndarray:
        with self._limits():
            return self.model.predict_proba(np.asarray(x, dtype=np.float64))[:, 1]

    def decide(self, x, clv) -> np.ndarray:
        return decide(self.predict_proba(x), clv, self.campaign)


def fit_gbm(x, y, clv, campaign: Campaign, *, seed: int = 0, threads: int | None = None,
            **kwargs) -> GradientBoostingBaseline:
    """HistGradientBoostingClassifier (scikit-learn defaults unless ``kwargs``, ``random_state=seed``)."""
    return GradientBoostingBaseline(campaign, seed, threads, **kwargs).fit(x, y, clv)


# ---------------------------------------------------------------------------------------------- metrics
def average_profit(targets, y, clv, campaign: Campaign) -> float:
    """(1/n) sum_i z_i pi_i(y_i): realised profit per customer of the decisions z, individual CLVs."""
    z = np.asarray(targets, dtype=bool)
    return float(np.sum(np.asarray(targeting_profit(y, clv, campaign))[z]) / len(z)) if len(z) else 0.0


def _profit_curve(scores, y, clv, campaign: Campaign) -> tuple[np.ndarray, np.ndarray]:
    """(k, total profit) at every cut between distinct scores, k = customers targeted (0 and n included),
    customers sorted by descending score. Inside a block of tied scores the profit is linear in k (the
    expected profit of a random order within the tie)."""
    s = np.asarray(scores, dtype=np.float64)
    pi = np.asarray(targeting_profit(y, clv, campaign), dtype=np.float64) * np.ones(len(s))
    order = np.argsort(-s, kind="stable")
    s, pi = s[order], pi[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) + 1          # cut after each block of ties
    k = np.r_[0, ends]
    return k, np.r_[0.0, np.cumsum(pi)[ends - 1]]


def max_profit(scores, y, clv, campaign: Campaign) -> tuple[float, float]:
    """(MP, T): the best per-customer profit over targeting fractions when targeting by descending score, and
    that fraction. Individual CLVs; pass ``np.full(n, mean)`` for the aggregate (average-CLV) version."""
    k, total = _profit_curve(scores, y, clv, campaign)
    best = int(np.argmax(total))                                     # first maximum: the smallest campaign
    return float(total[best] / k[-1]), float(k[best] / k[-1])


def profit_at_fraction(scores, y, clv, campaign: Campaign, fraction: float) -> float:
    """Per-customer profit when the top ``fraction`` by score are targeted (ties: their expected profit)."""
    k, total = _profit_curve(scores, y, clv, campaign)
    return float(np.interp(fraction * k[-1], k, total) / k[-1])


def _roc_points(scores, y) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every cut between distinct scores, from (0, 0) to (1, 1); y = 1 is the positive
    (churner) class."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, yy = s[order], y[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp = np.r_[0.0, np.cumsum(yy)[ends]]
    fp = np.r_[0.0, np.cumsum(1.0 - yy)[ends]]
    return fp / fp[-1], tp / tp[-1]


def _upper_hull(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the ROC convex hull (upper hull from (0, 0) to (1, 1)), by increasing FPR."""
    hull: list[tuple[float, float]] = []
    for p in sorted(set(zip(fpr.tolist(), tpr.tolist()))):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] on or below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    h = np.asarray(hull)
    return h[:, 0], h[:, 1]


def empc(scores, y, clv: float, campaign: Campaign, *, alpha: float = EMPC_ALPHA, beta: float = EMPC_BETA,
         method: str = "hull") -> float:
    """Expected maximum profit per customer, E_gamma[MP(gamma)] with gamma ~ Beta(alpha, beta) and ONE CLV
    for everyone (pass the mean of individual CLVs: the aggregation the paper criticises); ``campaign.gamma``
    is ignored. MP(gamma) = max over ROC points of pi1 TPR (gamma (c - d) - f) - pi0 FPR (d + f), pi1 the
    churn rate, linear in gamma.
    ``method="hull"``: Verbraken's closed form. On the ROC convex hull vertex k is optimal for gamma between
    the breakpoints gamma_k where vertex k + 1 overtakes it; the integral of (A_k gamma - B_k) h(gamma) over
    each interval is A_k (alpha/(alpha+beta)) [I(alpha+1, beta)] - B_k [I(alpha, beta)] (regularised
    incomplete beta). ``method="quadrature"``: adaptive quadrature of the max over ALL ROC points (no hull),
    an independent check."""
    from scipy import integrate, special, stats

    y = np.asarray(y, dtype=np.float64)
    c = float(clv)
    d, f = float(incentive_cost(c, campaign)), campaign.contact_cost
    pi1 = float(y.mean())
    fpr, tpr = _roc_points(scores, y)
    if method == "quadrature":
        a, b = pi1 * tpr * (c - d), pi1 * tpr * f + (1 - pi1) * fpr * (d + f)
        h = stats.beta(alpha, beta).pdf
        value, _ = integrate.quad(lambda g: float(np.max(a * g - b)) * h(g), 0.0, 1.0, limit=2000,
                                  epsabs=1e-12, epsrel=1e-10)
        return float(value)
    if method != "hull":
        raise ValueError(f"method must be 'hull' or 'quadrature', got {method!r}")
    if c - d <= 0:            # no gamma makes a churner worth saving: the best campaign is none
        return 0.0
    hf, ht = _upper_hull(fpr, tpr)
    a = pi1 * ht * (c - d)                                   # P_k(gamma) = A_k gamma - B_k
    b = pi1 * ht * f + (1 - pi1) * hf * (d + f)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.where(np.diff(a) > 0, np.diff(b) / np.diff(a), np.inf)
    edges = np.clip(np.r_[-np.inf, cross, np.inf], 0.0, 1.0)     # vertex k optimal on [edges[k], edges[k+1]]
    lo, hi = edges[:-1], np.maximum(edges[1:], edges[:-1])
    mass = special.betainc(alpha, beta, hi) - special.betainc(alpha, beta, lo)
    first = alpha / (alpha + beta) * (special.betainc(alpha + 1, beta, hi) - special.betainc(alpha + 1, beta, lo))
    return float(np.sum(a * first - b * mass))


def auc(scores, y) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(y), np.asarray(scores, dtype=np.float64)))


def evaluate(model, x, y, clv, campaign: Campaign | None = None, *, synthetic: bool = False) -> dict[str, Any]:
    """Everything reported for one model on one split: ``average_profit`` (its own decisions, individual
    CLVs), ``targeted`` (fraction), ``mp`` and ``mp_fraction`` (individual CLVs), ``empc`` (mean CLV),
    ``auc``, ``synthetic`` (carry it into every logged result)."""
    campaign = campaign or model.campaign
    y, clv = np.asarray(y), np.asarray(clv, dtype=np.float64)
    s, z = model.predict_proba(x), np.asarray(model.decide(x, clv), dtype=bool)
    mp, frac = max_profit(s, y, clv, campaign)
    return {"average_profit": average_profit(z, y, clv, campaign), "targeted": float(z.mean()), "mp": mp,
            "mp_fraction": frac, "empc": empc(s, y, float(clv.mean()), campaign), "auc": auc(s, y),
            "synthetic": bool(synthetic)}
