"""The team's MLflow tracking server as users run it: `make mlflow-server` (mlflow/server.sh) on a free
port with temporary stores, a real job logging to it over HTTP, the UI in headless Chromium (Debian's,
installed by `make browser`, driven by Playwright), and the basic-auth server (`MLFLOW_AUTH=1`).

The job is `pipelines.fit --smoke`: the quickest job that logs a plot (reliability.png), and it runs in
one process, so it needs no Ray cluster. The UI check leaves a screenshot at
test-artifacts/mlflow-ui.png (folder: $SQUEEZELAB_TEST_ARTIFACTS).
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
# as root on a closed network: no sandbox, no GPU, no calls home (see `make browser`)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXPERIMENT, RUN_NAME = "ci-tracking-server", "server-check"


def artifacts_dir() -> Path:
    d = Path(os.environ.get("SQUEEZELAB_TEST_ARTIFACTS") or REPO / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


class Server:
    """`make -s mlflow-server` in a process group of its own, on a free loopback port."""

    def __init__(self, root: Path, **env: str):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        self.env = {**os.environ, "MLFLOW_PORT": str(self.port),
                    "MLFLOW_BACKEND_URI": f"sqlite:///{root / 'mlflow.db'}",
                    "MLFLOW_ARTIFACTS": str(self.artifacts),
                    "MLFLOW_WORKERS": "1",  # 4 uvicorn workers take a while to start on 2 CPUs
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # GenAI job runners: unused here
                    "MLFLOW_DISABLE_TELEMETRY": "true", **env}
        for k in ("MLFLOW_HOST", "MLFLOW_TRACKING_URI", "MLFLOW_AUTH_CONFIG_PATH"):
            self.env.pop(k, None)  # the defaults are what is under test
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "Server":
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["make", "-s", "mlflow-server"], cwd=REPO, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"make mlflow-server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"no /health from {self.url} after {timeout}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # make, mlflow and its uvicorn: the group we started
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect((host, port))
        except OSError:
            return True
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow-server")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fit_run(server) -> str:
    """A real job logging to the server over HTTP, as `MLFLOW_TRACKING_URI=http://... python -m pipelines.fit`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.fit", "--config", "pipelines/configs/fit_tables.yaml",
                           "--smoke", f"experiment={EXPERIMENT}", f"run_name={RUN_NAME}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return re.search(r"\[fit\] done: MLflow run (\w+)", proc.stdout).group(1)


def test_the_server_listens_on_loopback_only(server):
    listening = {(c.laddr.ip, c.laddr.port) for p in server.processes()
                 for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", server.port)}, listening
    # bound to 127.0.0.1 itself: another loopback address and the machine's own addresses are refused
    others = ["127.0.0.2"] + [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    assert all(refused(host, server.port) for host in others), others


def test_a_job_logs_its_run_metrics_and_plot_over_http(server, fit_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.url)
    run = client.get_run(fit_run)
    assert run.info.run_name == RUN_NAME and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    m = run.data.metrics
    assert 0.1 < m["test/acc"] <= 1 and 0 <= m["test/ece"] <= 1  # digits: 10 classes, chance is 0.1
    assert m["model/parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10  # the 2x256 MLP
    assert run.data.params["train.epochs"] == "3"  # the smoke override, logged as a param
    assert [h.step for h in client.get_metric_history(fit_run, "train/loss")] == [1, 2, 3]
    # artifacts go through the server's proxy (mlflow-artifacts:) into its --artifacts-destination
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {"reliability.png", "config.yaml", "model"} <= {a.path for a in client.list_artifacts(fit_run)}
    rel = f"{run.info.experiment_id}/{fit_run}/artifacts/reliability.png"
    r = requests.get(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{rel}", timeout=30)
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert (server.artifacts / rel).read_bytes() == r.content


def test_chromium_finds_the_run_in_the_ui_and_shows_its_metric(server, fit_run):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium (`make test` does it first)")
    acc = MlflowClient(tracking_uri=server.url).get_run(fit_run).data.metrics["test/acc"]
    shot = artifacts_dir() / "mlflow-ui.png"
    shot.unlink(missing_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.set_default_timeout(60_000)
            page.goto(f"{server.url}/")
            page.get_by_text("Model training", exact=True).click()  # the UI opens on its GenAI views
            page.get_by_role("link", name=EXPERIMENT, exact=True).click()
            page.get_by_role("link", name=RUN_NAME, exact=True).click()  # the run, by name, in the runs table
            page.wait_for_url(re.compile(rf"/experiments/\d+/runs/{fit_run}"))
            page.get_by_placeholder("Search metrics").fill("test/acc")
            row = page.get_by_role("row").filter(has_text="test/acc")
            row.first.wait_for()
            assert row.count() == 1 and str(acc) in row.inner_text(), row.inner_text()
            row.scroll_into_view_if_needed()
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_basic_auth_refuses_anonymous_requests_and_admits_the_admin(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("mlflow-auth")
    # no password ships in the repository: the server refuses to create the admin without one
    bare = Server(root, MLFLOW_AUTH="1", MLFLOW_AUTH_DB_URI=f"sqlite:///{root / 'none.db'}")
    bare.env.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)
    proc = subprocess.run(["make", "-s", "mlflow-server"], cwd=REPO, env=bare.env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "needs MLFLOW_AUTH_ADMIN_PASSWORD" in proc.stderr, proc.stderr[-2000:]

    password = secrets.token_urlsafe(18)  # made up for this test, like a deployment's secret
    server = Server(root, MLFLOW_AUTH="1", MLFLOW_AUTH_ADMIN_PASSWORD=password,
                    MLFLOW_AUTH_DB_URI=f"sqlite:///{root / 'basic_auth.db'}").start()
    try:
        create = f"{server.url}/api/2.0/mlflow/experiments/create"
        search = f"{server.url}/api/2.0/mlflow/experiments/search"
        assert requests.post(create, json={"name": "anonymous"}, timeout=30).status_code == 401
        assert requests.post(create, json={"name": "anonymous"}, auth=("admin", "wrong-password-123"),
                             timeout=30).status_code == 401
        assert requests.get(search, params={"max_results": 10}, timeout=30).status_code == 401
        assert requests.get(f"{server.url}/", timeout=30).status_code == 401
        r = requests.post(create, json={"name": "by-admin"}, auth=("admin", password), timeout=30)
        assert r.status_code == 200, r.text
        # a job authenticates the same way, from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        exp = MlflowClient(tracking_uri=server.url).get_experiment_by_name("by-admin")
        assert exp is not None and exp.experiment_id == r.json()["experiment_id"]
    finally:
        server.stop()
