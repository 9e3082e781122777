import functools

import numpy as np
import pytest

from tasks.common.registry import lookup, names
from tasks.common.tables import (RawTable, TableSplits, link_misspecified, load_table, split_indices,
                                 table_names)

# name -> (rows, features after encoding, classes, synthetic)
EXPECTED = {
    "iris": (150, 4, 3, False),
    "wine": (178, 13, 3, False),
    "breast_cancer": (569, 30, 2, False),
    "letter": (20000, 16, 26, False),
    "satellite": (6435, 36, 6, False),
    "vehicle": (846, 18, 4, False),
    "vowel": (990, 9, 11, False),
    "glass": (214, 9, 6, False),
    "shuttle": (58000, 9, 7, False),
    "dna": (3186, 180, 3, False),
    "soybean": (683, 117, 19, False),
    "sonar": (208, 60, 2, False),
    "ionosphere": (351, 33, 2, False),
    "pima": (768, 8, 2, False),
    "highdim_binary": (800, 1000, 2, True),
    "breast_cancer_noise": (569, 530, 2, True),
    "link20": (4000, 20, 20, True),
    "link40": (4000, 20, 40, True),
}
NAMES = sorted(EXPECTED)


@functools.cache
def raw(name: str) -> RawTable:
    return lookup("dataset", name)()


@functools.cache
def splits(name: str, seed: int = 0) -> TableSplits:
    return load_table(name, seed=seed)


def test_every_table_is_registered():
    assert sorted(table_names()) == NAMES
    assert set(NAMES) <= set(names("dataset"))


@pytest.mark.parametrize("name", NAMES)
def test_raw_table_shapes_labels_and_flags(name):
    r = raw(name)
    n, d, c, synthetic = EXPECTED[name]
    assert r.kind == "table" and r.synthetic is synthetic
    assert r.source.startswith("synthetic") == synthetic
    assert r.x.shape == (n, d) and r.x.dtype == np.float64
    assert r.y.shape == (n,) and r.y.dtype == np.int64
    assert len(r.classes) == c and len(set(r.classes)) == c
    assert len(r.feature_names) == d and len(set(r.feature_names)) == d
    assert np.array_equal(np.unique(r.y), np.arange(c))  # contiguous, every class present
    assert np.isfinite(r.x).all()  # no NaN left after imputation
    assert (np.ptp(r.x, axis=0) > 0).all()  # constant columns dropped


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_stratified_standardised_and_consistent(name):
    r, s = raw(name), splits(name)
    assert s.name == name and s.classes == r.classes and s.num_classes == len(r.classes)
    assert s.input_shape == (r.x.shape[1],) and s.source == r.source and s.synthetic == r.synthetic
    train, val, test = split_indices(r.y, seed=0)
    for x, y, idx in ((s.train_x, s.train_y, train), (s.val_x, s.val_y, val), (s.test_x, s.test_y, test)):
        assert x.dtype == np.float32 and y.dtype == np.int64 and np.isfinite(x).all()
        assert np.array_equal(y, r.y[idx])
        np.testing.assert_allclose(x, (r.x[idx] - s.mean) / s.std, rtol=1e-5, atol=1e-4)
    counts = np.bincount(r.y)
    n_test = np.bincount(s.test_y, minlength=len(counts))
    n_val = np.bincount(s.val_y, minlength=len(counts))
    assert np.array_equal(n_test, np.round(0.3 * counts))  # stratified: every class loses its share
    assert np.array_equal(n_val, np.round(0.1 * (counts - n_test)))
    assert len(s.train_y) + len(s.val_y) + len(s.test_y) == len(r.y)
    # standardised with the training split's statistics
    varying = np.ptp(r.x[train], axis=0) > 0
    assert np.allclose(s.train_x.mean(axis=0), 0, atol=1e-3)
    assert np.allclose(s.train_x[:, varying].std(axis=0), 1, atol=1e-3)
    assert np.all(s.std[~varying] == 1) and np.all(s.std > 0)
    np.testing.assert_allclose(s.mean, r.x[train].mean(axis=0))


