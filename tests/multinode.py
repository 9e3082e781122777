"""A multi-node Ray cluster on one machine, and the node-loss drill the multi-node test and
``benchmarks/failover.py`` run on it.

Each node is its own ``ray start`` (a head, then workers joining it), with its own temp dir and its
own agent ports, as separate machines would have; a worker node runs ``--block`` in its own process
group, so that killing the group with SIGKILL takes its raylet, agents and Ray workers down at once
with no goodbye to the head - what a crashed or unplugged machine does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import BIN, REPO, Cluster

CONFIG = "pipelines/configs/squeezenet_fashion.yaml"
# 2,048 images and 2 epochs: 32 steps (~3 s) per epoch, so a node killed when the epoch-1
# checkpoint lands dies in the middle of epoch 2
DRILL = ("--smoke", "data.limit_train=2048", "train.epochs=2", "scaling.placement=SPREAD",
         "scaling.max_failures=1")


class MultiNodeCluster(Cluster):
    """A head with ``head_cpus`` plus worker nodes started by :meth:`add_worker`."""

    def __init__(self, root: Path, head_cpus: int = 2):
        super().__init__(root, num_cpus=head_cpus)
        self.workers: list[subprocess.Popen] = []

    def add_worker(self, num_cpus: int = 1, timeout: float = 120) -> subprocess.Popen:
        n, before = len(self.workers) + 1, len(self.alive_nodes())
        temp = f"{self.temp}w{n}"  # short, as the head's: unix socket paths are capped at 107 bytes
        bare = {k: v for k, v in self.env.items() if k != "MLFLOW_TRACKING_URI"}
        log = open(self.root / f"worker{n}.log", "w")
        proc = subprocess.Popen([str(BIN / "ray"), "start", f"--address={self.address}", f"--num-cpus={num_cpus}",
                                 f"--temp-dir={temp}", "--block", "--disable-usage-stats", *self.node_ports()],
                                env=bare, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(proc)
        end = time.time() + timeout
        while len(self.alive_nodes()) < before + 1:
            if proc.poll() is not None or time.time() > end:
                raise AssertionError(f"worker node {n} did not join:\n{(self.root / f'worker{n}.log').read_text()[-3000:]}")
            time.sleep(0.5)
        return proc

    def api(self, path: str, **params):
        """GET this cluster's dashboard REST API with the token. Ray's Python clients are not used
        here: they let ``RAY_ADDRESS`` (set to the session's other cluster) override their address."""
        import requests

        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        r = requests.get(f"{self.dashboard}{path}", params=params, timeout=30,
                         headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        return r.json()

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.api("/api/v0/nodes", limit=1000)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def job_status(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}")["status"]

    def job_logs(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}/logs")["logs"]

    def kill_worker(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        super().stop()
        for n in range(1, len(self.workers) + 1):
            shutil.rmtree(f"{self.temp}w{n}", ignore_errors=True)

    # -- jobs -------------------------------------------------------------------------------------

    def submit(self, job_id: str, *args: str) -> None:
        """``ray job submit --no-wait`` of the train job, as a user submits to a cluster."""
        env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": self.tracking_uri}})
        cmd = [str(BIN / "ray"), "job", "submit", "--no-wait", "--address", self.dashboard,
               "--submission-id", job_id, "--working-dir", str(REPO), "--runtime-env-json", env, "--",
               "python", "-m", "pipelines.train", "--config", CONFIG, f"scaling.storage_path={self.storage}", *args]
        for _ in range(60):  # the head's job agent may still be registering right after start-up
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                return
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(1)
        raise AssertionError(f"ray job submit failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


@dataclass
class Drill:
    status: str
    logs: str
    seconds: float  # submit -> job finished
    killed_at: float | None = None  # seconds after submit
    recovery_s: float | None = None  # kill -> the restarted group has loaded the checkpoint
    resumed_epoch: int | None = None


def run_job(cluster: MultiNodeCluster, job_id: str, *args: str, kill: subprocess.Popen | None = None,
            kill_after_epoch: int = 1, timeout: float = 600) -> Drill:
    """Submit the train job and follow it; with ``kill``, SIGKILL that worker node as soon as the
    epoch-``kill_after_epoch`` checkpoint is written, then time the recovery from the job's log."""
    import re

    run_name = next(a.split("=", 1)[1] for a in args if a.startswith("run_name="))
    marker = cluster.storage / run_name / f"epoch={kill_after_epoch:04d}"
    t0 = time.time()
    cluster.submit(job_id, *args)
    drill = Drill(status="", logs="", seconds=0.0)
    killed = None
    while time.time() - t0 < timeout:
        status = cluster.job_status(job_id)
        if kill is not None and killed is None and marker.exists():
            cluster.kill_worker(kill)
            killed = time.time()
            drill.killed_at = killed - t0
        if killed is not None and drill.recovery_s is None:
            m = re.search(r"resumed from epoch (\d+) checkpoint", cluster.job_logs(job_id))
            if m:
                drill.recovery_s, drill.resumed_epoch = time.time() - killed, int(m.group(1))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.25)
    drill.status, drill.seconds, drill.logs = status, time.time() - t0, cluster.job_logs(job_id)
    return drill
