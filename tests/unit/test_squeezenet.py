import pytest
import torch

from tasks.common.registry import get_model
from tasks.squeezenet import Fire, FireSpec, SqueezeNet, count_parameters, fire_layout


def test_paper_imagenet_parameter_counts():
    # v1.0: conv weights 1,244,448 + biases 3,976 (official prototxt); v1.1 matches the official v1.1 model
    assert count_parameters(SqueezeNet("1_0", num_classes=1000)) == 1_248_424
    assert count_parameters(SqueezeNet("1_1", num_classes=1000)) == 1_235_496


def test_default_metaparameters_give_the_published_layout():
    layout = [(f.squeeze, f.expand1x1, f.expand3x3) for f in fire_layout()]
    assert layout == [(16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128),
                      (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)]


@pytest.mark.parametrize("sr,pct", [(0.25, 0.5), (0.75, 0.25), (0.125, 0.99)])
def test_fire_layout_follows_the_design_space_formulas(sr, pct):
    for i, f in enumerate(fire_layout(squeeze_ratio=sr, pct3x3=pct)):
        e = 128 + 128 * (i // 2)  # e_i = base_e + incr_e * floor(i / freq)
        assert f.expand1x1 + f.expand3x3 == e
        assert f.expand3x3 == round(pct * e)
        assert f.squeeze == round(sr * e)


def test_fire_module_channel_arithmetic():
    fire = Fire(96, FireSpec(16, 64, 64))
    out = fire(torch.randn(2, 96, 13, 13))
    assert out.shape == (2, 128, 13, 13)  # e1x1 + e3x3 concatenated, spatial size kept
    params = (96 * 16 + 16) + (16 * 64 + 64) + (16 * 64 * 9 + 64)
    assert count_parameters(fire) == params


def test_simple_bypass_adds_the_identity():
    torch.manual_seed(0)
    plain = Fire(128, FireSpec(16, 64, 64))
    bypass = Fire(128, FireSpec(16, 64, 64), bypass=True)
    bypass.load_state_dict(plain.state_dict())
    x = torch.randn(1, 128, 7, 7)
    assert torch.allclose(bypass(x) - plain(x), x, atol=1e-6)
    with pytest.raises(ValueError, match="equal widths"):
        Fire(96, FireSpec(16, 64, 64), bypass=True)


def test_v10_caffe_spatial_sizes_55_27_13():
    net = SqueezeNet("1_0")
    x = torch.randn(1, 3, 227, 227)
    sizes = []
    for layer in net.features:
        x = layer(x)
        if isinstance(layer, torch.nn.MaxPool2d):
            sizes.append(x.shape[-1])
    assert sizes == [55, 27, 13]


@pytest.mark.parametrize("version", ["1_0", "1_1"])
def test_small_stem_on_28x28(version):
    net = SqueezeNet(version, num_classes=10, in_channels=1, stem="small", batch_norm=True)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert net.features(torch.randn(1, 1, 28, 28)).shape[-2:] == (3, 3)


def test_relu_before_global_pool_makes_logits_nonnegative():
    net = SqueezeNet("1_1", num_classes=10, in_channels=1, stem="small").eval()
    assert (net(torch.randn(4, 1, 28, 28)) >= 0).all()


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_small_stem_runs_on_28x28(name):
    model = get_model(name, num_classes=10, in_channels=1, stem="small").eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="stem"):
        SqueezeNet(stem="huge")
    with pytest.raises(ValueError, match="version"):
        SqueezeNet(version="2_0")
