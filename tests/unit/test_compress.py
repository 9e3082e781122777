"""The compress job's config matching and stage-size arithmetic (no MLflow)."""
import pytest
import torch

from pipelines.compress import CompressConfig, per_layer, stage_bytes
from pipelines.core.config import ConfigError, load_config


def test_first_matching_pattern_wins_and_unmatched_layers_are_left_out():
    names = ["features.2.expand3x3.0.weight", "features.2.squeeze.0.weight", "conv10.weight"]
    assert per_layer({"*expand3x3*": 0.33, "conv10.weight": 0.2}, names) == {
        "features.2.expand3x3.0.weight": 0.33, "conv10.weight": 0.2}
    assert per_layer({"*expand3x3*": 0.33, "*": 1.0}, names)["features.2.squeeze.0.weight"] == 1.0


def test_stage_sizes_count_every_stored_entry_with_its_index():
    mask = torch.zeros(40, dtype=torch.bool)
    mask[[0, 1, 39]] = True  # gaps 0, 0, 37: 37 needs two fillers with 4-bit gaps -> 5 stored entries
    pruned, shared = stage_bytes({"w": mask}, {"w": 4}, rest_bytes=100)
    assert pruned == 100 + 5 * (32 + 4) // 8 + (5 * 36 % 8 > 0)
    assert shared == 100 + 5 * (4 + 4) // 8 + 4 * 16


def test_bad_densities_and_bits_name_the_key():
    with pytest.raises(ConfigError, match="density"):
        load_config(CompressConfig, "pipelines/configs/compress_squeezenet.yaml", ['density={"*": 1.5}'])
    with pytest.raises(ConfigError, match="bits"):
        load_config(CompressConfig, "pipelines/configs/compress_squeezenet.yaml", ['bits={"*": 9}'])
