"""The train job on the shared local Ray cluster: real Ray Train workers, real DeepSpeed engines,
a real MLflow store."""
import pytest
import torch

from tests.integration.conftest import digests, train

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_zero_stage_learns_and_ends_with_identical_ranks(zero_runs, mlflow_client, stage):
    run_id = zero_runs[stage]
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    losses = [m.value for m in sorted(mlflow_client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 2 and losses[-1] < losses[0]  # the loss falls
    assert run.data.metrics["ranks/identical"] == 1.0
    d = digests(mlflow_client, run_id)
    assert set(d) == {"rank0", "rank1"} and d["rank0"] == d["rank1"]
    # tracking: flattened params, tags, config artifact
    assert run.data.params["scaling.zero_stage"] == str(stage)
    assert run.data.params["train.batch_size"] == "64"
    for tag in ("git_commit", "ray_version", "torch_version", "deepspeed_version"):
        assert run.data.tags[tag]
    assert run.data.tags["zero_stage"] == str(stage)
    files = {f.path for f in mlflow_client.list_artifacts(run_id)} | {
        f.path for f in mlflow_client.list_artifacts(run_id, "model")}
    assert {"config.yaml", "rank_digests.json", "model/model.safetensors", "model/model.json"} <= files
    # a loss by name trains under DeepSpeed too, its parts logged (ZeRO-1 runs squentropy)
    assert ("train/loss/sq" in run.data.metrics) == (stage == 1)
    # LOBSTER under ZeRO-2 (partitioned gradients and master weights) keeps the ranks identical too
    assert (run.data.params["sparsity.regularizer"] == "lobster") == (stage == 2)


def test_logged_model_reloads_and_reproduces_the_accuracy(zero_runs, mlflow_client):
    from pipelines.core.tracking import load_logged_model
    from tasks.common.batches import predict_labels
    from tasks.common.datasets import load_dataset

    run_id = zero_runs[3]  # ZeRO-3: the logged model is consolidated from parameter shards
    model, spec, _ = load_logged_model(f"runs:/{run_id}")
    assert isinstance(model, torch.nn.Module) and not model.training
    data = load_dataset("fashion_mnist")
    x, y = data.test_x[:256], data.test_y[:256]  # the smoke config's limit_eval
    pred = predict_labels(model, x, spec["input"]["mean"], spec["input"]["std"])
    assert float((pred == y).mean()) == pytest.approx(mlflow_client.get_run(run_id).data.metrics["test/acc"], abs=1e-9)


def test_stop_after_epoch_one_then_resume_continues_at_epoch_two(cluster, zero_runs, mlflow_client):
    first_id, first = train(cluster, "resume", "train.stop_after_epochs=1")
    assert "stopping after epoch 1" in first.stdout
    assert [m.step for m in mlflow_client.get_metric_history(first_id, "epoch")] == [1]

    second_id, second = train(cluster, "resume")
    assert "resumed from epoch 1 checkpoint (global step 8)" in second.stdout  # 512 images / 64 = 8 steps
    assert second_id == first_id  # the same MLflow run goes on
    steps = sorted(mlflow_client.get_metric_history(first_id, "global_step"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in steps] == [(1, 8.0), (2, 16.0)]
    # weights: a resumed run ends exactly where the uninterrupted run of the same config (ZeRO-0) ends
    assert digests(mlflow_client, first_id)["rank0"] == digests(mlflow_client, zero_runs[0])["rank0"]


def test_a_worker_failure_restarts_the_group_from_the_last_checkpoint(cluster, zero_runs, mlflow_client):
    run_id, proc = train(cluster, "failover", "scaling.inject_failure_after_epoch=1")
    assert "injected failure after epoch 1" in proc.stdout + proc.stderr
    assert "resumed from epoch 1 checkpoint (global step 8)" in proc.stdout
    assert mlflow_client.get_run(run_id).data.metrics["ranks/identical"] == 1.0
    # the restarted group finishes exactly where an uninterrupted run of the same config does
    assert digests(mlflow_client, run_id)["rank0"] == digests(mlflow_client, zero_runs[0])["rank0"]


def _runs(client):
    exp = client.get_experiment_by_name("squeezelab")
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.parametrize("override,message", [
    ("train.epohcs=3", "train.epohcs: unknown key"),
    ("train.epochs=many", "train.epochs: Input should be a valid integer"),
    ("scaling.zero_stage=5", "scaling.zero_stage: Input should be less than or equal to 3"),
    ("model.name=resnet", "model.name: unknown model 'resnet'"),
    ("scaling.num_workers=4", "scaling.num_workers: needs 4 CPUs but the Ray cluster has 2"),
    ("sparsity.prune=true", "sparsity.prune: the plateau pruning schedule runs in pipelines.fit"),
])
def test_config_errors_exit_2_naming_the_key_and_run_nothing(cluster, mlflow_client, zero_runs, override, message):
    before = len(_runs(mlflow_client))
    run_id, proc = train(cluster, "bad", override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert errors == [f"config error: {message}"] or (len(errors) == 1 and message in errors[0])
    assert run_id is None and len(_runs(mlflow_client)) == before
