r"""Fused multi-positive InfoNCE (supervised contrastive learning, multi-view SimCLR): the public
function :func:`fused_supcon`, and the fake kernels and autograd of the ``supcon_*`` ops.

Op contract (the schemas and equations are in ``csrc/supcon.cpp``): ``supcon_fwd(z, labels,
inv_temperature, normalize) -> (loss, lse)`` gives each row's loss (float32; float64 for float64
z) and its log-sum-exp over all other rows (float64 always); ``supcon_bwd(grad_loss, z, labels, loss, lse, inv_temperature, normalize) -> dz``.
The C++ ops live in ``torch.ops.sslkernels`` (CPU kernel); the GPU implementation, Triton,
in ``torch.ops.sslkernels_triton`` under the same names, with the same fake kernels and
autograd (:func:`register`). The
slice ops ``supcon_slice_fwd / _bwd`` (one rank's rows against the gathered batch) are one ATen
body for every device.
"""
from __future__ import annotations

import functools

import torch

from . import _ext, _validate, distributed  # noqa: F401  (_ext registers the ops)
from . import info_nce as _info_nce
from .reference import supcon as _ref

BACKENDS = ("reference", "cpu", "triton")
REDUCTIONS = ("mean", "sum", "none")

__all__ = ["fused_supcon", "view_labels", "register", "BACKENDS"]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd.

def _fwd_fake(z, labels, inv_temperature, normalize):
    m = z.shape[0]
    return z.new_empty(m, dtype=_acc_dtype(z)), z.new_empty(m, dtype=torch.float64)


def _bwd_fake(grad_loss, z, labels, loss, lse, inv_temperature, normalize):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def register(ns: str, bwd) -> None:
    """Fake kernels and autograd for ``{ns}::supcon_fwd`` and ``{ns}::supcon_bwd`` (``bwd``: the
    namespace's backward op). The forward's second output (lse) is not differentiable; the
    backward gets the forward's own loss and lse."""
    torch.library.register_fake(f"{ns}::supcon_fwd")(_fwd_fake)
    torch.library.register_fake(f"{ns}::supcon_bwd")(_bwd_fake)

    def setup(ctx, inputs, output):
        z, labels, ctx.inv_t, ctx.normalize = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(z, labels, output[0], output[1])

    def backward(ctx, grad_loss, _grad_lse):
        z, labels, loss, lse = ctx.saved_tensors
        dz = bwd(grad_loss.contiguous(), z, labels, loss, lse, ctx.inv_t, ctx.normalize)
        return dz, None, None, None

    torch.library.register_autograd(f"{ns}::supcon_fwd", backward, setup_context=setup)


_ops = torch.ops.sslkernels
register("sslkernels", _ops.supcon_bwd)


@torch.library.register_fake("sslkernels::supcon_slice_fwd")
def _slice_fwd_fake(keys, labels, offset, n, inv_temperature, normalize):
    return (keys.new_empty(n, dtype=_acc_dtype(keys)), keys.new_empty(n, dtype=torch.float64))


@torch.library.register_fake("sslkernels::supcon_slice_bwd")
def _slice_bwd_fake(grad_loss, keys, labels, loss, lse, offset, n, inv_temperature, normalize):
    return torch.empty_like(keys, memory_format=torch.contiguous_format)


def _slice_setup(ctx, inputs, output):
    keys, labels, ctx.offset, ctx.n, ctx.inv_t, ctx.normalize = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(keys, labels, output[0], output[1])


def _slice_backward(ctx, grad_loss, _grad_lse):
    keys, labels, loss, lse = ctx.saved_tensors
    dkeys = _ops.supcon_slice_bwd(grad_loss.contiguous(), keys, labels, loss, lse, ctx.offset,
                                  ctx.n, ctx.inv_t, ctx.normalize)
    return dkeys, None, None, None, None, None


torch.library.register_autograd("sslkernels::supcon_slice_fwd", _slice_backward,
                                setup_context=_slice_setup)


# ---------------------------------------------------------------------------------------------
# Public API.

