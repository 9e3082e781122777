"""Batch-score a customer table with a churn model from MLflow: Parquet in, Parquet out, on Ray Data.

    python -m pipelines.score --config pipelines/configs/score_telco.yaml input=customers.parquet output=out/
    python -m pipelines.score --config pipelines/configs/score_telco.yaml --smoke        # what CI runs
    ray job submit --working-dir . --runtime-env clusters/runtime_env.yaml \\
        -- python -m pipelines.score --config pipelines/configs/score_telco.yaml input=s3://... output=s3://...

The model (``model``: ``runs:/<id>`` or ``models:/<name>@<alias>`` of a ``pipelines.churn`` run: weights,
campaign and feature encoder, no pickle) is read once by the driver and shipped to an actor pool
(``actors`` x ``cpus_per_actor``). Ray Data hands the actors the table's row groups; each actor reads its
row group itself in slices of ``batch_size`` rows, validates them (tasks.churn.validate_rows), scores the
valid rows and appends them to one scored and one rejects part per row group, so nothing but a small
summary per row group travels back, and an actor's memory does not grow with the table:

    <output>/scored/part-*.parquet    every valid row + churn_probability, expected_profit, target
    <output>/rejects/part-*.parquet   every rejected row as it came + reason (never silently dropped)
    <output>/targets.parquet          the ranked target list: the ``top`` targeted customers by expected
                                      profit (id, probability, expected profit, CLV), best first
    <output>/summary.json             rows in / scored / rejected / targeted, expected profit, histogram

Rows in (from the Parquet metadata) must equal scored + rejected; the job fails if they do not. The MLflow
run logs the counts, the expected profit of the campaign, throughput, the score histogram (plot) and
the summary. ``make_table`` writes test tables: Telco-like customers resampled from the real table, with
a given number of deliberately broken rows.

Scale (benchmarks/score_scale.py, docs/results/score_scale.md): the job's memory stays flat in the table's
size: ~1.5 GB summed over every process of a local Ray on 2 CPUs, of which ~0.8 GB are the job's own
(driver ~0.3, each scoring actor ~0.23: Ray and pandas imports ~0.18, a 16Ki-row slice ~0.05; no torch, as
ChurnModel scores with numpy) and ~0.7 GB Ray's runtime on the node (daemons, and Ray Data's coordinator,
stats and actor-location actors). One pandas process holding the whole table takes ~1.5 KB a row.
Parallelism comes from row groups: a table needs at least ``actors`` of them (pyarrow writes 1Mi-row
groups by default).
"""
from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from pipelines.core import tracking
from pipelines.core.config import ConfigError, JobConfig, run_cli

HIST_BINS = 20  # churn-probability histogram over [0, 1]


class ScoreConfig(JobConfig):
    experiment: str = "churn"
    run_name: str | None = None
    model: str = "models:/churn-telco@current"  # a pipelines.churn model (runs:/<id> or models:/<name>@<alias>)
    input: str  # a Parquet file or folder (local path, or a URI pyarrow reads: s3://, gs://)
    output: str  # a folder; scored/ and rejects/ in it are replaced
    id_column: str = "customer_id"  # carried into every output; the target list names customers by it
    top: int = Field(100_000, ge=1)  # length of the ranked target list (the campaign's capacity)
    # rows an actor reads, scores and writes at a time: its memory above the ~0.3 GB of imports is ~2 KB a
    # row of it (validate_rows' Python strings); a slice is one row group of the actor's part file
    batch_size: int = Field(16_384, ge=1)
    actors: int = Field(2, ge=1)  # scoring actors (each holds the model)
    cpus_per_actor: float = Field(1.0, gt=0)
    # write a Telco-like table of this many rows (1 in 500 broken) at ``input`` first (``make_table``)
    make_input_rows: int | None = Field(None, ge=1)

    SMOKE: ClassVar[dict[str, Any]] = {"make_input_rows": 5000, "batch_size": 1024}


