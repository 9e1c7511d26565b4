"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"), as in
facebookresearch/moco's builder: query encoder, momentum key encoder, queue of K negatives."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..distributed import batch_shuffle, batch_unshuffle
from ..ema import EMA
from ..info_nce import fused_info_nce
from ..queue import NegativeQueue
from .heads import mlp


class MoCoV2(nn.Module):
    """MoCo v2 with the fused InfoNCE loss, the in-place EMA and the ring-buffer queue.

    Per step (official order): the key encoder takes a momentum step towards the query encoder,
    keys are computed without gradient, the loss is InfoNCE with logits ``[q.k, q.queue^T]/T``,
    then the keys are enqueued.

    Args:
        backbone, feature_dim: the encoder and its output width.
        dim: embedding width (128). mlp_hidden: MLP head hidden width (default feature_dim:
            2048 for ResNet-50, as the paper).
        head: ``"mlp"`` (MoCo v2: Linear-ReLU-Linear) or ``"linear"`` (MoCo v1's single fc,
            the paper's ablation).
        queue_size: K (65536). momentum: m (0.999). temperature: T (0.2).
        symmetric: also use (view1 as query, view0 as key), as in MoCo v3-style training
            (off in MoCo v2).
        loss_backend / ema_backend: ``"reference"`` switches to plain PyTorch.
        ema_buffers: ``"skip"`` (official: the key encoder's BatchNorm statistics come from its
            own forward passes), ``"copy"`` or ``"ema"``.
        gather: enqueue the keys of all ranks, in rank order, so every rank holds the same
            queue (as the official code does; no effect without a process group). The loss itself
            is per rank (each rank's queries against its keys and the shared queue), as in MoCo.
        shuffle_bn: MoCo's shuffled BatchNorm for the key encoder under ``torch.distributed``:
            the key inputs of all ranks are gathered, permuted by one random permutation shared
            by all ranks, each rank encodes its slice and the keys are un-shuffled (see
            :func:`sslkernels.distributed.batch_shuffle`), so BatchNorm statistics cannot leak
            which key pairs with which query. No effect on one process. For SyncBatchNorm
            instead, convert the encoders with ``nn.SyncBatchNorm.convert_sync_batchnorm``
            (CUDA only in torch) and pass ``shuffle_bn=False``.

    ``self.ema`` is the :class:`sslkernels.EMA` of the key encoder towards the query encoder,
    built here; it is not a submodule, so ``state_dict`` holds the encoders and nothing of it.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, dim: int = 128,
                 mlp_hidden: int | None = None, queue_size: int = 65536,
                 momentum: float = 0.999, temperature: float = 0.2, symmetric: bool = False,
                 loss_backend: str | None = None, ema_backend: str | None = None,
                 ema_buffers: str = "skip", gather: bool = True, shuffle_bn: bool = True,
                 head: str = "mlp"):
        super().__init__()
        if head not in ("mlp", "linear"):
            raise ValueError(f"head must be 'mlp' or 'linear', got {head!r}")
        self.backbone = backbone
        self.projector = (mlp([feature_dim, mlp_hidden or feature_dim, dim], batch_norm=False)
                          if head == "mlp" else nn.Sequential(nn.Linear(feature_dim, dim)))
        self.key_backbone = copy.deepcopy(backbone)
        self.key_projector = copy.deepcopy(self.projector)
        for p in list(self.key_backbone.parameters()) + list(self.key_projector.parameters()):
            p.requires_grad_(False)
        self.queue = NegativeQueue(queue_size, dim)
        self.momentum = momentum
        self.temperature = temperature
        self.symmetric = symmetric
        self.loss_backend = loss_backend
        # built once: every momentum_update is one prepared kernel call
        self.ema = EMA(nn.ModuleList([self.key_backbone, self.key_projector]),
                       nn.ModuleList([self.backbone, self.projector]), momentum,
                       buffers=ema_buffers, backend=ema_backend)
        self.gather = bool(gather)
        self.shuffle_bn = bool(shuffle_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def momentum_update(self) -> None:
        """key <- m * key + (1 - m) * query for every parameter (buffers per ``ema_buffers``),
        with ``m = self.momentum``."""
        self.ema.update(self.momentum)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if not self.shuffle_bn:
                return self.key_projector(self.key_backbone(x))
            x, unshuffle = batch_shuffle(x)
            return batch_unshuffle(self.key_projector(self.key_backbone(x)), unshuffle)

    def training_step(self, views) -> torch.Tensor:
        x0, x1 = views
        q = self.projector(self.backbone(x0))
        self.momentum_update()
        k = self._keys(x1)
        loss = fused_info_nce(q, k, self.queue.negatives, temperature=self.temperature,
                              backend=self.loss_backend)
        if self.symmetric:
            q1 = self.projector(self.backbone(x1))
            k0 = self._keys(x0)
            loss = loss + fused_info_nce(q1, k0, self.queue.negatives,
                                         temperature=self.temperature, backend=self.loss_backend)
            self.queue.enqueue(k0, gather=self.gather)
        self.queue.enqueue(k, gather=self.gather)
        return loss

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        pass  # the momentum step runs at the start of the next training_step, as in the paper
