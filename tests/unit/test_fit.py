"""The fit job's training loop and evaluation, in process (no Ray, no MLflow): what a sweep trial runs."""
import numpy as np
import pytest
import torch

from pipelines.core.config import load_config
from pipelines.fit import FitConfig, FitData, evaluate, model_outputs, train

BASE = "pipelines/configs/fit_tables.yaml"


def config(*overrides):
    return load_config(FitConfig, BASE, ["data.name=wine", "train.epochs=30", "train.eval_every=10", *overrides])


def test_training_is_deterministic_per_seed_and_reports_on_evaluation_epochs():
    cfg = config()
    data = FitData.load(cfg.data, cfg.seed)
    reports = []
    model, kwargs, history, diverged = train(cfg, data, report=reports.append)
    again = train(cfg, FitData.load(cfg.data, cfg.seed))[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert diverged is None and len(history) == 30 and [r["epoch"] for r in reports] == [10, 20, 30]
    assert kwargs == {"hidden": [256, 256], "num_classes": 3, "in_features": 13}
    assert evaluate(model, data.test_x, data.test_y, 10)["acc"] > 0.9  # wine is easy for an MLP


def test_a_diverging_run_stops_keeps_its_last_finite_epoch_and_still_scores():
    cfg = config("train.lr=1.0e6", "train.schedule=constant")
    data = FitData.load(cfg.data, cfg.seed)
    model, _, history, diverged = train(cfg, data)
    assert diverged is not None and len(history) == diverged - 1
    m = evaluate(model, data.test_x, data.test_y, 10)
    assert all(np.isfinite(v) for v in m.values())  # non-finite logits score as uniform guesses


def test_single_score_losses_get_one_output_on_two_classes_only():
    assert model_outputs(config("data.name=breast_cancer", "losses={h: {name: hinge}}"),
                         FitData.load(config("data.name=breast_cancer").data, 0)) == 1
    from pipelines.core.config import ConfigError

    with pytest.raises(ConfigError, match="need a two-class dataset"):
        model_outputs(config("losses={h: {name: hinge}}"), FitData.load(config().data, 0))


def test_plateau_pruning_with_lobster_prunes_within_tolerance_and_keeps_zeros_zero():
    cfg = load_config(FitConfig, "pipelines/configs/prune_lenet.yaml",
                      ["data.name=iris", "model.name=mlp", "model.kwargs={hidden: [64, 64]}", "train.epochs=40",
                       "train.lr=0.5", "train.batch_size=32", "sparsity.patience=3", "sparsity.lmbda=0.001"])
    data = FitData.load(cfg.data, cfg.seed)
    model, _, history, _ = train(cfg, data)
    events = [h for h in history if "prune/remaining" in h]
    assert events, "no plateau in 40 epochs"
    first = events[0]
    # the pruned model's validation loss stays within the tolerance of the rewound best
    after = [h for h in history if h["epoch"] > first["epoch"]]
    assert first["prune/remaining"] < 1.0 and all(h["sparsity/remaining"] <= first["prune/remaining"] for h in after)
    from tasks.lobster import remaining

    nonzero, total = remaining(model)
    assert nonzero / total == pytest.approx(history[-1]["sparsity/remaining"])


def test_pruning_needs_a_validation_loss_every_epoch():
    from pipelines.core.config import ConfigError

    with pytest.raises(ConfigError, match="train.eval_every"):
        load_config(FitConfig, BASE, ["sparsity.prune=true"])
