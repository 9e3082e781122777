import numpy as np
import pytest

from tasks.common.batches import EvalShard, epoch_shard, normalise
from tasks.common.datasets import (
    DatasetUnavailable,
    debian_data_path,
    load_dataset,
    stratified_split,
)


@pytest.mark.parametrize("name,shape,n_total", [("mnist5k", (1, 28, 28), 5000), ("digits", (1, 8, 8), 1797)])
def test_small_datasets_load_with_disjoint_stratified_splits(name, shape, n_total):
    d = load_dataset(name, seed=3)
    assert d.input_shape == shape and d.num_classes == 10 and not d.synthetic
    assert len(d.train_y) + len(d.val_y) + len(d.test_y) == n_total
    assert d.train_x.dtype == np.uint8 and d.train_x.max() > 200
    # stratified: every class is in every split in proportion
    for split in (d.val_y, d.test_y):
        counts = np.bincount(split, minlength=10)
        assert counts.min() >= 0.7 * counts.mean()


def test_splits_depend_only_on_the_seed():
    a, b, c = load_dataset("digits", seed=1), load_dataset("digits", seed=1), load_dataset("digits", seed=2)
    assert np.array_equal(a.val_x, b.val_x) and np.array_equal(a.train_y, b.train_y)
    assert not np.array_equal(a.val_x, c.val_x)


def test_fashion_mnist_is_the_full_set():
    d = load_dataset("fashion_mnist", val_fraction=0.1)
    assert d.input_shape == (1, 28, 28)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (54_000, 6_000, 10_000)
    assert d.classes[9] == "Ankle boot"
    assert abs(d.mean - 0.286) < 0.01 and abs(d.std - 0.353) < 0.01


def test_stratified_split_holds_out_the_fraction_per_class():
    y = np.repeat(np.arange(4), 50)
    rest, held = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(rest, held)) == 0 and len(rest) + len(held) == 200
    assert np.bincount(y[held]).tolist() == [10, 10, 10, 10]


def test_missing_debian_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZELAB_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")  # no apt-get, no dpkg
    with pytest.raises(DatasetUnavailable, match="install the Debian package 'no-such-data'"):
        debian_data_path("no-such-data", "/usr/share/no-such-data/x.gz")


def test_epoch_shards_are_disjoint_and_change_per_epoch():
    shards = [epoch_shard(100, epoch=0, seed=1, rank=r, world=2, micro_batch=16, steps=3) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 48
    assert not set(shards[0]) & set(shards[1])
    again = epoch_shard(100, epoch=0, seed=1, rank=0, world=2, micro_batch=16, steps=3)
    assert np.array_equal(shards[0], again)
    assert not np.array_equal(shards[0], epoch_shard(100, 1, 1, 0, 2, 16, 3))


@pytest.mark.parametrize("n,world,batch", [(10, 2, 4), (7, 2, 4), (1, 2, 8), (33, 3, 5)])
def test_eval_shards_cover_every_row_once_with_equal_batch_counts(n, world, batch):
    seen, counts = [], []
    for r in range(world):
        batches = list(EvalShard(n, r, world, batch).batches())
        counts.append(len(batches))
        for idx, w in batches:
            seen += idx[w > 0].tolist()
    assert len(set(counts)) == 1  # ZeRO-3 needs the same number of forwards on every rank
    assert sorted(seen) == list(range(n))


def test_normalise_matches_the_formula():
    x = np.array([[0, 255]], dtype=np.uint8)
    assert normalise(x, 0.5, 0.25).tolist() == [[-2.0, 2.0]]
