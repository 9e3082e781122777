"""The scoring actor of pipelines.score without Ray: what it writes, part by part, is what score_frame says of
the whole table, and a part that fails leaves nothing behind."""
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.score import PartWriter, Scorer, _arrow_table, fragments, make_table
from tasks import churn as C


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    frame = C.telco()
    enc = C.FeatureEncoder.fit(frame)
    model = C.fit_logistic(enc.transform(frame), frame[C.LABEL], frame[C.CLV], C.TELCO_CAMPAIGN, encoder=enc)
    return model.save(tmp_path_factory.mktemp("model"))


def test_actor_parts_hold_every_row_scored_as_score_frame_scores_the_whole_table(model_dir, tmp_path):
    table = make_table(tmp_path / "t", 3000, seed=1, bad_rows=12, chunk=2000, row_group_rows=500)
    parts = fragments(str(table))
    assert [p["rows"] for p in parts] == [500] * 6  # 2 files, row groups of 500 rows
    threads = torch.get_num_threads()
    try:
        actor = Scorer({f.name: f.read_bytes() for f in model_dir.iterdir()}, str(tmp_path / "out"), "customer_id",
                       top=40, batch_size=128)  # slices of 128 rows: 4 row groups of a part each
        summaries = actor({"path": np.array([p["path"] for p in parts]),
                           "row_group": np.array([p["row_group"] for p in parts])})
    finally:
        torch.set_num_threads(threads)
    assert summaries["rows"].tolist() == [500] * 6
    files = {sub: sorted((tmp_path / "out" / sub).iterdir()) for sub in ("scored", "rejects")}
    assert len(files["scored"]) == 6 and len(files["rejects"]) <= 6  # one part per row group, none hidden
    assert all(f.name.startswith("part-") and f.suffix == ".parquet" for f in files["scored"] + files["rejects"])
    assert pq.ParquetFile(files["scored"][0]).metadata.num_row_groups == 4

    whole = pd.read_parquet(table)
    want, want_rejected = C.ChurnModel.load(model_dir).score_frame(whole)
    scored = pd.read_parquet(tmp_path / "out" / "scored").set_index("customer_id").loc[want.customer_id]
    rejected = pd.read_parquet(tmp_path / "out" / "rejects").set_index("customer_id")
    assert len(scored) == len(want) == summaries["scored"].sum() and len(rejected) == 12 == summaries["rejected"].sum()
    assert sorted(rejected.index) == sorted(want_rejected.customer_id)
    assert rejected.loc[want_rejected.customer_id, "reason"].tolist() == want_rejected["reason"].tolist()
    np.testing.assert_allclose(scored["churn_probability"], want["churn_probability"], rtol=0, atol=1e-6)
    assert (scored["target"].to_numpy() == want["target"].to_numpy()).all()
    assert summaries["targeted"].sum() == want["target"].sum()
    assert sum(summaries["hist"].map(sum)) == len(want)
    # each row group's top 40, merged, is the whole table's top 40
    tops = pd.concat([pd.DataFrame({"id": r.top_id, "profit": r.top_profit}) for r in summaries.itertuples()])
    assert all(len(r.top_id) <= 40 for r in summaries.itertuples())
    best = want[want["target"]].nlargest(40, "expected_profit")["expected_profit"].to_numpy()
    np.testing.assert_allclose(np.sort(tops["profit"].nlargest(40).to_numpy()), np.sort(best), rtol=1e-6)


def test_a_part_is_published_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "scored" / "part-x.parquet")
    with PartWriter(path) as w:
        w.write(pd.DataFrame({"a": np.array([None, None], dtype=object), "b": [1.0, 2.0]}))  # a: null so far
        w.write(pd.DataFrame({"a": np.array(["x", 7], dtype=object), "b": [3.0, 4.0]}))     # text from here
        assert [p.name for p in (tmp_path / "scored").iterdir()] == [".part-x.parquet.tmp"]  # readers skip it
    back = pd.read_parquet(tmp_path / "scored")
    assert back["a"].isna().tolist() == [True, True, False, False] and back["a"].tolist()[2:] == ["x", "7"]
    assert back["b"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert pq.ParquetFile(path).metadata.num_row_groups == 2

    with pytest.raises(RuntimeError), PartWriter(str(tmp_path / "rejects" / "part-y.parquet")) as w:
        w.write(pd.DataFrame({"a": ["x"]}))
        raise RuntimeError("the actor died mid-part")
    assert list((tmp_path / "rejects").iterdir()) == []


def test_object_columns_become_strings_with_nulls_for_none_and_nan():
    frame = pd.DataFrame({"mixed": np.array([1.5, "n/a", None, np.nan], dtype=object),
                          "text": np.array(["a", "b", "c", "d"], dtype=object), "x": [1.0, 2.0, 3.0, 4.0]})
    table = _arrow_table(frame)
    assert table.column("mixed").to_pylist() == ["1.5", "n/a", None, None]
    assert table.column("text").to_pylist() == ["a", "b", "c", "d"]
    assert str(table.schema.field("x").type) == "double"
    assert frame["mixed"].tolist()[0] == 1.5  # the caller's frame is left as it was
