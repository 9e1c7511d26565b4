"""Data for the trainer: an embedded synthetic dataset that needs no download, and image folders,
both yielding decoded uint8 images (batched with :func:`sslkernels.augment.uint8_collate`;
augmentation runs in the training step, batched, instead of in data-loader workers)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("disc", "square", "triangle", "ring", "plus", "diamond", "x", "frame", "stripes",
          "checker")

# Rendering runs in numpy: torch's intra-op threads cost milliseconds per tiny op on a loaded
# machine, numpy's elementwise ops are single-threaded. Rendering at twice the resolution and averaging 2x2 blocks gives anti-aliased edges, so small
# shapes keep their outline (a disc and a diamond of radius 4 px differ in a few edge pixels).
_SUPERSAMPLE = 2


def _shape_mask(kind: int, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float,
                phase: float) -> np.ndarray:
    """Boolean mask of shape ``SHAPES[kind]`` centred at (cx, cy) with half-size r on the pixel
    coordinate grids x, y."""
    dx, dy = x - cx, y - cy
    box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    name = SHAPES[kind]
    if name == "disc":
        return dx ** 2 + dy ** 2 <= r ** 2
    if name == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if name == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= 0.55 * (dy + r))
    if name == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 <= r ** 2) & (d2 >= (0.5 * r) ** 2)
    if name == "plus":
        return box & ((np.abs(dx) <= 0.3 * r) | (np.abs(dy) <= 0.3 * r))
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if name == "x":
        return box & ((np.abs(dx - dy) <= 0.4 * r) | (np.abs(dx + dy) <= 0.4 * r))
    if name == "frame":
        inner = (np.abs(dx) <= 0.45 * r) & (np.abs(dy) <= 0.45 * r)
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r) & ~inner
    period = max(1.5, r / 2.5)  # bars ~1 px wide at 32 px: thin, but kept by the supersampling
    if name == "stripes":
        return box & (np.sin((dy + phase) * math.pi / period) > 0)
    # checker
    return box & ((np.sin((dx + phase) * math.pi / period) *
                   np.sin((dy + phase) * math.pi / period)) > 0)


_LUMA = np.array([0.2989, 0.587, 0.114], dtype=np.float32)


def _level_far_from(bg: float, g: torch.Generator) -> float:
    """A grey level uniform on [0, bg - 0.3] U [bg + 0.3, 1] (never empty: 0.4 long at least),
    so every shape stays visible, also after grayscale and desaturation."""
    below, above = max(0.0, bg - 0.3), max(0.0, 0.7 - bg)
    v = float(torch.rand((), generator=g)) * (below + above)
    return v if v < below else bg + 0.3 + (v - below)


class SyntheticShapes(Dataset):
    """Ten classes (``SHAPES``) defined by shape and texture only: every image shows 2-4 copies
    of its class's shape, each with its own random colour, size and position, on a flat
    background of a random colour, plus pixel noise. (3, size, size) uint8 images and integer
    labels.

    Colour, position, scale and background are nuisances: a class never has a colour of its
    own, so what colour augmentations remove cannot be what separates classes. Two crops of one
    image still share that image's layout (how many shapes, where, how large, which colours
    before jitter), so views of one image are more alike than views of two images of the same
    class, which is what instance-discrimination methods need; and most crops of at least a
    fifth of the image contain one of the shapes, so the class survives cropping.

    Deterministic given ``seed``: image ``i`` is generated from ``seed`` and ``i`` alone, so the
    dataset is the same on every machine and needs neither download nor disk.

    Args:
        length: number of images (>= 1).
        size: image side in pixels (>= 16: smaller shapes lose their outline).
        seed: any int; datasets with different seeds are independent draws.
    """

    def __init__(self, length: int = 5000, size: int = 32, seed: int = 0):
        for name, v in (("length", length), ("size", size), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if size < 16:
            raise ValueError(f"size must be >= 16 (smaller shapes lose their outline), got {size}")
        self.length, self.size, self.seed = length, size, seed
        self.classes = list(SHAPES)
        n = size * _SUPERSAMPLE
        c = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
        self._y, self._x = np.meshgrid(c, c, indexing="ij")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} images")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(len(SHAPES), (), generator=g))
        s = self.size
        u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
        x, y = self._x, self._y
        # Luminance carries the picture and one random tint colours the whole image. Colour
        # that differs freely between regions (a random colour per shape and for the
        # background) identifies an image even after the recipes' colour jitter, so instance
        # discrimination would learn colour instead of shape; a global tint is what the jitter
        # (hue, saturation, grayscale) does remove.
        bg = float(torch.rand((), generator=g))
        img = np.full(x.shape, bg, dtype=np.float32)
        count = int(torch.randint(1, 4, (), generator=g))
        for _ in range(count):
            r = u(0.18, 0.3) * s
            cx, cy = u(r, s - r), u(r, s - r)
            level = _level_far_from(bg, g)
            mask = _shape_mask(label, x, y, cx, cy, r, u(0, 4))
            img = np.where(mask, np.float32(level), img)
        tint = torch.rand(3, generator=g).numpy() + 0.05
        tint = tint / float(_LUMA @ tint)
        amount = u(0.2, 0.8)
        img = img[None] * (1 - amount + amount * tint[:, None, None])
        k = _SUPERSAMPLE
        img = np.clip(img, 0, 1).reshape(3, s, k, s, k).mean((2, 4))
        img = img + 0.05 * torch.randn(3, s, s, generator=g).numpy()
        img = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
        return torch.from_numpy(img), label


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
