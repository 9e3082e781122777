"""A real multi-node run: a head and a worker node as separate `ray start` processes, the train job
submitted with `ray job submit` with its DeepSpeed ranks spread over both, the worker node killed
mid-training, and the job resuming from its last checkpoint to end where an uninterrupted run ends."""
import re

import pytest

from tests.multinode import DRILL, MultiNodeCluster, run_job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    # head: 2 CPUs (the job's driver and, after the loss, both ranks); worker node: 1 CPU
    c = MultiNodeCluster(tmp_path_factory.mktemp("multinode"), head_cpus=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _nodes_line(logs: str) -> list[int]:
    return [int(n) for n in re.findall(r"\[train\] 2 ranks on (\d+) Ray node", logs)]


def _run_id(logs: str) -> str:
    return re.search(r"\[train\] done: MLflow run (\w+)", logs).group(1)


def test_worker_node_loss_resumes_from_the_last_checkpoint_and_matches_an_uninterrupted_run(two_nodes):
    from mlflow.tracking import MlflowClient

    from tests.integration.conftest import digests

    spare = two_nodes.add_worker(num_cpus=1)
    assert len(two_nodes.alive_nodes()) == 2
    base = run_job(two_nodes, "uninterrupted", *DRILL, "run_name=uninterrupted")
    assert base.status == "SUCCEEDED", base.logs[-4000:]
    assert _nodes_line(base.logs) == [2]  # SPREAD: one rank per node

    victim = spare  # the uninterrupted run used it; now the same node dies mid-run
    drill = run_job(two_nodes, "node-loss", *DRILL, "run_name=node-loss", kill=victim)
    assert drill.status == "SUCCEEDED", drill.logs[-4000:]
    assert drill.killed_at is not None and drill.resumed_epoch == 1, drill.logs[-4000:]
    assert _nodes_line(drill.logs) == [2, 1]  # spread over both nodes, then restarted on the head alone
    assert len(two_nodes.alive_nodes()) == 1
    print(f"\n[multinode] node killed {drill.killed_at:.1f} s after submit; recovered (checkpoint loaded) "
          f"{drill.recovery_s:.1f} s later; job {drill.seconds:.1f} s vs {base.seconds:.1f} s uninterrupted")

    client = MlflowClient(tracking_uri=two_nodes.tracking_uri)
    a, b = client.get_run(_run_id(base.logs)), client.get_run(_run_id(drill.logs))
    for key in ("test/acc", "val/acc", "train/loss"):
        assert b.data.metrics[key] == pytest.approx(a.data.metrics[key], abs=1e-6), key
    # the weights too: the resumed run replays the lost epoch exactly
    assert digests(client, b.info.run_id)["rank0"] == digests(client, a.info.run_id)["rank0"]
    assert drill.recovery_s < 120
