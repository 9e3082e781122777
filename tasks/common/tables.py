"""Tabular classification datasets that ship offline, with deterministic splits from a seed.

Registered (``register_dataset``, next to the image sets of ``tasks.common.datasets`` and the text sets
of ``tasks.common.text``); every loader returns a ``RawTable`` (``kind == "table"``):

=================== ===== ======== ======= ====================================================================
name                 rows features classes source / notes
=================== ===== ======== ======= ====================================================================
iris                 150        4       3 scikit-learn ``load_iris``
wine                 178       13       3 scikit-learn ``load_wine``
breast_cancer        569       30       2 scikit-learn ``load_breast_cancer`` (malignant 212 / benign 357)
letter             20000       16      26 mlbench ``LetterRecognition``; 1,332 rows are exact duplicates
satellite           6435       36       6 mlbench ``Satellite`` (Landsat, 3x3 pixels x 4 bands)
vehicle              846       18       4 mlbench ``Vehicle`` (bus, opel, saab, van)
vowel                990        9      11 mlbench ``Vowel``; speaker column ``V1`` (15 speakers) dropped
glass                214        9       6 mlbench ``Glass``; classes are the type codes 1 2 3 5 6 7
shuttle            58000        9       7 mlbench ``Shuttle``; 78.6% Rad.Flow, smallest class 10 rows
dna                 3186      180       3 mlbench ``DNA``; 180 binary indicators (one column each)
soybean              683      117      19 mlbench ``Soybean``; 35 categorical columns with 2,337 NAs
sonar                208       60       2 mlbench ``Sonar`` (M 111 / R 97)
ionosphere           351       33       2 mlbench ``Ionosphere``; constant ``V2`` dropped
pima                 768        8       2 mlbench ``PimaIndiansDiabetes`` (neg 500 / pos 268)
highdim_binary       800     1000       2 synthetic ``make_classification``, p >> n (EnsLoss)
breast_cancer_noise  569      530       2 breast_cancer + 500 N(0, 1) noise columns (synthetic)
link20              4000       20      20 synthetic, link-misspecified multiclass (LegendreTron)
link40              4000       20      40 synthetic, link-misspecified multiclass (LegendreTron)
=================== ===== ======== ======= ====================================================================

mlbench sets come from Debian ``r-cran-mlbench`` (2.1-3): plain ``.rda`` files under
``/usr/lib/R/site-library/mlbench/data/``, fetched without root (``apt-get download`` + ``dpkg -x``) into
the project's cache (``$SQUEEZELAB_CACHE``) by ``tasks.common.datasets.debian_data_path`` and read with
the pure-Python PyPI ``rdata`` (R is not needed). Each parsed file is cached per process.

Encoding (the same for every source):

- rows whose label is missing are removed; the label's levels that occur become classes ``0..C-1`` in
  the source's level order (R factor levels, scikit-learn ``target_names``);
- numeric columns stay as they are (float64); a missing numeric value is imputed with the column's
  median over all rows (none of the registered sets has one today);
- a categorical column (an R factor) is one-hot encoded over the levels that occur, except that a
  two-level factor becomes a single 0/1 column for its second level (``"V1=1"``); a missing categorical
  value is its own category: an extra ``"<column>=NA"`` indicator, with the level indicators 0
  (soybean is the only set with missing values; there they are informative: they cluster in a few
  classes);
- columns that are constant over all rows are dropped (ionosphere ``V2``).

Things to know about the data: Pima's ``PimaIndiansDiabetes`` (not ``...2``) codes missing
measurements as 0 (insulin 374 zeros, triceps 227, pressure 35); they are kept as 0. Shuttle's features
are heavy-tailed (``V6`` ranges -26739..15164 with std 218), so standardised values reach |z| > 100.
mlbench's Vowel carries 9 of the 10 LPC log-area ratios of the UCI original, plus the speaker.

Synthetic sets (``synthetic=True``; fixed generator seeds, so the data never depend on the split seed):

- ``highdim_binary``: ``sklearn.datasets.make_classification(n_samples=800, n_features=1000,
  n_informative=20, n_redundant=20, flip_y=0.05, class_sep=0.8, random_state=1000)``: the p >> n
  overfitting regime.
- ``breast_cancer_noise``: ``breast_cancer`` (real labels) with 500 appended N(0, 1) columns from
  ``numpy.random.default_rng(1001)``.
- ``link20`` / ``link40``: ``rng = numpy.random.default_rng([1002, C])``; ``x ~ N(0, I_20)`` (n = 4000),
  ``eta = W x`` with ``W[c, j] ~ N(0, 1/20)`` (so each eta_c ~ N(0, 1)), and the label is sampled from
  ``p(c | x) ∝ exp(g(eta_c))`` with ``g(t) = sign(t) |t|^1.7``: a monotone, non-softmax link. The
  arg-max class is still linear in x (a linear classifier can be Bayes-optimal in accuracy), but
  softmax(W x) is a misspecified model of the probabilities. Draw order: x, W, then the uniforms for
  the labels (inverse-CDF sampling). The classes are not balanced (W's rows differ in norm): link20
  has 138..290 rows per class, link40 49..209; the Bayes-optimal accuracy (mean max_c p) is 0.38 for both.

``load_table`` splits as ``load_dataset`` does for images without an official test split: a stratified
``test_fraction`` chosen by ``10_000 + seed`` first, then a stratified ``val_fraction`` of the rest chosen
by ``seed``; features are standardised with the training split's mean and std (a column constant on the
training split gets std 1) and returned as float32.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from tasks.common.datasets import debian_data_path, stratified_split
from tasks.common.registry import lookup, register_dataset

MLBENCH_PACKAGE = "r-cran-mlbench"
MLBENCH_DATA = "/usr/lib/R/site-library/mlbench/data"

HIGHDIM_SEED = 1000
NOISE_SEED = 1001
LINK_SEED = 1002
LINK_POWER = 1.7


@dataclass(frozen=True)
class RawTable:
    x: np.ndarray  # float64 [N, D]: numeric, one-hot categoricals, imputed (see the module docstring)
    y: np.ndarray  # int64 [N], contiguous 0..C-1
    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    source: str
    synthetic: bool = False
    kind: str = "table"


@dataclass(frozen=True)
class TableSplits:
    name: str
    classes: tuple[str, ...]
    train_x: np.ndarray  # float32 [n, D], standardised with the training split's mean/std
    train_y: np.ndarray  # int64 [n]
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str
    synthetic: bool
    mean: np.ndarray  # float64 [D], fitted on train
    std: np.ndarray  # float64 [D], fitted on train (1 where the column is constant on train)
    kind: str = "table"

    @property
    def input_shape(self) -> tuple[int]:
        return (int(self.train_x.shape[1]),)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --- encoding ------------------------------------------------------------------------------------------

def _finish(x: np.ndarray, y: np.ndarray, classes, names, source: str, synthetic: bool = False) -> RawTable:
    """Drop constant columns, check the invariants and build the ``RawTable``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    names = tuple(str(n) for n in names)
    if x.ndim != 2 or x.shape != (len(y), len(names)):
        raise ValueError(f"table shape {x.shape} does not match {len(y)} labels and {len(names)} names")
    keep = np.ptp(x, axis=0) > 0 if len(x) else np.ones(x.shape[1], bool)
    x, names = np.ascontiguousarray(x[:, keep]), tuple(n for n, k in zip(names, keep) if k)
    classes = tuple(str(c) for c in classes)
    if np.isnan(x).any():
        raise ValueError(f"{source}: NaN left after imputation")
    if y.min() < 0 or np.bincount(y, minlength=len(classes)).min() == 0 or y.max() >= len(classes):
        raise ValueError(f"{source}: labels are not contiguous 0..{len(classes) - 1}")
    return RawTable(x, y, classes, names, source, synthetic)


