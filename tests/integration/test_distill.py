"""The distil job on the shared local Ray cluster: each method as a 2-worker DeepSpeed run, logged to
MLflow, and a distilled student answered by the serve app."""
import re

import pytest
import requests

from tests.conftest import free_port

pytestmark = pytest.mark.integration

VISION = "pipelines/configs/distill_fashion.yaml"
MLP = "pipelines/configs/distill_mlp_fashion.yaml"


def distill(cluster, name: str, config: str, *overrides: str, check: bool = True):
    proc = cluster.job("distill", "--config", config, "--smoke", f"run_name={name}",
                       f"scaling.storage_path={cluster.storage}", *overrides, check=check)
    m = re.search(r"\[distill\] done: MLflow run (\w+)", proc.stdout)
    return (m.group(1) if m else None), proc


def history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def kd_runs(cluster, zero_runs):
    """KD with SGD under ZeRO-2, from the ZeRO-0 SqueezeNet teacher."""
    teacher = f"teacher.model_uri=runs:/{zero_runs[0]}"
    return {"sgd": distill(cluster, "kd-sgd", VISION, teacher, "scaling.zero_stage=2",
                           "scaling.channels_last=false", "train.optimizer=sgd")[0]}


def test_kd_logs_every_loss_term_teacher_and_student(kd_runs, mlflow_client, zero_runs):
    run = mlflow_client.get_run(kd_runs["sgd"])
    m = run.data.metrics
    for key in ("train/loss", "train/ce", "train/kd", "val/acc", "test/acc", "teacher/test_acc",
                "model/bytes", "teacher/bytes", "model/parameters", "teacher/parameters"):
        assert key in m, key
    # the logged total is the weighted sum of the logged parts: 0.1 CE + 0.9 KD
    assert m["train/loss"] == pytest.approx(0.1 * m["train/ce"] + 0.9 * m["train/kd"], rel=1e-6)
    assert m["model/parameters"] < m["teacher/parameters"] / 10 and m["model/bytes"] < m["teacher/bytes"] / 5
    assert m["teacher/test_acc"] == pytest.approx(
        mlflow_client.get_run(zero_runs[0]).data.metrics["test/acc"])  # the same teacher, the same test images
    assert m["ranks/identical"] == 1.0
    assert run.data.tags["method"] == "kd" and run.data.tags["teacher"] == f"runs:/{zero_runs[0]}"


def test_dot_with_delta_zero_is_sgd_inside_deepspeed_zero3(cluster, mlflow_client, mlp_teacher):
    # DOT's two momentum buffers live in ZeRO-3's flat partitions; with delta = 0 they sum to SGD's.
    # An MLP student: a BatchNorm CNN at this LR amplifies float rounding ~10x per step, so two
    # mathematically equal runs part after a few steps even in plain PyTorch (an MLP stays at 1e-7)
    common = (f"teacher.model_uri=runs:/{mlp_teacher}", "scaling.zero_stage=3", "train.lr=0.05",
              "train.nesterov=false")
    sgd, _ = distill(cluster, "mlp-sgd", MLP, *common, "train.optimizer=sgd")
    dot, _ = distill(cluster, "mlp-dot0", MLP, *common, "train.optimizer=dot", "train.dot_delta=0")
    for key in ("train/loss", "train/kd", "train/ce", "val/loss"):
        a, b = history(mlflow_client, sgd, key), history(mlflow_client, dot, key)
        assert len(a) == 2 and a == pytest.approx(b, rel=1e-5), key
    for run_id in (sgd, dot):
        assert mlflow_client.get_run(run_id).data.metrics["ranks/identical"] == 1.0
    assert mlflow_client.get_run(dot).data.tags["method"] == "dot"


def test_minimoe_student_logs_load_balance_and_utilisation(cluster, mlflow_client, mlp_teacher):
    run_id, _ = distill(cluster, "minimoe", MLP, f"teacher.model_uri=runs:/{mlp_teacher}",
                        "student.name=minimoe_mlp", "student.kwargs={d_model: 32, d_ff: 32, num_experts: 4}",
                        "losses.lb={name: load_balance, weight: 0.01}")
    m = mlflow_client.get_run(run_id).data.metrics
    assert m["train/lb"] >= 1.0  # the Switch load balance is minimised at 1 (uniform routing)
    assert 0.0 < m["experts/utilisation_entropy"] <= 1.0
    assert m["model/active_parameters"] < m["model/parameters"]  # 1 of 4 experts per input
    assert m["ranks/identical"] == 1.0


