"""Torch-side launchers of the Triton InfoNCE kernels (:mod:`.info_nce`).

Each function implements one op of the InfoNCE contract (see :mod:`sslkernels.info_nce`) with the
same outputs as the C++ CPU kernels: per-row losses and ``lse_neg``, each row's log-sum-exp over
its negatives only, from which the backward re-derives the rest. The O(N^2) (or O(N*K)) work
runs in Triton; what is O(N*D) - normalizing, the positive logits, the positive pair's gradient,
the normalization backward - runs here in torch, in the same order of operations as the C++
host code (csrc/info_nce.h), so both backends round alike where it matters.

The launchers fix everything the JIT would specialize on besides a plan's constexprs: their own
copies of the rows are padded to a width that is a multiple of ``ALIGN`` (zeros change no dot
product), a queue that is not so aligned is copied, and sizes are passed unspecialized. So the
compile gate's ahead-of-time compiles are exactly what runs.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
import triton

from . import info_nce as K

_ACC = {torch.float64: torch.float64}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return _ACC.get(dtype, torch.float32)


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (triton launches on the current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(plan: K.Plan, grid, *args) -> None:
    plan.kernel[grid](*args, **K.launch_constexprs(plan), num_warps=plan.num_warps,
                      num_stages=plan.num_stages)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _unit_rows(parts, normalize: bool, acc: torch.dtype):
    """The rows of ``parts`` stacked into one (rows, padded D) zero-padded buffer of ``acc``,
    divided by their clamped norms (exactly F.normalize) when ``normalize``.

    Returns (zn, norm): ``zn`` the (rows, D) view of the padded buffer, ``norm`` the (rows, 1)
    norms (None without normalization).
    """
    d = parts[0].shape[1]
    rows = sum(p.shape[0] for p in parts)
    buf = parts[0].new_zeros((rows, K.padded_width(d)), dtype=acc)
    zn = buf[:, :d]
    r0 = 0
    for p in parts:
        zn[r0:r0 + p.shape[0]].copy_(p)
        r0 += p.shape[0]
    if not normalize:
        return zn, None
    norm = torch.linalg.vector_norm(zn, dim=1, keepdim=True)
    zn.div_(norm.clamp_min(K.EPS))
    return zn, norm


def _dot_operand(zn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The padded (rows, padded D) buffer behind ``zn``, in the dtype the kernels dot in."""
    padded = zn.as_strided((zn.shape[0], zn.stride(0)), (zn.stride(0), 1))
    return padded if dtype == zn.dtype else padded.to(dtype)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


def _unit_rows_backward_(dxn: torch.Tensor, xn: torch.Tensor, norm, normalize: bool):
    """In place: d/dx of x / max(||x||, eps) applied to the gradient of the normalized rows."""
    if not normalize:
        return dxn
    dot = _row_dot(xn, dxn).unsqueeze(1) * (norm > K.EPS)
    return dxn.addcmul_(xn, dot, value=-1).div_(norm.clamp_min(K.EPS))


