"""Fused InfoNCE / NT-Xent loss in Triton: forward and backward without the logits matrix.

Two variants, both written FlashAttention-style (tiles of logits are produced by ``tl.dot``,
consumed by an online log-sum-exp and thrown away), so memory is O(N*D) instead of O(N^2):

* ``pair``: two-view NT-Xent (SimCLR). ``Z = cat(zn0, zn1)``, ``S = Z Z^T / T``, row ``i``'s
  positive is ``(i + N) mod 2N``, the diagonal is excluded.
* ``neg``: MoCo InfoNCE against a queue of negatives. The forward also accumulates
  ``wsum_i = sum_j softmax_ij * Qn_j`` (FlashAttention with ``V = Qn``), which makes the backward
  a row-local O(N*D) pass: the queue is never read again.

The plain-PyTorch oracle is :mod:`sslkernels.reference.info_nce`. Accumulation is fp32, or fp64
when the inputs are fp64; fp16/bf16 tiles are upcast before every ``tl.dot``.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# F.normalize's default eps: ``x / max(||x||, eps)``.
_EPS = 1e-12
EPS = tl.constexpr(_EPS)

# fp32 tiles use IEEE products: logits are scaled by up to 1/T = 100, and TF32's 10-bit mantissa
# would put errors of ~0.05 on them, far more than the fp32 reference shows. The interpreter
# always multiplies exactly, so "ieee" also keeps CPU tests and GPU runs in agreement.
# ("tf32x3" is the obvious thing to try if the FMA path is too slow on a given GPU; the tile
# table below was chosen for "ieee" and would need a second look.)
DOT_PRECISION = "ieee"

# Widest feature dimension: (BLOCK_M, BLOCK_D) accumulators and (BLOCK_N, BLOCK_D) tiles must
# fit in registers and shared memory (an fp64 D = 2048 tile alone would exceed an H100's).
MAX_D = 1024


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

class _Cfg(NamedTuple):
    block_m: int
    block_n: int
    block_k: int  # chunk of D per tl.dot when building a logits tile
    block_d: int  # D padded to a power of two, for (rows, D) accumulators
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_d(d: int) -> int:
    # A power of two for tl.arange, and >= 16 so a (BLOCK_N, BLOCK_D) tile is a tl.dot operand
    # on every backend.
    return max(16, triton.next_power_of_2(d))


# GPU tiles as (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Chosen offline for sm_90 by
# compiling every candidate with Triton's own ptxas and keeping large tiles that do not spill
# registers; not benchmarked (no GPU was available when they were picked). IEEE fp32 tl.dot is
# lowered to FMAs that keep whole (rows, K) operand slices in registers, hence BLOCK_K = 8.
# Logits-only kernels (pair forward, negatives forward without wsum) hold a (BLOCK_M, BLOCK_N)
# tile; "wide" ones (pair backward, negatives forward with wsum) also a (BLOCK_M, BLOCK_D)
# accumulator, so their tiles shrink as D grows. Keys: the largest BLOCK_D a row applies to.
_GPU_LOGITS_ONLY = {torch.float32: (64, 64, 8, 4, 3), torch.float64: (64, 32, 8, 4, 3)}
_GPU_WIDE = {
    torch.float32: ((64, (64, 32, 8, 8, 3)), (128, (32, 32, 8, 8, 3)), (256, (32, 32, 8, 8, 2)),
                    (512, (16, 32, 8, 8, 2)), (MAX_D, (16, 16, 8, 8, 2))),
    torch.float64: ((64, (32, 32, 8, 8, 3)), (MAX_D, (16, 16, 8, 8, 2))),
}


def _cfg(d: int, wide: bool, acc: torch.dtype) -> _Cfg:
    """Block sizes for feature dimension ``d`` and accumulation dtype ``acc``."""
    block_d = _block_d(d)
    if _interpreting():
        # Small tiles keep the CPU interpreter fast; BLOCK_K < BLOCK_D still exercises the
        # chunked-D loop and BLOCK_M/N = 32 the multi-block paths at test sizes.
        return _Cfg(32, 32, 16, block_d, 4, 1)
    if wide:
        tiles = next(t for limit, t in _GPU_WIDE[acc] if block_d <= limit)
    else:
        tiles = _GPU_LOGITS_ONLY[acc]
    block_m, block_n, block_k, num_warps, num_stages = tiles
    return _Cfg(block_m, block_n, block_k, block_d, num_warps, num_stages)


def _check_d(d: int) -> None:
    if d > MAX_D:
        raise ValueError(f"the Triton InfoNCE kernels support up to {MAX_D} features, got {d}")


def _rowwise_block_m(block_d: int, acc: torch.dtype) -> int:
    """Rows per program for the row-local kernels (negatives backward and split combine)."""
    # ~2K fp32 (1K fp64) elements per (rows, D) tile keeps neg_bwd's five live tiles in
    # registers on sm_90 without spilling.
    if _interpreting():
        return 16
    budget = 1024 if acc == torch.float64 else 2048
    return max(1, min(64, budget // block_d))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """About two waves of programs: enough to fill the GPU when splitting the queue."""
    if device.type != "cuda":
        return 4  # interpreter: small, but enough to exercise the split path in tests
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 2 * _sm_count(index)


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_float_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


# --------------------------------------------------------------------------------------------
# Two-view (pair) kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _logits_tile(A, B, a_rows, b_rows, a_ok, b_ok, D, stride_a, stride_b,
                 ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """Raw dot products A[a_rows] . B[b_rows]^T (unit column stride), D walked in chunks.

    Chunking keeps only (rows, BLOCK_K) operand slices live, whatever D is; rows outside the
    problem load as zeros, so their products are 0 and get masked by the caller.
    """
    offs_k = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        a = tl.load(A + a_rows[:, None] * stride_a + kk[None, :],
                    mask=a_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
        b = tl.load(B + b_rows[:, None] * stride_b + kk[None, :],
                    mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
        s = tl.dot(a, tl.trans(b), s, input_precision=DOT_PREC)
    return s


@triton.jit
def _pair_fwd_kernel(Z, LOSS, LSE, N, D, stride_z, inv_t: "fp64",
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    # inv_t arrives as fp64 so the fp64 path is not limited by an fp32-rounded temperature.
    inv_t = tl.full([], inv_t, ACC)
    two_n = 2 * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < two_n
    pos = tl.where(rows < N, rows + N, rows - N)
    rows64 = rows.to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    s_pos = tl.zeros([BLOCK_M], dtype=ACC)
    for n0 in range(0, two_n, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < two_n
        s = _logits_tile(Z, Z, rows64, cols.to(tl.int64), row_ok, col_ok, D, stride_z, stride_z,
                         ACC, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC) * inv_t
        # The positive logit is taken from the same tile the lse sees, so loss >= 0 exactly
        # whenever the positive dominates, with no second dot product.
        s_pos += tl.sum(tl.where(cols[None, :] == pos[:, None], s, 0.0), axis=1)
        s = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), s, float("-inf"))
        # No NaN from exp(-inf - -inf): the first column tile holds a valid logit for every row
        # (2N >= 2, BLOCK_N >= 2), so m_new is finite from then on; a later tile that is all
        # masked (say, only the diagonal) just leaves the running max unchanged.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    log_l = tl.log(l_i)
    tl.store(LSE + rows, m_i + log_l, mask=row_ok)
    # (m - s_pos) is exactly 0 when the positive is the row max: no cancellation in the loss.
    tl.store(LOSS + rows, (m_i - s_pos) + log_l, mask=row_ok)


@triton.jit
def _pair_bwd_kernel(Z, NRM, G, LSE, DZ0, DZ1, N, D, stride_z, stride_dz0, stride_dz1,
                     inv_t: "fp64", NORMALIZE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    # Each program owns BLOCK_M rows of dZ and sweeps all columns, so every output row is
    # written by exactly one program: no atomics, deterministic. S is symmetric, so the column
    # side of dS (row j's softmax weight on a) is formed from the same recomputed tile.
    inv_t = tl.full([], inv_t, ACC)
    two_n = 2 * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < two_n
    pos = tl.where(rows < N, rows + N, rows - N)
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    g_i = tl.load(G + rows, mask=row_ok, other=0.0)
    lse_i = tl.load(LSE + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for n0 in range(0, two_n, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < two_n
        cols64 = cols.to(tl.int64)
        s = _logits_tile(Z, Z, rows64, cols64, row_ok, col_ok, D, stride_z, stride_z,
                         ACC, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC) * inv_t
        # Mask before exp: masked entries become exactly 0 and never produce inf * 0.
        s = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), s, float("-inf"))
        g_j = tl.load(G + cols, mask=col_ok, other=0.0)
        lse_j = tl.load(LSE + cols, mask=col_ok, other=0.0)
        # M_aj = g_a P_aj + g_j P_ja; both softmax weights are <= 1 so nothing overflows.
        w = g_i[:, None] * tl.exp(s - lse_i[:, None]) + g_j[None, :] * tl.exp(s - lse_j[None, :])
        z_j = tl.load(Z + cols64[:, None] * stride_z + offs_d[None, :],
                      mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(w, z_j, acc, input_precision=DOT_PREC)

    # The positive's logit appears in both its row's and its partner's loss with weight -1.
    g_pos = tl.load(G + pos, mask=row_ok, other=0.0)
    tile_ok = row_ok[:, None] & d_ok[None, :]
    z_pos = tl.load(Z + pos.to(tl.int64)[:, None] * stride_z + offs_d[None, :],
                    mask=tile_ok, other=0.0)
    dzn = (acc - (g_i + g_pos)[:, None] * z_pos) * inv_t

    if NORMALIZE:
        # Backward of zn = z / max(||z||, eps); Z holds zn. Below eps the clamp is constant,
        # so only the 1/eps scaling remains (torch's clamp_min passes the gradient at ==).
        eps = tl.full([], EPS, ACC)
        z_i = tl.load(Z + rows64[:, None] * stride_z + offs_d[None, :], mask=tile_ok, other=0.0)
        nrm = tl.load(NRM + rows, mask=row_ok, other=1.0)
        r = 1.0 / tl.maximum(nrm, eps)
        radial = tl.where(nrm >= eps, tl.sum(z_i * dzn, axis=1), 0.0)
        dz = r[:, None] * (dzn - z_i * radial[:, None])
    else:
        dz = dzn

    # View 0 rows go to dz0 and view 1 rows to dz1, cast straight to each input's dtype.
    offs_d64 = offs_d.to(tl.int64)
    in0 = rows < N
    tl.store(DZ0 + rows64[:, None] * stride_dz0 + offs_d64[None, :],
             dz.to(DZ0.dtype.element_ty), mask=tile_ok & in0[:, None])
    tl.store(DZ1 + (rows64 - N)[:, None] * stride_dz1 + offs_d64[None, :],
             dz.to(DZ1.dtype.element_ty), mask=tile_ok & (rows >= N)[:, None])


def _pair_prepare(z0: torch.Tensor, z1: torch.Tensor, normalize: bool):
    """(2N, D) contiguous accumulation-dtype Z (normalized if asked) and the row norms.

    O(N*D) torch ops; done exactly like F.normalize so the kernels see the reference's zn.
    """
    _check_float_2d("z0", z0)
    _check_float_2d("z1", z1)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} "
                         f"and {tuple(z1.shape)}")
    _check_d(z0.shape[1])
    acc = _acc_dtype(z0, z1)
    z = torch.cat([z0.to(acc), z1.to(acc)], dim=0)
    nrm = None
    if normalize:
        nrm = torch.linalg.vector_norm(z, dim=1)
        z = z / nrm.clamp_min(_EPS).unsqueeze(1)
    return z.contiguous(), nrm, acc


def pair_fwd(z0: torch.Tensor, z1: torch.Tensor, inv_t: float, normalize: bool):
    """Per-row two-view NT-Xent loss and log-sum-exp, each of shape (2N,).

    Rows are ordered [view 0, view 1]. Both outputs are fp32 (fp64 for fp64 inputs); ``lse`` is
    what :func:`pair_bwd` needs besides the inputs.
    """
    z, _, acc = _pair_prepare(z0, z1, normalize)
    n, d = z0.shape
    loss = torch.empty(2 * n, dtype=acc, device=z.device)
    lse = torch.empty(2 * n, dtype=acc, device=z.device)
    if n == 0:
        return loss, lse
    cfg = _cfg(d, wide=False, acc=acc)
    grid = (triton.cdiv(2 * n, cfg.block_m),)
    _pair_fwd_kernel[grid](
        z, loss, lse, n, d, z.stride(0), float(inv_t),
        ACC=_tl_dtype(acc), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_PREC=DOT_PRECISION, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return loss, lse


def pair_bwd(grad_loss: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor, lse: torch.Tensor,
             inv_t: float, normalize: bool):
    """Gradients of ``sum_i grad_loss[i] * loss[i]`` w.r.t. z0 and z1, in their dtypes."""
    z, nrm, acc = _pair_prepare(z0, z1, normalize)
    n, d = z0.shape
    dz0 = torch.empty((n, d), dtype=z0.dtype, device=z.device)
    dz1 = torch.empty((n, d), dtype=z1.dtype, device=z.device)
    if n == 0:
        return dz0, dz1
    # grad_loss is often an expanded (stride-0) view from a sum/mean; O(N) to materialize.
    g = grad_loss.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    cfg = _cfg(d, wide=True, acc=acc)
    grid = (triton.cdiv(2 * n, cfg.block_m),)
    _pair_bwd_kernel[grid](
        z, nrm if nrm is not None else z, g, lse, dz0, dz1, n, d,
        z.stride(0), dz0.stride(0), dz1.stride(0), float(inv_t),
        NORMALIZE=bool(normalize), ACC=_tl_dtype(acc), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, DOT_PREC=DOT_PRECISION,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dz0, dz1


# --------------------------------------------------------------------------------------------
# Negatives (MoCo) kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_dot_operand(ptrs, mask, ACC: tl.constexpr, LAYOUT_BARRIER: tl.constexpr):
    """Load a tile in its storage dtype and upcast it to ACC for tl.dot."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    if LAYOUT_BARRIER:
        # Triton cannot lower an fp64 tl.dot whose operand is a 16-bit load upcast in-register
        # (the upcast is folded into the MMA operand layout and hits "fp64 don't support
        # largeK MMA"). A reduction over a size-1 axis is an identity that stops the folding.
        x = tl.sum(x[:, :, None], axis=2)
    return x


