"""LeNet-300-100 and LeNet-5 (Caffe variant): the models LOBSTER and Deep Compression report pruning on.

LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to document recognition", Proc.
IEEE 1998; the sizes are those of the pruning literature (Han et al. 2015, arXiv 1506.02626;
Tartaglione et al. 2022, arXiv 2011.09905): LeNet-300-100 = 784-300-100-10 fully connected (266,610
parameters); LeNet-5 = conv 20@5x5 -> max-pool 2 -> conv 50@5x5 -> max-pool 2 -> fc 500 -> fc 10
(431,080 parameters on 28x28 inputs), ReLU activations.
Departs from LeCun 1998: the Caffe variant above (ReLU, max-pooling, 20/50 channels), not the
original's tanh, subsampling and partial connection table, because that is the model both pruning
papers measure.
"""
from __future__ import annotations

import torch
from torch import nn

from tasks.common.registry import register_model


@register_model("lenet300_100")
class LeNet300(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(in_features, 300), nn.Linear(300, 100), nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


@register_model("lenet5")
class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, side: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        flat = 50 * (((side - 4) // 2 - 4) // 2) ** 2  # two valid 5x5 convs, each followed by a 2x2 pool
        self.fc1, self.fc2 = nn.Linear(flat, 500), nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
