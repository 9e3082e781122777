"""`serve run` of the shipped Serve config file against the shared cluster."""
import signal
import subprocess

import pytest
import requests
import yaml

from tests.conftest import BIN, REPO, free_port, wait_for

pytestmark = pytest.mark.integration


def test_serve_run_from_the_shipped_config_file(cluster, zero_runs, tmp_path):
    spec = yaml.safe_load((REPO / "pipelines/configs/serve_squeezenet.yaml").read_text())
    port = free_port()
    spec["http_options"]["port"] = port
    spec["applications"][0]["args"]["tracking_uri"] = cluster.tracking_uri
    spec["applications"][0]["name"] = "fromyaml"
    spec["applications"][0]["route_prefix"] = "/yaml"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = tmp_path / "serve_run.log"  # a file, not a pipe: an unread pipe fills up and blocks serve run
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "serve"), "run", "--address", cluster.address, str(path)], cwd=REPO,
                                env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"serve run exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                return requests.get(f"http://127.0.0.1:{port}/yaml/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_for(healthy, 240, "serve run to bring the app up")
        images = {"images": [[[0] * 28] * 28]}
        r = requests.post(f"http://127.0.0.1:{port}/yaml/classify", json=images, timeout=30)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: serve run tears its app down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        from ray import serve

        from pipelines.core.ray_session import ensure_ray

        ensure_ray()  # joins the test cluster (RAY_ADDRESS); then free the replica's CPU for training
        serve.shutdown()
