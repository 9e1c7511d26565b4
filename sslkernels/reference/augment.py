"""Per-image torchvision reference of the batched augmentation kernels.

The oracle for :func:`sslkernels.augment.augment` and its ``backend="reference"`` path: every
image is converted with ``to_dtype(scale=True)`` and run through
``torchvision.transforms.v2.functional`` one op at a time, with the sample's parameters (one row
of the (B, 18) parameter tensor, columns in :data:`sslkernels.augment.PARAM_COLUMNS`).
"""
from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

# Column indices (csrc/augment_math.h).
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER = 0, 1, 2, 3, 4, 5
BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER = 6, 7, 8, 9, 10
GRAY, BLUR, SIGMA, SOLARIZE = 14, 15, 16, 17


def augment_image(img: torch.Tensor, p: list[float], size: int, mean, std,
                  solarize_threshold: float, blur_kernel_size: int) -> torch.Tensor:
    """One uint8 (3, H, W) image -> float32 (3, size, size), torchvision's functional ops."""
    x = TF.to_dtype(img, torch.float32, scale=True)
    x = TF.resized_crop(x, int(p[TOP]), int(p[LEFT]), int(p[HEIGHT]), int(p[WIDTH]),
                        size=[size, size], antialias=True)
    if p[FLIP]:
        x = TF.horizontal_flip(x)
    if p[JITTER]:
        for k in range(4):
            op = int(p[ORDER + k])
            if op == 0:
                x = TF.adjust_brightness(x, p[BRIGHTNESS])
            elif op == 1:
                x = TF.adjust_contrast(x, p[CONTRAST])
            elif op == 2:
                x = TF.adjust_saturation(x, p[SATURATION])
            elif p[HUE] != 0.0:  # ColorJitter(hue=0) skips the op
                x = TF.adjust_hue(x, p[HUE])
    if p[GRAY]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p[BLUR] and blur_kernel_size > 1:
        x = TF.gaussian_blur(x, [blur_kernel_size, blur_kernel_size], [p[SIGMA], p[SIGMA]])
    if p[SOLARIZE]:
        x = TF.solarize(x, solarize_threshold)
    return TF.normalize(x, list(mean), list(std))


def augment(images: list[torch.Tensor], params: torch.Tensor, size: int, mean, std,
            solarize_threshold: float, blur_kernel_size: int, dtype: torch.dtype = torch.float32,
            channels_last: bool = False) -> torch.Tensor:
    """Every image through :func:`augment_image`, stacked to (B, 3, size, size)."""
    rows = params.detach().to("cpu", torch.float32).tolist()
    out = torch.stack([augment_image(img.cpu(), p, size, mean, std, solarize_threshold,
                                     blur_kernel_size) for img, p in zip(images, rows)])
    out = out.to(device=params.device, dtype=dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
