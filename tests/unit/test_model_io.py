import json

import pytest
import torch

from tasks.common.model_io import (
    artifact_bytes,
    load_model,
    read_spec,
    save_model,
    state_digest,
)
from tasks.squeezenet import squeezenet1_1


def test_round_trip_is_exact_and_pickle_free(tmp_path):
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_channels": 1, "stem": "small", "batch_norm": True}
    model = squeezenet1_1(**kwargs).eval()
    out = save_model(model, tmp_path / "m", "squeezenet1_1", kwargs, input={"shape": [1, 28, 28]})
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    raw = (out / "model.safetensors").read_bytes()  # safetensors: u64 header length, JSON header, raw bytes
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["conv10.weight"] == {"dtype": "F32", "shape": [10, 512, 1, 1], "data_offsets": header["conv10.weight"]["data_offsets"]}
    loaded, spec = load_model(out)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert state_digest(model.state_dict()) == state_digest(loaded.state_dict())
    assert spec["input"]["shape"] == [1, 28, 28] and spec["model"] == "squeezenet1_1"
    assert artifact_bytes(out) == sum(p.stat().st_size for p in out.iterdir())


def test_digest_changes_with_any_weight():
    a = {"w": torch.zeros(3), "n": torch.tensor(2)}
    b = {"w": torch.tensor([0.0, 0.0, 1e-30]), "n": torch.tensor(2)}
    assert state_digest(a) != state_digest(b)
    assert state_digest(a) == state_digest({"n": torch.tensor(2), "w": torch.zeros(3)})


def test_unknown_registry_name_and_missing_spec_are_clear(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"model": "nope", "kwargs": {}}))
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.json"):
        read_spec(tmp_path / "missing")
