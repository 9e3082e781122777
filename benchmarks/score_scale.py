"""Scoring a large customer table: the Ray Data job (pipelines/score.py) vs one pandas process.

    python benchmarks/score_scale.py                                  # what `make bench-score` runs: 1M, 10M, 30M rows
    python benchmarks/score_scale.py --rows 1M,2M --report /tmp/score_scale.md     # a quick look (~5 min)
    python benchmarks/score_scale.py --model runs:/<id>/model --workdir /big/disk --keep

For each table size in ``--rows`` the table is written once (``pipelines.score.make_table``: Telco-like
customers, real Telco rows resampled with a fresh id each, 1 in 500 deliberately broken; Parquet files of
1M rows in row groups of ``--row-group`` rows) and scored twice, one contender after the other:

- pandas: ONE process, the way a data scientist would: ``pd.read_parquet`` of the whole table,
  ``ChurnModel.score_frame`` (the same ``validate_rows`` and model), then scored/rejects Parquet and the
  ranked top-``top`` target list written with the job's own writer. Its peak memory grows with the table.
- Ray Data: the job exactly as users run it, ``python -m pipelines.score --config
  pipelines/configs/score_telco.yaml input=... output=... model=...``, as a subprocess that starts its own
  local Ray (RAY_ADDRESS is removed from its environment).

Memory: every ~0.2 s the PSS (proportional set size: shared pages, such as the object store's shared
memory and the shared libraries, are split between the processes that map them, so nothing is counted
twice) of the contender's process and all its descendants is summed; for the Ray job that is the driver,
gcs_server, raylet (which holds the object store), dashboard, agents and every worker, all started by the
driver. The report gives the peak of that sum (and for pandas also the kernel's exact peak RSS of the
process), plus the growth of the system's shared memory (/dev/shm, where the object store lives).

Throughput: rows / seconds of the scoring itself (pandas: read to last file written; Ray: the job's own
``seconds`` in summary.json, from the first batch requested to the last summary back, actor start-up
included) and rows / end-to-end wall time of the subprocess (interpreter, imports, model download, Ray
start-up and shutdown included). Both contenders' counts and target lists are checked to agree.

Writes docs/results/score_scale.md and score_scale.png (``--report``). Needs a registered churn model
(``--model``, default models:/churn-telco@current): ``python -m pipelines.churn --config
pipelines/configs/churn_telco.yaml`` registers one in ~10 s. Disk: ~15 bytes a row for the table plus
~45 for the two contenders' outputs (30M rows: ~2 GB), checked before each size; deleted after it
unless ``--keep``. Memory: the pandas process needs ~1.5 KB a row (10M rows: ~16 GB); a size it cannot
fit in ``--pandas-memory`` is reported as such and only the Ray job runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "pipelines/configs/score_telco.yaml"
BYTES_PER_ROW = 75  # disk: table 15 B + pandas output 18 B + Ray output 28 B (measured at 2M rows) + slack
PANDAS_BYTES_PER_ROW = 1_600  # the pandas process' memory a row, until measured here (1.5 KB at 1M-2M rows)
TARGET_RATIO, TARGET_GB = 1.0, 1.0  # issue 11: Ray >= 1.0x pandas' rows/s, peak <= 1 GB, flat in rows
GB = 1e9
# the job's own processes; everything else in the tree is Ray's runtime on the node (daemons, and the actors
# Ray Data starts with its first job there), which a cluster has whether or not this job runs
JOB_KINDS = ("driver", "scoring actors")
RAY_DATA_RUNTIME = ("_AutoscalingCoordinatorActor", "_StatsActor", "ActorLocationTracker")


def parse_rows(text: str) -> list[int]:
    """'1M,10M,30M' or '1000000,2_000_000' -> [1000000, ...]."""
    out = []
    for item in text.split(","):
        item = item.strip().replace("_", "").upper()
        scale = {"K": 10**3, "M": 10**6}.get(item[-1:], 1)
        out.append(int(float(item.rstrip("KM")) * scale))
    return out


def human(rows: int) -> str:
    return f"{rows / 1e6:g}M" if rows >= 10**6 and rows % 10**5 == 0 else f"{rows:,}"


# ------------------------------------------------------------------------------------------- memory
def _name(p) -> str:
    try:
        return p.name()
    except Exception:  # noqa: BLE001 - gone
        return "?"


class TreeMemory:
    """Samples, every ``interval`` s, the summed PSS of a process and all its descendants (processes seen
    once stay counted while they live, even if re-parented). ``peak`` is the largest sum seen; ``at_peak``
    its split by kind of process; ``shm_growth`` the largest growth of the system's Shmem (/proc/meminfo).
    Past ``limit`` bytes the process is killed (``over`` set): on a shared machine the kernel's OOM killer
    might pick someone else's process instead."""

    def __init__(self, pid: int, interval: float = 0.2, limit: float | None = None):
        import psutil

        self.root, self.interval, self.limit, self.over = psutil.Process(pid), interval, limit, False
        self.procs: dict[int, object] = {pid: self.root}
        self.peak, self.at_peak, self.samples, self.kinds_seen = 0, {}, 0, set()
        self.procs_at_peak: list[tuple[int, int, str]] = []  # (pss, pid, kind) at the peak, largest first
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU s used by its last sample)
        self.shm0 = self.shm_growth = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _shmem() -> int:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Shmem:"):
                    return int(line.split()[1]) * 1024
        return 0

    def kind(self, p) -> str:
        if p.pid == self.root.pid:
            return "driver"
        name = _name(p)
        try:
            cmd = " ".join(p.cmdline()[:3])
        except Exception:  # noqa: BLE001 - gone or unreadable
            cmd = ""
        if name.startswith("ray::MapWorker") or "Scorer" in name:
            return "scoring actors"
        if name.startswith("ray::") and "Agent" in name:
            return "agents"
        if name.startswith("ray::") and name.removeprefix("ray::").split(".")[0] in RAY_DATA_RUNTIME:
            return "Ray Data runtime actors"
        if name.startswith("ray::"):  # idle or prestarted workers
            return "other Ray workers"
        for key in ("raylet", "gcs_server", "dashboard", "monitor"):
            if key in name or key in cmd:
                return {"monitor": "monitors"}.get(key, key)
        return "other"

    def sample(self) -> None:
        import psutil

        try:
            for child in self.root.children(recursive=True):
                self.procs.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        split: dict[str, int] = {}
        each = []
        for pid, p in list(self.procs.items()):
            try:
                pss = p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                self.procs.pop(pid, None)
                continue
            except psutil.AccessDenied:
                pss = p.memory_info().rss
            k = self.kind(p)
            self.kinds_seen.add(k)
            try:
                t = p.cpu_times()
                self.cpu[pid] = (k, t.user + t.system)
            except psutil.Error:
                pass
            split[k] = split.get(k, 0) + pss
            each.append((pss, pid, k if k in ("driver", "raylet", "gcs_server") else _name(p)))
        total = sum(split.values())
        self.samples += 1
        if total > self.peak:
            self.peak, self.at_peak = total, dict(split, processes=len(self.procs))
            self.procs_at_peak = sorted(each, reverse=True)
        self.shm_growth = max(self.shm_growth, self._shmem() - self.shm0)
        if self.limit and total > self.limit and not self.over:
            self.over = True
            for p in [self.root, *self.procs.values()]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds (user + system) each kind of process used, as of its last sample."""
        out: dict[str, float] = {}
        for kind, seconds in self.cpu.values():
            out[kind] = out.get(kind, 0.0) + seconds
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self.shm0 = self._shmem()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def reap(mem: TreeMemory, grace: float = 15.0) -> list[str]:
    """Processes the contender started that outlive it (a Ray process orphaned by a failed start-up): wait
    ``grace`` s for them to exit, then stop them. Only processes seen in its tree are touched."""
    import psutil

    alive = [p for pid, p in mem.procs.items() if pid != mem.root.pid and p.is_running()]
    _, alive = psutil.wait_procs(alive, timeout=grace)
    names = [f"{_name(p)} ({p.pid})" for p in alive]
    for signal in ("terminate", "kill"):
        for p in alive:
            try:
                getattr(p, signal)()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5)
    return names


def run_measured(cmd: list[str], log: Path, interval: float, timeout: float | None,
                 limit: float | None = None) -> tuple[float, TreeMemory]:
    """Run ``cmd`` (cwd: the repo, RAY_ADDRESS unset), stdout+stderr to ``log``; (wall s, its memory).
    Past ``limit`` bytes of memory it is killed and ``mem.over`` is set (no exception)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with TreeMemory(proc.pid, interval, limit) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        wall = time.perf_counter() - t0
    left = reap(mem)
    with open(log, "a") as out:  # the memory picture at the peak, for whoever reads the log
        if left:
            out.write(f"\n[bench] {len(left)} processes outlived the job by 15 s and were stopped: {left}\n")
        out.write(f"\n[bench] peak {mem.peak / GB:.3f} GB PSS over {len(mem.procs_at_peak)} processes, "
                  f"{mem.samples} samples:\n")
        out.writelines(f"[bench]   {pss / 2**20:8.1f} MiB  pid {pid:<7} {kind}\n"
                       for pss, pid, kind in mem.procs_at_peak)
        out.write("[bench] CPU s by kind: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                     sorted(mem.cpu_by_kind().items(), key=lambda kv: -kv[1])) + "\n")
    if timeout is not None and wall >= timeout:
        raise SystemExit(f"{' '.join(cmd[:4])} ... ran past --timeout {timeout:g} s; log: {log}")
    if rc != 0 and not mem.over:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {rc}); last lines of {log}:\n{tail}")
    return wall, mem


