r"""Batched image augmentations with per-sample randomness (SimCLR, MoCo v2, SimSiam, BYOL).

One op, ``torch.ops.sslkernels.augment`` (C++ CPU kernel, CUDA kernel), turns a batch of uint8
images into normalized float views, every sample with its own random parameters, in a few passes
over an S x S buffer per image instead of one tensor op per transform per image.

**Inputs.** A uint8 batch (B, 3, H, W), or a list of uint8 (3, H_i, W_i) images of different
sizes, packed once into one flat buffer with per-image offsets (:func:`pack_images`; never
padded). **Output.** (B, 3, S, S) float32, bfloat16 or float16, optionally channels-last.

**Chain** (per sample, parameters from one row of the (B, 18) float32 parameter tensor, columns
in :data:`PARAM_COLUMNS`). With :math:`x = \text{img} / 255`:

1. ``resized_crop(x, top, left, h, w, [S, S], antialias=True)``: separable triangle filter whose
   support is widened by the downscale factor (ATen's ``_upsample_bilinear2d_aa``); when
   upscaling it is ``align_corners=False`` bilinear.
2. ``horizontal_flip`` when ``flip``.
3. When ``jitter``: the four ops in the sample's order (a permutation of 0 brightness,
   1 contrast, 2 saturation, 3 hue), each followed by a clamp to [0, 1]:
   brightness :math:`x \leftarrow x b`; contrast :math:`x \leftarrow c x + (1 - c)\,\overline{L}`
   with :math:`\overline{L}` the mean grayscale of the image *as it is just before contrast*;
   saturation :math:`x \leftarrow s x + (1 - s) L(x)` per pixel; hue: RGB -> HSV (torchvision's
   ``_rgb2hsv``), :math:`h \leftarrow (h + \delta) \bmod 1`, HSV -> RGB. A hue factor of exactly
   0 skips the op (``ColorJitter(hue=0)``).
4. grayscale when ``gray``: :math:`L = 0.2989 r + 0.587 g + 0.114 b` into all three channels.
5. Gaussian blur when ``blur``: kernel :math:`\propto e^{-d^2 / 2\sigma^2}`, ``d = -k//2 .. k//2``,
   normalized, separable, reflect padding; ``k`` is per call (default: ``int(0.1 S)``, made odd,
   as SimCLR/BYOL), :math:`\sigma` per sample.
6. solarize when ``solarize``: :math:`x \ge t \Rightarrow 1 - x`.
7. normalize: :math:`(x - \mu_c) / \sigma_c`.

Given the same parameters this equals ``torchvision.transforms.v2.functional`` applied image by
image to ``to_dtype(img, float32, scale=True)`` (see :mod:`sslkernels.reference.augment`, the
oracle of the tests): within 1e-4 before normalization (float rounding and summation order
only; the resize weights are computed in float32 exactly as ATen computes them).

**Randomness.** :func:`sample_params` draws every sample's parameters from a seeded
``torch.Generator`` with torchvision's ``get_params`` distributions (RandomResizedCrop: 10 tries
of area-fraction ~ U(scale) and log-uniform aspect ratio, centre-crop fallback; ColorJitter:
factors ~ U[max(0, 1 - v), 1 + v], hue ~ U[-h, h], a uniformly random order of the 4 ops;
RandomApply / RandomGrayscale / flip: Bernoulli(p); GaussianBlur: sigma ~ U[0.1, 2.0]). The
parameters are returned with the views; passing them back replays the same views.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import torch

from . import _ext, _validate  # noqa: F401  (_ext registers the ops)
from .reference import augment as _ref

BACKENDS = ("reference", "cpu", "cuda")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Columns of the (B, 18) float32 parameter tensor (csrc/augment_math.h).
PARAM_COLUMNS = {
    "top": 0, "left": 1, "height": 2, "width": 3,  # crop box, source pixels
    "flip": 4,                                      # 0/1
    "jitter": 5,                                    # 0/1: colour jitter applied
    "brightness": 6, "contrast": 7, "saturation": 8, "hue": 9,  # jitter factors
    "order0": 10, "order1": 11, "order2": 12, "order3": 13,     # op ids in application order
    "gray": 14,                                     # 0/1
    "blur": 15, "sigma": 16,                        # 0/1, sigma
    "solarize": 17,                                 # 0/1
}
NUM_PARAMS = 18

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_blur_kernel_size(size: int) -> int:
    """SimCLR's and BYOL's blur kernel: 10% of the output side, made odd (23 at 224 px)."""
    k = int(0.1 * size)
    return k + 1 if k % 2 == 0 else k


def _pair(name: str, value: Any, lo: float, hi: float) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (min, max), got {value!r}")
    a = _validate.in_range(f"{name}[0]", value[0], lo, hi)
    b = _validate.in_range(f"{name}[1]", value[1], lo, hi)
    if a > b:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {value!r}")
    return (a, b)


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """One view's recipe: the transform probabilities and ranges, and the output format.

    Args:
        size: output side S (> 0).
        scale: RandomResizedCrop area fraction range, within (0, 1].
        ratio: RandomResizedCrop aspect-ratio range (w / h), > 0.
        flip_p: probability of a horizontal flip.
        jitter: ColorJitter strengths (brightness, contrast, saturation, hue); hue <= 0.5.
        jitter_p: probability of applying the jitter (RandomApply).
        gray_p: RandomGrayscale probability.
        blur_p: probability of the Gaussian blur (RandomApply).
        blur_sigma: sigma range, uniform.
        blur_kernel_size: odd kernel side; ``None``: :func:`default_blur_kernel_size`.
        solarize_p: probability of solarization; solarize_threshold: its threshold in [0, 1].
        mean, std: per-channel normalization (``None``: ImageNet's); std must be non-zero.
        dtype: float32, bfloat16 or float16 output. channels_last: output memory format.
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise TypeError(f"size must be an int, got {type(self.size).__name__}")
        if self.size <= 0:
            raise ValueError(f"size must be > 0, got {self.size}")
        s = _pair("scale", self.scale, 0.0, 1.0)
        if s[0] <= 0:
            raise ValueError(f"scale must be within (0, 1], got {self.scale!r}")
        r = _pair("ratio", self.ratio, 0.0, math.inf)
        if r[0] <= 0:
            raise ValueError(f"ratio must be > 0, got {self.ratio!r}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            _validate.in_range(name, getattr(self, name), 0.0, 1.0)
        if not isinstance(self.jitter, (tuple, list)) or len(self.jitter) != 4:
            raise TypeError(f"jitter must be (brightness, contrast, saturation, hue), got "
                            f"{self.jitter!r}")
        for name, v in zip(("brightness", "contrast", "saturation"), self.jitter[:3]):
            _validate.in_range(f"jitter {name}", v, 0.0, math.inf)
        _validate.in_range("jitter hue", self.jitter[3], 0.0, 0.5)
        sig = _pair("blur_sigma", self.blur_sigma, 0.0, math.inf)
        if sig[0] <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma!r}")
        k = self.kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"blur_kernel_size must be an odd int >= 1, got {k!r}")
        if k > 2 * self.size - 1:
            raise ValueError(f"blur_kernel_size must be <= 2 * size - 1 = {2 * self.size - 1} "
                             f"(reflect padding), got {k}")
        _validate.in_range("solarize_threshold", self.solarize_threshold, 0.0, 1.0)
        for name in ("mean", "std"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or len(v) != 3:
                raise ValueError(f"{name} must hold 3 values (one per channel), got {v!r}")
        if any(float(x) == 0.0 for x in self.std):
            raise ValueError(f"std must be non-zero, got {self.std!r}")
        if self.dtype not in OUT_DTYPES:
            raise TypeError(f"dtype must be one of {OUT_DTYPES}, got {self.dtype}")

    @property
    def kernel_size(self) -> int:
        """The blur kernel side used for this view."""
        return (default_blur_kernel_size(self.size) if self.blur_kernel_size is None
                else self.blur_kernel_size)

    def replace(self, **changes) -> "ViewConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Recipes. Each returns the configs of its two views (identical for symmetric recipes).

def simclr(size: int = 224, **kw) -> tuple[ViewConfig, ViewConfig]:
    """SimCLR (Chen et al. 2020; google-research/simclr ``data_util.py``, colour strength 1.0):
    random crop area 0.08-1, aspect 3/4-4/3, flip 0.5, colour jitter (0.8, 0.8, 0.8, 0.2) in
    random order with p 0.8, grayscale 0.2, blur p 0.5 with sigma U[0.1, 2.0] and a kernel of 10%
    of the side, no solarization."""
    c = ViewConfig(size=size, scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8,
                   gray_p=0.2, blur_p=0.5, solarize_p=0.0, flip_p=0.5, **kw)
    return c, c


def moco_v2(size: int = 224, **kw) -> tuple[ViewConfig, ViewConfig]:
    """MoCo v2 (facebookresearch/moco ``main_moco.py``, ``--aug-plus``): RandomResizedCrop scale
    (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale 0.2, GaussianBlur
    sigma [0.1, 2.0] p 0.5, flip 0.5. (MoCo blurs with PIL's GaussianBlur(radius=sigma); here the
    blur is torchvision's with a kernel of 10% of the side. MoCo flips last; flip commutes with
    every later op, so the order does not matter.)"""
    c = ViewConfig(size=size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                   gray_p=0.2, blur_p=0.5, solarize_p=0.0, flip_p=0.5, **kw)
    return c, c


def moco_v1(size: int = 224, **kw) -> tuple[ViewConfig, ViewConfig]:
    """MoCo v1 (facebookresearch/moco ``main_moco.py`` without ``--aug-plus``), the baseline of
    MoCo v2's augmentation ablation: RandomResizedCrop scale (0.2, 1), RandomGrayscale 0.2,
    ColorJitter(0.4, 0.4, 0.4, 0.4) always applied, flip 0.5; no blur. (MoCo v1 converts to
    grayscale before the jitter, here it is after, as in every other recipe: brightness,
    contrast and saturation commute with grayscale up to clamping, hue on a gray image is a
    no-op, so the two orders differ only in the hue shift of the 20% grayscale views.)"""
    c = ViewConfig(size=size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                   gray_p=0.2, blur_p=0.0, solarize_p=0.0, flip_p=0.5, **kw)
    return c, c


def simsiam(size: int = 224, **kw) -> tuple[ViewConfig, ViewConfig]:
    """SimSiam (facebookresearch/simsiam ``main_simsiam.py``): MoCo v2's augmentation."""
    return moco_v2(size, **kw)


def byol(size: int = 224, **kw) -> tuple[ViewConfig, ViewConfig]:
    """BYOL (Grill et al. 2020, Table 6; deepmind/byol ``utils/augmentations.py``): crop area
    0.08-1, flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8 in random order, grayscale 0.2;
    view 1: blur p 1.0, solarize p 0; view 2: blur p 0.1, solarize p 0.2 (threshold 0.5)."""
    base = dict(size=size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                gray_p=0.2, flip_p=0.5, solarize_threshold=0.5)
    base.update(kw)
    return (ViewConfig(blur_p=1.0, solarize_p=0.0, **base),
            ViewConfig(blur_p=0.1, solarize_p=0.2, **base))


RECIPES = {"simclr": simclr, "moco_v1": moco_v1, "moco_v2": moco_v2, "simsiam": simsiam,
           "byol": byol}


# ---------------------------------------------------------------------------------------------
# Inputs.

class Packed(NamedTuple):
    """Images packed for the op: ``data`` flat uint8, ``meta`` (B, 3) int64 rows (offset, H, W),
    ``sizes`` (B, 2) int64 (H, W) on the CPU."""
    data: torch.Tensor
    meta: torch.Tensor
    sizes: torch.Tensor


def _check_image(name: str, img: Any, ndim: int) -> torch.Tensor:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(img).__name__}")
    if img.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 (decoded images), got {img.dtype}")
    if img.dim() != ndim:
        shape = "(B, 3, H, W)" if ndim == 4 else "(3, H, W)"
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(img.shape)}")
    if img.shape[-3] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels in dim {ndim - 3}, got shape "
                         f"{tuple(img.shape)}")
    if img.shape[-1] == 0 or img.shape[-2] == 0:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(img.shape)}")
    return img


