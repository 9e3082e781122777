"""SqueezeNet: AlexNet-level accuracy with 50x fewer parameters, built from Fire modules.

Iandola, Han, Moskewicz, Ashraf, Dally, Keutzer, "SqueezeNet: AlexNet-level accuracy with 50x fewer
parameters and <0.5MB model size" (arXiv 1602.07360); layouts from the official Caffe prototxts
(DeepScale/SqueezeNet, v1.0 and v1.1).

Implements:
- the Fire module (1x1 squeeze, then 1x1 and 3x3 expand convolutions concatenated on channels);
- the macro-architecture metaparameters of the paper's design-space study (section 5):
  e_i = base_e + incr_e * floor(i / freq) expand filters in Fire i = 0..7, a fraction pct3x3 of them
  3x3, and s_i = SR * e_i squeeze filters (squeeze ratio SR); defaults base_e = incr_e = 128,
  freq = 2, pct3x3 = 0.5, SR = 0.125 give the published v1.0/v1.1 layouts;
- the v1.0 layout (conv1 96x7x7/2, max-pools after conv1, fire4, fire8) and the v1.1 layout
  (conv1 64x3x3/2, max-pools after conv1, fire3, fire5), Caffe's ceil-mode pooling, Dropout(0.5)
  before conv10, ReLU after every convolution including conv10, global average pooling;
- the simple bypass of section 6 (identity shortcut around fire3, fire5, fire7, fire9, the Fire
  modules whose input and output widths match);
- Caffe's "xavier" initialisation (uniform, variance 1/fan_in) and N(0, 0.01) for conv10.

Departs from the paper:
- ``stem="small"`` adapts the network to small inputs such as 28x28 Fashion-MNIST: conv1 becomes a
  3x3, stride-1, padding-1 convolution with the same number of filters, so the three ceil-mode
  max-pools take 28 -> 14 -> 7 -> 3 (v1.1); the ImageNet stem's stride-2 conv1 plus pool would
  leave a 7x7 map before the first Fire module. Everything after conv1 is unchanged.
- conv10 has no padding: the official v1.0 prototxt's ``pad: 1`` on a 1x1 convolution is a
  generator quirk (forresti/SqueezeNet issue #14) that only adds a border of relu(bias).
- ``batch_norm=True`` (off by default) adds BatchNorm after every convolution but conv10. The paper
  has none; SRe2L needs a BatchNorm teacher, and BN makes short CPU training runs far less
  sensitive to the learning rate. ``init="kaiming"`` offers He initialisation for the same reason.
"""
from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from tasks.common.registry import register_model


@dataclass(frozen=True)
class FireSpec:
    squeeze: int  # s1x1
    expand1x1: int  # e1x1
    expand3x3: int  # e3x3

    @property
    def out_channels(self) -> int:
        return self.expand1x1 + self.expand3x3


def fire_layout(base_e: int = 128, incr_e: int = 128, freq: int = 2, pct3x3: float = 0.5,
                squeeze_ratio: float = 0.125, n_fire: int = 8) -> list[FireSpec]:
    """The paper's metaparameters -> (s1x1, e1x1, e3x3) for Fire modules fire2..fire9."""
    specs = []
    for i in range(n_fire):
        e = base_e + incr_e * (i // freq)
        e3 = int(round(pct3x3 * e))
        specs.append(FireSpec(max(1, int(round(squeeze_ratio * e))), e - e3, e3))
    return specs


class Fire(nn.Module):
    """squeeze 1x1 -> ReLU -> [expand 1x1 -> ReLU ; expand 3x3 -> ReLU] concatenated on channels."""

    def __init__(self, in_channels: int, spec: FireSpec, batch_norm: bool = False, bypass: bool = False):
        super().__init__()
        if bypass and in_channels != spec.out_channels:
            raise ValueError(f"simple bypass needs equal widths, got {in_channels} -> {spec.out_channels}")
        self.bypass = bypass
        self.squeeze = _conv(in_channels, spec.squeeze, 1, batch_norm)
        self.expand1x1 = _conv(spec.squeeze, spec.expand1x1, 1, batch_norm)
        self.expand3x3 = _conv(spec.squeeze, spec.expand3x3, 3, batch_norm, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        out = torch.cat([self.expand1x1(s), self.expand3x3(s)], dim=1)
        return out + x if self.bypass else out


def _conv(cin: int, cout: int, k: int, batch_norm: bool, stride: int = 1, padding: int = 0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=padding)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# Fire indices (0-based, fire2 = 0) after which a max-pool follows, per version.
_POOL_AFTER = {"1_0": (2, 6), "1_1": (1, 3)}
_STEM = {"1_0": (96, 7), "1_1": (64, 3)}  # conv1 filters, kernel (ImageNet stem, stride 2)


class SqueezeNet(nn.Module):
    def __init__(self, version: Literal["1_0", "1_1"] = "1_1", num_classes: int = 1000,
                 in_channels: int = 3, stem: Literal["imagenet", "small"] = "imagenet",
                 base_e: int = 128, incr_e: int = 128, freq: int = 2, pct3x3: float = 0.5,
                 squeeze_ratio: float = 0.125, bypass: Literal["none", "simple"] = "none",
                 batch_norm: bool = False, dropout: float = 0.5,
                 init: Literal["xavier", "kaiming"] = "xavier"):
        super().__init__()
        if version not in _POOL_AFTER:
            raise ValueError(f"version must be one of {sorted(_POOL_AFTER)}, got {version!r}")
        filters, kernel = _STEM[version]
        if stem == "imagenet":
            conv1 = _conv(in_channels, filters, kernel, batch_norm, stride=2)
        elif stem == "small":
            conv1 = _conv(in_channels, filters, 3, batch_norm, stride=1, padding=1)
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        layers: list[nn.Module] = [conv1, nn.MaxPool2d(3, 2, ceil_mode=True)]
        cin = filters
        for i, spec in enumerate(fire_layout(base_e, incr_e, freq, pct3x3, squeeze_ratio)):
            layers.append(Fire(cin, spec, batch_norm, bypass=(bypass == "simple" and i % 2 == 1)))
            cin = spec.out_channels
            if i in _POOL_AFTER[version]:
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.conv10 = nn.Conv2d(cin, num_classes, 1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), self.conv10, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self._init_weights(init)

    def _init_weights(self, init: str) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is self.conv10:
                    nn.init.normal_(m.weight, 0.0, 0.01)
                elif init == "xavier":  # Caffe's "xavier": U(-a, a), a = sqrt(3 / fan_in)
                    fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                    bound = math.sqrt(3.0 / fan_in)
                    nn.init.uniform_(m.weight, -bound, bound)
                elif init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                else:
                    raise ValueError(f"init must be 'xavier' or 'kaiming', got {init!r}")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# partials, not wrappers: the registry reads the constructor's signature (registry.data_kwargs)
squeezenet1_0 = register_model("squeezenet1_0")(partial(SqueezeNet, version="1_0"))
squeezenet1_1 = register_model("squeezenet1_1")(partial(SqueezeNet, version="1_1"))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