class Scorer:
    """A Ray Data actor: the churn model, loaded once from its files. Each call gets Parquet fragments (a
    file's row group: path, index), reads each itself in slices of ``batch_size`` rows, scores them and
    appends them to one scored and one rejects part per fragment (``PartWriter``), and returns one summary
    row per fragment. Rows never pass through the object store: an actor holds one slice at a time, so
    its memory stays flat however large the table or its row groups."""

    def __init__(self, files: dict[str, bytes], output: str, id_column: str, top: int, batch_size: int):
        from tasks.churn import ChurnModel  # numpy only: no torch in a scoring actor (~180 MB each)

        with tempfile.TemporaryDirectory() as tmp:
            for name, blob in files.items():
                (Path(tmp) / name).write_bytes(blob)
            self.model = ChurnModel.load(tmp)
        self.output, self.id_column, self.top, self.batch_size = output, id_column, top, batch_size

    def __call__(self, fragments):
        import pandas as pd

        return pd.DataFrame([self.fragment(str(path), int(group))
                             for path, group in zip(fragments["path"], fragments["row_group"])])

    def fragment(self, path: str, group: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        clv = self.model.encoder.clv_column
        totals = {"rows": 0, "scored": 0, "rejected": 0, "targeted": 0, "expected_profit": 0.0}
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        top = TopK(self.top)
        part = uuid.uuid4().hex
        fs, where = _fs(path)
        with fs.open_input_file(where) as f, PartWriter(f"{self.output}/scored/part-{part}.parquet") as good, \
                PartWriter(f"{self.output}/rejects/part-{part}.parquet") as bad:
            # no thread pools in a 1-CPU actor: on a busy node their hand-offs cost more than they save
            # (measured: 4x the wall time of reading 16Ki-row slices at load 5 on 2 CPUs)
            for piece in pq.ParquetFile(f).iter_batches(batch_size=self.batch_size, row_groups=[group],
                                                        use_threads=False):
                scored, rejected = self.model.score_frame(piece.to_pandas(use_threads=False))
                good.write(scored)
                bad.write(rejected)
                targeted = scored[scored["target"]]
                best = targeted.nlargest(self.top, "expected_profit")
                top.add(best[self.id_column].astype(str).to_numpy(), best["churn_probability"].to_numpy(),
                        best["expected_profit"].to_numpy(), best[clv].to_numpy(dtype=np.float64))
                hist += np.histogram(scored["churn_probability"], bins=HIST_BINS, range=(0.0, 1.0))[0]
                for key, value in (("rows", piece.num_rows), ("scored", len(scored)), ("rejected", len(rejected)),
                                   ("targeted", len(targeted)),
                                   ("expected_profit", float(targeted["expected_profit"].sum()))):
                    totals[key] += value
        best = top.frame
        return {**totals, "hist": hist.tolist(), "top_id": best["customer"].tolist(),
                "top_p": best["churn_probability"].tolist(), "top_profit": best["expected_profit"].tolist(),
                "top_clv": best["clv"].tolist()}


class PartWriter:
    """One Parquet part, written slice by slice (a row group each) and published only when complete: it is
    written under a hidden name (``.<name>.tmp``, which Parquet readers skip) and renamed on a clean exit,
    removed on an error, so a failed or retried actor call leaves no partial part and no duplicate rows.
    Nothing is written for no rows. Object columns are text (``_arrow_table``), also while all-null; a slice
    whose column types differ from the part's is cast to them, or, if it cannot be, starts a part of its own."""

    def __init__(self, path: str):
        self.path, self.writer, self.done = path, None, []

    def __enter__(self) -> "PartWriter":
        return self

    def write(self, frame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not len(frame):
            return
        table = _arrow_table(frame, threads=1)
        if self.writer is not None and not table.schema.equals(self.writer.schema, check_metadata=False):
            try:
                table = table.cast(self.writer.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError):
                self._publish()
        if self.writer is None:
            # an object column with no value yet (null type) is text in every later slice: start it as text
            table = table.cast(pa.schema([f.with_type(pa.large_string()) if pa.types.is_null(f.type) else f
                                          for f in table.schema], metadata=table.schema.metadata))
            final = self.path if not self.done else self.path.replace(".parquet", f"-{len(self.done)}.parquet")
            fs, where = _fs(final)
            fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
            folder, name = where.rsplit("/", 1)
            self.fs, self.tmp, self.final = fs, f"{folder}/.{name}.tmp", where
            self.writer = pq.ParquetWriter(self.tmp, table.schema, filesystem=fs)
        self.writer.write_table(table)

    def _publish(self) -> None:
        self.writer.close()
        self.fs.move(self.tmp, self.final)
        self.writer = None
        self.done.append(self.final)

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            if self.writer is not None:
                self._publish()
            return
        doomed = list(self.done)  # an error: nothing of this part stays
        if self.writer is not None:
            doomed.append(self.tmp)
            try:
                self.writer.close()
            except OSError:
                pass
        for path in doomed:
            try:
                self.fs.delete_file(path)
            except OSError:
                pass


def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path if "://" in path else str(Path(path).absolute()))


def fragments(source: str) -> list[dict[str, Any]]:
    """Every row group of the Parquet file or folder ``source``: path, index, rows (read from footers)."""
    import pyarrow.fs
    import pyarrow.parquet as pq

    fs, where = _fs(source)
    info = fs.get_file_info(where)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"input: no such file or folder {source}")
    if info.type == pyarrow.fs.FileType.Directory:
        found = fs.get_file_info(pyarrow.fs.FileSelector(where, recursive=True))
        paths = sorted(f.path for f in found if f.type == pyarrow.fs.FileType.File and f.path.endswith(".parquet"))
    else:
        paths = [where]
    if not paths:
        raise ConfigError(f"input: no .parquet files in {source}")
    scheme = source.split("://", 1)[0] + "://" if "://" in source else ""
    out = []
    for p in paths:
        with fs.open_input_file(p) as f:
            meta = pq.ParquetFile(f).metadata
        out += [{"path": scheme + p, "row_group": i, "rows": meta.row_group(i).num_rows} for i in range(meta.num_row_groups)]
    return out


