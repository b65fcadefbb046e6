"""The CIFAR-10 ResNets of He et al. 2016 (section 4.2) and their plain counterparts.

Depth 6n+2: a 3x3 stem, three stages of n basic blocks (16, 32, 64 channels), global average
pooling and a 64->10 linear layer. Shortcuts are "option A": identity, or where the shape changes,
every second pixel with the channels zero-padded (no parameters). The plain nets are the same
layers without the shortcut additions. Parameter names match the published checkpoints
(akamaster/pytorch_resnet_cifar10), so those load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_LABELS = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class _ShortcutA(nn.Module):
    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, residual: bool = True, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._stage(16, n, 1, residual)
        self.layer2 = self._stage(32, n, 2, residual)
        self.layer3 = self._stage(64, n, 2, residual)
        self.linear = nn.Linear(64, num_classes)

    def _stage(self, planes: int, n: int, stride: int, residual: bool) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s, residual))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(depth, residual=True, num_classes=num_classes)


def cifar_plain(depth: int, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(depth, residual=False, num_classes=num_classes)


# Published checkpoints: file name (sha256 prefix inside) and reference CIFAR-10 test top-1.
CIFAR_CHECKPOINTS: dict[int, tuple[str, float]] = {
    20: ("resnet20-12fca82f.th", 91.78),
    32: ("resnet32-d509ac18.th", 92.78),
    44: ("resnet44-014dd654.th", 93.14),
    56: ("resnet56-4bfd9763.th", 93.62),
    110: ("resnet110-1d1ed7c2.th", 93.39),
}
CIFAR_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