def view_labels(n: int, views: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Labels of V views of n images stacked view-major (``torch.cat([view_0, ..., view_{V-1}])``,
    each (n, D)): row ``v * n + i`` gets label ``i``, so each row's positives are the other
    views of its image. ``fused_supcon(torch.cat(views), view_labels(n, len(views)))`` is
    SimCLR with V views; with V = 2 it is :func:`sslkernels.fused_info_nce`."""
    return torch.arange(n, device=device).repeat(views)


def default_backend(device: torch.device) -> str:
    """The backend :func:`fused_supcon` uses for tensors on ``device`` when none is given: the
    same rule as :func:`sslkernels.info_nce.default_backend` (CUDA: ``"triton"``)."""
    return _info_nce.default_backend(device)


@functools.cache
def _triton_ops():
    """``torch.ops.sslkernels_triton.supcon_fwd / supcon_bwd``: the Triton kernels
    (sslkernels/triton_kernels/supcon.py) as custom ops with this module's fake kernels and
    autograd; CUDA, and CPU under TRITON_INTERPRET=1."""
    if not _info_nce.triton_available():
        raise RuntimeError("backend='triton' needs triton >= 3.6 (pip install 'triton>=3.6')")
    from .triton_kernels import supcon_launch as tk

    devices = ("cuda", "cpu")

    @torch.library.custom_op("sslkernels_triton::supcon_fwd", mutates_args=(),
                             device_types=devices)
    def fwd(z: torch.Tensor, labels: torch.Tensor, inv_temperature: float,
            normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return tk.supcon_fwd(z, labels, inv_temperature, normalize)

    @torch.library.custom_op("sslkernels_triton::supcon_bwd", mutates_args=(),
                             device_types=devices)
    def bwd(grad_loss: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor,
            lse: torch.Tensor, inv_temperature: float, normalize: bool) -> torch.Tensor:
        return tk.supcon_bwd(grad_loss, z, labels, loss, lse, inv_temperature, normalize)

    register("sslkernels_triton", bwd)
    return torch.ops.sslkernels_triton


def _positive_counts(all_labels: torch.Tensor, row_labels: torch.Tensor) -> torch.Tensor:
    """For each of row_labels: how many entries of all_labels share it, minus itself."""
    s = torch.sort(all_labels).values
    return (torch.searchsorted(s, row_labels, right=True) - torch.searchsorted(s, row_labels)
            - 1)


def _check_labels(labels, m: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.shape != (m,):
        raise ValueError(f"labels must have shape (M,) = ({m},) like the rows of z, got "
                         f"{tuple(labels.shape)}")


def fused_supcon(z: torch.Tensor, labels: torch.Tensor, *, temperature: float = 0.1,
                 normalize: bool = True, reduction: str = "mean", backend: str | None = None,
                 gather_distributed: bool = False,
                 group: "torch.distributed.ProcessGroup | None" = None) -> torch.Tensor:
    r"""Multi-positive InfoNCE (supervised contrastive, SupCon's :math:`\mathcal{L}_{out}`,
    Khosla et al. 2020) without materializing the M x M logits.

    ``z``: (M, D) rows, L2-normalized inside unless ``normalize=False``; ``labels``: (M,)
    integers. With :math:`S = \hat Z \hat Z^\top / \tau` and :math:`P(i)` the other rows with
    row i's label,

    .. math:: \ell_i = \log \sum_{j \ne i} e^{S_{ij}} - \frac{1}{|P(i)|} \sum_{p \in P(i)} S_{ip}.

    **Multi-view SimCLR**: labels = the image index of each view (:func:`view_labels`): the
    positives of a view are the other V - 1 views of its image. With V = 2 this is
    :func:`sslkernels.fused_info_nce` row for row. **Supervised**: labels = classes (V views of
    each image with the image's class label give SupCon's multi-view batch).

    **Rows without a positive** (a label that occurs once): such a row has nothing to be pulled
    towards, so it has no loss term: its row is 0 (``reduction="none"``), it adds nothing to
    ``"sum"``, and ``"mean"`` averages over the rows that have a positive only. If no row has
    one, the mean is 0 (an empty mean, with zero gradient), never NaN. The row still serves as a
    negative of every other row.

    **Across ranks** - ``gather_distributed=True`` with an initialized process group of W > 1
    ranks: every rank passes its own (M_r, D) rows and (M_r,) labels (the same M_r and D on every
    rank); each rank computes its own rows of the global loss - against the rows and labels of
    all ranks, own column excluded - in column tiles (memory O(W*M_r*D)). ``"mean"`` divides the
    rank's sum by (number of rows with a positive in the global batch) / W, so the mean of the
    ranks' losses is the global-batch mean and, with the gradient conventions of
    :mod:`sslkernels.distributed` (each rank's rows get W x the gradient of the global loss),
    DDP's averaging gives single-process training on the global batch. ``"none"`` returns the
    rank's rows. Without a process group, or with one rank, the flag changes nothing.

    Args:
        z: (M, D) float16, bfloat16, float32 or float64, M >= 1, D >= 1.
        labels: (M,) integer tensor on ``z``'s device.
        temperature: :math:`\tau > 0`.
        normalize: L2-normalize rows first (``F.normalize``, eps 1e-12).
        reduction: ``"mean"`` (over rows with a positive), ``"sum"`` or ``"none"`` ((M,) rows,
            in ``z``'s order).
        backend: ``None`` (CPU tensors: ``"cpu"``; CUDA: ``"triton"``), ``"reference"``
            (plain PyTorch, O(M^2) memory), ``"cpu"`` (the C++ kernel: tiled over the symmetric
            similarity matrix, multi-threaded, O(M*D) memory) or ``"triton"`` (the GPU kernels:
            bf16/fp16 on tensor cores, O(M*D) memory; on CPU only under TRITON_INTERPRET=1).
        gather_distributed: compute this rank's share of the loss over the batches of all
            ranks (see above).
        group: the process group for ``gather_distributed`` (default: the world).

    Returns:
        The loss in float32 (float64 for float64 inputs); a scalar unless ``reduction="none"``.
        Accumulation is in float32 or wider.
    """
    _validate.tensor("z", z, ndim=2)
    m, d = z.shape
    _check_labels(labels, m)
    if m == 0:
        raise ValueError("z must hold at least one row (M >= 1), got M = 0")
    if d == 0:
        raise ValueError("z must have at least one feature (D >= 1), got D = 0")
    temperature = _validate.positive("temperature", temperature)
    _validate.choice("reduction", reduction, REDUCTIONS)
    device = _validate.same_device(z=z, labels=labels)
    backend = default_backend(device) if backend is None else backend
    _info_nce._check_backend(backend, device)
    normalize = bool(normalize)
    labels = labels.to(torch.int64).contiguous()
    rank, world = distributed.rank_and_world(group) if gather_distributed else (0, 1)

    if world > 1:
        keys = distributed.gather_with_grad(z, group)
        all_labels = distributed.gather_no_grad(labels, group)
        offset = rank * m
        if backend == "reference":
            rows = _ref.supcon_slice_rows(keys, all_labels, offset, m, temperature,
                                          normalize).to(_acc_dtype(z))
        else:
            rows, _ = _ops.supcon_slice_fwd(keys, all_labels, offset, m, 1.0 / temperature,
                                            normalize)
        return _reduce(rows, reduction, (_positive_counts(all_labels, all_labels) > 0).sum(),
                       world)

    if backend == "reference":
        rows = _ref.supcon_rows(z, labels, temperature, normalize).to(_acc_dtype(z))
    else:
        ops = _ops if backend == "cpu" else _triton_ops()
        rows, _ = ops.supcon_fwd(z, labels, 1.0 / temperature, normalize)
    return _reduce(rows, reduction, (_positive_counts(labels, labels) > 0).sum(), 1)


def _reduce(rows: torch.Tensor, reduction: str, anchors: torch.Tensor, world: int) -> torch.Tensor:
    """``anchors``: the rows with a positive in the (global) batch, of which this process holds
    1/world on average: "mean" is this rank's sum over anchors / world (0 when there are none)."""
    if reduction == "none":
        return rows
    # Summed in float64: M rows of float32 lose an ulp or more in a float32 sum.
    total = rows.to(torch.float64).sum()
    if reduction == "mean":
        total = total * world / anchors.clamp_min(1)
    return total.to(rows.dtype)
