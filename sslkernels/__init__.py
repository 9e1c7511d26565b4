"""sslkernels: compiled kernels for self-supervised learning in PyTorch.

Public API:

* :func:`fused_info_nce` - InfoNCE / NT-Xent without the O(N^2) logits (two views or q/k with
  negatives); :mod:`sslkernels.losses` has drop-in ``nn.Module`` losses.
* :func:`ema_update_` - in-place EMA of a target network (one launch for the whole parameter
  list), :func:`flatten_parameters_` for a one-pass flat mode, :func:`cosine_momentum`.
* :mod:`sslkernels.methods` - ``SimCLR``, ``MoCoV2``, ``BYOL``, ``SimSiam``.
* :class:`NegativeQueue` - MoCo's K x D ring buffer of negatives: one-launch enqueue with
  wrap-around and a device-side pointer, read in place by :func:`fused_info_nce`.
"""
from ._ext import cuda_built
from .info_nce import fused_info_nce
from .queue import NegativeQueue
from .ema import cosine_momentum, ema_update_, flatten_parameters_, is_flat
from . import losses, methods

__all__ = ["fused_info_nce", "NegativeQueue", "ema_update_", "cosine_momentum",
           "flatten_parameters_", "is_flat", "losses", "methods", "cuda_built"]
__version__ = "0.1.0"