def _encode_frame(frame, label: str, drop: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray,
                                                                            tuple[str, ...], tuple[str, ...]]:
    """(x, y, classes, feature_names) from a pandas DataFrame as the module docstring describes."""
    import pandas as pd

    frame = frame[frame[label].notna()]
    target = frame[label].astype("category").cat.remove_unused_categories()
    y = target.cat.codes.to_numpy().astype(np.int64)
    classes = tuple(str(c) for c in target.cat.categories)
    columns, names = [], []
    for col in frame.columns:
        if col == label or col in drop:
            continue
        series = frame[col]
        if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
            cat = series.astype("category").cat.remove_unused_categories()
            codes = cat.cat.codes.to_numpy()  # -1 where missing
            levels = list(cat.cat.categories)
            shown = levels[1:] if len(levels) == 2 else levels
            for level in shown:
                columns.append((codes == levels.index(level)).astype(np.float64))
                names.append(f"{col}={level}")
            if (codes < 0).any():
                columns.append((codes < 0).astype(np.float64))
                names.append(f"{col}=NA")
        else:
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            missing = np.isnan(values)
            if missing.all():
                continue
            if missing.any():
                values = np.where(missing, np.nanmedian(values), values)
            columns.append(values)
            names.append(str(col))
    x = np.stack(columns, axis=1) if columns else np.zeros((len(y), 0))
    return x, y, classes, tuple(names)


