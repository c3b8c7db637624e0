"""Small models for the PTQ tests: MobileNet-like (depthwise, ReLU, per-channel affine) nets."""

import pytest
import torch
from torch import nn


class DepthwiseNet(nn.Module):
    """conv-BN-ReLU -> depthwise conv-BN-ReLU -> pointwise conv -> x*a+b -> conv -> pool -> MLP.

    Channel ranges are made very unequal (as in MobileNets), so per-tensor quantization
    suffers and CLE has something to fix.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn2 = nn.BatchNorm2d(16)
        self.pointwise = nn.Conv2d(16, 24, 1)
        self.register_buffer("scale", torch.rand(24, 1, 1) + 0.5)
        self.register_buffer("offset", torch.randn(24, 1, 1) * 0.1)
        self.conv3 = nn.Conv2d(24, 16, 3)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)
        with torch.no_grad():
            for module in (self.conv1, self.depthwise, self.pointwise, self.fc1):
                spread = torch.logspace(-1.5, 1, module.weight.shape[0])
                module.weight.mul_(
                    spread[torch.randperm(len(spread))].reshape(
                        -1, 1, *[1] * (module.weight.ndim - 2)
                    )
                )
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.depthwise(x)))
        x = self.pointwise(x) * self.scale + self.offset
        x = torch.relu(self.conv3(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def depthwise_net() -> nn.Module:
    torch.manual_seed(0)
    return DepthwiseNet().eval()


@pytest.fixture
def images() -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 12, 12, generator=generator),) for _ in range(4)]
