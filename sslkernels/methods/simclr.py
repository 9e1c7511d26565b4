"""SimCLR (Chen et al. 2020; v2: Chen et al. 2020b): two views, NT-Xent over 2N embeddings."""
from __future__ import annotations

import torch
from torch import nn

from ..losses import NTXentLoss
from .heads import mlp


class SimCLR(nn.Module):
    """SimCLR with the fused NT-Xent loss.

    Args:
        backbone: images (B, 3, H, W) -> features (B, feature_dim).
        feature_dim: backbone output width.
        proj_hidden: projection hidden width (default: feature_dim, as in the paper).
        proj_dim: embedding width (128).
        proj_layers: 2 (SimCLR v1: Linear-ReLU-Linear) or 3 (v2: with BatchNorm).
        temperature: NT-Xent temperature (0.5 in the paper's CIFAR runs; 0.1-0.2 at large batch).
        queue_size: lightly's memory bank of past ``z1`` embeddings (0 = off): the loss becomes
            the MoCo form (:class:`sslkernels.losses.NTXentLoss`), without in-batch negatives.
            SimCLR v2's memory (an EMA network's outputs added to the in-batch negatives) is
            :class:`sslkernels.methods.SimCLRv2`.
        loss_backend: forwarded to :func:`sslkernels.fused_info_nce` (``"reference"`` for plain
            PyTorch).
        gather_distributed: under ``torch.distributed``, every rank's embeddings are negatives
            for every rank, with gradients (:class:`sslkernels.losses.NTXentLoss`); with DDP this
            trains exactly as one process on the global batch would. No effect on one process.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int | None = None,
                 proj_dim: int = 128, proj_layers: int = 2, temperature: float = 0.5,
                 queue_size: int = 0, loss_backend: str | None = None,
                 gather_distributed: bool = True):
        super().__init__()
        if proj_layers not in (2, 3):
            raise ValueError(f"proj_layers must be 2 (SimCLR v1) or 3 (v2), got {proj_layers}")
        hidden = proj_hidden or feature_dim
        self.backbone = backbone
        dims = [feature_dim] + [hidden] * (proj_layers - 1) + [proj_dim]
        self.projector = mlp(dims, batch_norm=proj_layers == 3)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=queue_size,
                                    backend=loss_backend,
                                    gather_distributed=gather_distributed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, views) -> torch.Tensor:
        x0, x1 = views
        z0 = self.projector(self.backbone(x0))
        z1 = self.projector(self.backbone(x1))
        return self.criterion(z0, z1)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        pass