@triton.jit
def _neg_fwd_kernel(Q, K, NEG, LOSS, LSE, WSUM, LPOS, M_PART, L_PART, ACC_PART,
                    N, D, KNEG, tiles_per_split,
                    stride_qn, stride_qd, stride_kn, stride_kd, stride_negk, stride_negd,
                    stride_w, inv_t: "fp64",
                    NORMALIZE: tl.constexpr, NEED_WSUM: tl.constexpr, SPLIT: tl.constexpr,
                    Q_BARRIER: tl.constexpr, NEG_BARRIER: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    # Grid: (row blocks, queue splits). MoCo has few queries (N ~ 256) and a long queue
    # (K ~ 65536), so splitting the queue is what fills the GPU; partial (max, sum, wsum) of
    # each split are merged by _neg_combine_kernel. With one split the epilogue is fused here.
    inv_t = tl.full([], inv_t, ACC)
    eps = tl.full([], EPS, ACC)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    # q and k are normalized on the fly (row-local), so the wrapper never copies them.
    qq = tl.zeros([BLOCK_M], dtype=ACC)
    kk = tl.zeros([BLOCK_M], dtype=ACC)
    qk = tl.zeros([BLOCK_M], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        dk = k0 + offs_k
        msk = row_ok[:, None] & (dk < D)[None, :]
        q_c = tl.load(Q + rows64[:, None] * stride_qn + dk[None, :] * stride_qd,
                      mask=msk, other=0.0).to(ACC)
        k_c = tl.load(K + rows64[:, None] * stride_kn + dk[None, :] * stride_kd,
                      mask=msk, other=0.0).to(ACC)
        qq += tl.sum(q_c * q_c, axis=1)
        kk += tl.sum(k_c * k_c, axis=1)
        qk += tl.sum(q_c * k_c, axis=1)
    if NORMALIZE:
        r_q = 1.0 / tl.maximum(tl.sqrt(qq), eps)
        r_k = 1.0 / tl.maximum(tl.sqrt(kk), eps)
    else:
        r_q = tl.full([BLOCK_M], 1.0, ACC)
        r_k = tl.full([BLOCK_M], 1.0, ACC)
    l_pos = qk * r_q * r_k * inv_t
    row_scale = r_q * inv_t

    # The running max starts at l_pos (finite, and part of every row's lse), so no tile can
    # leave it at -inf; the positive's own exp term is added once, at the end.
    m_i = l_pos
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    n_lo = pid_s * tiles_per_split * BLOCK_N
    n_hi = tl.minimum(KNEG, n_lo + tiles_per_split * BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        cols64 = cols.to(tl.int64)
        # Queue tiles are read in their storage dtype (e.g. bf16) and upcast here: the queue
        # itself is never copied or converted.
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        ss = tl.zeros([BLOCK_N], dtype=ACC)
        for k0 in range(0, D, BLOCK_K):
            dk = k0 + offs_k
            k_ok = dk < D
            q_c = _load_dot_operand(Q + rows64[:, None] * stride_qn + dk[None, :] * stride_qd,
                                    row_ok[:, None] & k_ok[None, :], ACC, Q_BARRIER)
            n_c = _load_dot_operand(
                NEG + cols64[:, None] * stride_negk + dk[None, :] * stride_negd,
                col_ok[:, None] & k_ok[None, :], ACC, NEG_BARRIER)
            s = tl.dot(q_c, tl.trans(n_c), s, input_precision=DOT_PREC)
            if NORMALIZE:
                # Negative norms ride along on tiles already in registers: ~1/BLOCK_M of the
                # dot's work, and no separate pass over the queue.
                ss += tl.sum(n_c * n_c, axis=1)
        if NORMALIZE:
            r_neg = 1.0 / tl.maximum(tl.sqrt(ss), eps)
        else:
            r_neg = tl.full([BLOCK_N], 1.0, ACC)
        s = s * row_scale[:, None] * r_neg[None, :]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if NEED_WSUM:
            v = _load_dot_operand(
                NEG + cols64[:, None] * stride_negk + offs_d[None, :] * stride_negd,
                col_ok[:, None] & d_ok[None, :], ACC, NEG_BARRIER)
            # V = Qn: the normalization folds into the weights instead of the (BN, D) tile.
            acc = tl.dot(p * r_neg[None, :], v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    tile_ok = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part = pid_s * N + rows
        tl.store(M_PART + part, m_i, mask=row_ok)
        tl.store(L_PART + part, l_i, mask=row_ok)
        tl.store(LPOS + rows, l_pos, mask=row_ok & (pid_s == 0))
        if NEED_WSUM:
            tl.store(ACC_PART + part.to(tl.int64)[:, None] * D + offs_d[None, :], acc,
                     mask=tile_ok)
    else:
        total = l_i + tl.exp(l_pos - m_i)  # = exp(lse - m)
        log_total = tl.log(total)
        tl.store(LSE + rows, m_i + log_total, mask=row_ok)
        tl.store(LOSS + rows, (m_i - l_pos) + log_total, mask=row_ok)
        if NEED_WSUM:
            tl.store(WSUM + rows64[:, None] * stride_w + offs_d[None, :],
                     acc / total[:, None], mask=tile_ok)


@triton.jit
def _neg_combine_kernel(LPOS, M_PART, L_PART, ACC_PART, LOSS, LSE, WSUM, N, D, n_splits,
                        stride_w, NEED_WSUM: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Merge per-split online-softmax states: rescale each to the global max and add.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (offs_d < D)[None, :]
    l_pos = tl.load(LPOS + rows, mask=row_ok, other=0.0)
    m = l_pos
    for sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(M_PART + sp * N + rows, mask=row_ok, other=0.0))
    total = tl.exp(l_pos - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for sp in range(0, n_splits):
        part = sp * N + rows
        scale = tl.exp(tl.load(M_PART + part, mask=row_ok, other=0.0) - m)
        total += tl.load(L_PART + part, mask=row_ok, other=0.0) * scale
        if NEED_WSUM:
            a = tl.load(ACC_PART + part.to(tl.int64)[:, None] * D + offs_d[None, :],
                        mask=tile_ok, other=0.0)
            acc += a * scale[:, None]
    log_total = tl.log(total)
    tl.store(LSE + rows, m + log_total, mask=row_ok)
    tl.store(LOSS + rows, (m - l_pos) + log_total, mask=row_ok)
    if NEED_WSUM:
        tl.store(WSUM + rows.to(tl.int64)[:, None] * stride_w + offs_d[None, :],
                 acc / total[:, None], mask=tile_ok)


@triton.jit
def _neg_bwd_kernel(G, Q, K, LSE, WSUM, DQ, DK, N, D,
                    stride_qn, stride_qd, stride_kn, stride_kd, stride_w,
                    stride_dq, stride_dk, inv_t: "fp64",
                    NORMALIZE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Row-local: d loss_i / d qn_i = inv_t * ((p0 - 1) kn_i + wsum_i), with wsum from the
    # forward, so the queue is not touched here.
    inv_t = tl.full([], inv_t, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (offs_d < D)[None, :]

    q = tl.load(Q + rows64[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=tile_ok, other=0.0).to(ACC)
    k = tl.load(K + rows64[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=tile_ok, other=0.0).to(ACC)
    w = tl.load(WSUM + rows64[:, None] * stride_w + offs_d[None, :], mask=tile_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)

    if NORMALIZE:
        eps = tl.full([], EPS, ACC)
        nq = tl.sqrt(tl.sum(q * q, axis=1))
        nk = tl.sqrt(tl.sum(k * k, axis=1))
        r_q = 1.0 / tl.maximum(nq, eps)
        r_k = 1.0 / tl.maximum(nk, eps)
        q = q * r_q[:, None]
        k = k * r_k[:, None]
    l_pos = tl.sum(q * k, axis=1) * inv_t
    gt = g * inv_t
    c = gt * (tl.exp(l_pos - lse) - 1.0)
    dqn = c[:, None] * k + gt[:, None] * w
    dkn = c[:, None] * q
    if NORMALIZE:
        # Same normalization backward as the pair kernel (projection only above eps).
        rad_q = tl.where(nq >= eps, tl.sum(q * dqn, axis=1), 0.0)
        rad_k = tl.where(nk >= eps, tl.sum(k * dkn, axis=1), 0.0)
        dq = r_q[:, None] * (dqn - q * rad_q[:, None])
        dk = r_k[:, None] * (dkn - k * rad_k[:, None])
    else:
        dq = dqn
        dk = dkn
    tl.store(DQ + rows64[:, None] * stride_dq + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=tile_ok)
    tl.store(DK + rows64[:, None] * stride_dk + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=tile_ok)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    _check_float_2d("q", q)
    _check_float_2d("k", k)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    _check_d(q.shape[1])


def _needs_layout_barrier(x: torch.Tensor, acc: torch.dtype) -> bool:
    """16-bit tiles feeding an fp64 tl.dot need _load_dot_operand's workaround."""
    return acc == torch.float64 and x.element_size() < 4


def _queue_splits(n_rows: int, k_neg: int, block_m: int, block_n: int,
                  device: torch.device) -> tuple[int, int]:
    """(number of splits, tiles per split) of the queue for the negatives forward."""
    tiles = triton.cdiv(k_neg, block_n)
    if tiles <= 1:
        return 1, max(tiles, 1)
    row_blocks = triton.cdiv(n_rows, block_m)
    splits = min(tiles, triton.cdiv(_target_programs(device), row_blocks))
    if not _interpreting():
        # Keep >= 4 tiles per split so partial (N, D) write-backs stay a small overhead.
        splits = min(splits, triton.cdiv(tiles, 4))
    splits = max(splits, 1)
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split


def neg_fwd(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, inv_t: float,
            normalize: bool, need_grad: bool):
    """Per-row MoCo InfoNCE loss against a queue of negatives.

    Returns ``(loss, lse, wsum)``: loss and lse of shape (N,), and wsum (N, D), the softmax-
    weighted sum of the normalized negatives that :func:`neg_bwd` needs, or an empty tensor when
    ``need_grad`` is False (the second ``tl.dot`` is then skipped). ``negatives`` is read in
    place in its own dtype and strides.
    """
    _check_qk(q, k)
    _check_float_2d("negatives", negatives)
    n, d = q.shape
    if negatives.shape[1] != d:
        raise ValueError(f"negatives must have {d} features, got shape {tuple(negatives.shape)}")
    k_neg = negatives.shape[0]
    acc = _acc_dtype(q, k)
    dev = q.device
    loss = torch.empty(n, dtype=acc, device=dev)
    lse = torch.empty(n, dtype=acc, device=dev)
    wsum = torch.empty((n, d) if need_grad else (0,), dtype=acc, device=dev)
    if n == 0:
        return loss, lse, wsum

    cfg = _cfg(d, wide=bool(need_grad), acc=acc)
    splits, per_split = _queue_splits(n, k_neg, cfg.block_m, cfg.block_n, dev)
    split = splits > 1
    if split:
        lpos = torch.empty(n, dtype=acc, device=dev)
        m_part = torch.empty((splits, n), dtype=acc, device=dev)
        l_part = torch.empty((splits, n), dtype=acc, device=dev)
        acc_part = torch.empty((splits, n, d), dtype=acc, device=dev) if need_grad else loss
    else:
        # Unused pointers in this specialization; a real buffer avoids passing a null pointer.
        lpos = m_part = l_part = acc_part = loss
    w_arg = wsum if need_grad else loss
    w_stride = wsum.stride(0) if need_grad else 0
    acc_tl = _tl_dtype(acc)

    grid = (triton.cdiv(n, cfg.block_m), splits)
    _neg_fwd_kernel[grid](
        q, k, negatives, loss, lse, w_arg, lpos, m_part, l_part, acc_part,
        n, d, k_neg, per_split,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        negatives.stride(0), negatives.stride(1), w_stride, float(inv_t),
        NORMALIZE=bool(normalize), NEED_WSUM=bool(need_grad), SPLIT=split,
        Q_BARRIER=_needs_layout_barrier(q, acc), NEG_BARRIER=_needs_layout_barrier(negatives, acc),
        ACC=acc_tl,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
        DOT_PREC=DOT_PRECISION, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split:
        block_m = _rowwise_block_m(cfg.block_d, acc)
        _neg_combine_kernel[(triton.cdiv(n, block_m),)](
            lpos, m_part, l_part, acc_part, loss, lse, w_arg, n, d, splits, w_stride,
            NEED_WSUM=bool(need_grad), ACC=acc_tl, BLOCK_M=block_m, BLOCK_D=cfg.block_d,
            num_warps=4)
    return loss, lse, wsum


def neg_bwd(grad_loss: torch.Tensor, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
            wsum: torch.Tensor, inv_t: float, normalize: bool):
    """Gradients of ``sum_i grad_loss[i] * loss[i]`` w.r.t. q and k (in their dtypes).

    No gradient flows to the negatives (MoCo's queue is a constant).
    """
    _check_qk(q, k)
    n, d = q.shape
    dq = torch.empty((n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((n, d), dtype=k.dtype, device=k.device)
    if n == 0:
        return dq, dk
    if wsum.shape != (n, d):
        raise ValueError(f"wsum must have shape {(n, d)} (call neg_fwd with need_grad=True), "
                         f"got {tuple(wsum.shape)}")
    acc = _acc_dtype(q, k)
    g = grad_loss.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    wsum = wsum.to(acc)
    if wsum.stride(1) != 1:
        wsum = wsum.contiguous()
    block_d = _block_d(d)
    block_m = _rowwise_block_m(block_d, acc)
    _neg_bwd_kernel[(triton.cdiv(n, block_m),)](
        g, q, k, lse, wsum, dq, dk, n, d,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), wsum.stride(0),
        dq.stride(0), dk.stride(0), float(inv_t),
        NORMALIZE=bool(normalize), ACC=_tl_dtype(acc), BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=4)
    return dq, dk