def _arrow_table(frame, threads: int | None = None):
    """A pandas frame as an Arrow table, without its index, converted by ``threads`` threads (pyarrow's
    choice when None). Object columns (a rejected row's bad value next to good ones) become strings: None
    and float NaN become nulls, every other cell str(cell)."""
    import pyarrow as pa
    from pandas.api.types import infer_dtype

    mixed = [c for c in frame.columns[frame.dtypes == object]
             if infer_dtype(frame[c], skipna=False) != "string"]  # all str (a validated column): as it is
    if mixed:
        frame = frame.copy(deep=False)  # new columns, the caller's frame untouched
        for c in mixed:
            frame[c] = frame[c].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    return pa.Table.from_pandas(frame, preserve_index=False, nthreads=threads)


def write_parquet(frame, path: str, row_group_rows: int | None = None) -> None:
    """A pandas frame to one Parquet file at a local path or URI (pyarrow filesystems: s3://, gs://), in
    row groups of ``row_group_rows`` (pyarrow's default, 1Mi rows, when None)."""
    import pyarrow.parquet as pq

    fs, where = _fs(path)
    fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
    pq.write_table(_arrow_table(frame), where, filesystem=fs, row_group_size=row_group_rows)


def write_text(text: str, path: str) -> None:
    fs, where = _fs(path)
    with fs.open_output_stream(where) as f:
        f.write(text.encode())


def _clear(path: str) -> None:
    import pyarrow.fs

    fs, where = _fs(path)
    if fs.get_file_info(where).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(where)


class TopK:
    """The ``k`` best (expected profit) targeted customers seen so far, merged batch by batch."""

    def __init__(self, k: int):
        import pandas as pd

        self.k, self.frame = k, pd.DataFrame(columns=["customer", "churn_probability", "expected_profit", "clv"])

    def add(self, ids, p, profit, clv) -> None:
        import pandas as pd

        new = pd.DataFrame({"customer": ids, "churn_probability": p, "expected_profit": profit, "clv": clv})
        both = pd.concat([self.frame, new], ignore_index=True) if len(self.frame) else new
        self.frame = both.nlargest(self.k, "expected_profit")


