"""Backbones: anything mapping images (B, 3, H, W) to features (B, F). Helpers for torchvision
ResNets (ImageNet stem, or the small-image stem of the SimCLR/SimSiam CIFAR experiments: 3x3
stride-1 first convolution, no max-pool) and a small convnet for quick runs and tests."""
from __future__ import annotations

import torch
from torch import nn


def resnet_backbone(name: str = "resnet18", small_images: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier, and its feature width.

    Args:
        name: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"`` (random initialization; no
            download).
        small_images: CIFAR-style stem for 32-64 px inputs.
    """
    import torchvision

    if name not in ("resnet18", "resnet34", "resnet50"):
        raise ValueError(f"name must be resnet18, resnet34 or resnet50, got {name!r}")
    net = getattr(torchvision.models, name)(weights=None)
    if small_images:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class SmallConvNet(nn.Module):
    """Four conv-BN-ReLU blocks and global average pooling: (B, 3, H, W) -> (B, width)."""

    def __init__(self, width: int = 64):
        super().__init__()
        chans = [3, width // 4, width // 2, width, width]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2,
                                 padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))
