"""Drop-in loss modules built on :func:`sslkernels.fused_info_nce`.

``NTXentLoss`` takes the constructor arguments of ``lightly.loss.NTXentLoss`` so that swapping
the import is the whole migration; ``InfoNCELoss`` is the MoCo-style query/key(/negatives) form.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _validate
from .info_nce import fused_info_nce
from .queue import NegativeQueue


class NTXentLoss(nn.Module):
    r"""Normalized temperature-scaled cross-entropy (SimCLR), same interface as lightly's.

    ``loss = NTXentLoss(temperature=0.5)(out0, out1)`` with ``out0, out1``: (N, D) embeddings of
    the two views. Equals ``lightly.loss.NTXentLoss`` value for value and gradient for gradient
    (see :func:`sslkernels.fused_info_nce` for the equation).

    Args:
        temperature: :math:`\tau > 0`.
        memory_bank_size: 0 (in-batch negatives only) or the number of past ``out1`` embeddings
            kept as extra negatives, as lightly does: the loss is then the MoCo form
            ``q = out0, k = out1`` with the bank as negatives, and ``out1`` (detached,
            normalized) is written into the bank after the loss is computed. A lightly-style
            ``(size, dim)`` tuple is accepted too.
        gather_distributed: with an initialized process group of W > 1 ranks, each rank's
            loss is its share of the NT-Xent over the global batch (every rank's embeddings are
            negatives, gradients flow back to the rank that produced them; see
            :func:`sslkernels.fused_info_nce`): the mean of the ranks' losses is the global-batch
            loss and, after DDP's gradient averaging, training equals one process on the global
            batch. With a memory bank the loss stays per rank (the MoCo form) and the bank is fed
            the keys of all ranks, so every rank holds the same bank. No effect on one process.
        backend: forwarded to :func:`fused_info_nce`.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: int | tuple = 0,
                 gather_distributed: bool = False, backend: str | None = None):
        super().__init__()
        self.temperature = _validate.positive("temperature", temperature)
        if isinstance(memory_bank_size, (tuple, list)):
            size, dim = int(memory_bank_size[0]), int(memory_bank_size[1])
        else:
            size, dim = int(memory_bank_size), None
        if size < 0:
            raise ValueError(f"memory_bank_size must be >= 0, got {memory_bank_size}")
        self.memory_bank_size = size
        self.gather_distributed = bool(gather_distributed)
        self.backend = backend
        self._bank_dim = dim
        # The bank is a NegativeQueue, created at the first call when the width is known
        # (lightly's int form does not give it); like lightly's, it starts from random unit rows.
        self.bank: NegativeQueue | None = None
        if size > 0 and dim is not None:
            self.bank = NegativeQueue(size, dim)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        if self.memory_bank_size == 0:
            return fused_info_nce(out0, out1, temperature=self.temperature, backend=self.backend,
                                  gather_distributed=self.gather_distributed)
        if self.bank is None:
            _validate.tensor("out1", out1, ndim=2)
            self.bank = NegativeQueue(self.memory_bank_size, out1.shape[1], device=out1.device)
        loss = fused_info_nce(out0, out1, negatives=self.bank.negatives,
                              temperature=self.temperature, backend=self.backend)
        self.bank.enqueue(out1.detach(), gather=self.gather_distributed)
        return loss


class InfoNCELoss(nn.Module):
    r"""InfoNCE between queries and keys, with optional external negatives.

    ``InfoNCELoss(temperature=0.2)(q, k)`` is the two-view NT-Xent over ``q`` and ``k``;
    ``InfoNCELoss(temperature=0.2)(q, k, negatives)`` is MoCo's loss with logits
    ``[q.k, q.Q^T]/T`` and label 0 (no gradient to ``negatives``; detach ``k`` yourself for a
    momentum encoder). See :func:`sslkernels.fused_info_nce`.
    """

    def __init__(self, temperature: float = 0.07, normalize: bool = True, reduction: str = "mean",
                 backend: str | None = None):
        super().__init__()
        self.temperature = _validate.positive("temperature", temperature)
        self.normalize = bool(normalize)
        self.reduction = _validate.choice("reduction", reduction, ("mean", "sum", "none"))
        self.backend = backend

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        return fused_info_nce(query, key, negatives, temperature=self.temperature,
                              normalize=self.normalize, reduction=self.reduction,
                              backend=self.backend)