def measured(mem: TreeMemory) -> dict:
    return {"peak": mem.peak, "split": mem.at_peak, "cpu": mem.cpu_by_kind(), "shm": mem.shm_growth,
            "samples": mem.samples}


# ------------------------------------------------------------------------------------ pandas contender
def pandas_child(table: str, output: str, model_dir: str, top: int, id_column: str) -> None:
    """The baseline, in its own process: whole table in, whole outputs out (``--pandas-child``)."""
    import resource

    import numpy as np
    import pandas as pd
    import psutil

    from pipelines.score import write_parquet
    from tasks.churn import ChurnModel

    model = ChurnModel.load(model_dir)
    base_rss = psutil.Process().memory_info().rss  # imports and model: what does not grow with the table
    t0 = time.perf_counter()
    frame = pd.read_parquet(table)
    t_read = time.perf_counter() - t0
    scored, rejected = model.score_frame(frame)
    t_score = time.perf_counter() - t0 - t_read
    out = Path(output)
    write_parquet(scored, str(out / "scored.parquet"))
    write_parquet(rejected, str(out / "rejects.parquet"))
    best = scored[scored["target"]].nlargest(top, "expected_profit")
    targets = pd.DataFrame({id_column: best[id_column].astype(str).to_numpy(),
                            "churn_probability": best["churn_probability"].to_numpy(),
                            "expected_profit": best["expected_profit"].to_numpy(),
                            "clv": best[model.encoder.clv_column].astype(float).to_numpy()})
    targets.insert(0, "rank", np.arange(1, len(targets) + 1))
    write_parquet(targets, str(out / "targets.parquet"))
    seconds = time.perf_counter() - t0
    summary = {"rows_in": len(frame), "scored": len(scored), "rejected": len(rejected),
               "targeted": int(scored["target"].sum()), "top_listed": len(targets),
               "top_expected_profit": float(targets["expected_profit"].sum()), "seconds": seconds,
               "read_s": t_read, "score_s": t_score, "write_s": seconds - t_read - t_score,
               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "base_rss": base_rss,
               "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def run_pandas(table: Path, out: Path, model_dir: Path, top: int, id_column: str, args, need: float) -> dict:
    """The baseline, unless it cannot fit: ``need`` is its expected peak (bytes a row seen at a smaller size
    x rows); it is neither started when that exceeds ``--pandas-memory`` (default: 85% of the memory
    available now) nor left running past it."""
    import psutil

    name = "pandas (1 process)"
    limit = args.pandas_memory * GB if args.pandas_memory else 0.85 * psutil.virtual_memory().available
    if need > limit:
        return {"contender": name, "skipped": f"not run: would need ~{need / GB:.1f} GB, "
                                              f"{limit / GB:.1f} GB allowed (--pandas-memory)"}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--pandas-child", str(table), str(out), str(model_dir), str(top), id_column]
    load = os.getloadavg()[0]
    wall, mem = run_measured(cmd, out.parent / f"{out.name}.log", args.interval, args.timeout, limit)
    if mem.over:
        return {"contender": name, "skipped": f"out of memory: stopped at {mem.peak / GB:.1f} GB "
                                              f"({limit / GB:.1f} GB allowed, --pandas-memory)"}
    s = json.loads((out / "summary.json").read_text())
    return {"contender": name, "summary": s, "seconds": s["seconds"], "wall": wall, "peak_rss": s["peak_rss"],
            **measured(mem), "cpu": {"pandas": s["cpu_s"]}, "load": load}


# -------------------------------------------------------------------------------------- Ray contender
def run_ray(table: Path, out: Path, rows: int, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipelines.score", "--config", args.config, f"input={table}", f"output={out}",
           f"model={args.model}", f"run_name=bench-score-{human(rows)}", *args.set]
    load = os.getloadavg()[0]
    wall, mem = run_measured(cmd, out.parent / f"{out.name}.log", args.interval, args.timeout)
    if "raylet" not in mem.kinds_seen:
        raise SystemExit("the score job started no raylet of its own: it joined a running Ray cluster "
                         "(RAY_ADDRESS or `ray start` on this machine?), whose memory this benchmark cannot "
                         f"attribute; stop it or run elsewhere. Log: {out.parent / (out.name + '.log')}")
    s = json.loads((out / "summary.json").read_text())
    return {"contender": "Ray Data job", "summary": s, "seconds": s["seconds"], "wall": wall, "peak_rss": None,
            **measured(mem), "load": load}


def agree(p: dict, r: dict, out_p: Path, out_r: Path) -> str:
    """Both contenders must have scored the same rows the same way: counts, and the same target list."""
    import pandas as pd

    keys = ("rows_in", "scored", "rejected", "targeted", "top_listed")
    bad = [k for k in keys if p[k] != r[k]]
    if bad:
        raise SystemExit(f"the contenders disagree on {bad}: pandas {[p[k] for k in bad]}, Ray {[r[k] for k in bad]}")
    gap = abs(p["top_expected_profit"] - r["top_expected_profit"]) / max(abs(p["top_expected_profit"]), 1.0)
    if gap > 1e-6:
        raise SystemExit(f"the target lists differ: expected profit {p['top_expected_profit']:.2f} vs "
                         f"{r['top_expected_profit']:.2f}")
    tp, tr = pd.read_parquet(out_p / "targets.parquet"), pd.read_parquet(out_r / "targets.parquet")
    same = len(set(tp.iloc[:, 1]) & set(tr.iloc[:, 1])) / max(len(tp), 1)  # ties at the cut may differ
    return (f"both: {p['scored']:,} scored + {p['rejected']:,} rejected, {p['targeted']:,} targeted, the same "
            f"top-{len(tp):,} expected profit ({same:.2%} the same customers; ties at the cut)")


# -------------------------------------------------------------------------------------------- report
def machine() -> str:
    import pandas as pd
    import psutil
    import pyarrow
    import ray

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}, Ray {ray.__version__}, "
            f"pandas {pd.__version__}, pyarrow {pyarrow.__version__}")


