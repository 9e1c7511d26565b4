"""BYOL (Grill et al. 2020): online network with predictor, EMA target, cosine momentum."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..ema import EMA, cosine_momentum
from .heads import mlp


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(p, z)``; z is the (already detached) target projection."""
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1)


class BYOL(nn.Module):
    """BYOL. Loss: ``mean_b[(2 - 2cos(p1, z2')) + (2 - 2cos(p2, z1'))]`` with ``z'`` from the
    target network (no gradient). After every optimizer step the target follows the online
    network with ``m_k = 1 - (1 - base)(cos(pi k / K) + 1) / 2``.

    Args:
        backbone, feature_dim: the encoder and its output width.
        proj_hidden, proj_dim: 4096 -> 256 (paper). pred_hidden: 4096.
        base_momentum: 0.996 (paper; 0.99 for small batches), final_momentum: 1.0.
        ema_backend: ``"reference"`` for ``torch._foreach_lerp_``.
        ema_buffers: ``"skip"`` (the target's BatchNorm statistics come from its own forward
            passes, as in the official code), ``"copy"`` or ``"ema"``.

    ``self.ema`` is the :class:`sslkernels.EMA` of (target_backbone, target_projector) towards
    (backbone, projector), built here; it is not a submodule, so ``state_dict`` holds the
    networks and nothing of it.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 4096,
                 proj_dim: int = 256, pred_hidden: int = 4096, base_momentum: float = 0.996,
                 final_momentum: float = 1.0, ema_backend: str | None = None,
                 ema_buffers: str = "skip"):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp([feature_dim, proj_hidden, proj_dim])
        self.predictor = mlp([proj_dim, pred_hidden, proj_dim])
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in list(self.target_backbone.parameters()) + \
                list(self.target_projector.parameters()):
            p.requires_grad_(False)
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self.current_momentum = base_momentum
        # built once: the EMA step of every after_optimizer_step is one prepared kernel call
        self.ema = EMA(nn.ModuleList([self.target_backbone, self.target_projector]),
                       nn.ModuleList([self.backbone, self.projector]), base_momentum,
                       buffers=ema_buffers, backend=ema_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, views) -> torch.Tensor:
        x0, x1 = views
        p0 = self.predictor(self.projector(self.backbone(x0)))
        p1 = self.predictor(self.projector(self.backbone(x1)))
        with torch.no_grad():
            t0 = self.target_projector(self.target_backbone(x0))
            t1 = self.target_projector(self.target_backbone(x1))
        return (byol_loss(p0, t1) + byol_loss(p1, t0)).mean()

    # no torch.no_grad() decorator: EMA.update records no history in any mode, and the
    # decorator alone cost 7.5 us per call, 2% of this step on 500 Linear layers
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA of the target with the cosine momentum of step ``step`` (0-based) of ``total_steps``."""
        self.current_momentum = cosine_momentum(step, total_steps, self.base_momentum,
                                                self.final_momentum)
        self.ema.update(self.current_momentum)
