"""Plain-PyTorch EMA of parameters (momentum / target network), written the way the official code
writes it. The oracles for :func:`sslkernels.ema.ema_update_` and the baselines of
``benchmarks/bench_ema.py``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


@torch.no_grad()
def ema_loop_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor],
              momentum: float) -> None:
    """``t <- m*t + (1-m)*o`` pair by pair with two in-place ops (BYOL/lightly style)."""
    for t, o in zip(target, online):
        t.mul_(momentum).add_(o.to(t.dtype), alpha=1.0 - momentum)


def ema_moco_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor],
              momentum: float) -> None:
    """The official MoCo update: ``param_k.data = param_k.data * m + param_q.data * (1. - m)``
    (a new tensor per parameter, re-homed through ``.data``)."""
    for t, o in zip(target, online):
        t.data = t.data * momentum + o.data * (1.0 - momentum)


@torch.no_grad()
def ema_foreach_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor],
                 momentum: float) -> None:
    """``torch._foreach_lerp_(target, online, 1 - m)``: what the fused kernel matches bit for bit
    in float32 (online tensors of another dtype are widened first)."""
    online = [o if o.dtype == t.dtype else o.to(t.dtype) for t, o in zip(target, online)]
    torch._foreach_lerp_(list(target), online, 1.0 - momentum)


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: ``m_k = final - (final - base) * (cos(pi k / K) + 1) / 2``; for
    ``final = 1`` this is BYOL's ``1 - (1 - base) * (cos(pi k / K) + 1) / 2``."""
    return final - (final - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0
