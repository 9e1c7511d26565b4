"""Per-sample random augmentation of a whole uint8 batch with plain PyTorch ops (no per-image
Python loop): random resized crop + flip through one ``grid_sample``, colour jitter in a
per-sample random order, grayscale, Gaussian blur with per-sample sigma (grouped separable
convolution, reflect padding), solarize, normalize.

The trainer uses it for speed; it follows torchvision's parameter distributions and colour
formulas, but its resampling is plain bilinear (no antialias), so it is not bit-exact with
torchvision's per-image pipeline.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _u(shape, lo, hi, g, device):
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)


def crop_boxes(b: int, h: int, w: int, scale, ratio, g, device):
    """RandomResizedCrop.get_params for b images at once: 10 tries, log-uniform ratio,
    centre-crop fallback. Returns (top, left, height, width) float tensors."""
    area = h * w
    target = _u((b, 10), scale[0], scale[1], g, device) * area
    logr = _u((b, 10), math.log(ratio[0]), math.log(ratio[1]), g, device)
    ar = logr.exp()
    cw = (target * ar).sqrt().round()
    ch = (target / ar).sqrt().round()
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1, device=device))
    idx = first.clamp_min(0).unsqueeze(1)
    cw, ch = cw.gather(1, idx).squeeze(1), ch.gather(1, idx).squeeze(1)
    # fallback: whole image, clamped to the ratio range
    in_ratio = w / h
    fw, fh = (float(w), float(h))
    if in_ratio < ratio[0]:
        fw, fh = float(w), float(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(h * ratio[1])), float(h)
    bad = first < 0
    cw = torch.where(bad, torch.full_like(cw, fw), cw)
    ch = torch.where(bad, torch.full_like(ch, fh), ch)
    top = (torch.rand(b, generator=g, device=device) * (h - ch + 1)).floor()
    left = (torch.rand(b, generator=g, device=device) * (w - cw + 1)).floor()
    top = torch.where(bad, ((h - ch) / 2).round(), top)
    left = torch.where(bad, ((w - cw) / 2).round(), left)
    return top, left, ch, cw


def _gray(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a, b, f):
    return (f * a + (1 - f) * b).clamp(0, 1)


def _hue(x, f):
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + f.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], 1))


def _blur(x, sigma, kernel):
    b, c, h, w = x.shape
    r = kernel // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, kernel)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(b * c, 1, 1, kernel),
                 groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(b * c, 1, kernel, 1),
                 groups=b * c)
    return y.view(b, c, h, w)


def augment_batch(images: torch.Tensor, size: int, recipe: dict, view: int,
                  g: torch.Generator, mean, std) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, size, size) float32, normalized; one random draw per image."""
    dev = images.device
    x = images.float() / 255
    b, _, h, w = x.shape
    top, left, ch, cw = crop_boxes(b, h, w, recipe["scale"], (3 / 4, 4 / 3), g, dev)
    flip = torch.rand(b, generator=g, device=dev) < 0.5
    # output pixel centres -> input coordinates (align_corners=False convention)
    sx = cw / w * torch.where(flip, -1.0, 1.0)
    sy = ch / h
    tx = (2 * left + cw) / w - 1
    ty = (2 * top + ch) / h - 1
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    bj, cj, sj, hj = recipe["jitter"]
    apply = (torch.rand(b, generator=g, device=dev) < recipe["p_jitter"]).view(b, 1, 1, 1)
    fb = _u(b, max(0, 1 - bj), 1 + bj, g, dev).view(b, 1, 1, 1)
    fc = _u(b, max(0, 1 - cj), 1 + cj, g, dev).view(b, 1, 1, 1)
    fs = _u(b, max(0, 1 - sj), 1 + sj, g, dev).view(b, 1, 1, 1)
    fh = _u(b, -hj, hj, g, dev)
    order = torch.rand(b, 4, generator=g, device=dev).argsort(1)
    for pos in range(4):
        op = order[:, pos].view(b, 1, 1, 1)
        y = x
        y = torch.where(op == 0, (x * fb).clamp(0, 1), y)
        y = torch.where(op == 1, _blend(x, _gray(x).mean((2, 3), keepdim=True), fc), y)
        y = torch.where(op == 2, _blend(x, _gray(x), fs), y)
        y = torch.where(op == 3, _hue(x, fh), y)
        x = torch.where(apply, y, x)
    gray = (torch.rand(b, generator=g, device=dev) < recipe["p_gray"]).view(b, 1, 1, 1)
    x = torch.where(gray, _gray(x).expand_as(x), x)
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    blur = (torch.rand(b, generator=g, device=dev) < recipe["p_blur"][view]).view(b, 1, 1, 1)
    sigma = _u(b, 0.1, 2.0, g, dev)
    x = torch.where(blur, _blur(x, sigma, kernel), x)
    sol = (torch.rand(b, generator=g, device=dev) < recipe["p_solarize"][view]).view(b, 1, 1, 1)
    x = torch.where(sol & (x >= 0.5), 1 - x, x)
    m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    return (x - m) / s