# --- scikit-learn bundled ------------------------------------------------------------------------------

def _sklearn(loader_name: str) -> RawTable:
    import sklearn.datasets

    d = getattr(sklearn.datasets, loader_name)()
    return _finish(d.data, d.target, d.target_names, d.feature_names, f"scikit-learn {loader_name}")


@register_dataset("iris")
def iris() -> RawTable:
    return _sklearn("load_iris")


@register_dataset("wine")
def wine() -> RawTable:
    return _sklearn("load_wine")


@register_dataset("breast_cancer")
def breast_cancer() -> RawTable:
    return _sklearn("load_breast_cancer")


# --- Debian r-cran-mlbench -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def read_mlbench(name: str):
    """The data.frame ``name`` of mlbench (a pandas DataFrame, cached per process: do not mutate)."""
    import rdata

    path = debian_data_path(MLBENCH_PACKAGE, f"{MLBENCH_DATA}/{name}.rda")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Missing constructor for R class")
        warnings.filterwarnings("ignore", message="Unknown encoding")  # factor levels are plain ASCII
        return rdata.read_rda(str(path))[name]


def _mlbench(name: str, label: str, drop: tuple[str, ...] = ()) -> RawTable:
    x, y, classes, names = _encode_frame(read_mlbench(name), label, drop)
    return _finish(x, y, classes, names, f"Debian {MLBENCH_PACKAGE} ({name})")


@register_dataset("letter")
def letter() -> RawTable:
    return _mlbench("LetterRecognition", "lettr")


@register_dataset("satellite")
def satellite() -> RawTable:
    return _mlbench("Satellite", "classes")


@register_dataset("vehicle")
def vehicle() -> RawTable:
    return _mlbench("Vehicle", "Class")


@register_dataset("vowel")
def vowel() -> RawTable:
    return _mlbench("Vowel", "Class", drop=("V1",))  # V1: the speaker (15 levels, 66 rows each)


@register_dataset("glass")
def glass() -> RawTable:
    return _mlbench("Glass", "Type")


@register_dataset("shuttle")
def shuttle() -> RawTable:
    return _mlbench("Shuttle", "Class")


@register_dataset("dna")
def dna() -> RawTable:
    return _mlbench("DNA", "Class")


@register_dataset("soybean")
def soybean() -> RawTable:
    return _mlbench("Soybean", "Class")


@register_dataset("sonar")
def sonar() -> RawTable:
    return _mlbench("Sonar", "Class")


@register_dataset("ionosphere")
def ionosphere() -> RawTable:
    return _mlbench("Ionosphere", "Class")


@register_dataset("pima")
def pima() -> RawTable:
    return _mlbench("PimaIndiansDiabetes", "diabetes")


# --- synthetic -----------------------------------------------------------------------------------------

