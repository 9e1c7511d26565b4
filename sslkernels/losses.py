"""Drop-in loss modules built on :func:`sslkernels.fused_info_nce` and
:func:`sslkernels.fused_supcon`.

``NTXentLoss`` takes the constructor arguments of ``lightly.loss.NTXentLoss`` so that swapping
the import is the whole migration; ``InfoNCELoss`` is the MoCo-style query/key(/negatives) form;
``SupConLoss`` takes the arguments and inputs of the popular supervised contrastive loss
(HobbitLong/SupContrast) and also serves SimCLR with more than two views.
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate
from .info_nce import fused_info_nce
from .supcon import fused_supcon, view_labels
from .queue import NegativeQueue


def _bank_size(memory_bank_size) -> tuple[int, int | None]:
    """lightly's ``memory_bank_size``: an int K, or a (K, dim) sequence. Same kinds of error as
    lightly's MemoryBankModule: TypeError for what is not an int or a sequence of ints,
    ValueError for negative entries. Refused too (lightly fails later, in forward): an empty
    sequence or one of more than two entries (ValueError)."""
    if isinstance(memory_bank_size, (str, bytes)) or not isinstance(memory_bank_size, Sequence):
        entries = (memory_bank_size,)
        scalar = True
    else:
        entries = tuple(memory_bank_size)
        scalar = False
    try:
        entries = tuple(operator.index(x) for x in entries)
    except TypeError:
        raise TypeError(f"memory_bank_size must be an int or a (size, dim) pair of ints, got "
                        f"{memory_bank_size!r}") from None
    if any(x < 0 for x in entries):
        raise ValueError(f"memory_bank_size must be non-negative, got {memory_bank_size!r}")
    if not scalar and len(entries) not in (1, 2):
        raise ValueError(f"memory_bank_size must be an int or a (size, dim) pair, got "
                         f"{memory_bank_size!r}")
    return entries[0], (entries[1] if len(entries) == 2 else None)


class NTXentLoss(nn.Module):
    r"""Normalized temperature-scaled cross-entropy (SimCLR), a drop-in for
    ``lightly.loss.NTXentLoss``.

    ``loss = NTXentLoss(temperature=0.5)(out0, out1)`` with ``out0, out1``: (N, D) embeddings of
    the two views. Equals ``lightly.loss.NTXentLoss`` value for value and gradient for gradient
    (see :func:`sslkernels.fused_info_nce` for the equation), and in float32 is at least as
    accurate against a float64 evaluation, degenerate batches included: when every embedding
    points the same way the loss is log(2N - 1) (log(K + 1) with a full bank of K) to within one
    rounding. The mean over rows is accumulated in float64.

    Args:
        temperature: :math:`\tau > 0`.
        memory_bank_size: 0 (in-batch negatives only) or the number of past ``out1`` embeddings
            kept as extra negatives, as lightly does: the loss is then the MoCo form
            ``q = out0, k = out1`` with the bank as negatives (logits
            ``[out0.out1, out0.bank] / tau`` of the normalized outputs, the bank rows used as
            stored), and the normalized ``out1`` is written into the bank after the loss is
            computed - only when ``out0`` requires a gradient, as in lightly, so evaluating
            under ``torch.no_grad()`` leaves the bank as it is. A lightly-style ``(size, dim)``
            pair creates the bank at once; an int creates it at the first call (and warns, as
            lightly does, because a bank that does not exist yet is missing from
            ``state_dict``).
        gather_distributed: with an initialized process group of W > 1 ranks, each rank's
            loss is its share of the NT-Xent over the global batch (every rank's embeddings are
            negatives, gradients flow back to the rank that produced them; see
            :func:`sslkernels.fused_info_nce`): the mean of the ranks' losses is the global-batch
            loss and, after DDP's gradient averaging, training equals one process on the global
            batch. With a memory bank the loss stays per rank (the MoCo form) and the bank is fed
            the keys of all ranks, so every rank holds the same bank. No effect on one process.
        backend: forwarded to :func:`fused_info_nce`.

    Raises (at construction, as lightly): ``ValueError`` for a temperature below 1e-8
    (lightly: ``abs(temperature) < 1e-8``), a negative ``memory_bank_size`` entry, or
    ``gather_distributed=True`` when ``torch.distributed`` is not available; ``TypeError`` for
    a temperature or bank size that is not a number / int.

    Deliberate differences from lightly: a temperature that is negative, NaN or infinite is a
    ``ValueError`` here (lightly accepts it and trains on a meaningless loss); a bank size of
    more than two entries is refused; and the bank is a ring (:class:`NegativeQueue`): a batch
    that reaches past the end wraps around to the start, where lightly drops the keys that do
    not fit and restarts at slot 0.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: int | Sequence[int] = 0,
                 gather_distributed: bool = False, backend: str | None = None):
        super().__init__()
        # lightly checks the bank size first (its MemoryBankModule), then the temperature, then
        # torch.distributed; the same order gives the same error for the same bad arguments.
        size, dim = _bank_size(memory_bank_size)
        if dim is None and size > 0:
            warnings.warn(f"memory_bank_size={memory_bank_size} does not give the embedding "
                          "width: the bank is created at the first call and is missing from "
                          "state_dict until then; pass memory_bank_size=(size, dim)",
                          UserWarning, stacklevel=2)
        self.temperature = _validate.positive("temperature", temperature)
        if self.temperature < 1e-8:  # lightly's bound: the logits would overflow
            raise ValueError(f"temperature must be >= 1e-8, got {temperature}")
        _check_gather(gather_distributed)
        self.memory_bank_size = size
        self.gather_distributed = bool(gather_distributed)
        self.backend = backend
        self._bank_dim = dim
        # The bank is a NegativeQueue, created at the first call when the width is known
        # (lightly's int form does not give it); like lightly's, it starts from random unit rows
        # and stores the normalized outputs exactly as they are (normalize=False: no second
        # rounding of rows that are already unit).
        self.bank: NegativeQueue | None = None
        if size > 0 and dim is not None:
            self.bank = NegativeQueue(size, dim, normalize=False)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        if self.memory_bank_size == 0:
            rows = fused_info_nce(out0, out1, temperature=self.temperature, backend=self.backend,
                                  gather_distributed=self.gather_distributed, reduction="none")
            return _mean(rows)
        _validate.tensor("out0", out0, ndim=2)
        _validate.tensor("out1", out1, ndim=2)
        if self.bank is None:
            self.bank = NegativeQueue(self.memory_bank_size, out1.shape[1], device=out1.device,
                                      normalize=False)
        # lightly's formulation: normalize the outputs, use the bank rows as stored.
        q = F.normalize(out0, dim=1)
        k = F.normalize(out1, dim=1)
        rows = fused_info_nce(q, k, negatives=self.bank.negatives, temperature=self.temperature,
                              normalize=False, backend=self.backend, reduction="none")
        if out0.requires_grad:
            self.bank.enqueue(k.detach(), gather=self.gather_distributed)
        return _mean(rows)


