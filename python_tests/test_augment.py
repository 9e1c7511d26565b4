"""Batched augmentations: every op and the whole chain against torchvision's functional ops
applied image by image, the parameter sampler against torchvision's get_params, replay,
reproducibility, input checks, opcheck, and the CUDA kernel where a GPU is present."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from sslkernels import augment as A
from sslkernels.reference import augment as R

# Float rounding and summation order only (the resize weights are float32, as ATen computes
# them): the measured worst case is ~1e-5 after normalization by ImageNet's std (~0.22).
ATOL = 1e-4
NO_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs a CUDA device"))
DEVICES = ["cpu", CUDA]


def _images(sizes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(device)
            for h, w in sizes]


def _smooth_images(sizes, seed=0):
    """Natural-ish images (smooth colour gradients plus noise): exercise hue and contrast on
    saturated and gray pixels alike."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        y = torch.linspace(0, 1, h)[:, None]
        x = torch.linspace(0, 1, w)[None, :]
        base = torch.stack([x * torch.ones_like(y), y * torch.ones_like(x), (1 - x) * y])
        noise = torch.rand(3, h, w, generator=g) * 0.3
        img = ((base + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        img[:, : max(1, h // 4), : max(1, w // 4)] = 128  # a gray patch (h undefined)
        out.append(img)
    return out


def _identity_params(images, size=None):
    """Full-image crop, every op off; jitter factors at identity, order 0..3."""
    n = len(images)
    p = torch.zeros(n, A.NUM_PARAMS)
    for i, img in enumerate(images):
        p[i, 2], p[i, 3] = img.shape[1], img.shape[2]
    p[:, 6:9] = 1.0
    p[:, 10:14] = torch.arange(4.0)
    p[:, 16] = 1.0
    return p


def _check(images, params, cfg, device="cpu", atol=ATOL):
    packed = [img.to(device) for img in images]
    got, _ = A.augment(packed, cfg, params=params)
    ref, _ = A.augment(images, cfg, params=params, backend="reference")
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert got.device.type == device
    torch.testing.assert_close(got.cpu().float(), ref.float(), atol=atol, rtol=0)
    return got


SIZES = [(37, 53), (64, 64), (1, 1), (5, 300), (300, 7), (120, 90)]


# ---------------------------------------------------------------------------------------------
# Single ops against torchvision.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out", [1, 16, 33])
def test_resized_crop_and_flip(device, out):
    imgs = _smooth_images(SIZES)
    g = torch.Generator().manual_seed(1)
    p = _identity_params(imgs)
    for i, img in enumerate(imgs):  # random boxes, including 1x1 crops and whole images
        h, w = img.shape[1:]
        ch = int(torch.randint(1, h + 1, (1,), generator=g))
        cw = int(torch.randint(1, w + 1, (1,), generator=g))
        if i == 1:
            ch = cw = 1
        p[i, 0] = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        p[i, 1] = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        p[i, 2], p[i, 3] = ch, cw
    p[::2, 4] = 1.0
    cfg = A.ViewConfig(size=out, **NO_NORM)
    _check(imgs, p, cfg, device)
    # Directly against torchvision, independent of the reference module.
    got, _ = A.augment(imgs, cfg, params=p)
    for i, img in enumerate(imgs):
        x = TF.resized_crop(TF.to_dtype(img, torch.float32, scale=True), int(p[i, 0]),
                            int(p[i, 1]), int(p[i, 2]), int(p[i, 3]), [out, out], antialias=True)
        if p[i, 4]:
            x = TF.horizontal_flip(x)
        torch.testing.assert_close(got[i], x, atol=ATOL, rtol=0)


def test_resize_identity_and_upscale():
    # S equal to the crop: the resize is skipped by torchvision; upscaling: plain bilinear.
    imgs = _images([(24, 24), (3, 5)])
    p = _identity_params(imgs)
    got, _ = A.augment(imgs[:1], A.ViewConfig(size=24, **NO_NORM), params=p[:1])
    torch.testing.assert_close(got[0], imgs[0].float() / 255, atol=1e-6, rtol=0)
    got, _ = A.augment(imgs[1:], A.ViewConfig(size=40, **NO_NORM), params=p[1:])
    ref = torch.nn.functional.interpolate(imgs[1][None].float() / 255, size=(40, 40),
                                          mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,col,values", [
    (0, 6, [0.0, 0.3, 1.0, 1.8]),            # brightness
    (1, 7, [0.0, 0.2, 1.0, 1.8]),            # contrast
    (2, 8, [0.0, 0.2, 1.0, 1.8]),            # saturation
    (3, 9, [-0.5, -0.2, 0.07, 0.5]),         # hue
])
def test_single_jitter_op(device, op, col, values):
    imgs = _smooth_images([(20, 31)] * len(values)) + _images([(9, 9)] * len(values))
    p = _identity_params(imgs)
    p[:, 5] = 1.0
    p[:, col] = torch.tensor(values * 2)
    p[:, 10:14] = torch.tensor([op] + [k for k in range(4) if k != op], dtype=torch.float32)
    got = _check(imgs, p, A.ViewConfig(size=16, **NO_NORM), device)
    fn = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][op]
    for i, img in enumerate(imgs):
        x = TF.resized_crop(TF.to_dtype(img, torch.float32, scale=True), 0, 0, img.shape[1],
                            img.shape[2], [16, 16], antialias=True)
        torch.testing.assert_close(got[i].cpu(), fn(x, float(p[i, col])), atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_all_24_jitter_orders(device):
    # Brightness before contrast changes the grayscale mean contrast blends with: every order
    # must give torchvision's result for that order.
    orders = list(itertools.permutations(range(4)))
    imgs = _smooth_images([(23, 17)] * 24, seed=3)
    p = _identity_params(imgs)
    p[:, 5] = 1.0
    p[:, 6:10] = torch.tensor([1.6, 0.4, 1.7, 0.23])
    p[:, 10:14] = torch.tensor(orders, dtype=torch.float32)
    got = _check(imgs, p, A.ViewConfig(size=12, **NO_NORM), device)
    assert len({tuple(v.flatten().tolist()) for v in got.cpu().round(decimals=4)}) > 12


@pytest.mark.parametrize("device", DEVICES)
def test_gray_solarize_normalize(device):
    imgs = _smooth_images([(30, 30)] * 4)
    p = _identity_params(imgs)
    p[:, 14] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    p[:, 17] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    for thr in (0.0, 0.3, 1.0):
        cfg = A.ViewConfig(size=30, solarize_threshold=thr, mean=(0.1, 0.5, 0.9),
                           std=(0.2, 2.0, 0.5))
        got = _check(imgs, p, cfg, device)
        x = TF.to_dtype(imgs[2], torch.float32, scale=True)
        x = TF.solarize(TF.rgb_to_grayscale(x, num_output_channels=3), thr)
        x = TF.normalize(x, [0.1, 0.5, 0.9], [0.2, 2.0, 0.5])
        torch.testing.assert_close(got[2].cpu(), x, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size,ksize", [(16, 3), (24, 23), (11, 21), (2, 3), (5, 1), (40, 5)])
def test_gaussian_blur(device, size, ksize):
    imgs = _smooth_images([(size + 3, size + 1)] * 3, seed=size)
    p = _identity_params(imgs)
    p[:, 15] = 1.0
    p[:, 16] = torch.tensor([0.1, 0.77, 2.0])
    cfg = A.ViewConfig(size=size, blur_kernel_size=ksize, **NO_NORM)
    got = _check(imgs, p, cfg, device)
    for i, img in enumerate(imgs):
        x = TF.resized_crop(TF.to_dtype(img, torch.float32, scale=True), 0, 0, img.shape[1],
                            img.shape[2], [size, size], antialias=True)
        if ksize > 1:
            x = TF.gaussian_blur(x, [ksize, ksize], [float(p[i, 16])] * 2)
        torch.testing.assert_close(got[i].cpu(), x, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# The whole chain.

CONFIGS = {
    "simclr": A.simclr(24)[0],
    "byol1": A.byol(19)[0],
    "byol2": A.byol(19)[1],
    "everything": A.ViewConfig(size=21, jitter=(0.9, 0.9, 0.9, 0.5), jitter_p=1.0, gray_p=0.5,
                               blur_p=0.5, solarize_p=0.5, flip_p=0.5, scale=(0.01, 1.0)),
    "tiny": A.ViewConfig(size=1, jitter_p=1.0, blur_p=1.0, solarize_p=0.5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chain_matches_torchvision(device, name):
    cfg = CONFIGS[name]
    imgs = _smooth_images(SIZES + [(40, 61), (13, 11)], seed=7)
    for seed in range(2):
        _, p = A.augment(imgs, cfg, generator=torch.Generator().manual_seed(seed))
        _check(imgs, p, cfg, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_dtype_and_layout(dtype, channels_last):
    imgs = _images([(40, 50), (33, 20)])
    cfg = A.simclr(16)[0]
    base, p = A.augment(imgs, cfg, generator=torch.Generator().manual_seed(0))
    got, _ = A.augment(imgs, cfg.replace(dtype=dtype, channels_last=channels_last), params=p)
    assert got.dtype == dtype and got.shape == base.shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    assert torch.equal(got, base.to(dtype))  # same rounding of the same float32 values


# ---------------------------------------------------------------------------------------------
# Inputs: list packing, batches, replay, reproducibility.

def test_list_of_mixed_sizes_equals_per_image():
    imgs = _images([(31, 47), (300, 200), (8, 5), (64, 64)], seed=2)
    cfg = A.simclr(20)[0]
    got, p = A.augment(imgs, cfg, generator=torch.Generator().manual_seed(5))
    for i, img in enumerate(imgs):
        one, _ = A.augment([img], cfg, params=p[i:i + 1])
        assert torch.equal(one[0], got[i])


def test_batch_tensor_equals_list():
    batch = torch.stack(_images([(30, 40)] * 5))
    cfg = A.moco_v2(16)[0]
    got, p = A.augment(batch, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(A.augment(list(batch), cfg, params=p).views, got)


def test_reproducible_from_seed_and_replay():
    imgs = _images([(50, 60), (70, 40), (20, 20)])
    cfg = A.simclr(16)[0]
    a = A.augment(imgs, cfg, generator=torch.Generator().manual_seed(123))
    b = A.augment(imgs, cfg, generator=torch.Generator().manual_seed(123))
    c = A.augment(imgs, cfg, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a.params, b.params) and torch.equal(a.views, b.views)
    assert not torch.equal(a.params, c.params)
    assert torch.equal(A.augment(imgs, cfg, params=a.params).views, a.views)


def test_two_views_and_recipes():
    imgs = _images([(50, 60), (70, 40), (20, 20)])
    tv = A.TwoViews("byol", size=16)
    out = tv(imgs, generator=torch.Generator().manual_seed(0))
    assert out.view1.shape == out.view2.shape == (3, 3, 16, 16)
    assert not torch.equal(out.params1, out.params2)  # independent draws
    again = tv(imgs, params=(out.params1, out.params2))
    assert torch.equal(again.view1, out.view1) and torch.equal(again.view2, out.view2)
    v1, v2 = A.byol()
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert v1.jitter == (0.4, 0.4, 0.2, 0.1) and v1.kernel_size == 23
    s = A.simclr()[0]
    assert (s.scale, s.jitter, s.jitter_p, s.gray_p, s.blur_p) == (
        (0.08, 1.0), (0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.5)
    m = A.moco_v2()[0]
    assert m.scale == (0.2, 1.0) and m.jitter == (0.4, 0.4, 0.4, 0.1)
    assert A.simsiam()[0] == m
    assert A.TwoViews(A.simclr(8)[0]).view2 == A.simclr(8)[0]


def test_multi_views_equal_per_view_augment():
    """Views that share a config come from one op call over the repeated images; each is what
    augment gives for its own parameters, and the parameters replay."""
    imgs = _images([(50, 60), (70, 40), (20, 20)])
    mv = A.MultiViews.multi_crop("simclr", n_global=2, n_local=3, global_size=16, local_size=8)
    assert len(mv) == 5
    out = mv(imgs, generator=torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in out.views] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 3
    for v, p, cfg in zip(out.views, out.params, mv.configs):
        assert torch.equal(v, A.augment(imgs, cfg, params=p).views)
    assert all(not torch.equal(out.params[i], out.params[j])
               for i in range(5) for j in range(i))  # independent draws
    assert mv.configs[2].scale == (0.05, 0.14) and mv.configs[0].scale == (0.14, 1.0)
    assert mv.configs[2].kernel_size == A.default_blur_kernel_size(8)
    again = mv(imgs, params=out.params)
    assert all(torch.equal(a, b) for a, b in zip(again.views, out.views))
    same = mv(imgs, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(same.views, out.views))
    assert out.labels().tolist() == [0, 1, 2] * 5


def test_multi_views_from_recipe_and_configs():
    imgs = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8)
    out = A.MultiViews("byol", n=3, size=12)(imgs, generator=torch.Generator().manual_seed(1))
    v1, v2 = A.byol(12)
    assert len(out.views) == 3 and out.views[0].shape == (4, 3, 12, 12)
    assert torch.equal(out.views[2], A.augment(imgs, v1, params=out.params[2]).views)
    assert torch.equal(out.views[1], A.augment(imgs, v2, params=out.params[1]).views)
    cfg = A.simclr(8)[0]
    assert A.MultiViews([cfg, cfg]).configs == [cfg, cfg]
    with pytest.raises(TypeError, match=r"views\[1\] must be a ViewConfig"):
        A.MultiViews([cfg, "simclr"])
    with pytest.raises(ValueError, match="n \\(the number of views\\) must be an int >= 1"):
        A.MultiViews("simclr", n=0)
    with pytest.raises(ValueError, match="recipe must be one of"):
        A.MultiViews("swav")
    with pytest.raises(ValueError, match="params must be a list of 2"):
        A.MultiViews([cfg, cfg])(imgs, params=[out.params[0]])
    with pytest.raises(ValueError, match="at least one view"):
        A.MultiViews.multi_crop(n_global=0, n_local=0)


def test_uint8_collate():
    imgs = _images([(10, 12), (10, 12), (7, 9)])
    x, y = A.uint8_collate([(imgs[0], 1), (imgs[1], 2)])
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 10, 12) and y.tolist() == [1, 2]
    x, y = A.uint8_collate([(img, i) for i, img in enumerate(imgs)])
    assert isinstance(x, list) and x[2] is imgs[2] and y.tolist() == [0, 1, 2]
    x, _ = A.uint8_collate([(imgs[0], 0), (imgs[1], 1)], stack=False)
    assert isinstance(x, list)
    loader = torch.utils.data.DataLoader([(img, 0) for img in imgs], batch_size=3,
                                         collate_fn=A.uint8_collate)
    batch, _ = next(iter(loader))
    assert A.TwoViews("simclr", size=8)(batch).view1.shape == (3, 3, 8, 8)
    with pytest.raises(TypeError, match="uint8"):
        A.uint8_collate([(imgs[0].float(), 0)])


# ---------------------------------------------------------------------------------------------
# The sampler against torchvision's get_params.

def test_crop_sampler_matches_torchvision_distribution():
    h, w, n = 180, 320, 4000
    ours = A.sample_params(torch.tensor([[h, w]] * n), A.ViewConfig(scale=(0.08, 1.0)),
                           torch.Generator().manual_seed(0))[:, :4].double()
    t = T.RandomResizedCrop(224, scale=(0.08, 1.0))
    torch.manual_seed(0)
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    theirs = torch.tensor([[d[k] for k in ("top", "left", "height", "width")]
                           for d in (t.make_params([img]) for _ in range(n))]).double()
    for x in (ours, theirs):  # inside the image, area and ratio within the ranges (+ rounding)
        assert (x[:, 0] >= 0).all() and (x[:, 0] + x[:, 2] <= h).all()
        assert (x[:, 1] >= 0).all() and (x[:, 1] + x[:, 3] <= w).all()
    area = ours[:, 2] * ours[:, 3] / (h * w)
    ratio = ours[:, 3] / ours[:, 2]
    assert area.min() > 0.07 and area.max() <= 1.0
    assert ratio.min() > 0.74 and ratio.max() < 1.35
    # Same distribution: quantiles of area, aspect, and box centre agree within sampling noise.
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)

    def stats(x):
        return torch.stack([torch.quantile(x[:, 2] * x[:, 3] / (h * w), q),
                            torch.quantile(torch.log(x[:, 3] / x[:, 2]), q),
                            torch.quantile((x[:, 0] + x[:, 2] / 2) / h, q),
                            torch.quantile((x[:, 1] + x[:, 3] / 2) / w, q)])

    torch.testing.assert_close(stats(ours), stats(theirs), atol=0.04, rtol=0)


@pytest.mark.parametrize("hw", [(10, 100), (100, 10), (50, 50)])
def test_crop_sampler_fallback_is_torchvisions(hw):
    # scale=(1, 1) on a 10x100 image never fits a ratio in [3/4, 4/3]: centre-crop fallback.
    h, w = hw
    cfg = A.ViewConfig(scale=(1.0, 1.0))
    ours = A.sample_params(torch.tensor([[h, w]] * 50), cfg,
                           torch.Generator().manual_seed(0))[:, :4]
    t = T.RandomResizedCrop(224, scale=(1.0, 1.0))
    d = t.make_params([torch.zeros(3, h, w, dtype=torch.uint8)])
    expected = torch.tensor([d["top"], d["left"], d["height"], d["width"]], dtype=torch.float32)
    if hw != (50, 50):
        assert (ours == expected).all()
    else:  # square: the first try fits (whole image)
        assert (ours == torch.tensor([0.0, 0.0, 50.0, 50.0])).all()


def test_jitter_and_flag_distributions():
    n = 24000
    cfg = A.ViewConfig(jitter=(0.8, 0.3, 1.5, 0.2), jitter_p=0.8, flip_p=0.5, gray_p=0.2,
                       blur_p=0.1, solarize_p=0.3, blur_sigma=(0.1, 2.0))
    p = A.sample_params(torch.tensor([[64, 48]] * n), cfg, torch.Generator().manual_seed(1))
    for col, (lo, hi) in ((6, (0.2, 1.8)), (7, (0.7, 1.3)), (8, (0.0, 2.5)), (9, (-0.2, 0.2)),
                          (16, (0.1, 2.0))):
        x = p[:, col].double()
        assert x.min() >= lo and x.max() <= hi
        assert x.min() < lo + 0.01 * (hi - lo) and x.max() > hi - 0.01 * (hi - lo)
        assert abs(x.mean() - (lo + hi) / 2) < 0.02 * (hi - lo)  # uniform: mean and variance
        assert abs(x.var() - (hi - lo) ** 2 / 12) < 0.05 * (hi - lo) ** 2 / 12
    for col, prob in ((4, 0.5), (5, 0.8), (14, 0.2), (15, 0.1), (17, 0.3)):
        assert set(p[:, col].tolist()) <= {0.0, 1.0}
        assert abs(p[:, col].mean().item() - prob) < 4 * math.sqrt(prob * (1 - prob) / n)
    orders = [tuple(int(v) for v in row) for row in p[:, 10:14].tolist()]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    counts = torch.tensor([orders.count(o) for o in itertools.permutations(range(4))],
                          dtype=torch.float64)
    assert (counts > 0).all() and len(counts) == 24
    expected = n / 24
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 49.7  # 23 degrees of freedom, p = 0.001


def test_zero_jitter_strength_is_identity_factor():
    cfg = A.ViewConfig(jitter=(0.0, 0.0, 0.0, 0.0))
    p = A.sample_params(torch.tensor([[8, 8]] * 100), cfg, torch.Generator().manual_seed(0))
    assert (p[:, 6:9] == 1).all() and (p[:, 9] == 0).all()
    cfg = A.ViewConfig(jitter=(2.0, 0.0, 0.0, 0.0))  # brightness range clipped at 0
    p = A.sample_params(torch.tensor([[8, 8]] * 1000), cfg, torch.Generator().manual_seed(0))
    assert p[:, 6].min() >= 0 and p[:, 6].max() <= 3


# ---------------------------------------------------------------------------------------------
# Bad input.

def test_bad_input():
    img = _images([(8, 8)])[0]
    cfg = A.ViewConfig(size=4)
    with pytest.raises(TypeError, match="uint8"):
        A.augment([img.float()], cfg)
    with pytest.raises(TypeError, match="uint8"):
        A.augment(img[None].float(), cfg)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        A.augment([torch.zeros(4, 8, 8, dtype=torch.uint8)], cfg)
    with pytest.raises(ValueError, match="3-D"):
        A.augment([torch.zeros(8, 8, dtype=torch.uint8)], cfg)
    with pytest.raises(ValueError, match="4-D"):
        A.augment(torch.zeros(3, 8, 8, dtype=torch.uint8), cfg)
    with pytest.raises(ValueError, match="empty list"):
        A.augment([], cfg)
    with pytest.raises(ValueError, match="empty batch"):
        A.augment(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), cfg)
    with pytest.raises(TypeError, match="images"):
        A.augment("x", cfg)
    with pytest.raises(TypeError, match="config"):
        A.augment([img], None)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="size"):
            A.ViewConfig(size=bad)
    for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
        for v in (-0.1, 1.5):
            with pytest.raises(ValueError, match=name):
                A.ViewConfig(**{name: v})
    with pytest.raises(ValueError, match="scale"):
        A.ViewConfig(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hue"):
        A.ViewConfig(jitter=(0.4, 0.4, 0.4, 0.7))
    with pytest.raises(ValueError, match="blur_kernel_size"):
        A.ViewConfig(size=4, blur_kernel_size=4)
    with pytest.raises(ValueError, match="blur_kernel_size"):
        A.ViewConfig(size=4, blur_kernel_size=9)
    with pytest.raises(ValueError, match="std"):
        A.ViewConfig(std=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match="dtype"):
        A.ViewConfig(dtype=torch.int32)
    p = _identity_params([img])
    with pytest.raises(ValueError, match="params must have shape"):
        A.augment([img], cfg, params=p[:, :5])
    bad = p.clone()
    bad[0, 2] = 9
    with pytest.raises(ValueError, match="crop box"):
        A.augment([img], cfg, params=bad)
    bad = p.clone()
    bad[0, 5], bad[0, 10:14] = 1, torch.tensor([0.0, 0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="permutation"):
        A.augment([img], cfg, params=bad)
    with pytest.raises(ValueError, match="backend"):
        A.augment([img], cfg, backend="tpu")
    # A direct op call with a box outside the image is refused before any read.
    packed = A.pack_images([img])
    bad = p.clone()
    bad[0, 0] = 5
    with pytest.raises(RuntimeError, match="crop box"):
        torch.ops.sslkernels.augment(packed.data, packed.meta, bad, 4, [0.0] * 3, [1.0] * 3,
                                     0.5, 1, torch.float32, False)


# ---------------------------------------------------------------------------------------------
# Op registration.

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    imgs = _images([(12, 9), (5, 14)], device=device)
    packed = A.pack_images(imgs)
    cfg = A.ViewConfig(size=6, jitter_p=1.0, blur_p=1.0, blur_kernel_size=3)
    p = A.sample_params(packed, cfg, torch.Generator().manual_seed(0)).to(device)
    for dtype, cl in ((torch.float32, False), (torch.bfloat16, True)):
        torch.library.opcheck(torch.ops.sslkernels.augment.default,
                              (packed.data, packed.meta, p, 6, [0.5] * 3, [0.25] * 3, 0.5, 3,
                               dtype, cl))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu():
    imgs = _images([(300, 400), (480, 320), (7, 9), (224, 224)])
    cfg = A.simclr(224)[0]
    cpu, p = A.augment(imgs, cfg, generator=torch.Generator().manual_seed(0))
    gpu, _ = A.augment([i.cuda() for i in imgs], cfg, params=p)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=ATOL, rtol=0)
