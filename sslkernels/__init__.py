"""sslkernels: compiled kernels for self-supervised learning in PyTorch.

Public API:

* :func:`fused_info_nce` - InfoNCE / NT-Xent without the O(N^2) logits (two views or q/k with
  negatives); :mod:`sslkernels.losses` has drop-in ``nn.Module`` losses.
"""
from ._ext import cuda_built
from .info_nce import fused_info_nce
from . import losses

__all__ = ["fused_info_nce", "losses", "cuda_built"]
__version__ = "0.1.0"