def pack_images(images: torch.Tensor | Sequence[torch.Tensor]) -> Packed:
    """Packs a uint8 (B, 3, H, W) batch (a view, no copy when contiguous) or a list of uint8
    (3, H_i, W_i) images (one copy into a flat buffer) for the op."""
    if isinstance(images, torch.Tensor):
        _check_image("images", images, 4)
        b, _, h, w = images.shape
        if b == 0:
            raise ValueError("images must hold at least one image, got an empty batch")
        data = images.contiguous().view(-1)
        offsets = torch.arange(b, dtype=torch.int64) * (3 * h * w)
        sizes = torch.tensor([[h, w]], dtype=torch.int64).expand(b, 2)
    elif isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images must hold at least one image, got an empty list")
        for i, img in enumerate(images):
            _check_image(f"images[{i}]", img, 3)
        dev = images[0].device
        if any(img.device != dev for img in images):
            raise ValueError("images must all be on one device")
        sizes = torch.tensor([[img.shape[1], img.shape[2]] for img in images], dtype=torch.int64)
        numel = 3 * sizes[:, 0] * sizes[:, 1]
        offsets = torch.cumsum(numel, 0) - numel
        data = torch.cat([img.reshape(-1) for img in images])
    else:
        raise TypeError("images must be a uint8 tensor (B, 3, H, W) or a list of uint8 "
                        f"(3, H, W) tensors, got {type(images).__name__}")
    meta = torch.cat([offsets[:, None], sizes], 1).contiguous().to(data.device)
    return Packed(data, meta, sizes.contiguous())


