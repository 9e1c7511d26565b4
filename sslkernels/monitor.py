"""Collapse monitor (SimSiam, Chen & He 2021, Fig. 2): the standard deviation of the
L2-normalized embeddings, per dimension over the batch, averaged over the dimensions.

For embeddings spread over the unit sphere (e.g. a zero-mean isotropic Gaussian before
normalizing) each coordinate of ``z / ||z||`` has standard deviation close to ``1 / sqrt(d)``;
when a method collapses to a constant output it falls to 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """``mean_k std_b(z_b / ||z_b||)_k`` of (B, d) embeddings, B >= 2: a 0-d float32 tensor
    (≈ 1/sqrt(d) when healthy, 0 when collapsed)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be a (B, d) tensor with B >= 2, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


class CollapseMonitor:
    """Watches a method's projection head: :meth:`value` is :func:`embedding_std` of its
    outputs since the last :meth:`reset` (the mean over calls: two views give two). The hook
    only reads the outputs, so it changes nothing in training; every method in
    :mod:`sslkernels.methods` has its online head at ``.projector``."""

    def __init__(self, head: nn.Module):
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
        self._values: list[torch.Tensor] = []
        self._handle = head.register_forward_hook(self._record)
        self.dim = None

    def _record(self, module, inputs, output):
        if module.training and isinstance(output, torch.Tensor) and output.dim() == 2 \
                and output.shape[0] >= 2:
            self.dim = output.shape[1]
            self._values.append(embedding_std(output))

    def reset(self) -> None:
        self._values.clear()

    def value(self) -> float | None:
        """The mean over the recorded calls, or ``None`` if the head ran no training forward."""
        if not self._values:
            return None
        return torch.stack(self._values).mean().item()

    def remove(self) -> None:
        self._handle.remove()
