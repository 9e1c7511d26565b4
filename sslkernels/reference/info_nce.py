"""Plain-PyTorch InfoNCE, written the way the popular libraries write it.

These functions are the oracle for every fused kernel and the ``backend="reference"`` path of
:func:`sslkernels.fused_info_nce`. They materialize the full logits matrix (O(N^2) memory) on
purpose: clarity over speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=1) if normalize else x


def info_nce_pair_rows(z0: torch.Tensor, z1: torch.Tensor, temperature: float,
                       normalize: bool = True) -> torch.Tensor:
    """Per-row two-view NT-Xent losses, shape (2N,), rows ordered [view 0, view 1].

    ``loss_i = logsumexp_{j != i} S_ij - S_{i, pos(i)}`` with ``S = Z Z^T / temperature`` and
    ``Z = cat(z0, z1)``. Computed in the input dtype, like lightly's NTXentLoss.
    """
    n = z0.shape[0]
    z = torch.cat([_unit(z0, normalize), _unit(z1, normalize)], dim=0)
    logits = z @ z.T / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, labels, reduction="none")


def info_nce_slice_rows(keys: torch.Tensor, offset0: int, offset1: int, n: int,
                        temperature: float, normalize: bool = True) -> torch.Tensor:
    """Per-row NT-Xent losses of the 2n rows ``[keys[offset0:offset0+n]; keys[offset1:offset1+n]]``
    against all M keys, shape (2n,): the distributed SimCLR loss of one rank, written as lightly
    writes its gathered case (logits against every key, the row's own column masked, the label
    at the positive's global column).

    With ``keys = cat(z0, z1)``, offsets 0 and N, this is :func:`info_nce_pair_rows`.
    """
    k = _unit(keys, normalize)
    rows0 = torch.arange(offset0, offset0 + n, device=keys.device)
    rows1 = torch.arange(offset1, offset1 + n, device=keys.device)
    own, positive = torch.cat([rows0, rows1]), torch.cat([rows1, rows0])
    logits = k[own] @ k.T / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * n, device=keys.device), own] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, positive, reduction="none")


def info_nce_negatives_rows(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                            temperature: float, normalize: bool = True) -> torch.Tensor:
    """Per-row MoCo InfoNCE losses, shape (N,): logits ``[q.k, q.Q^T] / T``, label 0.

    Written as facebookresearch/moco's builder does it (einsum + cat + cross_entropy). No
    gradient reaches ``negatives``.
    """
    q = _unit(q, normalize)
    k = _unit(k, normalize)
    neg = _unit(negatives.detach().to(q.dtype), normalize)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, neg)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels, reduction="none")


def lightly_ntxent(z0: torch.Tensor, z1: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """lightly.loss.NTXentLoss (memory_bank_size=0, single process), formulation for formulation.

    Used by the benchmarks as "the reference the popular libraries use": einsum similarities,
    a boolean-mask copy to drop the diagonal, cat, and cross_entropy over 2N rows.
    """
    device = z0.device
    batch_size = z0.shape[0]
    out0 = F.normalize(z0, dim=1)
    out1 = F.normalize(z1, dim=1)
    diag_mask = torch.eye(batch_size, device=device, dtype=torch.bool)
    logits_00 = torch.einsum("nc,mc->nm", out0, out0) / temperature
    logits_01 = torch.einsum("nc,mc->nm", out0, out1) / temperature
    logits_10 = torch.einsum("nc,mc->nm", out1, out0) / temperature
    logits_11 = torch.einsum("nc,mc->nm", out1, out1) / temperature
    logits_00 = logits_00[~diag_mask].view(batch_size, -1)
    logits_11 = logits_11[~diag_mask].view(batch_size, -1)
    logits_0100 = torch.cat([logits_01, logits_00], dim=1)
    logits_1011 = torch.cat([logits_10, logits_11], dim=1)
    logits = torch.cat([logits_0100, logits_1011], dim=0)
    labels = torch.arange(batch_size, device=device, dtype=torch.long).repeat(2)
    return F.cross_entropy(logits, labels)