# ---------------------------------------------------------------------------------------------
# Parameters.

def _crop_params(sizes: torch.Tensor, scale, ratio, g) -> torch.Tensor:
    """RandomResizedCrop.get_params for every image at once: (B, 4) (top, left, h, w)."""
    n = sizes.shape[0]
    H = sizes[:, 0].to(torch.float64)
    W = sizes[:, 1].to(torch.float64)
    area = (H * W)[:, None]
    s = torch.rand(n, 10, generator=g, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0]
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    ar = torch.exp(torch.rand(n, 10, generator=g, dtype=torch.float64) * (lr1 - lr0) + lr0)
    target = area * s
    w = torch.round(torch.sqrt(target * ar))  # round half to even, like Python's round
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = ok.to(torch.int8).argmax(1, keepdim=True)
    found = ok.any(1)
    w = w.gather(1, first)[:, 0]
    h = h.gather(1, first)[:, 0]
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.minimum(torch.floor(u[:, 0] * (H - h + 1)), H - h)
    left = torch.minimum(torch.floor(u[:, 1] * (W - w + 1)), W - w)
    # Fallback: centre crop at the nearest allowed aspect ratio.
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W,
                     torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    fw = torch.clamp(fw, 1, None)
    fh = torch.clamp(fh, 1, None)
    ftop = torch.div(H - fh, 2, rounding_mode="floor")
    fleft = torch.div(W - fw, 2, rounding_mode="floor")
    box = torch.stack([torch.where(found, top, ftop), torch.where(found, left, fleft),
                       torch.where(found, h, fh), torch.where(found, w, fw)], 1)
    return box