def make_table(path: str | Path, rows: int, seed: int = 0, bad_rows: int = 0, chunk: int = 1_000_000,
               id_column: str = "customer_id", row_group_rows: int | None = None) -> Path:
    """Write a Telco-like customer table of ``rows`` rows to the Parquet folder ``path``: real Telco
    customers resampled with replacement (no churn label; a fresh id each), in files of ``chunk`` rows
    (row groups of ``row_group_rows``: the unit of work of the scoring actors), with
    ``bad_rows`` of them broken in ways a scoring job must reject (a missing value, a non-numeric charge, an
    unknown contract type, a negative CLV), spread over the table. Not synthetic in its values (each row is
    a real customer's), synthetic in its size."""
    from tasks.churn import CLV, LABEL, telco

    base = telco().drop(columns=[LABEL])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bad = np.sort(rng.choice(rows, size=min(bad_rows, rows), replace=False))
    kinds = ["missing", "text", "category", "clv"]
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        frame = base.iloc[rng.integers(0, len(base), n)].reset_index(drop=True)
        frame.insert(0, id_column, [f"c{start + i:09d}" for i in range(n)])
        mine = bad[(bad >= start) & (bad < start + n)] - start
        if len(mine):
            frame["total_charges"] = frame["total_charges"].astype(object)
            for j, k in enumerate(mine):
                kind = kinds[(start + j) % len(kinds)]
                if kind == "missing":
                    frame.at[k, "monthly_charges"] = np.nan
                elif kind == "text":
                    frame.at[k, "total_charges"] = "n/a"
                elif kind == "category":
                    frame.at[k, "contract"] = "Lifetime"
                else:
                    frame.at[k, CLV] = -1.0
        write_parquet(frame, str(path / f"part-{start // chunk:05d}.parquet"), row_group_rows)
    return path