def _check_gather(gather_distributed: bool) -> None:
    # At construction, as lightly: a loss that cannot gather should not wait for forward to say so.
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError("gather_distributed=True needs torch.distributed, which this torch "
                         "build does not have; pass gather_distributed=False")


def _mean(rows: torch.Tensor) -> torch.Tensor:
    # Accumulated in float64: a float32 sum of 2N equal rows is off by an ulp or more at a few
    # hundred rows, more than the rows' own error.
    return rows.to(torch.float64).mean().to(rows.dtype)


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


class SupConLoss(nn.Module):
    r"""Supervised contrastive loss (Khosla et al. 2020, :math:`\mathcal{L}_{out}`) and SimCLR
    with V views, fused (see :func:`sslkernels.fused_supcon` for the equation).

    Inputs as HobbitLong/SupContrast's ``SupConLoss`` (``contrast_mode="all"``):
    ``loss_fn(features, labels)`` with ``features`` (B, V, D) - V views of B samples (extra
    trailing dims are flattened) - and optional ``labels`` (B,): without labels each sample is
    its own class, i.e. SimCLR with V views; with labels, the positives of a view are every other
    view of every sample of its class. The rows are the views stacked view-major
    (``torch.cat(torch.unbind(features, 1))``), which is also the order of
    ``reduction="none"``. ``features`` (M, D) with ``labels`` (M,) gives the rows directly.

    The loss is scaled by ``temperature / base_temperature`` as in SupContrast (1 with the
    defaults); rows are L2-normalized inside unless ``normalize=False`` (SupContrast expects
    normalized features: pass them either way). A row whose label occurs nowhere else has no
    positive: it is left out of the mean (SupContrast counts it as 0; with V >= 2 views every
    row has positives and the two agree).

    Args:
        temperature: :math:`\tau > 0` (SupContrast's default 0.07).
        base_temperature: the scale's denominator (default 0.07); ``None``: no scaling.
        contrast_mode: ``"all"`` (every view is an anchor), the only mode.
        normalize, reduction, backend, gather_distributed: as :func:`fused_supcon`.
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all",
                 base_temperature: float | None = 0.07, normalize: bool = True,
                 reduction: str = "mean", backend: str | None = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = _validate.positive("temperature", temperature)
        if contrast_mode != "all":
            raise ValueError(f"contrast_mode must be 'all' (every view an anchor), got "
                             f"{contrast_mode!r}")
        self.scale = 1.0 if base_temperature is None else (
            self.temperature / _validate.positive("base_temperature", base_temperature))
        self.normalize = bool(normalize)
        self.reduction = _validate.choice("reduction", reduction, ("mean", "sum", "none"))
        self.backend = backend
        _check_gather(gather_distributed)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _validate.tensor("features", features)
        if features.dim() >= 3:
            b, v = features.shape[:2]
            z = features.reshape(b, v, -1).transpose(0, 1).reshape(v * b, -1)
            if labels is None:
                labels = view_labels(b, v, features.device)
            elif not isinstance(labels, torch.Tensor) or labels.shape != (b,):
                raise ValueError(f"labels must be a (B,) = ({b},) tensor for features of shape "
                                 f"{tuple(features.shape)}, got "
                                 f"{getattr(labels, 'shape', type(labels).__name__)}")
            else:
                labels = labels.repeat(v)
        elif features.dim() == 2:
            if labels is None:
                raise ValueError("features (M, D) need labels (M,); pass (B, V, D) features "
                                 "for the views of B samples without labels")
            z = features
        else:
            raise ValueError(f"features must be (B, V, D) or (M, D), got shape "
                             f"{tuple(features.shape)}")
        loss = fused_supcon(z, labels, temperature=self.temperature, normalize=self.normalize,
                            reduction=self.reduction, backend=self.backend,
                            gather_distributed=self.gather_distributed)
        return loss * self.scale if self.scale != 1.0 else loss