def sample_params(sizes: torch.Tensor | Packed | Sequence, config: ViewConfig,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws every sample's parameters: (B, 18) float32 on the CPU (columns :data:`PARAM_COLUMNS`).

    ``sizes``: (B, 2) int (H, W) per image, or what :func:`pack_images` takes or returns.
    Uses ``generator`` (a CPU ``torch.Generator``; ``None``: the global one) only.
    """
    if not isinstance(config, ViewConfig):
        raise TypeError(f"config must be a ViewConfig, got {type(config).__name__}")
    if isinstance(sizes, Packed):
        sizes = sizes.sizes
    elif not (isinstance(sizes, torch.Tensor) and sizes.dim() == 2 and not sizes.is_floating_point()
              and sizes.dtype != torch.uint8):
        sizes = pack_images(sizes).sizes
    if sizes.dim() != 2 or sizes.shape[1] != 2 or sizes.shape[0] == 0:
        raise ValueError(f"sizes must be (B, 2) with B >= 1, got shape {tuple(sizes.shape)}")
    if (sizes <= 0).any():
        raise ValueError("sizes must be >= 1")
    sizes = sizes.cpu().to(torch.int64)
    g = generator
    n = sizes.shape[0]
    p = torch.zeros(n, NUM_PARAMS, dtype=torch.float64)
    p[:, 0:4] = _crop_params(sizes, config.scale, config.ratio, g)
    u = torch.rand(n, 5, generator=g, dtype=torch.float64)
    p[:, 4] = (u[:, 0] < config.flip_p).double()
    p[:, 5] = (u[:, 1] < config.jitter_p).double()
    b, c, s, h = (float(v) for v in config.jitter)
    f = torch.rand(n, 4, generator=g, dtype=torch.float64)
    for col, v, uu in ((6, b, f[:, 0]), (7, c, f[:, 1]), (8, s, f[:, 2])):
        lo, hi = max(0.0, 1.0 - v), 1.0 + v
        p[:, col] = lo + (hi - lo) * uu if v > 0 else 1.0
    p[:, 9] = (-h + 2 * h * f[:, 3]) if h > 0 else 0.0
    p[:, 10:14] = torch.argsort(torch.rand(n, 4, generator=g, dtype=torch.float64), dim=1).double()
    p[:, 14] = (u[:, 2] < config.gray_p).double()
    p[:, 15] = (u[:, 3] < config.blur_p).double()
    lo, hi = config.blur_sigma
    p[:, 16] = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    p[:, 17] = (u[:, 4] < config.solarize_p).double()
    return p.to(torch.float32)


def _check_params(params: Any, sizes: torch.Tensor) -> torch.Tensor:
    _validate.tensor("params", params, ndim=2)
    n = sizes.shape[0]
    if params.shape != (n, NUM_PARAMS):
        raise ValueError(f"params must have shape (B, {NUM_PARAMS}) = ({n}, {NUM_PARAMS}), got "
                         f"{tuple(params.shape)}")
    p = params.detach().to("cpu", torch.float64)
    if not torch.isfinite(p).all():
        raise ValueError("params must be finite")
    box = p[:, 0:4]
    H, W = sizes[:, 0].double(), sizes[:, 1].double()
    bad = ((box != torch.round(box)).any(1) | (box[:, 0] < 0) | (box[:, 1] < 0) |
           (box[:, 2] < 1) | (box[:, 3] < 1) | (box[:, 0] + box[:, 2] > H) |
           (box[:, 1] + box[:, 3] > W))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"params[{i}] crop box (top, left, height, width) = "
                         f"{box[i].long().tolist()} must be integers inside its "
                         f"{int(H[i])}x{int(W[i])} image")
    if (p[:, 6:9] < 0).any():
        raise ValueError("params brightness/contrast/saturation factors must be >= 0")
    if (p[:, 9].abs() > 0.5).any():
        raise ValueError("params hue factors must be in [-0.5, 0.5]")
    order = p[:, 10:14]
    jit = p[:, 5] != 0
    if jit.any() and not (order[jit].sort(1).values ==
                          torch.arange(4, dtype=torch.float64)).all():
        raise ValueError("params jitter order (columns 10-13) must be a permutation of 0..3")
    if ((p[:, 15] != 0) & (p[:, 16] <= 0)).any():
        raise ValueError("params blur sigma must be > 0 where blur is on")
    return params.to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# The op: fake kernel (shapes only) for torch.compile / opcheck.

@torch.library.register_fake("sslkernels::augment")
def _augment_fake(data, meta, params, size, mean, std, solarize_threshold, blur_kernel_size,
                  dtype, channels_last):
    out = params.new_empty((params.shape[0], 3, size, size), dtype=dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def default_backend(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


class Augmented(NamedTuple):
    """The views (B, 3, S, S) and the (B, 18) parameters that made them (pass them back as
    ``params=`` to replay)."""
    views: torch.Tensor
    params: torch.Tensor


def augment(images: torch.Tensor | Sequence[torch.Tensor] | Packed, config: ViewConfig, *,
            params: torch.Tensor | None = None, generator: torch.Generator | None = None,
            backend: str | None = None) -> Augmented:
    """One augmented view of every image.

    Args:
        images: uint8 (B, 3, H, W), a list of uint8 (3, H_i, W_i), or :func:`pack_images`' result.
        config: the view's :class:`ViewConfig` (e.g. ``simclr()[0]``).
        params: (B, 18) parameters to replay; ``None``: drawn with :func:`sample_params`.
        generator: CPU ``torch.Generator`` for the draw (reproducible views from its seed).
        backend: ``None`` (the images' device), ``"cpu"``, ``"cuda"`` or ``"reference"``
            (torchvision per image).

    Returns:
        :class:`Augmented` ``(views, params)``: views (B, 3, S, S) in ``config.dtype`` on the
        images' device (channels-last if asked); params (B, 18) float32 on the CPU (or as given).
    """
    if not isinstance(config, ViewConfig):
        raise TypeError(f"config must be a ViewConfig, got {type(config).__name__}")
    packed = images if isinstance(images, Packed) else pack_images(images)
    device = packed.data.device
    if params is None:
        params = sample_params(packed.sizes, config, generator)
    else:
        params = _check_params(params, packed.sizes)
    backend = default_backend(device) if backend is None else backend
    _validate.backend(backend, BACKENDS, device)
    if backend == "reference":
        imgs = _unpack(packed)
        views = _ref.augment(imgs, params.to(device), config.size, config.mean, config.std,
                             config.solarize_threshold, config.kernel_size, config.dtype,
                             config.channels_last)
        return Augmented(views, params)
    views = torch.ops.sslkernels.augment(
        packed.data, packed.meta, params.to(device, non_blocking=True), config.size,
        [float(v) for v in config.mean], [float(v) for v in config.std],
        float(config.solarize_threshold), config.kernel_size, config.dtype, config.channels_last)
    return Augmented(views, params)


def _unpack(packed: Packed) -> list[torch.Tensor]:
    out = []
    for (off, h, w) in packed.meta.cpu().tolist():
        out.append(packed.data[off:off + 3 * h * w].view(3, h, w))
    return out


class TwoViewBatch(NamedTuple):
    view1: torch.Tensor
    view2: torch.Tensor
    params1: torch.Tensor
    params2: torch.Tensor


class TwoViews:
    """Both views of a batch with independent parameters (lightly's / solo-learn's
    ``MultiViewTransform`` / SimCLR's ``TwoCropsTransform``, batched).

    ``TwoViews("simclr")``, ``TwoViews(byol(224))`` or ``TwoViews(cfg1, cfg2)``. Calling it with a
    batch (or list) of uint8 images returns :class:`TwoViewBatch`; the images are packed once
    and serve both views. ``params=(p1, p2)`` replays.
    """

    def __init__(self, view1: ViewConfig | tuple | str = "simclr",
                 view2: ViewConfig | None = None, *, size: int = 224, backend: str | None = None):
        if isinstance(view1, str):
            _validate.choice("recipe", view1, tuple(RECIPES))
            view1, view2 = RECIPES[view1](size)
        elif isinstance(view1, tuple):
            view1, view2 = view1
        if view2 is None:
            view2 = view1
        for name, v in (("view1", view1), ("view2", view2)):
            if not isinstance(v, ViewConfig):
                raise TypeError(f"{name} must be a ViewConfig, got {type(v).__name__}")
        self.view1, self.view2, self.backend = view1, view2, backend

    def __call__(self, images, generator: torch.Generator | None = None,
                 params: tuple[torch.Tensor, torch.Tensor] | None = None) -> TwoViewBatch:
        packed = images if isinstance(images, Packed) else pack_images(images)
        p1, p2 = (None, None) if params is None else params
        v1, p1 = augment(packed, self.view1, params=p1, generator=generator, backend=self.backend)
        v2, p2 = augment(packed, self.view2, params=p2, generator=generator, backend=self.backend)
        return TwoViewBatch(v1, v2, p1, p2)


class MultiViewBatch(NamedTuple):
    """V views of a batch of B images: ``views[v]`` (B, 3, S_v, S_v) and ``params[v]`` (B, 18),
    in recipe order."""
    views: list[torch.Tensor]
    params: list[torch.Tensor]

    def labels(self) -> torch.Tensor:
        """(V * B,) int64 image index of each view, for the views stacked view-major
        (``torch.cat(views)``, or the embeddings of each view concatenated in this order): the
        labels of :func:`sslkernels.fused_supcon` for multi-view SimCLR."""
        b = self.views[0].shape[0]
        return torch.arange(b, device=self.views[0].device).repeat(len(self.views))


class MultiViews:
    """V augmented views of every image of a batch in one call: SimCLR with more than two views,
    multi-crop (SwAV / DINO-style: a few global crops and several small ones), SupCon's batches.

    ``MultiViews("simclr", views=4)`` - four views from a recipe (an asymmetric recipe such as
    BYOL's alternates its two configs); ``MultiViews([cfg, cfg, small, small])`` - one
    :class:`ViewConfig` per view; :meth:`multi_crop` - global + local crops from a recipe. Calling
    it with a uint8 batch (or list of mixed-size images) returns :class:`MultiViewBatch`: the
    images are packed once, and all the views that share a config are made by one op call (the
    images' offsets repeated), each view with its own random parameters. ``params=[p_0, ...]``
    replays. A multi-crop SimCLR / SupCon step::

        batch = MultiViews.multi_crop("simclr", n_global=2, n_local=4)(images, generator=g)
        z = torch.cat([model(v) for v in batch.views])
        loss = sslkernels.fused_supcon(z, batch.labels())
    """

    def __init__(self, views: Sequence[ViewConfig] | str = "simclr", *, n: int | None = None,
                 size: int = 224, backend: str | None = None):
        if isinstance(views, str):
            _validate.choice("recipe", views, tuple(RECIPES))
            pair = RECIPES[views](size)
            count = 2 if n is None else n
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"n (the number of views) must be an int >= 1, got {count!r}")
            views = [pair[v % 2] for v in range(count)]
        elif n is not None:
            raise ValueError("n applies to a recipe name; a list of configs gives one view each")
        if not isinstance(views, (list, tuple)) or len(views) == 0:
            raise TypeError("views must be a recipe name or a non-empty list of ViewConfig, got "
                            f"{views!r}")
        for i, v in enumerate(views):
            if not isinstance(v, ViewConfig):
                raise TypeError(f"views[{i}] must be a ViewConfig, got {type(v).__name__}")
        self.configs = list(views)
        self.backend = backend

    @classmethod
    def multi_crop(cls, recipe: str = "simclr", *, n_global: int = 2, n_local: int = 6,
                   global_size: int = 224, local_size: int = 96,
                   global_scale: tuple[float, float] = (0.14, 1.0),
                   local_scale: tuple[float, float] = (0.05, 0.14),
                   backend: str | None = None) -> "MultiViews":
        """Multi-crop (Caron et al. 2020, SwAV's defaults): ``n_global`` crops at
        ``global_size`` with area ``global_scale`` and ``n_local`` crops at ``local_size`` with
        area ``local_scale``, every other transform from ``recipe`` (the blur kernel follows the
        crop size). The global views alternate the recipe's two configs; the local ones use
        its first."""
        _validate.choice("recipe", recipe, tuple(RECIPES))
        for name, v in (("n_global", n_global), ("n_local", n_local)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if n_global + n_local == 0:
            raise ValueError("multi_crop needs at least one view (n_global + n_local >= 1)")
        pair = RECIPES[recipe](global_size)
        glob = [pair[v % 2].replace(scale=global_scale) for v in range(n_global)]
        local = pair[0].replace(size=local_size, scale=local_scale)
        return cls(glob + [local] * n_local, backend=backend)

    def __len__(self) -> int:
        return len(self.configs)

    def __call__(self, images, generator: torch.Generator | None = None,
                 params: Sequence[torch.Tensor] | None = None) -> MultiViewBatch:
        packed = images if isinstance(images, Packed) else pack_images(images)
        v_count = len(self.configs)
        if params is not None and (not isinstance(params, (list, tuple)) or
                                   len(params) != v_count):
            raise ValueError(f"params must be a list of {v_count} (B, {NUM_PARAMS}) tensors "
                             "(one per view), as MultiViewBatch.params holds them")
        b = packed.sizes.shape[0]
        views: list[torch.Tensor | None] = [None] * v_count
        out_params: list[torch.Tensor | None] = [None] * v_count
        # Views with one config: one op call over the images repeated (offsets, not pixels).
        groups: dict[ViewConfig, list[int]] = {}
        for v, cfg in enumerate(self.configs):
            groups.setdefault(cfg, []).append(v)
        for cfg, idx in groups.items():
            k = len(idx)
            rep = packed if k == 1 else Packed(packed.data, packed.meta.repeat(k, 1),
                                              packed.sizes.repeat(k, 1))
            p = None if params is None else torch.cat([params[v] for v in idx])
            out, p = augment(rep, cfg, params=p, generator=generator, backend=self.backend)
            for j, v in enumerate(idx):
                views[v] = out[j * b:(j + 1) * b]
                out_params[v] = p[j * b:(j + 1) * b]
        return MultiViewBatch(views, out_params)


# ---------------------------------------------------------------------------------------------
# Data loading: workers decode only; augmentation runs in the training step.

def uint8_collate(batch: Sequence[tuple[torch.Tensor, Any]], stack: bool | None = None):
    """``collate_fn`` for a ``DataLoader`` whose dataset yields ``(uint8 (3, H, W) image, label)``
    (e.g. ``torchvision.io.decode_image`` output): the images are left untouched.

    Returns ``(images, labels)``: ``images`` is a uint8 (B, 3, H, W) batch when all images share
    one size (or ``stack=True``), else the list of images (``stack=False`` forces the list); pass
    either to :func:`augment` / :class:`TwoViews`. ``labels`` is a tensor when the labels are
    numbers or tensors, else the list.
    """
    if len(batch) == 0:
        raise ValueError("batch must hold at least one sample")
    images, labels = [], []
    for i, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) < 1:
            raise TypeError(f"batch[{i}] must be (image, label), got {type(item).__name__}")
        img = item[0]
        _check_image(f"batch[{i}] image", img, 3)
        images.append(img)
        labels.append(item[1] if len(item) > 1 else None)
    same = all(img.shape == images[0].shape for img in images)
    if stack and not same:
        raise ValueError("stack=True needs images of one size")
    out = torch.stack(images) if (same if stack is None else stack) else images
    if all(isinstance(v, (int, float, bool)) for v in labels):
        labels = torch.tensor(labels)
    elif all(isinstance(v, torch.Tensor) for v in labels):
        labels = torch.stack(labels)
    return out, labels
