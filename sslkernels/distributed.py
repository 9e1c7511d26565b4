"""Multi-process helpers on ``torch.distributed``: gathers with and without gradient, MoCo's
shuffled BatchNorm, DDP around a method's training step (:func:`wrap_ddp`) and the trainer's
per-rank bookkeeping (:class:`Ranks`).

Scaling convention (DDP). Each rank's loss is the mean over its own rows. :func:`gather_with_grad`
sums the gradient over ranks in its backward, so each rank's inputs receive the gradient of the
*sum* of all ranks' losses, which is ``world`` times the gradient of the global-batch mean loss;
DDP then averages parameter gradients over ranks (divides by ``world``), so the parameters get
exactly the gradient of single-process training on the global batch (the concatenation of every
rank's batch). The global-batch loss value is the mean of the ranks' losses.

Every rank must call these functions in the same order with tensors of the same shape (they are
collectives); shapes are not exchanged, to keep the step free of host synchronizations.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from . import _validate

__all__ = ["rank_and_world", "gather_with_grad", "gather_no_grad", "batch_shuffle",
           "batch_unshuffle", "TrainingStep", "wrap_ddp", "Ranks"]


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_into(x: torch.Tensor, group, world: int) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    # all_gather_single replaces the deprecated all_gather_into_tensor (torch >= 2.14).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        rank, world = rank_and_world(group)
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        return _gather_into(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss saw this rank's rows: their gradients add up. all_reduce rather than
        # reduce_scatter because gloo has no reduce_scatter; the extra traffic is O(world*B*D).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows), None


def _check_rows(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one dimension and one row, got shape "
                         f"{tuple(x.shape)}")


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    r"""All-gather with gradient: (B, ...) on each rank -> (world * B, ...), rank r's rows at
    ``[r*B, (r+1)*B)`` on every rank.

    Backward: the incoming (world * B, ...) gradients of all ranks are summed and each rank gets
    its own slice, :math:`\partial x_r = \sum_s \partial\,\mathrm{out}^{(s)}[rB:(r+1)B]` - the
    gradient of the sum of every rank's loss (see the module docstring for how this meets DDP's
    averaging). Without an initialized process group, or with one rank, returns ``x`` itself.
    Every rank must pass the same shape and dtype.
    """
    _check_rows("x", x)
    _, world = rank_and_world(group)
    if world == 1:
        return x
    return _GatherWithGrad.apply(x, group)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather without gradient: (B, ...) -> (world * B, ...) in rank order; ``x`` itself
    with a single process. Every rank must pass the same shape and dtype."""
    _check_rows("x", x)
    _, world = rank_and_world(group)
    if world == 1:
        return x
    return _gather_into(x, group, world)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, group: dist.ProcessGroup | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MoCo's shuffled BatchNorm, first half (``_batch_shuffle_ddp`` of facebookresearch/moco).

    Gathers the (B, ...) inputs of every rank, permutes the world * B samples with one random
    permutation (drawn on every rank so their generators advance alike; rank 0's is broadcast)
    and returns this rank's B samples of the shuffled batch, plus the (world * B,) int64 inverse
    permutation for :func:`batch_unshuffle`. The key encoder's BatchNorm then sees a random
    subset of the global batch, so its statistics cannot leak which key goes with which query.
    With a single process returns ``(x, None)``.
    """
    _check_rows("x", x)
    rank, world = rank_and_world(group)
    if world == 1:
        return x, None
    everyone = _gather_into(x, group, world)
    perm = torch.randperm(everyone.shape[0], generator=generator,
                          device=generator.device if generator is not None else "cpu")
    perm = perm.to(x.device)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(perm, src=src, group=group)
    b = x.shape[0]
    return everyone[perm[rank * b:(rank + 1) * b]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, unshuffle: torch.Tensor | None,
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Second half of shuffled BatchNorm: gathers the (B, ...) outputs computed on the shuffled
    batch and returns the rows of this rank's original samples, in their original order.
    ``unshuffle`` is the inverse permutation :func:`batch_shuffle` returned (``None``: single
    process, returns ``y``)."""
    _check_rows("y", y)
    if unshuffle is None:
        return y
    _validate.tensor("unshuffle", unshuffle, ndim=1, floating=False)
    rank, world = rank_and_world(group)
    if unshuffle.numel() != world * y.shape[0]:
        raise ValueError(f"unshuffle must have world * B = {world * y.shape[0]} entries, got "
                         f"{unshuffle.numel()}")
    b = y.shape[0]
    return _gather_into(y, group, world)[unshuffle[rank * b:(rank + 1) * b]]


class TrainingStep(torch.nn.Module):
    """``forward(views) = method.training_step(views)``: the module to wrap in
    ``DistributedDataParallel`` (:func:`wrap_ddp` does it). DDP averages gradients only for a
    backward whose forward ran through the DDP wrapper, and the methods' own ``forward`` returns
    backbone features, so the loss must be computed inside this ``forward``::

        ddp = wrap_ddp(method)
        loss = ddp(views); loss.backward(); optimizer.step()
        method.after_optimizer_step(step, total)
    """

    def __init__(self, method: torch.nn.Module):
        super().__init__()
        if not hasattr(method, "training_step"):
            raise TypeError(f"method must have a training_step(views) method, got "
                            f"{type(method).__name__}")
        self.method = method

    def forward(self, views):
        return self.method.training_step(views)


def wrap_ddp(method: torch.nn.Module, device_ids: list[int] | None = None):
    """``DistributedDataParallel(TrainingStep(method))`` with buffers synchronized once, at
    construction (with the parameters, from rank 0), and not before every forward: the methods'
    queues stay identical by gathering, their EMA targets follow identical parameters, and
    broadcasting a MoCo queue every step would move K*D values for nothing. BatchNorm running
    statistics stay per rank (rank 0's are the ones checkpointed). Parameters without
    ``requires_grad`` (EMA targets) are left alone by DDP after the initial broadcast.

    Args:
        method: a method with ``training_step(views)`` (SimCLR, MoCoV2, BYOL, SimSiam).
        device_ids: ``[cuda index]`` for a CUDA module, ``None`` on CPU.
    """
    from torch.nn.parallel import DistributedDataParallel

    step = TrainingStep(method)
    try:  # torch >= 2.14 renamed the per-forward buffer sync
        return DistributedDataParallel(step, device_ids=device_ids, forward_sync_buffers=False)
    except TypeError:
        return DistributedDataParallel(step, device_ids=device_ids, broadcast_buffers=False)


class Ranks:
    """A training loop's place in a ``torchrun`` job (rank 0 of 1 without one): what the trainer
    (``python -m sslkernels train``) needs to run on several processes.

    The global batch is cut into ``world`` equal slices in rank order (the per-rank split a
    ``DistributedSampler`` makes, but of the same seeded batches one process uses, so resuming
    works the same way); each rank keys its augmentation draws by (seed, step, rank) so no two
    ranks share them; the method runs under :func:`wrap_ddp`; the logged loss is the mean over
    ranks (the global-batch loss); only rank 0 (``main``) writes.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0,
                 owns_group: bool = False):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.owns_group = owns_group
        self.main = rank == 0

    @classmethod
    def from_env(cls, device: str, global_batch: int) -> "Ranks":
        """Joins the ``torchrun`` process group when ``WORLD_SIZE`` > 1 in the environment (NCCL
        for a CUDA ``device``, gloo otherwise; an already initialized group is used as it is)
        and checks that ``global_batch`` splits evenly over the ranks."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        ranks = cls(dist.get_rank(), dist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", "0")), owns)
        if global_batch % ranks.world:
            ranks.close()
            raise ValueError(f"the batch size ({global_batch}) must be a multiple of the number "
                             f"of processes ({ranks.world}): it is the global batch")
        return ranks

    def device(self, name: str) -> torch.device:
        """``name`` as a device; CUDA ranks get ``cuda:LOCAL_RANK``."""
        device = torch.device(name)
        if self.world > 1 and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def wrap(self, method: torch.nn.Module):
        """What computes a step's loss from views: ``method.training_step``, or its DDP wrapper."""
        if self.world == 1:
            return method.training_step
        device = next(method.parameters()).device
        return wrap_ddp(method, [device.index] if device.type == "cuda" else None)

    def slice(self, batch: list) -> list:
        """This rank's share of a global batch (a list of sample indices)."""
        per = len(batch) // self.world
        return batch[self.rank * per:(self.rank + 1) * per]

    def seed_step(self, seed: int, step: int) -> None:
        """Seeds the global generator from (seed, step) on several ranks: shuffle-BN draws its
        permutation from it inside a step, and a resumed run must draw what the uninterrupted
        one drew. One process draws nothing from it and is left alone."""
        if self.world > 1:
            torch.manual_seed((seed * 1_000_003 + step) ^ 0x5EED)

    def augment_key(self, step: int) -> int:
        """The augmentation seed key of ``step`` on this rank (``step`` itself on one process,
        so single-process runs are unchanged)."""
        return step * self.world + self.rank

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (all-reduce) of a scalar tensor; ``x`` itself on one process."""
        if self.world == 1:
            return x
        x = x.float().clone()
        dist.all_reduce(x)
        return x / self.world

    def close(self) -> None:
        """Leaves the process group if :meth:`from_env` created it."""
        if self.owns_group:
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False