def _histogram_plot(hist: np.ndarray, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, HIST_BINS + 1)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", edgecolor="white")
    ax.set(xlabel="churn probability", ylabel="customers", title=title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(cfg: ScoreConfig) -> str:
    import mlflow
    import pyarrow.parquet as pq
    import ray

    from pipelines.core.ray_session import ensure_ray, require_cpus

    tracking.tracking_uri()  # fails early (exit 2) when a submitted job has no store
    model_dir = tracking.download_configured_model(cfg.model, "model")
    spec = json.loads((model_dir / "model.json").read_text())
    if spec.get("model") != "churn_net" or not spec.get("encoder"):
        raise ConfigError(f"model: {cfg.model} is a {spec.get('model')!r}, not a churn model with an encoder "
                          "(pipelines.churn with method pno, logistic, cost_sensitive or empc)")
    if cfg.make_input_rows:
        make_table(cfg.input, cfg.make_input_rows, seed=0, bad_rows=max(4, cfg.make_input_rows // 500),
                   id_column=cfg.id_column)
    parts = fragments(cfg.input)
    fs, first = _fs(parts[0]["path"])
    with fs.open_input_file(first) as f:
        columns = pq.ParquetFile(f).schema_arrow.names
    if cfg.id_column not in columns:
        raise ConfigError(f"id_column: the input has no column {cfg.id_column!r} (it has {', '.join(columns[:8])}, ...)")

    ensure_ray(dashboard=False)  # a local Ray: no dashboard (~0.25 GB); Ray Data needs none
    require_cpus(cfg.actors * cfg.cpus_per_actor, "actors")
    for sub in ("scored", "rejects"):
        _clear(f"{cfg.output}/{sub}")
    files = {f.name: f.read_bytes() for f in model_dir.iterdir() if f.is_file()}
    name = cfg.run_name or time.strftime("score-%Y%m%d-%H%M%S")
    tags = {"model": cfg.model, "method": spec.get("method", ""), "input": cfg.input}
    with tracking.job_run(cfg, "score", cfg.experiment, name, tags=tags) as run:
        # the dataset is the list of row groups; the actors read them. (ray.data.read_parquet would add
        # read and list tasks that each want a CPU: with the actors holding every CPU of a small node they
        # never ran and the job hung; and every row would cross the object store twice.)
        rows_in = sum(p["rows"] for p in parts)  # from the Parquet footers: no data read
        ds = ray.data.from_items(parts, override_num_blocks=len(parts))
        print(f"[score] {name}: {rows_in:,} rows ({len(parts)} row groups) from {cfg.input} through {cfg.actors} x {cfg.cpus_per_actor:g}-CPU "
              f"actors holding {cfg.model} ({spec.get('method')}); MLflow run {run.info.run_id}", flush=True)
        summaries = ds.map_batches(
            Scorer, fn_constructor_kwargs={"files": files, "output": cfg.output, "id_column": cfg.id_column,
                                           "top": cfg.top, "batch_size": cfg.batch_size},
            batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.cpus_per_actor)
        totals = {"rows": 0, "scored": 0, "rejected": 0, "targeted": 0, "expected_profit": 0.0}
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        top = TopK(cfg.top)
        t0 = time.perf_counter()
        last = t0
        for part in summaries.iter_batches(batch_size=None, batch_format="pandas"):
            for row in part.itertuples(index=False):
                for key in totals:
                    totals[key] += getattr(row, key)
                hist += np.asarray(row.hist, dtype=np.int64)
                top.add(list(row.top_id), list(row.top_p), list(row.top_profit), list(row.top_clv))
            if time.perf_counter() - last > 10:  # progress on long tables
                last = time.perf_counter()
                print(f"[score] {totals['rows']:,} / {rows_in:,} rows ({totals['rows'] / (last - t0):,.0f} rows/s)",
                      flush=True)
        seconds = time.perf_counter() - t0
        if totals["rows"] != rows_in or totals["scored"] + totals["rejected"] != rows_in:
            raise RuntimeError(f"row count mismatch: {rows_in:,} in, {totals['scored']:,} scored + "
                               f"{totals['rejected']:,} rejected (of {totals['rows']:,} seen)")
        targets = top.frame.sort_values("expected_profit", ascending=False, kind="stable").reset_index(drop=True)
        targets.insert(0, "rank", np.arange(1, len(targets) + 1))
        write_parquet(targets.rename(columns={"customer": cfg.id_column}), f"{cfg.output}/targets.parquet")
        summary = {**totals, "rows_in": rows_in, "seconds": seconds, "rows_per_s": rows_in / max(seconds, 1e-9),
                   "top_listed": len(targets), "top_expected_profit": float(targets["expected_profit"].sum()),
                   "histogram": {"bins": HIST_BINS, "counts": hist.tolist()}}
        write_text(json.dumps(summary, indent=2), f"{cfg.output}/summary.json")
        mlflow.log_metrics({"rows_in": rows_in, "scored": totals["scored"], "rejected": totals["rejected"],
                            "targeted": totals["targeted"], "expected_profit": totals["expected_profit"],
                            "top_expected_profit": summary["top_expected_profit"], "seconds": seconds,
                            "rows_per_s": summary["rows_per_s"]})
        mlflow.log_dict(summary, "summary.json")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(_histogram_plot(hist, Path(tmp) / "score_histogram.png",
                                                    f"churn probability, {totals['scored']:,} scored customers")))
        print(f"[score] {rows_in:,} rows in = {totals['scored']:,} scored + {totals['rejected']:,} rejected; "
              f"{totals['targeted']:,} targeted, expected profit {totals['expected_profit']:,.0f} "
              f"(top {len(targets):,}: {summary['top_expected_profit']:,.0f}); {summary['rows_per_s']:,.0f} rows/s; "
              f"outputs in {cfg.output}", flush=True)
    print(f"[score] done: MLflow run {run.info.run_id}", flush=True)
    return run.info.run_id


if __name__ == "__main__":
    run_cli(ScoreConfig, main)
