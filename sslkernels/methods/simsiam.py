"""SimSiam (Chen & He 2021), as in facebookresearch/simsiam: 3-layer projector with BN,
2-layer bottleneck predictor, stop-gradient, symmetric negative cosine loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import mlp


class SimSiam(nn.Module):
    """Loss: ``-(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) / 2``.

    Args:
        backbone, feature_dim: the encoder and its output width.
        dim: projection width (2048). pred_dim: predictor bottleneck (512).
        fix_pred_lr: :meth:`parameter_groups` marks the predictor's group ``fix_lr=True`` so a
            scheduler keeps its learning rate constant (the paper's default).
        stop_gradient: ``False`` is the paper's ablation (Sec. 4.1, Fig. 2): without the
            stop-gradient on ``z`` the loss is minimized by a constant output and SimSiam
            collapses (the embeddings' standard deviation falls to 0,
            :mod:`sslkernels.monitor`).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, dim: int = 2048,
                 pred_dim: int = 512, fix_pred_lr: bool = True, stop_gradient: bool = True):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp([feature_dim, feature_dim, feature_dim, dim], last_bn=True,
                             last_bn_affine=False)
        self.predictor = mlp([dim, pred_dim, dim])
        self.fix_pred_lr = fix_pred_lr
        self.stop_gradient = bool(stop_gradient)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def parameter_groups(self) -> list[dict]:
        """Optimizer groups: encoder (backbone + projector) and predictor."""
        encoder = list(self.backbone.parameters()) + list(self.projector.parameters())
        return [{"params": encoder, "fix_lr": False},
                {"params": list(self.predictor.parameters()), "fix_lr": self.fix_pred_lr}]

    def training_step(self, views) -> torch.Tensor:
        x0, x1 = views
        z0 = self.projector(self.backbone(x0))
        z1 = self.projector(self.backbone(x1))
        p0 = self.predictor(z0)
        p1 = self.predictor(z1)
        if self.stop_gradient:
            z0, z1 = z0.detach(), z1.detach()
        return -(F.cosine_similarity(p0, z1, dim=-1).mean() +
                 F.cosine_similarity(p1, z0, dim=-1).mean()) * 0.5

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        pass
