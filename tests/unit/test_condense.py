"""The condensed set's Parquet form: what an actor writes is what a student reads back, exactly."""
import numpy as np
import pytest

from pipelines.condense import part_name, read_condensed, write_part
from tasks.sre2l import Recovered, SoftLabels


def _batch(ipc_index: int, classes=(0, 1, 2), epochs=3, seed=0):
    rng = np.random.default_rng(seed + ipc_index)
    n, k = len(classes), 3
    f32 = lambda: rng.random(n).astype(np.float32)  # noqa: E731
    rec = Recovered(images=rng.random((n, 1, 4, 4)).astype(np.float32), labels=np.array(classes),
                    ipc_index=np.full(n, ipc_index), block=np.zeros(n, dtype=np.int64), ce=f32(), confidence=f32(),
                    predicted=np.array(classes), bn_loss=f32(), ce_start=f32(), bn_loss_start=f32())
    ids = ipc_index * k + rec.labels
    soft = SoftLabels(ids, rng.integers(0, 4, (epochs, n, 4)).astype(np.int16), rng.random((epochs, n)) > 0.5,
                      rng.normal(size=(epochs, n, k)).astype(np.float16), 42, (0.5, 1.0), (0.75, 4 / 3), False)
    return rec, soft, ids


def test_parts_round_trip_images_labels_soft_labels_and_provenance(tmp_path):
    written = [_batch(i) for i in (1, 0)]  # written out of order: rows come back by image id
    for i, (rec, soft, ids) in zip((1, 0), written):
        write_part(tmp_path / part_name(i, 0), rec, soft, ids, {"teacher": "runs:/x", "seed": 0})
    images, labels, soft, prov = read_condensed(tmp_path)
    assert prov == {"teacher": "runs:/x", "seed": 0}
    assert images.dtype == np.uint8 and images.shape == (6, 1, 4, 4)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2] and soft.image_ids.tolist() == list(range(6))
    rec0, soft0, _ = written[1]
    np.testing.assert_array_equal(images[:3], np.round(rec0.images * 255).astype(np.uint8))
    np.testing.assert_array_equal(soft.logits[:, :3], soft0.logits)
    np.testing.assert_array_equal(soft.boxes[:, :3], soft0.boxes)
    np.testing.assert_array_equal(soft.flips[:, :3], soft0.flips)
    assert (soft.seed, soft.scale, soft.flip, soft.epochs) == (42, (0.5, 1.0), False, 3)


def test_a_part_is_written_whole_or_not_at_all(tmp_path):
    rec, soft, ids = _batch(0)
    write_part(tmp_path / part_name(0, 0), rec, soft, ids, {})
    assert [p.name for p in tmp_path.iterdir()] == [part_name(0, 0)]  # no temporary left behind
    with pytest.raises(FileNotFoundError):
        read_condensed(tmp_path / "empty")


def test_an_ipc_prefix_reads_the_first_images_of_every_class(tmp_path):
    for i in range(3):
        rec, soft, ids = _batch(i)
        write_part(tmp_path / part_name(i, 0), rec, soft, ids, {})
    images, labels, soft, _ = read_condensed(tmp_path, ipc=2)
    full = read_condensed(tmp_path)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2] and soft.image_ids.tolist() == list(range(6))
    np.testing.assert_array_equal(images, full[0][:6])
    np.testing.assert_array_equal(soft.logits, full[2].logits[:, :6])
    with pytest.raises(ValueError, match="holds IPC 3"):
        read_condensed(tmp_path, ipc=4)
