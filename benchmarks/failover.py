"""Node-loss drill on a real multi-node Ray cluster on this machine: recovery time and cost.

    python benchmarks/failover.py                 # what `make drill-failover` runs (3 drills, ~6 min)
    python benchmarks/failover.py --drills 5 --out docs/results/failover.md

A head (2 CPUs) and a worker node (1 CPU) start as separate ``ray start`` processes
(tests/multinode.py). The train job (SqueezeNet on 2,048 Fashion-MNIST images, 2 epochs, 2 DeepSpeed
ranks placed with SPREAD, one per node) is submitted with ``ray job submit``: once uninterrupted,
then ``--drills`` times with the worker node SIGKILLed as soon as the epoch-1 checkpoint is written.
A fresh worker node joins before each drill. Per drill it records the recovery time (kill -> the
restarted worker group has loaded the checkpoint, read from the job log polled every 0.25 s), the
job's extra wall time over the uninterrupted run, and whether the final weights equal the
uninterrupted run's (digest of the full state dict). Figures go to stdout and a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["RAY_AUTH_MODE"] = "token"  # Ray reads it at import; the drill cluster runs with token auth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drills", type=int, default=3)
    ap.add_argument("--out", default="docs/results/failover.md")
    args = ap.parse_args()

    import re

    from mlflow.tracking import MlflowClient

    from tests.integration.conftest import digests
    from tests.multinode import DRILL, MultiNodeCluster, run_job

    cluster = MultiNodeCluster(Path(tempfile.mkdtemp(prefix="failover-")), head_cpus=2)
    cluster.start()
    rows = []
    try:
        client = MlflowClient(tracking_uri=cluster.tracking_uri)

        def final(drill):
            run_id = re.search(r"\[train\] done: MLflow run (\w+)", drill.logs).group(1)
            return client.get_run(run_id).data.metrics["test/acc"], digests(client, run_id)["rank0"]

        cluster.add_worker(num_cpus=1)
        base = run_job(cluster, "uninterrupted", *DRILL, "run_name=uninterrupted")
        if base.status != "SUCCEEDED":
            raise SystemExit(f"uninterrupted run {base.status}:\n{base.logs[-3000:]}")
        base_acc, base_digest = final(base)
        print(f"[failover] uninterrupted: {base.seconds:.1f} s, test acc {base_acc:.4f}", flush=True)
        for i in range(args.drills):
            node = cluster.add_worker(num_cpus=1) if i else cluster.workers[-1]
            d = run_job(cluster, f"drill{i}", *DRILL, f"run_name=drill{i}", kill=node)
            acc, digest = final(d) if d.status == "SUCCEEDED" else (float("nan"), "")
            rows.append({"drill": i + 1, "status": d.status, "killed_at": d.killed_at, "recovery": d.recovery_s,
                         "resumed": d.resumed_epoch, "seconds": d.seconds, "extra": d.seconds - base.seconds,
                         "acc": acc, "same": digest == base_digest})
            print(f"[failover] drill {i + 1}: {d.status}; killed {d.killed_at:.1f} s after submit, recovered in "
                  f"{d.recovery_s:.1f} s (resumed from epoch {d.resumed_epoch}); job {d.seconds:.1f} s "
                  f"(+{d.seconds - base.seconds:.1f} s); test acc {acc:.4f}; weights equal uninterrupted: "
                  f"{digest == base_digest}", flush=True)
    finally:
        cluster.stop()

    rec = [r["recovery"] for r in rows]
    extra = [r["extra"] for r in rows]
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    lines = [
        "# Node-loss drill: recovery of a multi-node DeepSpeed job",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on this machine (2 cores) by `make drill-failover` "
        f"(`python benchmarks/failover.py --drills {args.drills}`). A head (2 CPUs) and a worker node (1 CPU) "
        "as separate `ray start` processes, token auth on; the train job (SqueezeNet 1.1, 2,048 Fashion-MNIST "
        "images, 2 epochs, 2 ranks with SPREAD placement, ZeRO-0) submitted with `ray job submit`; the worker "
        "node SIGKILLed (raylet, agents and its rank at once) as soon as the epoch-1 checkpoint is written, "
        "i.e. early in epoch 2. Recovery: kill -> the restarted worker group (both ranks now on the head) "
        "has loaded the checkpoint.",
        "",
        f"Uninterrupted run: {base.seconds:.1f} s, test accuracy {base_acc:.4f}.",
        "",
        "| drill | status | killed at (s) | recovery (s) | resumed from epoch | job (s) | extra (s) | test acc | weights = uninterrupted |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['drill']} | {r['status']} | {r['killed_at']:.1f} | {r['recovery']:.1f} | {r['resumed']} | "
          f"{r['seconds']:.1f} | {r['extra']:+.1f} | {r['acc']:.4f} | {'yes' if r['same'] else 'no'} |" for r in rows),
        "",
        f"Recovery {statistics.mean(rec):.1f} ± {sd(rec):.1f} s (mean ± sd over {len(rec)} drills); "
        f"extra job time {statistics.mean(extra):.1f} ± {sd(extra):.1f} s.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines[-2:]))
    print(f"[failover] wrote {out}")


if __name__ == "__main__":
    main()
