import json
import re

import pytest

CONFIG = "pipelines/configs/squeezenet_fashion.yaml"


def train(cluster, name: str, *overrides: str, check: bool = True, config: str = CONFIG):
    """The smoke train job, run as a user would; returns (MLflow run id or None, process)."""
    proc = cluster.job("train", "--config", config, "--smoke", f"run_name={name}",
                       f"scaling.storage_path={cluster.storage}", *overrides, check=check)
    m = re.search(r"\[train\] done: MLflow run (\w+)", proc.stdout)
    return (m.group(1) if m else None), proc


def digests(client, run_id: str) -> dict[str, str]:
    path = client.download_artifacts(run_id, "rank_digests.json")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def zero_runs(cluster):
    """One smoke run per ZeRO stage, shared by the tests that inspect them."""
    # NHWC parameters are a ZeRO-0 option (the shipped config's default)
    # ZeRO-3 registers its model: the serve tests load it by alias, as users do
    # ZeRO-1 trains with a registered loss other than cross-entropy (squentropy)
    # ZeRO-2 trains with LOBSTER: full gradients assembled from partitions, master weights written back
    extra = {1: ["losses={sq: {name: squentropy}}"], 2: ["sparsity.regularizer=lobster", "sparsity.lmbda=0.001"],
             3: ["register_as=squeezenet-fashion"]}
    return {stage: train(cluster, f"zero{stage}", f"scaling.zero_stage={stage}",
                         f"scaling.channels_last={str(stage == 0).lower()}", *extra.get(stage, []))[0]
            for stage in (0, 1, 2, 3)}


@pytest.fixture(scope="session")
def mlp_teacher(cluster):
    """A smoke MLP teacher (Weight Squeezing maps an MLP's weights; the MLP students distil from it)."""
    run_id, _ = train(cluster, "mlp-teacher", "model.name=mlp", "model.kwargs={hidden: [128, 128]}",
                      "train.optimizer=adamw", "train.lr=0.002")
    return run_id
