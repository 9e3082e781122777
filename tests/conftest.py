"""Shared fixtures. Integration tests share ONE local Ray cluster per session, started the way a user
starts one (``ray start --head``, token auth on), and a temporary MLflow SQLite store."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray reads the auth mode when it is first imported; the test cluster runs with token auth on
os.environ["RAY_AUTH_MODE"] = "token"

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A `ray start --head` cluster plus the environment a job on it needs."""

    def __init__(self, root: Path, num_cpus: int = 2):
        self.root, self.num_cpus = root, num_cpus
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.tracking_uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
        self.storage = root / "ray_results"
        (root / "mlflow").mkdir(parents=True)
        self.env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                    "MLFLOW_TRACKING_URI": self.tracking_uri, "PYTHONUNBUFFERED": "1",
                    "RAY_DEDUP_LOGS": "0",
                    # a submitted job's `python` must be this venv's, as after `source .venv/bin/activate`
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def start(self) -> None:
        temp = Path("/tmp") / f"sqlray{self.gcs_port}"  # short: unix socket paths are capped at 107 bytes
        self.temp = temp
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env,
                       check=True, capture_output=True)
        # the cluster's own processes do not know the store: jobs must bring it (runtime_env / driver env)
        bare = {k: v for k, v in self.env.items() if k != "MLFLOW_TRACKING_URI"}
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={self.gcs_port}", f"--num-cpus={self.num_cpus}",
                        f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                        # ports every Ray node would otherwise take by default (52365, 10001): free
                        # ones, so that a second cluster or node on this machine can start beside it
                        *self.node_ports(), f"--ray-client-server-port={free_port()}",
                        "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
                       env=bare, check=True, capture_output=True, timeout=180)

    @staticmethod
    def node_ports() -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def stop(self) -> None:
        # `ray stop` would end every Ray on the machine (a demo running beside the tests, say):
        # end only the processes of this cluster, which all name its temp dir on their command line
        import psutil

        marks = (str(self.temp), f":{self.gcs_port}")
        mine: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(m in arg for arg in (p.info["cmdline"] or []) for m in marks):
                    mine[p.pid] = p
                    # agents rename themselves (ray::DashboardAgent): take the whole tree
                    mine.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
        mine = list(mine.values())
        for p in mine:
            try:
                p.terminate()
            except psutil.Error:
                pass
        # the GCS server and the autoscaler monitor linger ~30 s after SIGTERM; a test cluster's
        # state is thrown away, so they get 5 s before SIGKILL
        for p in self._running(mine, timeout=5):
            p.kill()
        shutil.rmtree(self.temp, ignore_errors=True)

    @staticmethod
    def _running(procs, timeout: float):
        """Those of ``procs`` still running after ``timeout`` s. A zombie counts as ended: the
        processes of a killed node are not our children, and a container whose PID 1 does not reap
        orphans keeps them as zombies for good (psutil.wait_procs would wait out its timeout)."""
        import psutil

        end = time.time() + timeout
        while True:
            left = []
            for p in procs:
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        left.append(p)
                except psutil.NoSuchProcess:
                    pass
            if not left or time.time() > end:
                return left
            time.sleep(0.2)

    def job(self, module: str, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``python -m pipelines.<module> ...`` as a user would, against this cluster."""
        return self._run([sys.executable, "-m", f"pipelines.{module}", *args], module, timeout, check)

    def submit(self, module: str, *args: str, runtime_env: dict | None = None, timeout: float = 900,
               check: bool = True) -> subprocess.CompletedProcess:
        """``ray job submit`` of ``python -m pipelines.<module> ...`` with this repository as the working
        dir, through the dashboard with the cluster's token; the store comes in the runtime env (default:
        the cluster's) since the cluster's own processes do not know it. The driver runs in Ray's copy of
        the working dir on this machine, so absolute paths under tmp are shared with the test."""
        env = {"env_vars": {"MLFLOW_TRACKING_URI": self.tracking_uri}} if runtime_env is None else runtime_env
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(env), "--", "python", "-m", f"pipelines.{module}", *args]
        return self._run(cmd, module, timeout, check)

    def _run(self, cmd: list[str], module: str, timeout: float, check: bool) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pipelines.{module} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    c.start()
    old = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE")}
    os.environ.update({"RAY_ADDRESS": c.address, "MLFLOW_TRACKING_URI": c.tracking_uri, "RAY_AUTH_MODE": "token"})
    try:
        yield c
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            c.stop()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_client(cluster):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cluster.tracking_uri)


def wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
