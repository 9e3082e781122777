"""Where jobs keep their checkpoints and run records, and how much CPU a cluster can reach."""
import pytest

from pipelines.core.ray_session import capacity
from pipelines.core.training import RunRecord, default_storage


def test_storage_comes_from_the_config_then_the_cluster_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SQUEEZELAB_STORAGE", raising=False)
    assert default_storage(None).endswith("ray_results")
    monkeypatch.setenv("SQUEEZELAB_STORAGE", "s3://bucket/squeezelab")
    assert default_storage(None) == "s3://bucket/squeezelab"
    assert default_storage(str(tmp_path)) == str(tmp_path)


def test_run_record_round_trips_and_marks_an_event_once(tmp_path):
    record = RunRecord(str(tmp_path / "store"), "run-a")
    assert record.read() is None
    record.write("abc123")
    assert RunRecord(str(tmp_path / "store"), "run-a").read() == "abc123"  # a re-run finds it
    assert RunRecord(str(tmp_path / "store"), "run-b").read() is None
    assert record.first("failure_after_epoch_1") and not record.first("failure_after_epoch_1")
    # the same record through a URI, as for s3:// or gs:// storage
    assert RunRecord(f"file://{tmp_path / 'store'}", "run-a").read() == "abc123"


@pytest.mark.parametrize("have,ceiling,expected", [
    (0, "40", 40), (8, "4", 8), (2, "", 2), (2, "many", 2), (0, "12.5", 12.5),
])
def test_capacity_is_the_larger_of_what_is_there_and_the_declared_ceiling(have, ceiling, expected):
    assert capacity(have, ceiling) == expected
