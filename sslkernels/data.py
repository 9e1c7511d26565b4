"""Data for the trainer: an embedded synthetic dataset that needs no download, image folders,
and a collate function that leaves decoded uint8 images untouched (augmentation runs in the
training step, batched, instead of in data-loader workers)."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

SHAPES = ("disc", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes", "checker",
          "diamond", "dots")


def _shape_mask(kind: int, size: int, cx: float, cy: float, r: float, phase: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                          torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    dx, dy = x - cx, y - cy
    inside = (dx.abs() <= r) & (dy.abs() <= r)
    name = SHAPES[kind]
    if name == "disc":
        return dx ** 2 + dy ** 2 <= r ** 2
    if name == "square":
        return inside
    if name == "triangle":
        return (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
    if name == "ring":
        d = (dx ** 2 + dy ** 2).sqrt()
        return (d <= r) & (d >= 0.55 * r)
    if name == "cross":
        w = 0.3 * r
        return inside & ((dx.abs() <= w) | (dy.abs() <= w))
    period = max(2.0, r / 2)
    if name == "h-stripes":
        return inside & (torch.sin((y + phase) * math.pi / period) > 0)
    if name == "v-stripes":
        return inside & (torch.sin((x + phase) * math.pi / period) > 0)
    if name == "checker":
        return inside & ((torch.sin((x + phase) * math.pi / period) *
                          torch.sin((y + phase) * math.pi / period)) > 0)
    if name == "diamond":
        return dx.abs() + dy.abs() <= r
    # dots
    return inside & (torch.sin((x + phase) * math.pi / period) > 0.3) & \
        (torch.sin((y + phase) * math.pi / period) > 0.3)


class SyntheticShapes(Dataset):
    """Ten classes of shapes and textures (``SHAPES``) at random position, size and colour on a
    random-colour noisy background: (3, size, size) uint8 images and integer labels.

    Deterministic given ``seed``: image ``i`` is generated from ``seed`` and ``i`` alone, so the
    dataset is the same on every machine and needs neither download nor disk. The class is the
    shape, never the colour, so colour augmentations cannot be used to cheat.
    """

    def __init__(self, length: int = 5000, size: int = 32, seed: int = 0):
        if length < 1 or size < 8:
            raise ValueError(f"length must be >= 1 and size >= 8, got {length} and {size}")
        self.length, self.size, self.seed = length, size, seed
        self.classes = list(SHAPES)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(len(SHAPES), (), generator=g))
        s = self.size
        u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
        r = u(0.22, 0.4) * s
        cx, cy = u(r, s - r), u(r, s - r)
        fg = torch.rand(3, generator=g)
        bg = torch.rand(3, generator=g)
        if (fg - bg).abs().sum() < 0.6:  # keep the shape visible
            fg = 1 - bg
        mask = _shape_mask(label, s, cx, cy, r, u(0, 4)).float()
        img = bg[:, None, None] * (1 - mask) + fg[:, None, None] * mask
        img = img + 0.08 * torch.randn(3, s, s, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), label


class ImageFolderUint8(Dataset):
    """torchvision ImageFolder layout (``root/class/image.jpg``), decoded to (3, H, W) uint8."""

    def __init__(self, root: str):
        import torchvision

        self.folder = torchvision.datasets.ImageFolder(root, loader=lambda p: p)
        self.classes = self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        from torchvision.io import ImageReadMode, decode_image

        path, label = self.folder[i]
        return decode_image(path, mode=ImageReadMode.RGB), label


def collate_uint8(batch):
    """Stacks equal-size uint8 images into (B, 3, H, W) (a list when sizes differ) without
    converting them: workers only decode; the augmentation kernels do the rest."""
    images, labels = zip(*batch)
    labels = torch.as_tensor(labels)
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), labels
    return list(images), labels
