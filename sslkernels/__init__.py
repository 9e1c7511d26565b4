"""sslkernels: compiled kernels for self-supervised learning in PyTorch.

Public API:

* :func:`fused_info_nce` - InfoNCE / NT-Xent without the O(N^2) logits (two views or q/k with
  negatives); :mod:`sslkernels.losses` has drop-in ``nn.Module`` losses.
* :class:`NegativeQueue` - MoCo's K x D ring buffer of negatives: one-launch enqueue with
  wrap-around and a device-side pointer, read in place by :func:`fused_info_nce`.
"""
from ._ext import cuda_built
from .info_nce import fused_info_nce
from .queue import NegativeQueue
from . import losses

__all__ = ["fused_info_nce", "NegativeQueue", "losses", "cuda_built"]
__version__ = "0.1.0"
