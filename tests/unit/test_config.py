import pytest

from pipelines.core.config import ConfigError, flatten, load_config, parse_override
from pipelines.train import TrainConfig


def test_defaults_validate_and_overrides_are_typed():
    cfg = load_config(TrainConfig, None, ["train.epochs=7", "scaling.zero_stage=3", "model.kwargs.dropout=0.2"])
    assert cfg.train.epochs == 7 and cfg.scaling.zero_stage == 3
    assert cfg.model.kwargs["dropout"] == 0.2


def test_shipped_config_and_smoke():
    cfg = load_config(TrainConfig, "pipelines/configs/squeezenet_fashion.yaml", smoke=True)
    assert cfg.data.limit_train == 512 and cfg.train.epochs == 2 and cfg.register_as is None
    full = load_config(TrainConfig, "pipelines/configs/squeezenet_fashion.yaml")
    assert full.data.limit_train is None and full.scaling.num_workers == 2
    assert full.register_as == "squeezenet-fashion"


@pytest.mark.parametrize("override,key", [
    ("train.epohcs=3", "train.epohcs: unknown key"),
    ("train.epochs=abc", "train.epochs:"),
    ("scaling.zero_stage=4", "scaling.zero_stage:"),
    ("train.batch_size=63", "train.batch_size=63 must be a multiple of scaling.num_workers=2"),
    ("model.kwargs.num_classes=5", "model.kwargs.num_classes comes from the dataset"),
    ("scaling.channels_last=true", "scaling.channels_last needs scaling.zero_stage=0"),
    ("train.epochs.x=1", "train.epochs: Input should be a valid integer"),
    ("novalue", "novalue: an override must look like dotted.key=value"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["scaling.zero_stage=2", override])
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(TrainConfig, tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(TrainConfig, tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, tmp_path / "bad.yaml")


def test_parse_override_and_flatten():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=text") == ("a", "text")
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": {}}) == {"a.b": 1, "a.c.d": None, "e": {}}


@pytest.mark.parametrize("override, key", [("bits=9", "bits"), ("eval.text=gutenberg:ulysses", "eval.text"),
                                           ("blackbox.m=1", "blackbox.m")])
def test_quantize_config_errors_name_the_key(override, key):
    # the job's exit 2 with this message is checked end to end in tests/integration/test_quantize.py
    from pipelines.quantize import QuantizeConfig

    with pytest.raises(ConfigError) as err:
        load_config(QuantizeConfig, "pipelines/configs/quantize_smollm2.yaml", [override])
    assert key in str(err.value)
