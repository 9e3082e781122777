import pytest
import torch

from tasks.common.model_io import load_model, save_model
from tasks.common.registry import data_kwargs, get_model, lookup, names


@pytest.mark.parametrize("name", names("model"))
def test_every_registered_model_builds_from_data_kwargs_and_round_trips(name, tmp_path):
    kind = getattr(lookup("model", name), "input_kind", "image")
    ids = kind in ("tokens", "bytes")
    kwargs = data_kwargs(name, (16,) if ids else (1, 28, 28), 10)
    assert kwargs["num_classes"] == 10 and (ids or {"in_channels", "in_features"} & set(kwargs))
    torch.manual_seed(0)
    model = get_model(name, **kwargs).eval()
    if kind == "tokens":  # token ids, right-padded with id 0
        x = torch.randint(1000, 2000, (3, 16))
        x[1, 10:] = 0
    elif kind == "bytes":  # a language model: num_classes is its vocabulary, one prediction per position
        x = torch.randint(0, 10, (3, 16))
    else:
        x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert out.shape == ((3, 10, 16) if kind == "bytes" else (3, 10))
    again, spec = load_model(save_model(model, tmp_path / name, name, kwargs))
    assert spec["model"] == name
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)


def test_data_kwargs_follow_the_constructor():
    assert data_kwargs("squeezenet1_1", (3, 32, 32), 7) == {"num_classes": 7, "in_channels": 3}
    assert data_kwargs("mlp", (1, 28, 28), 10) == {"num_classes": 10, "in_features": 784}


@pytest.mark.parametrize("name", names("loss"))
def test_every_registered_loss_is_callable_by_name(name):
    assert callable(lookup("loss", name))