@register_dataset("highdim_binary")
def highdim_binary() -> RawTable:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=800, n_features=1000, n_informative=20, n_redundant=20,
                               flip_y=0.05, class_sep=0.8, random_state=HIGHDIM_SEED)
    return _finish(x, y, ("0", "1"), [f"x{j}" for j in range(x.shape[1])],
                   "synthetic: make_classification(n_samples=800, n_features=1000, n_informative=20, "
                   f"n_redundant=20, flip_y=0.05, class_sep=0.8, random_state={HIGHDIM_SEED})",
                   synthetic=True)


@register_dataset("breast_cancer_noise")
def breast_cancer_noise() -> RawTable:
    base = breast_cancer()
    noise = np.random.default_rng(NOISE_SEED).standard_normal((len(base.y), 500))
    return _finish(np.concatenate([base.x, noise], axis=1), base.y, base.classes,
                   base.feature_names + tuple(f"noise{j}" for j in range(500)),
                   "synthetic: scikit-learn load_breast_cancer (real features and labels) + 500 N(0,1) "
                   f"noise features from default_rng({NOISE_SEED})", synthetic=True)


def link_misspecified(num_classes: int, n: int = 4000, dim: int = 20, power: float = LINK_POWER
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, W, p): x ~ N(0, I_dim), eta = x W^T with W ~ N(0, 1/dim), y ~ p ∝ exp(sign(eta)|eta|^power)."""
    rng = np.random.default_rng([LINK_SEED, num_classes])
    x = rng.standard_normal((n, dim))
    w = rng.standard_normal((num_classes, dim)) / np.sqrt(dim)
    eta = x @ w.T
    g = np.sign(eta) * np.abs(eta) ** power
    p = np.exp(g - g.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random(n)
    y = np.minimum((np.cumsum(p, axis=1) < u[:, None]).sum(axis=1), num_classes - 1)
    return x, y.astype(np.int64), w, p


def _link(num_classes: int) -> RawTable:
    x, y, _, _ = link_misspecified(num_classes)
    return _finish(x, y, [str(c) for c in range(num_classes)], [f"x{j}" for j in range(x.shape[1])],
                   f"synthetic: link-misspecified, x~N(0,I_20), n=4000, eta=Wx (W~N(0,1/20), C={num_classes}), "
                   f"p ∝ exp(sign(eta)|eta|^{LINK_POWER}), default_rng([{LINK_SEED}, {num_classes}])",
                   synthetic=True)


@register_dataset("link20")
def link20() -> RawTable:
    return _link(20)


@register_dataset("link40")
def link40() -> RawTable:
    return _link(40)


# --- splits --------------------------------------------------------------------------------------------

def table_names() -> list[str]:
    """The registered dataset names whose loaders live here (the tabular ones)."""
    from tasks.common.registry import names

    return [n for n in names("dataset") if getattr(lookup("dataset", n), "__module__", "") == __name__]


def split_indices(y: np.ndarray, *, seed: int = 0, val_fraction: float = 0.1,
                  test_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) row indices: a stratified test split chosen by ``10_000 + seed``, then a
    stratified validation split of the rest chosen by ``seed``."""
    rest, test = stratified_split(y, test_fraction, seed=10_000 + seed)
    train, val = stratified_split(y[rest], val_fraction, seed=seed)
    return rest[train], rest[val], test


def load_table(name: str, *, seed: int = 0, val_fraction: float = 0.1,
               test_fraction: float = 0.3) -> TableSplits:
    """Deterministic, stratified train/val/test splits of a registered table, standardised on train."""
    raw = lookup("dataset", name)()
    if getattr(raw, "kind", "image") != "table":
        raise TypeError(f"dataset {name!r} is not a table; use tasks.common.datasets.load_dataset or "
                        "tasks.common.text.load_text_dataset")
    train, val, test = split_indices(raw.y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    fit = raw.x[train]
    mean = fit.mean(axis=0)
    std = np.where(np.ptp(fit, axis=0) > 0, fit.std(axis=0), 1.0)

    def scaled(idx: np.ndarray) -> np.ndarray:
        return ((raw.x[idx] - mean) / std).astype(np.float32)

    return TableSplits(name, raw.classes, scaled(train), raw.y[train], scaled(val), raw.y[val],
                       scaled(test), raw.y[test], source=raw.source, synthetic=raw.synthetic,
                       mean=mean, std=std)
