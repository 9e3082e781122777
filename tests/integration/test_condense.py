"""SRe2L on Ray Data as users run it: condense Fashion-MNIST from the registered BN teacher into a
Parquet set, resume it, refuse to mix settings, and train a fresh model on it with the train job."""
import pytest

from pipelines.condense import read_condensed
from tests.integration.conftest import train

pytestmark = pytest.mark.integration

CONFIG = "pipelines/configs/condense_fashion.yaml"


@pytest.fixture(scope="module")
def condensed(cluster, zero_runs, tmp_path_factory):
    # zero_runs registers the ZeRO-3 smoke model (BN SqueezeNet) as squeezenet-fashion@current
    out = tmp_path_factory.mktemp("condensed") / "fashion"
    proc = cluster.job("condense", "--config", CONFIG, "--smoke", f"output={out}")
    return out, proc


def test_condensed_set_has_one_image_per_class_and_ipc_with_soft_labels(condensed, mlflow_client):
    out, proc = condensed
    assert "[condense] done" in proc.stdout
    assert sorted(p.name for p in out.glob("part-*")) == ["part-ipc0000-block000.parquet",
                                                         "part-ipc0001-block000.parquet"]
    images, labels, soft, provenance = read_condensed(out)
    assert images.shape == (20, 1, 28, 28) and images.dtype.name == "uint8"
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 2)
    assert soft.epochs == 2 and soft.logits.shape == (2, 20, 10)
    assert provenance["teacher"] == "models:/squeezenet-fashion@current"
    run_id = proc.stdout.split("[condense] done: MLflow run ")[1].split()[0]
    run = mlflow_client.get_run(run_id)
    assert run.data.metrics["images"] == 20 and run.data.metrics["images_per_s"] > 0
    assert {"recovered.png", "condensed"} <= {a.path for a in mlflow_client.list_artifacts(run_id)}


def test_a_rerun_resumes_and_other_settings_are_refused(cluster, condensed):
    out, _ = condensed
    again = cluster.job("condense", "--config", CONFIG, "--smoke", f"output={out}", "log_artifact=false")
    assert "2 already in" in again.stdout and "0 to do (0 images)" in again.stdout
    other = cluster.job("condense", "--config", CONFIG, "--smoke", f"output={out}", "seed=1", check=False)
    assert other.returncode == 2 and "output:" in other.stderr and "other settings" in other.stderr


def test_train_job_learns_from_the_condensed_set_with_its_soft_labels(cluster, condensed, mlflow_client):
    out, _ = condensed
    run_id, proc = train(cluster, "on-condensed", f"data.condensed={out}", "train.batch_size=4",
                         "data.condensed_ipc=1", "train.epochs=3", "train.eval_every=2")
    metrics = mlflow_client.get_run(run_id).data.metrics
    assert 0 < metrics["test/acc"] <= 1 and metrics["train/loss"] >= 0
    # IPC 1 of the set: 10 images / 4 per step = 2 steps an epoch (the training split is the condensed
    # set's prefix), validated and logged after epoch 2 (eval_every) and after the last
    steps = sorted(mlflow_client.get_metric_history(run_id, "global_step"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in steps] == [(2, 4.0), (3, 6.0)]


def test_random_real_baseline_set_holds_the_seeds_real_images_relabelled(cluster, zero_runs, tmp_path):
    import numpy as np

    from tasks.common.datasets import load_dataset
    from tasks.sre2l import random_real_subset

    # submitted as to a remote cluster (the driver runs in Ray's copy of the working dir)
    proc = cluster.submit("condense", "--config", CONFIG, "--smoke", f"output={tmp_path}", "source=random_real",
                          "seed=3", "log_artifact=false")
    assert "random_real" in proc.stdout and "[condense] done" in proc.stdout
    images, labels, soft, provenance = read_condensed(tmp_path)
    assert provenance["source"] == "random_real" and soft.logits.shape == (2, 20, 10)
    d = load_dataset("fashion_mnist", seed=3)  # the training split the train job carves with seed 3
    picked = random_real_subset(d.train_y, 2, seed=3).reshape(10, 2).T.ravel()  # by image id: IPC index, class
    np.testing.assert_array_equal(images, d.train_x[picked])
    np.testing.assert_array_equal(labels, d.train_y[picked])
