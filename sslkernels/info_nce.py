"""Fused normalized-similarity InfoNCE (NT-Xent): public function, autograd and fake kernels.

One contract, two implementations. The ops and what they return, whatever the backend:

* ``info_nce_pair_fwd(z0, z1, inv_t, normalize) -> (loss, lse_neg)``: two views (N, D) each;
  ``loss`` (2N,) per row, rows [view 0, view 1]; ``lse_neg`` (2N,) each row's log-sum-exp over
  its negatives only (diagonal and positive excluded; -inf when there are none).
* ``info_nce_pair_bwd(grad_loss, z0, z1, lse_neg, inv_t, normalize) -> (dz0, dz1)``.
* ``info_nce_neg_fwd(q, k, negatives, inv_t, normalize, need_grad) -> (loss, lse_neg, wsum)``:
  ``loss``, ``lse_neg`` (N,); ``wsum`` (N, D) = softmax-weighted sum of the normalized negatives
  when ``need_grad``, else an empty (0,) tensor.
* ``info_nce_neg_bwd(grad_loss, q, k, lse_neg, wsum, inv_t, normalize) -> (dq, dk)``.

Outputs are float32 (float64 for float64 inputs); N = 0 gives empty outputs (the public function
rejects it: validation happens there, once; the ops keep only the checks memory safety needs).

* ``torch.ops.sslkernels.info_nce_*`` - the C++ CPU kernels (tiled, symmetric, multi-threaded),
  registered in ``csrc/``. ``info_nce_neg_bwd`` is O(N*D) ATen code that runs on any device.
* ``torch.ops.sslkernels_triton.info_nce_{pair_fwd,pair_bwd,neg_fwd}`` - the GPU
  implementation: Triton kernels (``sslkernels/triton_kernels/``) defined here as
  ``torch.library.custom_op``s. They run on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (how
  the tests exercise them without a GPU). Their backward uses the same ``info_nce_neg_bwd``.

Both sets get the same autograd formula and fake kernels below, so each passes
``torch.library.opcheck`` and traces under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from . import _ext, _validate, distributed  # noqa: F401  (_ext registers the ops)
from .reference import info_nce as _ref

BACKENDS = ("reference", "cpu", "triton")
REDUCTIONS = ("mean", "sum", "none")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd, shared by both op sets.

def _pair_fwd_fake(z0, z1, inv_temperature, normalize):
    n = z0.shape[0]
    return z0.new_empty(2 * n, dtype=_acc_dtype(z0)), z0.new_empty(2 * n, dtype=_acc_dtype(z0))


def _pair_bwd_fake(grad_loss, z0, z1, lse_neg, inv_temperature, normalize):
    return torch.empty_like(z0), torch.empty_like(z1)


def _neg_fwd_fake(q, k, negatives, inv_temperature, normalize, need_grad):
    n, d = q.shape
    acc = _acc_dtype(q)
    w = q.new_empty((n, d) if need_grad else (0,), dtype=acc)
    return q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc), w


def _neg_bwd_fake(grad_loss, q, k, lse_neg, wsum, inv_temperature, normalize):
    return torch.empty_like(q), torch.empty_like(k)


def _register(ns, pair_bwd, neg_fwd, neg_bwd):
    """Fake kernels and autograd for the forward ops of namespace ``ns`` (and fakes for its
    backward ops); ``pair_bwd``, ``neg_fwd``, ``neg_bwd`` are what the autograd formulas call."""
    lib = f"{ns}::"
    torch.library.register_fake(lib + "info_nce_pair_fwd")(_pair_fwd_fake)
    torch.library.register_fake(lib + "info_nce_pair_bwd")(_pair_bwd_fake)
    torch.library.register_fake(lib + "info_nce_neg_fwd")(_neg_fwd_fake)
    if ns == "sslkernels":
        torch.library.register_fake(lib + "info_nce_neg_bwd")(_neg_bwd_fake)

    # Outputs: per-row losses, and lse_neg (each row's log-sum-exp over its negatives only; the
    # backward derives the loss and the full log-sum-exp from it), which is not differentiable.
    def pair_setup(ctx, inputs, output):
        z0, z1, inv_t, normalize = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(z0, z1, output[1])
        ctx.inv_t, ctx.normalize = inv_t, normalize

    def pair_backward(ctx, grad_loss, _grad_lse):
        z0, z1, lse_neg = ctx.saved_tensors
        dz0, dz1 = pair_bwd(grad_loss.contiguous(), z0, z1, lse_neg, ctx.inv_t, ctx.normalize)
        return dz0, dz1, None, None

    torch.library.register_autograd(lib + "info_nce_pair_fwd", pair_backward,
                                    setup_context=pair_setup)

    def neg_setup(ctx, inputs, output):
        q, k, negatives, inv_t, normalize, need_grad = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        # Without need_grad the forward skipped the softmax-weighted negatives; keep a reference
        # to the negatives (no copy) so a backward that is asked for anyway can redo it.
        ctx.save_for_backward(q, k, output[1], output[2], None if need_grad else negatives)
        ctx.inv_t, ctx.normalize, ctx.need_grad = inv_t, normalize, need_grad

    def neg_backward(ctx, grad_loss, _grad_lse, _grad_wsum):
        q, k, lse_neg, wsum, negatives = ctx.saved_tensors
        if not ctx.need_grad:
            _, lse_neg, wsum = neg_fwd(q, k, negatives, ctx.inv_t, ctx.normalize, True)
        dq, dk = neg_bwd(grad_loss.contiguous(), q, k, lse_neg, wsum, ctx.inv_t, ctx.normalize)
        return dq, dk, None, None, None, None

    torch.library.register_autograd(lib + "info_nce_neg_fwd", neg_backward,
                                    setup_context=neg_setup)


_ops = torch.ops.sslkernels
_register("sslkernels", _ops.info_nce_pair_bwd, _ops.info_nce_neg_fwd, _ops.info_nce_neg_bwd)


# The slice op (csrc/info_nce_slice.cpp): the 2n rows of one rank against the M gathered keys.
# One ATen body serves every device, so it has no Triton twin.
@torch.library.register_fake("sslkernels::info_nce_slice_fwd")
def _slice_fwd_fake(keys, offset0, offset1, n, inv_temperature, normalize):
    return (keys.new_empty(2 * n, dtype=_acc_dtype(keys)),
            keys.new_empty(2 * n, dtype=_acc_dtype(keys)))


@torch.library.register_fake("sslkernels::info_nce_slice_bwd")
def _slice_bwd_fake(grad_loss, keys, lse_neg, offset0, offset1, n, inv_temperature, normalize):
    return torch.empty_like(keys)


def _slice_setup(ctx, inputs, output):
    keys, ctx.offset0, ctx.offset1, ctx.n, ctx.inv_t, ctx.normalize = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(keys, output[1])


def _slice_backward(ctx, grad_loss, _grad_lse):
    keys, lse_neg = ctx.saved_tensors
    dkeys = _ops.info_nce_slice_bwd(grad_loss.contiguous(), keys, lse_neg, ctx.offset0,
                                    ctx.offset1, ctx.n, ctx.inv_t, ctx.normalize)
    return dkeys, None, None, None, None, None


torch.library.register_autograd("sslkernels::info_nce_slice_fwd", _slice_backward,
                                setup_context=_slice_setup)


# ---------------------------------------------------------------------------------------------
# Triton op set (defined only where triton imports).

# The oldest triton the kernels are written for (and compiled against by the offline gate).
TRITON_MIN = (3, 6)


@functools.cache
def triton_available() -> bool:
    """Whether the GPU implementation can run here: triton >= 3.6 importable."""
    if importlib.util.find_spec("triton") is None:
        return False
    import triton
    try:
        version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:  # a local build with an unusual version string: trust it
        return True
    return version >= TRITON_MIN


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_ops():
    if not triton_available():
        raise RuntimeError("backend='triton' needs triton >= %d.%d (pip install 'triton>=3.6'); "
                           "found %s" % (*TRITON_MIN, _triton_version()))
    from .triton_kernels import info_nce_launch as tk

    devices = ("cuda", "cpu")  # cpu only runs under TRITON_INTERPRET=1

    @torch.library.custom_op("sslkernels_triton::info_nce_pair_fwd", mutates_args=(),
                             device_types=devices)
    def pair_fwd(z0: torch.Tensor, z1: torch.Tensor, inv_temperature: float,
                 normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return tk.pair_fwd(z0, z1, inv_temperature, normalize)

    @torch.library.custom_op("sslkernels_triton::info_nce_pair_bwd", mutates_args=(),
                             device_types=devices)
    def pair_bwd(grad_loss: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor,
                 lse_neg: torch.Tensor, inv_temperature: float,
                 normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return tk.pair_bwd(grad_loss, z0, z1, lse_neg, inv_temperature, normalize)

    @torch.library.custom_op("sslkernels_triton::info_nce_neg_fwd", mutates_args=(),
                             device_types=devices)
    def neg_fwd(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, inv_temperature: float,
                normalize: bool, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tk.neg_fwd(q, k, negatives, inv_temperature, normalize, need_grad)

    _register("sslkernels_triton", pair_bwd, neg_fwd, _ops.info_nce_neg_bwd)
    return torch.ops.sslkernels_triton


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "no triton"
    import triton
    return f"triton {triton.__version__}"


# ---------------------------------------------------------------------------------------------
# Public API.

def default_backend(device: torch.device) -> str:
    """The backend :func:`fused_info_nce` uses for tensors on ``device`` when none is given:
    ``"cpu"`` for CPU tensors, ``"triton"`` for CUDA tensors (``"reference"``, with a warning,
    where triton >= 3.6 is missing)."""
    if device.type == "cuda":
        if triton_available():
            return "triton"
        _warn_no_triton()
        return "reference"
    if device.type == "cpu":
        return "cpu"
    return "reference"


@functools.cache
def _warn_no_triton() -> None:
    warnings.warn(f"sslkernels: the fused InfoNCE GPU kernels need triton >= 3.6 ({_triton_version()}"
                  "); CUDA tensors fall back to the plain-PyTorch reference (O(N^2) memory)",
                  RuntimeWarning, stacklevel=3)


def _check_backend(backend: str, device: torch.device) -> None:
    if backend == "cuda":
        raise ValueError("backend='cuda': the GPU implementation of the fused InfoNCE losses "
                         "is backend='triton' (the default for CUDA tensors)")
    _validate.backend(backend, BACKENDS, device)
    if backend == "triton":
        if device.type == "cpu" and not _triton_interpreted():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             "triton is imported; use backend='cpu' for the C++ CPU kernel")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}")


def fused_info_nce(z0: torch.Tensor, z1: torch.Tensor, negatives: torch.Tensor | None = None, *,
                   temperature: float = 0.5, normalize: bool = True, reduction: str = "mean",
                   backend: str | None = None, gather_distributed: bool = False,
                   group: "torch.distributed.ProcessGroup | None" = None) -> torch.Tensor:
    r"""InfoNCE / NT-Xent without materializing the logits matrix.

    **Two views (SimCLR)** - ``negatives is None``. ``z0, z1``: (N, D), the two views of N
    samples. With :math:`Z = [\hat z_0; \hat z_1]` (2N, D) (rows L2-normalized unless
    ``normalize=False``) and :math:`S = Z Z^\top / \tau`, row :math:`i`'s positive is its other
    view :math:`p(i) = (i + N) \bmod 2N` and

    .. math:: \ell_i = \log \sum_{j \ne i} e^{S_{ij}} - S_{i,p(i)}, \qquad i = 1 \dots 2N.

    ``reduction="mean"`` averages the 2N rows: this equals ``lightly.loss.NTXentLoss`` and half
    of google-research/simclr's ``loss_a + loss_b``. ``"none"`` returns the (2N,) rows ordered
    [view 0, view 1].

    **Query/key with negatives (MoCo)** - ``z0 = q``, ``z1 = k``: (N, D), ``negatives``: (K, D)
    (e.g. :attr:`NegativeQueue.negatives`, any float dtype, read in place). Logits
    :math:`[q_i\cdot k_i,\; q_i \cdot Q^\top] / \tau` with label 0:

    .. math:: \ell_i = \log\Big(e^{q_i\cdot k_i/\tau} + \sum_j e^{q_i\cdot Q_j/\tau}\Big) - q_i\cdot k_i/\tau.

    Gradients flow to ``z0`` and ``z1`` (pass ``k.detach()`` for MoCo's stop-gradient), never
    to ``negatives``. ``"none"`` returns (N,) rows.

    **Across ranks** - ``gather_distributed=True`` with an initialized process group of W > 1
    ranks, two-view form only. Every rank passes its own (N, D) views (same N and D on every
    rank); the global batch is ``z0 = cat(z0 of ranks 0..W-1)``, ``z1`` likewise. Each rank
    computes its own 2N rows of the global loss above - against all 2WN rows, own column
    masked, positive at its global column - and returns their mean (``"none"``: the 2N rows,
    [view 0, view 1]). The logits are never formed: the rank's rows sweep the gathered keys in
    tiles (memory O(W*N*D), not O(N^2)). Gradients reach every rank's inputs through
    :func:`sslkernels.distributed.gather_with_grad`: rank r's ``z0, z1`` get
    ``W * d(global mean loss)/d(z0_r, z1_r)`` (the gradient of the sum of the ranks' means), so
    after DDP averages parameter gradients over the W ranks, training equals one process on the
    global batch; the global loss is the mean of the ranks' losses. All backends compute it
    with the one slice op (ATen tiles, any device; ``"triton"`` runs it too),
    except ``"reference"``, which builds the (2N, 2WN) logits. The MoCo form does not gather:
    its negatives are shared through the queue (``NegativeQueue.enqueue(keys, gather=True)``)
    and each rank's loss is over its own queries; passing ``negatives`` with
    ``gather_distributed=True`` is an error. Without a process group, or with one rank, the
    flag changes nothing.

    Args:
        z0, z1: (N, D) float16, bfloat16, float32 or float64, same dtype and device.
        negatives: optional (K, D) floating tensor on the same device.
        temperature: :math:`\tau > 0`. Stable down to 0.01 in fp16/bf16.
        normalize: L2-normalize rows first (``F.normalize``, eps 1e-12).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``None`` (CPU tensors: ``"cpu"``; CUDA: ``"triton"``), ``"reference"``
            (plain PyTorch, O(N^2) memory), ``"cpu"`` (C++), ``"triton"`` (the GPU kernels;
            on CPU only under ``TRITON_INTERPRET=1``).
        gather_distributed: compute this rank's share of the loss over the batches of all
            ranks (two-view form; see above).
        group: the process group for ``gather_distributed`` (default: the world).

    Returns:
        The loss in float32 (float64 for float64 inputs); a scalar unless ``reduction="none"``.
        Accumulation is always in float32 or wider; memory is O(N*D), never O(N^2) or O(N*K).
    """
    _validate.tensor("z0", z0, ndim=2)
    _validate.tensor("z1", z1, ndim=2)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape (N, D), got {tuple(z0.shape)} "
                         f"and {tuple(z1.shape)}")
    if z0.dtype != z1.dtype:
        raise TypeError(f"z0 and z1 must have the same dtype, got {z0.dtype} and {z1.dtype}")
    if z0.shape[0] == 0:
        raise ValueError("z0 and z1 must hold at least one row (N >= 1), got N = 0")
    if z0.shape[1] == 0:
        raise ValueError("z0 and z1 must have at least one feature (D >= 1), got D = 0")
    inv_t = 1.0 / _validate.positive("temperature", temperature)
    _validate.choice("reduction", reduction, REDUCTIONS)
    if negatives is not None:
        _validate.tensor("negatives", negatives, ndim=2)
        if negatives.shape[1] != z0.shape[1]:
            raise ValueError(f"negatives must have width D = {z0.shape[1]} like z0, got shape "
                             f"{tuple(negatives.shape)}")
        device = _validate.same_device(z0=z0, z1=z1, negatives=negatives)
    else:
        device = _validate.same_device(z0=z0, z1=z1)
    backend = default_backend(device) if backend is None else backend
    _check_backend(backend, device)
    normalize = bool(normalize)
    if gather_distributed and negatives is not None:
        raise ValueError("gather_distributed=True applies to the two-view form only (negatives "
                         "is None); share MoCo negatives through "
                         "NegativeQueue.enqueue(keys, gather=True) instead")
    rank, world = distributed.rank_and_world(group) if gather_distributed else (0, 1)

    if world > 1:
        # Rank r's rows of the gathered keys: [z0_r; z1_r] at [2rN, 2(r+1)N). InfoNCE does not
        # care about row order, so one gather of the stacked views serves both.
        n = z0.shape[0]
        keys = distributed.gather_with_grad(torch.cat([z0, z1]), group)
        off0, off1 = 2 * rank * n, 2 * rank * n + n
        if backend == "reference":
            rows = _ref.info_nce_slice_rows(keys, off0, off1, n, 1.0 / inv_t, normalize)
            rows = rows.to(_acc_dtype(z0))
        else:
            rows, _ = torch.ops.sslkernels.info_nce_slice_fwd(keys, off0, off1, n, inv_t,
                                                              normalize)
        return _reduce(rows, reduction)

    if backend == "reference":
        if negatives is None:
            rows = _ref.info_nce_pair_rows(z0, z1, 1.0 / inv_t, normalize)
        else:
            rows = _ref.info_nce_negatives_rows(z0, z1, negatives, 1.0 / inv_t, normalize)
        rows = rows.to(_acc_dtype(z0))
    else:
        ops = torch.ops.sslkernels if backend == "cpu" else _triton_ops()
        if negatives is None:
            rows, _ = ops.info_nce_pair_fwd(z0, z1, inv_t, normalize)
        else:
            need_grad = torch.is_grad_enabled() and (z0.requires_grad or z1.requires_grad)
            rows, _, _ = ops.info_nce_neg_fwd(z0, z1, negatives.detach(), inv_t, normalize,
                                              need_grad)
    return _reduce(rows, reduction)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
