"""Projection and prediction heads, as the papers define them."""
from __future__ import annotations

from torch import nn


def mlp(dims: list[int], *, batch_norm: bool = True, last_bn: bool = False,
        last_bn_affine: bool = True, bias: bool = True) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]``, with BN (optional) and ReLU between them.

    ``last_bn`` adds a BatchNorm after the last Linear (SimSiam's projector, affine=False). With
    BN after a Linear its bias is redundant and omitted (as the official SimSiam code does).
    """
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        bn_here = batch_norm and (not last or last_bn)
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias and not bn_here))
        if bn_here:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=not last or last_bn_affine))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def head_blocks(head: nn.Sequential) -> list[nn.Sequential]:
    """The layers of a head built by :func:`mlp` (or any Sequential): one block per Linear,
    holding the Linear and the BatchNorm/ReLU that follow it. ``blocks[:k]`` is the head cut
    after its k-th layer, what SimCLR v2 fine-tunes from (``k = 1``: the first projection
    layer's output, after its BN and ReLU)."""
    if not isinstance(head, nn.Sequential):
        raise TypeError(f"head must be an nn.Sequential, got {type(head).__name__}")
    blocks: list[list[nn.Module]] = []
    for layer in head:
        if isinstance(layer, nn.Linear) or not blocks:
            blocks.append([])
        blocks[-1].append(layer)
    return [nn.Sequential(*b) for b in blocks]
