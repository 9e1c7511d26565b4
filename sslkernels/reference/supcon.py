"""Plain-PyTorch multi-positive InfoNCE (supervised contrastive, SupCon's L_out), written the way
the popular implementations write it (HobbitLong/SupContrast's ``SupConLoss``, solo-learn): the
M x M logits, a label-equality mask, a log-softmax over the other rows, the mean over each row's
positives.

The oracle of :func:`sslkernels.fused_supcon`'s kernels and its ``backend="reference"`` path.
O(M^2) memory on purpose.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_slice_rows(keys: torch.Tensor, labels: torch.Tensor, offset: int, n: int,
                      temperature: float, normalize: bool = True) -> torch.Tensor:
    """Per-row losses of the n rows ``keys[offset:offset+n]`` against all M keys, shape (n,)::

        l_r = logsumexp_{j != offset+r} S_rj - mean_{p in P(r)} S_rp,   S = K_rows K^T / temperature

    with P(r) the other keys with row r's label; l_r = 0 when P(r) is empty. Computed in the
    input dtype. With offset 0 and n = M this is :func:`supcon_rows`.
    """
    k = F.normalize(keys, dim=1) if normalize else keys
    rows = torch.arange(offset, offset + n, device=keys.device)
    logits = k[rows] @ k.T / temperature
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[torch.arange(n, device=keys.device), rows] = True
    positives = (labels[rows][:, None] == labels[None, :]) & ~own
    count = positives.sum(1)
    if keys.shape[0] == 1:  # no other row: the log-softmax would be over nothing
        return logits.sum(1) * 0
    log_prob = torch.log_softmax(logits.masked_fill(own, float("-inf")), dim=1)
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, -mean_log_prob_pos, torch.zeros_like(mean_log_prob_pos))


def supcon_rows(z: torch.Tensor, labels: torch.Tensor, temperature: float,
                normalize: bool = True) -> torch.Tensor:
    """Per-row multi-positive InfoNCE losses of the rows ``z`` (M, D) with integer ``labels``
    (M,), shape (M,): ``l_i = logsumexp_{j != i} S_ij - mean_{p in P(i)} S_ip``, 0 for a row
    without positives. Computed in the input dtype."""
    return supcon_slice_rows(z, labels, 0, z.shape[0], temperature, normalize)
