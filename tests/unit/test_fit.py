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
