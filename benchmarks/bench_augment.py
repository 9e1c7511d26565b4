"""Batched augmentations against torchvision v2 applied image by image (DESIGN.md section 7).

SimCLR two-view pipeline at 224 px from 256 uint8 images of mixed sizes (300-500 px a side),
CPU: torchvision v2 (RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter),
RandomGrayscale, RandomApply(GaussianBlur), ToDtype, Normalize) per image and per view, against
sslkernels' TwoViews("simclr") on the same images. kornia is compared when installed. The GPU
case (H100 target: >= 50k views/s) runs where CUDA is present.
"""
import importlib.util

import pytest
import torch
from torchvision.transforms import v2 as T

from sslkernels import augment as A

from conftest import note

N_IMAGES, SIZE = 256, 224
VIEWS = 2 * N_IMAGES
GROUP = f"simclr two views, {N_IMAGES} mixed-size uint8 images -> 224 px, CPU"
GROUP_GPU = f"simclr two views, {N_IMAGES} mixed-size uint8 images -> 224 px, GPU"
BASE = ["torchvision v2 per image"]


def _images(device="cpu"):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(N_IMAGES):
        h, w = (int(v) for v in torch.randint(300, 501, (2,), generator=g))
        out.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).to(device))
    return out


def _torchvision_pipeline():
    return T.Compose([
        T.RandomResizedCrop(SIZE, scale=(0.08, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(A.default_blur_kernel_size(SIZE), (0.1, 2.0))], p=0.5),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(A.IMAGENET_MEAN, A.IMAGENET_STD),
    ])


def _views_per_s(group, name):
    from conftest import _RESULTS
    return VIEWS / _RESULTS[group][name]


def test_torchvision(rec):
    imgs, tf = _images(), _torchvision_pipeline()
    torch.manual_seed(0)
    rec(GROUP, "torchvision v2 per image",
        lambda: [torch.stack([tf(i) for i in imgs]) for _ in range(2)], baselines=BASE,
        rounds=2, warmup=0)
    note(GROUP, f"torchvision: {_views_per_s(GROUP, 'torchvision v2 per image'):.0f} views/s")


def test_sslkernels(rec):
    imgs, tv = _images(), A.TwoViews("simclr", size=SIZE)
    g = torch.Generator().manual_seed(0)
    rec(GROUP, "sslkernels TwoViews", lambda: tv(imgs, generator=g), baselines=BASE, rounds=5)
    note(GROUP, f"sslkernels: {_views_per_s(GROUP, 'sslkernels TwoViews'):.0f} views/s "
                f"(target >= 5x torchvision)")


@pytest.mark.skipif(importlib.util.find_spec("kornia") is None, reason="kornia not installed")
def test_kornia(rec):  # pragma: no cover - kornia is not installed here
    import kornia.augmentation as K

    imgs = _images()
    aug = torch.nn.Sequential(
        K.RandomResizedCrop((SIZE, SIZE), scale=(0.08, 1.0)), K.RandomHorizontalFlip(),
        K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8), K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((23, 23), (0.1, 2.0), p=0.5),
        K.Normalize(torch.tensor(A.IMAGENET_MEAN), torch.tensor(A.IMAGENET_STD)))

    def run():  # kornia needs one size per batch call: image by image
        return [torch.cat([aug(i[None].float() / 255) for i in imgs]) for _ in range(2)]

    rec(GROUP, "kornia per image", run, baselines=BASE, rounds=2, warmup=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sslkernels_gpu(rec):
    imgs, tv = _images("cuda"), A.TwoViews("simclr", size=SIZE)
    packed = A.pack_images(imgs)
    g = torch.Generator().manual_seed(0)

    def run():
        out = tv(packed, generator=g)
        torch.cuda.synchronize()
        return out

    rec(GROUP_GPU, "sslkernels TwoViews (packed once)", run, rounds=20)
    note(GROUP_GPU, f"{_views_per_s(GROUP_GPU, 'sslkernels TwoViews (packed once)'):.0f} "
                    f"views/s (target >= 50k on an H100)")