def table_rows(results: list[dict]) -> list[str]:
    lines = ["| rows | contender | rows/s (scoring) | scoring s | rows/s (end to end) | wall s | CPU s "
             "| peak memory GB | rows/s vs pandas | memory vs pandas |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        n, base = res["rows"], res["pandas"]
        for c in (res["pandas"], res["ray"]):
            if "skipped" in c:
                lines.append(f"| {n:,} | {c['contender']} | - | - | - | - | - | {c['skipped']} | - | - |")
                continue
            extra = f" (peak RSS {c['peak_rss'] / GB:.2f})" if c["peak_rss"] else ""
            vs = ("- | -" if "skipped" in base else
                  f"{base['seconds'] / c['seconds']:.2f}x | {c['peak'] / base['peak']:.2f}x")
            lines.append(f"| {n:,} | {c['contender']} | {n / c['seconds']:,.0f} | {c['seconds']:.1f} | "
                         f"{n / c['wall']:,.0f} | {c['wall']:.1f} | {sum(c['cpu'].values()):.0f} | "
                         f"{c['peak'] / GB:.2f}{extra} | {vs} |")
    return lines


def verdict(results: list[dict]) -> list[str]:
    both = [r for r in results if "skipped" not in r["pandas"]]
    ratios = [(r["rows"], r["pandas"]["seconds"] / r["ray"]["seconds"],
               r["pandas"]["wall"] / r["ray"]["wall"]) for r in both]
    peaks = [r["ray"]["peak"] / GB for r in results]
    lines = []
    if ratios:
        speed = "met" if min(x for _, x, _ in ratios) >= TARGET_RATIO else "NOT met"
        lines.append("- rows/s, Ray / pandas (scoring; end to end): "
                     + ", ".join(f"{human(n)} {x:.2f}x; {e:.2f}x" for n, x, e in ratios)
                     + f" (target >= {TARGET_RATIO:g}x on the scoring rate: {speed})")
    if len(both) < len(results) and both:
        last = both[-1]
        rate = last["rows"] / last["pandas"]["seconds"]
        lines.append(f"- where pandas did not fit, Ray's rows/s vs pandas' at {human(last['rows'])} "
                     f"({rate:,.0f} rows/s): " + ", ".join(
                         f"{human(r['rows'])} {r['rows'] / r['ray']['seconds'] / rate:.2f}x"
                         for r in results if "skipped" in r["pandas"]))
    mem = "met" if max(peaks) <= TARGET_GB else "NOT met"
    flat = (f"; {human(results[0]['rows'])} -> {human(results[-1]['rows'])} rows: Ray {peaks[-1] - peaks[0]:+.2f} GB"
            if len(results) > 1 else "")
    if len(both) > 1:
        flat += f", pandas {(both[-1]['pandas']['peak'] - both[0]['pandas']['peak']) / GB:+.2f} GB " \
                f"({human(both[0]['rows'])} -> {human(both[-1]['rows'])})"
    lines.append(f"- Ray peak memory: {', '.join(f'{x:.2f}' for x in peaks)} GB (target <= {TARGET_GB:g} GB and "
                 f"flat: {mem}{flat})")
    own = [job_memory(r["ray"]) / GB for r in results]
    lines.append(f"- of which the job's own processes ({' and '.join(JOB_KINDS)}): {', '.join(f'{x:.2f}' for x in own)}"
                 f" GB; the rest, {', '.join(f'{p - o:.2f}' for p, o in zip(peaks, own))} GB, is Ray's runtime on the "
                 "node: gcs_server, raylet, agents, monitors, dashboard, and the coordinator, stats and "
                 "actor-location actors Ray Data starts with its first job on a node")
    return lines


def job_memory(contender: dict) -> float:
    """Bytes of the job's own processes at the contender's peak (``JOB_KINDS``)."""
    return sum(contender["split"].get(k, 0) for k in JOB_KINDS)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, style in (("pandas", "o-"), ("ray", "s-")):
        ran = [r for r in results if "skipped" not in r[key]]
        label = results[0][key]["contender"]
        a.plot([r["rows"] for r in ran], [r["rows"] / r[key]["seconds"] for r in ran], style, label=label)
        b.plot([r["rows"] for r in ran], [r[key]["peak"] / GB for r in ran], style, label=label)
        if key == "ray":
            b.plot([r["rows"] for r in ran], [job_memory(r[key]) / GB for r in ran], "s:", color=b.lines[-1].get_color(),
                   label=f"{label}: driver + scoring actors")
    b.axhline(TARGET_GB, color="grey", ls="--", lw=1, label="target (1 GB)")
    for ax, ylabel in ((a, "rows/s (scoring)"), (b, "peak memory, GB (summed PSS)")):
        ax.set_xscale("log")
        ax.set(xlabel="table rows", ylabel=ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Scoring a Telco-like customer table: Ray Data job vs one pandas process")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], args, path: Path, started: str) -> None:
    cmd = "python benchmarks/score_scale.py " + " ".join(sys.argv[1:])
    sets = " ".join(args.set)
    lines = [
        "# Scoring at scale: the Ray Data job vs one pandas process",
        "",
        f"Machine: {machine()}. Run {started}, both contenders in this one invocation, one after the other, "
        "each table written once and read by both"
        + (f"; each contender ran {args.repeats} times a size, alternating, and its fastest run is shown"
           if args.repeats > 1 else "")
        + ". The 1-minute load average before each run is in the notes: on a machine shared with other jobs "
        "the rates move with it; CPU s (summed over every process) does not much.",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        "Data: Telco-like synthetic customers (`pipelines.score.make_table`): real IBM Telco rows resampled with "
        "replacement, a fresh id each, 1 in 500 deliberately broken (missing value, non-numeric charge, unknown "
        f"contract, negative CLV); Parquet files of 1M rows in row groups of {args.row_group:,} rows. "
        f"Model: `{args.model}`.",
        "",
        *table_rows(results),
        "",
        *verdict(results),
        "",
        "How it was measured:",
        "- pandas: one process, `pd.read_parquet` of the whole table, `ChurnModel.score_frame` (validate_rows, "
        "encoder, model), scored/rejects/targets Parquet with the job's writer. Ray: `python -m pipelines.score "
        f"--config {args.config} input=... output=... model=...{' ' + sets if sets else ''}`, which starts its "
        "own local Ray.",
        "- rows/s (scoring): pandas from the read to the last write; Ray the job's own `seconds` (summary.json: "
        "first batch requested to last summary back, actor start-up included). End to end: the subprocess' wall "
        "time (interpreter, imports, model load; for Ray also the cluster's start-up and shutdown).",
        f"- peak memory: the largest sum, sampled every {args.interval:g} s, of the PSS of the contender's process "
        "and all its descendants (Ray: driver, gcs_server, raylet with the object store, dashboard, agents, "
        "workers); PSS splits shared pages between the processes that map them, so shared memory counts once. "
        "For pandas the kernel's exact peak RSS of the process is given too.",
        "- CPU s: user + system CPU time of every process of the contender (pandas: its own rusage; Ray: each "
        "process' last sample), imports and start-up included: the work done, whatever the machine's load.",
        "",
        "Notes per size:",
    ]
    for res in results:
        r, p = res["ray"], res["pandas"]
        split = ", ".join(f"{k} {v / GB:.2f}" for k, v in sorted(r["split"].items(), key=lambda kv: -kv[1])
                          if k != "processes")
        if "skipped" in p:
            pandas = f"pandas {p['skipped']}"
        else:
            ps = p["summary"]
            pandas = (f"pandas read {ps['read_s']:.1f} s, validate+score {ps['score_s']:.1f} s, write "
                      f"{ps['write_s']:.1f} s (load {p['load']:.1f})")
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["cpu"].items(), key=lambda kv: -kv[1]) if v >= 0.5)
        lines.append(f"- {res['rows']:,} rows ({res['table_bytes'] / GB:.2f} GB of Parquet): {res['check']}. "
                     f"{pandas}. Ray at its peak: {r['split'].get('processes', 0)} processes, GB: {split}; "
                     f"/dev/shm grew {r['shm'] / GB:.2f} GB; CPU s: {cpu} (load {r['load']:.1f}).")
    lines += ["", f"![rows/s and peak memory vs rows]({path.with_suffix('.png').name})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    plot(results, path.with_suffix(".png"))


# ---------------------------------------------------------------------------------------------- main
def check_disk(workdir: Path, rows: int) -> None:
    free = shutil.disk_usage(workdir).free
    need = rows * BYTES_PER_ROW
    print(f"[bench] disk: {free / GB:.1f} GB free at {workdir}, ~{need / GB:.1f} GB needed for {rows:,} rows",
          flush=True)
    if free < need * 1.2:
        raise SystemExit(f"not enough disk at {workdir} for {rows:,} rows: pass --workdir on a larger disk")


def pandas_need(rows: int, results: list[dict]) -> float:
    """The pandas process' expected peak at ``rows``: its baseline (imports, model) plus the bytes a row it
    took at the largest size it ran; PANDAS_BYTES_PER_ROW before any."""
    ran = [r for r in results if "skipped" not in r["pandas"]]
    if not ran:
        return 0.4 * GB + rows * PANDAS_BYTES_PER_ROW
    last = ran[-1]
    base = last["pandas"]["summary"]["base_rss"]
    return base + (last["pandas"]["peak_rss"] - base) * rows / last["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1M,10M,30M", help="table sizes, comma-separated (1M = 1,000,000)")
    parser.add_argument("--model", default="models:/churn-telco@current")
    parser.add_argument("--config", default=CONFIG, help="the score job's config (its top, id_column, actors...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override passed on to the score job (repeatable), e.g. --set actors=3")
    parser.add_argument("--row-group", type=int, default=131_072,
                        help="rows per Parquet row group of the table: the scoring actors' unit of work")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench" / "score_scale")
    parser.add_argument("--keep", action="store_true", help="keep the tables and outputs")
    parser.add_argument("--interval", type=float, default=0.2, help="memory sampling period, s")
    parser.add_argument("--timeout", type=float, default=None, help="per contender run, s")
    parser.add_argument("--pandas-memory", type=float, default=None, metavar="GB",
                        help="the most the pandas process may take (default: 85%% of the memory available "
                             "before it starts); sizes expected to need more are not run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each contender per size, alternating; the fastest of each is reported "
                             "(a shared machine's load comes and goes)")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "score_scale.md")
    parser.add_argument("--pandas-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pandas_child:
        table, output, model_dir, top, id_column = args.pandas_child
        return pandas_child(table, output, model_dir, int(top), id_column)

    import yaml

    from pipelines.core import tracking
    from pipelines.core.config import ConfigError
    from pipelines.score import make_table

    sizes = parse_rows(args.rows)
    cfg = yaml.safe_load((ROOT / args.config).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        cfg[key] = yaml.safe_load(value)
    top, id_column = int(cfg.get("top", 100_000)), cfg.get("id_column", "customer_id")
    try:
        model_dir = tracking.download_configured_model(args.model, "model")
    except ConfigError as e:
        raise SystemExit(f"{e}\nno such model: register the Telco churn model first with\n"
                         "  python -m pipelines.churn --config pipelines/configs/churn_telco.yaml\n"
                         "(~10 s; registers models:/churn-telco@current) or pass --model runs:/<id>/model") from None
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    results = []
    for rows in sizes:
        check_disk(args.workdir, rows)
        table = args.workdir / f"customers-{human(rows)}"
        t = time.perf_counter()
        shutil.rmtree(table, ignore_errors=True)
        make_table(table, rows, seed=0, bad_rows=max(4, rows // 500), id_column=id_column,
                   row_group_rows=args.row_group)
        size = sum(f.stat().st_size for f in table.glob("*.parquet"))
        print(f"[bench] {rows:,} rows: table written in {time.perf_counter() - t:.0f} s ({size / GB:.2f} GB)",
              flush=True)
        out_p, out_r = args.workdir / f"pandas-{human(rows)}", args.workdir / f"ray-{human(rows)}"
        p = r = None
        for attempt in range(args.repeats):  # alternating; each contender's fastest run is kept
            tries = f" (run {attempt + 1}/{args.repeats})" if args.repeats > 1 else ""
            if p is None or "skipped" not in p:
                new = run_pandas(table, out_p, model_dir, top, id_column, args, pandas_need(rows, results))
                if "skipped" in new:
                    print(f"[bench] {rows:,} rows, pandas{tries}: {new['skipped']}", flush=True)
                else:
                    print(f"[bench] {rows:,} rows, pandas{tries}: {rows / new['seconds']:,.0f} rows/s "
                          f"({new['seconds']:.1f} s, wall {new['wall']:.1f} s), peak {new['peak'] / GB:.2f} GB PSS / "
                          f"{new['peak_rss'] / GB:.2f} GB RSS", flush=True)
                p = new if p is None or "skipped" in new or new["seconds"] < p["seconds"] else p
            new = run_ray(table, out_r, rows, args)
            print(f"[bench] {rows:,} rows, Ray Data{tries}: {rows / new['seconds']:,.0f} rows/s ({new['seconds']:.1f} "
                  f"s, wall {new['wall']:.1f} s), peak {new['peak'] / GB:.2f} GB PSS over "
                  f"{new['split'].get('processes')} processes", flush=True)
            r = new if r is None or new["seconds"] < r["seconds"] else r
        if "skipped" not in p:
            print(f"[bench] {rows:,} rows: Ray {p['seconds'] / r['seconds']:.2f}x pandas' rows/s", flush=True)
        check = ("pandas not run: Ray's counts only: " + f"{r['summary']['scored']:,} scored + "
                 f"{r['summary']['rejected']:,} rejected" if "skipped" in p
                 else agree(p["summary"], r["summary"], out_p, out_r))
        results.append({"rows": rows, "table_bytes": size, "pandas": p, "ray": r, "check": check})
        if not args.keep:
            for d in (table, out_p, out_r):
                shutil.rmtree(d, ignore_errors=True)
        write_report(results, args, args.report, started)  # after every size: a partial run leaves one too
    print("\n" + "\n".join(table_rows(results)) + "\n\n" + "\n".join(verdict(results)))
    print(f"[bench] report: {args.report} and {args.report.with_suffix('.png')}")


if __name__ == "__main__":
    main()