def _loss(lse_neg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    # log(1 + sum_neg e^(s - pos)): full relative precision when the loss is tiny.
    return F.softplus(lse_neg - pos)


def _splits(row_programs: int, n_cols: int, block_n: int,
            device: torch.device) -> tuple[int, int]:
    """(number of splits, tiles per split) of ``n_cols`` columns so that ``row_programs``
    programs per split make about two waves on the GPU (2N / BLOCK_M or N / BLOCK_M alone is
    often far below the SM count: 2N = 4096 rows in blocks of 128 is 32 programs)."""
    tiles = triton.cdiv(n_cols, block_n)
    if tiles <= 1:
        return 1, max(tiles, 1)
    if device.type == "cuda":
        target = 2 * _sm_count(device.index if device.index is not None
                               else torch.cuda.current_device())
    else:
        target = 4  # interpreter: small, but enough to exercise the split paths in tests
    splits = min(tiles, triton.cdiv(target, row_programs))
    if device.type == "cuda":
        # >= 4 tiles per split keeps the partial write-backs a small overhead.
        splits = min(splits, triton.cdiv(tiles, 4))
    per_split = triton.cdiv(tiles, max(splits, 1))
    return triton.cdiv(tiles, per_split), per_split


def _combine(l_pos, m_part, l_part, acc_part, width: int, need_wsum: bool, dtype, interp):
    """Merge the splits' (max, sum) and accumulators: (loss, lse_neg, wsum (rows, width))."""
    splits, rows = m_part.shape
    dev, acc = m_part.device, m_part.dtype
    loss = torch.empty(rows, dtype=acc, device=dev)
    lse_neg = torch.empty(rows, dtype=acc, device=dev)
    wsum = torch.empty((rows, width) if need_wsum else (0,), dtype=acc, device=dev)
    plan = K.combine_plan(_name(dtype), need_wsum, interp)
    c = plan.constexprs
    _launch(plan, (triton.cdiv(rows, c["BLOCK_M"]),
                   triton.cdiv(width, c["BLOCK_D"]) if need_wsum else 1),
            l_pos, m_part, l_part, acc_part, loss, lse_neg, wsum if need_wsum else loss,
            rows, width, splits, width if need_wsum else 0, width if need_wsum else 0)
    return loss, lse_neg, wsum


# ---------------------------------------------------------------------------------------------
# Two views

def _pair_inputs(z0, z1, inv_t, normalize):
    acc = _acc(z0.dtype)
    zn, norm = _unit_rows([z0, z1], normalize, acc)
    n = z0.shape[0]
    pos = _row_dot(zn[:n], zn[n:]) * inv_t
    return zn, norm, torch.cat([pos, pos]), _dot_operand(zn, z0.dtype)


def pair_fwd(z0: torch.Tensor, z1: torch.Tensor, inv_t: float, normalize: bool):
    """(loss, lse_neg), each (2N,) in the accumulation dtype, rows [view 0, view 1]."""
    n, d = z0.shape
    K.check_d(d)
    acc = _acc(z0.dtype)
    if n == 0:
        return z0.new_empty(0, dtype=acc), z0.new_empty(0, dtype=acc)
    interp = _interpreting()
    with _on_device(z0):
        _, _, pos, z = _pair_inputs(z0, z1, inv_t, normalize)
        plan = K.pair_lse_plan(_name(z0.dtype), d, interp)
        c = plan.constexprs
        row_blocks = triton.cdiv(2 * n, c["BLOCK_M"])
        splits, per_split = _splits(row_blocks, 2 * n, c["BLOCK_N"], z0.device)
        m_part = torch.empty((splits, 2 * n), dtype=acc, device=z0.device)
        l_part = torch.empty((splits, 2 * n), dtype=acc, device=z0.device)
        _launch(plan, (row_blocks, splits), z, m_part, l_part, n, z.shape[1], per_split,
                z.stride(0), float(inv_t))
        loss, lse_neg, _ = _combine(pos.contiguous(), m_part, l_part, m_part, z.shape[1],
                                    False, z0.dtype, interp)
        return loss, lse_neg


def pair_bwd(grad_loss: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor,
             lse_neg: torch.Tensor, inv_t: float, normalize: bool):
    """Gradients of ``sum_i grad_loss[i] * loss[i]`` w.r.t. z0 and z1, in their dtypes."""
    n, d = z0.shape
    K.check_d(d)
    if n == 0:
        return torch.empty_like(z0), torch.empty_like(z1)
    acc = _acc(z0.dtype)
    with _on_device(z0):
        zn, norm, pos, z = _pair_inputs(z0, z1, inv_t, normalize)
        g = grad_loss.to(acc).contiguous()
        loss = _loss(lse_neg.to(acc), pos)
        lse = (pos + loss).contiguous()
        # The kernel weighs rows by g / max|g| (see _pair_grad_kernel); no host sync for it.
        g_max = g.abs().amax()
        g_max = torch.where(g_max > 0, g_max, torch.ones_like(g_max)).reshape(1)
        plan = K.pair_grad_plan(_name(z0.dtype), d, _interpreting())
        c = plan.constexprs
        width = z.shape[1]
        row_blocks = triton.cdiv(2 * n, c["BLOCK_M"])
        chunks = 1 if c["ONE_CHUNK"] else triton.cdiv(width, c["BLOCK_DV"])
        splits, per_split = _splits(row_blocks * chunks, 2 * n, c["BLOCK_N"], z0.device)
        part = torch.empty((splits, 2 * n, width), dtype=acc, device=z0.device)
        _launch(plan, (row_blocks, chunks, splits), z, g / g_max, lse, g_max, part, n, width,
                per_split, z.stride(0), part.stride(1), float(inv_t))
        dzn = (part[0] if splits == 1 else part.sum(0))[:, :d]
        # The positive pair (i, p) adds g_i (P_ip - 1) + g_p (P_pi - 1) = g_i expm1(-loss_i) +
        # g_p expm1(-loss_p): exact even when P_ip is within rounding of 1.
        ge = g * torch.expm1(-loss)
        coef = (ge[:n] + ge[n:]).unsqueeze(1)
        dzn[:n].addcmul_(zn[n:], coef)
        dzn[n:].addcmul_(zn[:n], coef)
        dzn.mul_(inv_t)
        _unit_rows_backward_(dzn, zn, norm, normalize)
        return dzn[:n].to(z0.dtype, copy=True), dzn[n:].to(z1.dtype, copy=True)


# ---------------------------------------------------------------------------------------------
# Queries against a queue of negatives

def _queue(negatives: torch.Tensor, q_dtype: torch.dtype) -> torch.Tensor:
    """The queue as the kernels read it: in place when its dtype pairs with the queries' and its
    rows are aligned; otherwise a converted, padded copy (rare layouts and dtype pairs)."""
    if K.neg_dot_name(_name(q_dtype), _name(negatives.dtype)) is None:
        negatives = negatives.to(q_dtype)
    k, d = negatives.shape
    aligned = (negatives.stride(1) == 1 and negatives.stride(0) % K.ALIGN == 0
               and d % K.ALIGN == 0 and negatives.data_ptr() % 16 == 0) or k == 0
    if aligned:
        return negatives
    copy = negatives.new_zeros((k, K.padded_width(d)))
    copy[:, :d] = negatives
    return copy


def neg_fwd(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, inv_t: float,
            normalize: bool, need_grad: bool):
    """(loss, lse_neg, wsum): loss and lse_neg (N,), and with ``need_grad`` wsum (N, D), the
    softmax-weighted sum of the normalized negatives the backward needs (else empty (0,))."""
    n, d = q.shape
    K.check_d(d)
    acc = _acc(q.dtype)
    dev = q.device
    if n == 0:
        return (q.new_empty(0, dtype=acc), q.new_empty(0, dtype=acc),
                q.new_empty((0, d) if need_grad else (0,), dtype=acc))
    with _on_device(q):
        neg = _queue(negatives, q.dtype)
        qn, _ = _unit_rows([q], normalize, acc)
        kn, _ = _unit_rows([k], normalize, acc)
        l_pos = (_row_dot(qn, kn) * inv_t).contiguous()
        dot_dtype = getattr(torch, K.neg_dot_name(_name(q.dtype), _name(neg.dtype)))
        qd = _dot_operand(qn, dot_dtype)
        width = qd.shape[1]
        k_neg = neg.shape[0]
        interp = _interpreting()
        rneg = l_pos  # unused without normalization
        if normalize and k_neg:
            rneg = torch.empty(k_neg, dtype=acc, device=dev)
            rplan = K.row_rnorm_plan(_name(neg.dtype), interp)
            _launch(rplan, (triton.cdiv(k_neg, rplan.constexprs["BLOCK_R"]),),
                    neg, rneg, k_neg, width, neg.stride(0))

        plan = K.neg_partial_plan(_name(q.dtype), _name(neg.dtype), d, need_grad, interp)
        c = plan.constexprs
        row_blocks = triton.cdiv(n, c["BLOCK_M"])
        splits, per_split = _splits(row_blocks, k_neg, c["BLOCK_N"], dev)
        chunks = triton.cdiv(width, c["BLOCK_DV"]) if need_grad and not c["ONE_CHUNK"] else 1
        m_part = torch.empty((splits, n), dtype=acc, device=dev)
        l_part = torch.empty((splits, n), dtype=acc, device=dev)
        acc_part = (torch.empty((splits, n, width), dtype=acc, device=dev) if need_grad
                    else m_part)
        part_stride = width if need_grad else 0
        _launch(plan, (row_blocks, splits, chunks),
                qd, neg, rneg, m_part, l_part, acc_part, n, width, k_neg, per_split,
                qd.stride(0), neg.stride(0) if k_neg else width, part_stride, float(inv_t),
                int(bool(normalize)))

        loss, lse_neg, wsum = _combine(l_pos, m_part, l_part, acc_part, width, need_grad,
                                       q.dtype, interp)
        if need_grad and width != d:
            wsum = wsum[:, :d].contiguous()
        return loss, lse_neg, wsum