@pytest.mark.parametrize("name", ["glass", "soybean", "link40", "shuttle"])
def test_split_indices_are_disjoint_cover_and_depend_only_on_the_seed(name):
    y = raw(name).y
    train, val, test = split_indices(y, seed=0)
    everything = np.concatenate([train, val, test])
    assert len(everything) == len(y) and np.array_equal(np.sort(everything), np.arange(len(y)))
    again = split_indices(y, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    other = split_indices(y, seed=1)
    assert not np.array_equal(other[2], test) and not np.array_equal(other[1], val)


def test_load_table_is_deterministic_per_seed():
    a, b, c = splits("sonar", 0), load_table("sonar", seed=0), splits("sonar", 1)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.test_x, c.test_x)
    # the same rows overall, only redistributed
    rows = lambda s: np.sort(np.concatenate([s.train_y, s.val_y, s.test_y]))  # noqa: E731
    assert np.array_equal(rows(a), rows(c))


@pytest.mark.parametrize("name", ["highdim_binary", "breast_cancer_noise", "link20"])
def test_synthetic_data_do_not_depend_on_anything_but_fixed_seeds(name):
    fresh = lookup("dataset", name)()
    assert np.array_equal(fresh.x, raw(name).x) and np.array_equal(fresh.y, raw(name).y)


def test_breast_cancer_noise_keeps_the_real_data_and_labels():
    base, noisy = raw("breast_cancer"), raw("breast_cancer_noise")
    assert np.array_equal(noisy.x[:, :30], base.x) and np.array_equal(noisy.y, base.y)
    noise = noisy.x[:, 30:]
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    assert "real" in noisy.source and "noise" in noisy.source


def test_link_misspecified_labels_follow_the_distorted_link():
    x, y, w, p = link_misspecified(20)
    assert w.shape == (20, 20) and np.allclose(p.sum(axis=1), 1)
    eta = x @ w.T
    g = np.sign(eta) * np.abs(eta) ** 1.7
    np.testing.assert_allclose(np.log(p) - np.log(p).mean(1, keepdims=True), g - g.mean(1, keepdims=True),
                               atol=1e-8)
    # arg-max of the link is the arg-max of eta; the sampled label agrees about as often as p says
    assert np.array_equal(p.argmax(1), eta.argmax(1))
    assert abs((y == p.argmax(1)).mean() - p.max(1).mean()) < 0.03


def test_mlbench_encoding_details():
    vowel, iono, soy, dna = raw("vowel"), raw("ionosphere"), raw("soybean"), raw("dna")
    assert "V1" not in vowel.feature_names and vowel.feature_names[0] == "V2"  # speaker dropped
    assert np.bincount(vowel.y).tolist() == [90] * 11
    assert not {"V2", "V2=0"} & set(iono.feature_names) and "V3" in iono.feature_names  # constant V2 dropped
    assert iono.feature_names[0] == "V1=1" and set(np.unique(iono.x[:, 0])) == {0.0, 1.0}
    assert soy.classes[0] == "2-4-d-injury" and np.bincount(soy.y).min() == 8
    na = [f for f in soy.feature_names if f.endswith("=NA")]
    assert len(na) == 34 and "date=NA" in na  # every column but 'leaves' has missing values
    assert set(np.unique(dna.x)) == {0.0, 1.0}
    assert raw("shuttle").classes[0] == "Rad.Flow" and np.bincount(raw("shuttle").y).tolist() == [
        45586, 50, 171, 8903, 3267, 10, 13]
    assert raw("glass").classes == ("1", "2", "3", "5", "6", "7")


def test_load_table_refuses_other_kinds():
    with pytest.raises(TypeError):
        load_table("digits")
