"""SimCLR v2 (Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised
Learners"), pretraining stage: SimCLR with a deeper projection head and, optionally, MoCo's
memory: a moving-average copy of the network whose past outputs are kept as extra negatives.

Its other two stages - fine-tuning from the middle of the projection head and
self-distillation - are the ``finetune`` and ``distill`` commands (:mod:`sslkernels.finetune`,
:mod:`sslkernels.distill`); :func:`sslkernels.methods.heads.head_blocks` cuts the head.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ema import EMA
from ..info_nce import fused_info_nce
from ..queue import NegativeQueue
from .heads import mlp


def nt_xent_with_memory(z0: torch.Tensor, z1: torch.Tensor, memory: torch.Tensor, *,
                        temperature: float = 0.5, backend: str | None = None,
                        gather_distributed: bool = False) -> torch.Tensor:
    r"""NT-Xent whose negatives are the batch's other 2N - 2 embeddings *and* the K rows of
    ``memory``. Row i of the 2N rows ``[z0; z1]`` (positive ``p(i)``, its other view):

    .. math:: \ell_i = \log\Big(\sum_{j \ne i} e^{S_{ij}} + \sum_{k} e^{\hat z_i \cdot M_k/\tau}
              \Big) - S_{i,p(i)}, \qquad S = \hat Z \hat Z^\top / \tau

    and the loss is the mean over the 2N rows. It is assembled from two fused InfoNCE calls
    without forming any logits: the two-view rows ``a_i`` (in-batch log-sum-exp minus the
    positive) and the query/key rows ``b_i`` with ``q = [z0; z1]``, ``k = [z1; z0]`` and the
    memory as negatives (log-sum-exp over the positive and the memory, minus the positive).
    Both log-sum-exps contain the positive once, so
    ``l_i = log(e^{a_i} + e^{b_i} - 1)``, computed as ``m + log(e^{a-m} + e^{b-m} - e^{-m})``
    with ``m = max(a, b)`` (a, b >= 0, so the argument is >= 1 after scaling and never
    cancels). Memory O((N + K) D); no gradient reaches ``memory``.

    ``gather_distributed``: the in-batch part spans every rank's batch (as
    :func:`sslkernels.fused_info_nce`); the memory part is per rank (share the memory through
    ``NegativeQueue.enqueue(keys, gather=True)``).
    """
    a = fused_info_nce(z0, z1, temperature=temperature, reduction="none", backend=backend,
                       gather_distributed=gather_distributed)
    q, k = torch.cat([z0, z1]), torch.cat([z1, z0])
    b = fused_info_nce(q, k, memory, temperature=temperature, reduction="none",
                       backend=backend)
    m = torch.maximum(a, b)
    return (m + torch.log(torch.exp(a - m) + torch.exp(b - m) - torch.exp(-m))).mean()


class SimCLRv2(nn.Module):
    """SimCLR v2 pretraining.

    Loss: NT-Xent over the two views' projections (:func:`sslkernels.fused_info_nce`); with
    ``memory_size > 0``, :func:`nt_xent_with_memory`, whose extra negatives are the last
    ``memory_size`` outputs of the memory network - an EMA of backbone and projector
    (``m = momentum``, updated after every optimizer step), run without gradient on both views
    and enqueued after the loss, as the paper's memory mechanism borrowed from MoCo.

    Args:
        backbone, feature_dim: the encoder and its output width.
        proj_hidden: hidden width of the projection head (default feature_dim, as the paper).
        proj_dim: embedding width (128).
        proj_layers: 3 (the paper's deeper head: Linear-BN-ReLU twice, then Linear-BN); 2 or
            more.
        temperature: NT-Xent temperature.
        memory_size: K negatives kept (0: no memory network; the paper used 65536 with its
            large batches).
        momentum: the memory network's EMA momentum (MoCo's 0.999); ``self.ema`` is the
            :class:`sslkernels.EMA` of (memory_backbone, memory_projector) towards (backbone,
            projector).
        loss_backend, ema_backend: ``"reference"`` for plain PyTorch.
        gather_distributed: under ``torch.distributed``, every rank's batch gives in-batch
            negatives (with gradients) and the memory is fed every rank's keys.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int | None = None,
                 proj_dim: int = 128, proj_layers: int = 3, temperature: float = 0.5,
                 memory_size: int = 0, momentum: float = 0.999,
                 loss_backend: str | None = None, ema_backend: str | None = None,
                 gather_distributed: bool = True):
        super().__init__()
        if isinstance(proj_layers, bool) or not isinstance(proj_layers, int) or proj_layers < 2:
            raise ValueError(f"proj_layers must be an int >= 2, got {proj_layers!r}")
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 0:
            raise ValueError(f"memory_size must be an int >= 0, got {memory_size!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        hidden = proj_hidden or feature_dim
        self.backbone = backbone
        # google-research/simclr ends the head with a BatchNorm too (no bias, no ReLU): the
        # embeddings are centred over the batch. The memory needs it: negatives from another
        # network share a mean direction, and pushing every query away from one direction
        # bunches the queries together (a collapse the in-batch negatives cannot undo).
        # BatchNorm there is scale-only (center=False); without a scale-only BN in PyTorch, the
        # unscaled one centres the same way.
        self.projector = mlp([feature_dim] + [hidden] * (proj_layers - 1) + [proj_dim],
                             last_bn=True, last_bn_affine=False)
        self.temperature = temperature
        self.memory_size, self.momentum = memory_size, momentum
        self.loss_backend, self.ema_backend = loss_backend, ema_backend
        self.gather_distributed = bool(gather_distributed)
        if memory_size:
            self.memory_backbone = copy.deepcopy(backbone)
            self.memory_projector = copy.deepcopy(self.projector)
            for p in list(self.memory_backbone.parameters()) + \
                    list(self.memory_projector.parameters()):
                p.requires_grad_(False)
            self.memory = NegativeQueue(memory_size, proj_dim)
            # built once: every after_optimizer_step is one prepared kernel call
            self.ema = EMA(nn.ModuleList([self.memory_backbone, self.memory_projector]),
                           nn.ModuleList([self.backbone, self.projector]), momentum,
                           buffers="skip", backend=ema_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, views) -> torch.Tensor:
        x0, x1 = views
        z0 = self.projector(self.backbone(x0))
        z1 = self.projector(self.backbone(x1))
        if not self.memory_size:
            return fused_info_nce(z0, z1, temperature=self.temperature,
                                  backend=self.loss_backend,
                                  gather_distributed=self.gather_distributed)
        loss = nt_xent_with_memory(z0, z1, self.memory.negatives, temperature=self.temperature,
                                   backend=self.loss_backend,
                                   gather_distributed=self.gather_distributed)
        with torch.no_grad():
            keys = torch.cat([self.memory_projector(self.memory_backbone(x)) for x in views])
        self.memory.enqueue(keys, gather=self.gather_distributed)
        return loss

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        # no torch.no_grad() needed (as BYOL's): EMA.update records no history in any mode
        if self.memory_size:
            self.ema.update(self.momentum)
