"""sslkernels: compiled kernels for self-supervised learning in PyTorch.

Public API:

* :func:`fused_info_nce` - InfoNCE / NT-Xent without the O(N^2) logits (two views or q/k with
  negatives); :func:`fused_supcon` - multi-positive InfoNCE (supervised contrastive, SimCLR with
  V views; :func:`view_labels`); :mod:`sslkernels.losses` has drop-in ``nn.Module`` losses
  (``NTXentLoss``, ``InfoNCELoss``, ``SupConLoss``).
* :class:`EMA` - in-place EMA of a target network, built once and updated every step (one
  kernel call for the whole parameter list); :func:`ema_update_` as one stateless call,
  :func:`flatten_parameters_` for one pass per flat buffer, :func:`cosine_momentum`.
* :mod:`sslkernels.methods` - ``SimCLR``, ``SimCLRv2``, ``MoCoV2``, ``BYOL``, ``SimSiam``;
  the commands ``python -m sslkernels train | finetune | distill`` run them (pretraining,
  SimCLR v2's fine-tuning from a head layer, and its self-distillation).
* :class:`NegativeQueue` - MoCo's K x D ring buffer of negatives: one-launch enqueue with
  wrap-around and a device-side pointer, read in place by :func:`fused_info_nce`.
* :mod:`sslkernels.augment` - batched augmentations with per-sample random parameters, exactly
  torchvision's ops: :class:`TwoViews` (both views of a uint8 batch or list of mixed-size
  images), :class:`MultiViews` (V views per image, e.g. multi-crop: 2 global + small crops),
  :class:`ViewConfig` and the recipes ``simclr``/``moco_v2``/``simsiam``/``byol``,
  :func:`sample_params` / ``augment(..., params=)`` to draw and replay, :func:`uint8_collate`.
"""
from ._ext import cuda_built
from .info_nce import fused_info_nce
from .supcon import fused_supcon, view_labels
from .queue import NegativeQueue
from .ema import EMA, cosine_momentum, ema_update_, flatten_parameters_, is_flat
from . import augment, losses, methods
from .augment import (MultiViews, TwoViews, ViewConfig, pack_images, sample_params,
                      uint8_collate)

__all__ = ["fused_info_nce", "fused_supcon", "view_labels", "NegativeQueue", "EMA",
           "ema_update_", "cosine_momentum", "flatten_parameters_", "is_flat", "losses",
           "methods", "cuda_built", "augment", "TwoViews", "MultiViews", "ViewConfig",
           "pack_images", "sample_params", "uint8_collate"]
__version__ = "0.1.0"