def test_weight_squeezing_student_is_materialised_as_a_plain_mlp(cluster, mlflow_client, mlp_teacher):
    from pipelines.core.tracking import load_logged_model
    from tasks.common.batches import predict_labels
    from tasks.common.datasets import load_dataset

    run_id, _ = distill(cluster, "wsq", MLP, f"teacher.model_uri=runs:/{mlp_teacher}",
                        "student.init=weight_squeezing", "student.kwargs={hidden: [32, 32]}")
    run = mlflow_client.get_run(run_id)
    model, spec, _ = load_logged_model(f"runs:/{run_id}")
    assert spec["model"] == "mlp" and spec["kwargs"]["hidden"] == [32, 32]
    assert sum(p.numel() for p in model.parameters()) == 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    data = load_dataset("fashion_mnist")
    acc = float((predict_labels(model, data.test_x[:256], data.mean, data.std) == data.test_y[:256]).mean())
    assert acc == pytest.approx(run.data.metrics["test/acc"])  # the materialised student is the trained one
    assert run.data.tags["method"] == "weight_squeezing"


def test_bad_teacher_is_a_config_error_naming_the_key(cluster):
    _, proc = distill(cluster, "bad", VISION, "teacher.model_uri=runs:/0123456789abcdef", check=False)
    assert proc.returncode == 2 and "teacher.model_uri" in proc.stderr
    _, proc = distill(cluster, "bad2", VISION, "student.init=weight_squeezing", check=False)
    assert proc.returncode == 2 and "student.name" in proc.stderr


def test_distilled_student_is_served(cluster, kd_runs):
    from ray import serve

    from pipelines.core.tracking import load_logged_model
    from pipelines.serve import ServeConfig, deploy
    from tasks.common.batches import predict_labels
    from tasks.common.datasets import load_dataset

    url = deploy(ServeConfig(model_uri=f"runs:/{kd_runs['sgd']}", port=free_port(), block=False))
    try:
        data = load_dataset("fashion_mnist")
        images = data.test_x[:8, 0]
        r = requests.post(f"{url}/classify", json={"images": images.tolist()}, timeout=60)
        assert r.status_code == 200
        model, spec, _ = load_logged_model(f"runs:/{kd_runs['sgd']}")
        expected = predict_labels(model, images[:, None], spec["input"]["mean"], spec["input"]["std"])
        assert [p["label"] for p in r.json()["predictions"]] == expected.tolist()
        info = requests.get(f"{url}/info", timeout=30).json()
        assert info["model"] == "squeezenet1_1" and info["bytes"] < 500_000
    finally:
        serve.shutdown()  # the replica holds a CPU the next training run needs


def test_text_teacher_minilm_distils_into_a_bert_student_with_relation_kd(cluster, mlflow_client):
    from tests.integration.conftest import train

    # CI-sized: short sequences (the shipped configs use 128) and few texts; the property is the wiring
    short = ("data.max_length=32", "data.limit_train=128", "data.limit_eval=64")
    teacher, _ = train(cluster, "minilm", *short, config="pipelines/configs/minilm_fine_foods.yaml")
    t = mlflow_client.get_run(teacher)
    assert t.data.tags["model"] == "minilm_classifier" and t.data.metrics["model/parameters"] > 22_000_000
    run_id, _ = distill(cluster, "text", "pipelines/configs/distill_text.yaml", *short,
                        f"teacher.model_uri=runs:/{teacher}",
                        "losses.rel={name: relation_kd, weight: 1.0, group: distill, num_relation_heads: 32}")
    m = mlflow_client.get_run(run_id).data.metrics
    assert m["train/rel"] > 0 and "train/kd" in m and "train/ce" in m  # MiniLMv2 Q/K/V relations distilled
    assert m["model/parameters"] < m["teacher/parameters"] / 4
    assert m["teacher/test_acc"] == pytest.approx(t.data.metrics["test/acc"])
    from pipelines.core.tracking import load_logged_model

    student, spec, _ = load_logged_model(f"runs:/{run_id}")
    assert spec["model"] == "bert_student" and spec["input"]["kind"] == "text"
    assert spec["input"]["max_length"] == 32
