"""Triton kernels of the fused InfoNCE / NT-Xent ops: the O(N^2) parts, nothing else.

This module imports triton and nothing else (no torch, no sslkernels), so the offline compile
gate (``tools/triton_gate.py``) can load it where only triton is installed, such as a side
environment holding the oldest supported triton. The torch-side launchers that prepare inputs,
pick a :class:`Plan` and finish the loss are in :mod:`sslkernels.triton_kernels.info_nce_launch`.

Kernels (FlashAttention-style: logits tiles are made by ``tl.dot``, consumed by an online
log-sum-exp and dropped, so memory is O(N*D)):

* ``_pair_lse_kernel``: two views, ``Z = [zn0; zn1]`` (2N, D): each row's log-sum-exp over its
  negatives (``S = Z Z^T / T`` without the diagonal and the positive ``(i + N) mod 2N``), as
  partial (max, sum) over column splits.
* ``_pair_grad_kernel``: ``dZn_i = sum_{j neg} (g_i P_ij + g_j P_ji) Z_j`` where
  ``P = exp(S - lse)`` is the softmax of each row; S is symmetric, so both terms come from one
  recomputed tile. The positive pair, the 1/T factor and the normalization backward are O(N*D)
  and done by the launcher. Column splits leave partial sums that the launcher adds.
* ``_neg_partial_kernel``: MoCo queries ``Qn`` (N, D) against a queue (K, D) read in place in its
  own dtype; the queue is cut into splits (a second grid axis) so that N ~ 256 queries still fill
  the GPU; each split leaves its (max, sum) and, for the backward, the rescaled
  ``sum_j exp(S_ij - m) Qn_j``.
* ``_combine_kernel``: merges the splits of either into ``lse_neg``, the loss and ``wsum``.
* ``_row_rnorm_kernel``: the queue rows' inverse norms, read in place.

Precision: fp32 inputs multiply in IEEE fp32 on FMA units (TF32 would put errors of ~1e-3/T on
the logits); bf16/fp16 inputs reach ``tl.dot`` as bf16/fp16 tiles with fp32 accumulation
(tensor cores); fp64 accumulates in fp64.

Specialization: every value the JIT would specialize on is fixed by the launchers (pointers and
row strides aligned to 16 elements, sizes passed unspecialized), so the constexprs of a
:class:`Plan` determine the compiled kernel and the gate can compile each one ahead of time.
"""
# No ``from __future__ import annotations``: triton reads kernel annotations such as
# ``inv_t: "fp64"`` as written, and postponed evaluation would turn them into other strings.
import os
from typing import Iterator, NamedTuple

import triton
import triton.language as tl

# F.normalize's eps: x / max(||x||, eps).
EPS = 1e-12
_EPS = tl.constexpr(EPS)

# The interpreter computes tl.dot with numpy, which has no bfloat16 (it multiplies the raw bits):
# there, half tiles are upcast exactly before the dot, which is what the tensor cores compute up
# to the order of the fp32 accumulation.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

DTYPES = ("float16", "bfloat16", "float32", "float64")
HALF = ("float16", "bfloat16")

# Widest feature dimension: (BLOCK_M, BLOCK_D) accumulators must fit in registers.
MAX_D = 1024
# Row strides and pointers of every tensor a kernel reads are multiples of this many elements:
# the launchers pad their own copies, and copy a queue that is not aligned.
ALIGN = 16
# Up to this many features one chunk of the row block stays in registers for a whole sweep;
# beyond it the kernels walk D in chunks.
ONE_CHUNK_MAX = 128


def acc_name(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


# ---------------------------------------------------------------------------------------------
# Shared device helpers

@triton.jit
def _dot(a, b, acc):
    """acc + a @ b for operands of one dtype, at the precision the module docstring states."""
    if a.dtype == tl.float64:
        # triton 3.6 defaults out_dtype to fp32 and rejects an fp64 accumulator without it.
        return tl.dot(a, b, acc, out_dtype=tl.float64)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        if _INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, out_dtype=tl.float32)


@triton.jit
def _log1p(x):
    """log(1 + x) to full relative precision for small x (Goldberg's form; tl has no log1p):
    log(u) * x / (u - 1) with u = 1 + x, which corrects the rounding of u."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _online_lse(m, l, s):
    """Fold a tile of logits ``s`` (rows, cols; -inf where masked) into running (max, sum).

    Returns (m_new, l_new, p, alpha) with ``p = exp(s - m_new)`` and ``alpha`` the factor that
    rescales what was accumulated against the old max. A row that has seen only masked entries
    keeps m = -inf and l = 0: the max used for the exponentials is then 0, never -inf - -inf.
    """
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_use)
    p = tl.exp(s - m_use[:, None])
    return m_new, l * alpha + tl.sum(p, axis=1), p, alpha


@triton.jit
def _logits_chunked(A, a_rows, a_ok, B, b_rows, b_ok, D, stride_a, stride_b,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Raw dot products A[a_rows] . B[b_rows]^T (unit column stride), D walked in BLOCK_K chunks
    so only (rows, BLOCK_K) operand slices are live whatever D is. Rows and features outside the
    problem load as zeros and contribute nothing. B is converted to A's dtype."""
    offs_k = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        a = tl.load(A + a_rows[:, None] * stride_a + kk[None, :],
                    mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + b_rows[:, None] * stride_b + kk[None, :],
                    mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        s = _dot(a, tl.trans(b.to(a.dtype)), s)
    return s


@triton.jit
def _load_rows(X, rows64, row_ok, offs, D, stride, DTYPE: tl.constexpr):
    """X[rows, offs] as a (rows, len(offs)) tile of DTYPE, zeros outside the problem."""
    return tl.load(X + rows64[:, None] * stride + offs[None, :],
                   mask=row_ok[:, None] & (offs < D)[None, :], other=0.0).to(DTYPE)


@triton.jit
def _weight_headroom(DTYPE: tl.constexpr):
    """The factor softmax-gradient weights are scaled by before they meet a DTYPE tile: fp16
    gets 2^8 so that weights of ~1/(2N) * 1/(2N) stay out of its subnormals (the launcher's
    G_SCALE and this factor are undone on the fp32 accumulator)."""
    scale = 1.0
    if DTYPE == tl.float16:
        scale = 256.0
    return scale


@triton.jit
def _column_tile(A, a_tile, rows64, row_ok, B, cols64, col_ok, offs_v, D, stride_a, stride_b,
                 ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr, WANT_V: tl.constexpr):
    """Raw dots of the row block with columns ``cols`` of B, and (WANT_V) B[cols, offs_v], the
    operand of a second dot, in A's dtype. With ONE_CHUNK, ``a_tile`` holds A[rows, :BLOCK_K]
    and the one B tile loaded serves both (offs_v must then be the first BLOCK_K features)."""
    dt = a_tile.dtype
    if ONE_CHUNK:
        v = _load_rows(B, cols64, col_ok, offs_v, D, stride_b, dt)
        s = _dot(a_tile, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC))
    else:
        s = _logits_chunked(A, rows64, row_ok, B, cols64, col_ok, D, stride_a, stride_b,
                            ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        if WANT_V:
            v = _load_rows(B, cols64, col_ok, offs_v, D, stride_b, dt)
        else:
            v = tl.zeros([BLOCK_N, BLOCK_K], dtype=dt)
    return s, v


@triton.jit
def _split_range(split, tiles_per_split, total, BLOCK_N: tl.constexpr):
    """Columns [lo, hi) of split ``split`` of ``total`` columns in splits of whole tiles."""
    lo = split * tiles_per_split * BLOCK_N
    return lo, tl.minimum(total, lo + tiles_per_split * BLOCK_N)


# ---------------------------------------------------------------------------------------------
# Two views

@triton.jit
def _pair_negative(rows, cols, col_ok, N):
    """Mask of the (rows, cols) entries that are negatives: not the diagonal, not the other view."""
    pos = tl.where(rows < N, rows + N, rows - N)
    return col_ok[None, :] & (cols[None, :] != rows[:, None]) & (cols[None, :] != pos[:, None])


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def _pair_lse_kernel(Z, M_PART, L_PART, N, D, tiles_per_split, stride_z, inv_t: "fp64",
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr):
    # Grid: (row blocks, column splits). Each program folds its rows' logits over one range of
    # columns into a partial (max, sum); _combine_kernel merges the splits. Splitting the
    # columns is what keeps the GPU busy when 2N / BLOCK_M is smaller than the SM count.
    # inv_t arrives as fp64 so the fp64 path is not limited by an fp32-rounded temperature.
    inv_t = tl.full([], inv_t, ACC)
    two_n = 2 * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < two_n
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    dt = Z.dtype.element_ty
    a_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=dt)
    if ONE_CHUNK:  # D <= BLOCK_K: the row block stays in registers for the whole sweep
        a_tile = _load_rows(Z, rows64, row_ok, offs_k, D, stride_z, dt)

    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], dtype=ACC)
    n_lo, n_hi = _split_range(tl.program_id(1), tiles_per_split, two_n, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s, _v = _column_tile(Z, a_tile, rows64, row_ok, Z, cols.to(tl.int64), col_ok, offs_k,
                             D, stride_z, stride_z, ACC, BLOCK_M, BLOCK_N, BLOCK_K, ONE_CHUNK,
                             False)
        s = tl.where(_pair_negative(rows, cols, col_ok, N), s * inv_t, float("-inf"))
        m, l, _p, _alpha = _online_lse(m, l, s)
    # A row without negatives in this range leaves m = -inf, l = 0 (N = 1: in every range).
    part = tl.program_id(1) * two_n + rows
    tl.store(M_PART + part, m, mask=row_ok)
    tl.store(L_PART + part, l, mask=row_ok)


@triton.jit(do_not_specialize=["N", "tiles_per_split"])
def _pair_grad_kernel(Z, G, LSE, G_SCALE, DZN_PART, N, D, tiles_per_split, stride_z,
                      stride_part, inv_t: "fp64",
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, ONE_CHUNK: tl.constexpr):
    # Grid: (row blocks, feature chunks of BLOCK_DV, column splits). Each program owns a
    # (BLOCK_M, BLOCK_DV) block of one split's partial dZn and sweeps that split's columns:
    # every output is written by one program, no atomics, deterministic (the launcher sums the
    # splits). With ONE_CHUNK (D <= BLOCK_K = BLOCK_DV) one tile of Z_j serves both dots;
    # otherwise each feature chunk recomputes the logits (a D-independent register footprint,
    # paid for only when D > BLOCK_K).
    inv_t = tl.full([], inv_t, ACC)
    two_n = 2 * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < two_n
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dt = Z.dtype.element_ty
    a_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=dt)
    offs_b = offs_v  # the features of the column tile that the second dot reads
    if ONE_CHUNK:
        a_tile = _load_rows(Z, rows64, row_ok, offs_k, D, stride_z, dt)
        offs_b = offs_k
    # G holds g / max|g| (G_SCALE = max|g|): the weights below are at most 2 before headroom.
    w_scale = _weight_headroom(dt)
    g_i = tl.load(G + rows, mask=row_ok, other=0.0) * w_scale
    lse_i = tl.load(LSE + rows, mask=row_ok, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    n_lo, n_hi = _split_range(tl.program_id(2), tiles_per_split, two_n, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s, z_j = _column_tile(Z, a_tile, rows64, row_ok, Z, cols.to(tl.int64), col_ok, offs_b,
                              D, stride_z, stride_z, ACC, BLOCK_M, BLOCK_N, BLOCK_K, ONE_CHUNK,
                              True)
        # Masked before exp: those entries are exactly 0 and never inf * 0. Both softmax
        # weights are <= 1, so nothing overflows.
        s = tl.where(_pair_negative(rows, cols, col_ok, N), s * inv_t, float("-inf"))
        g_j = tl.load(G + cols, mask=col_ok, other=0.0) * w_scale
        lse_j = tl.load(LSE + cols, mask=col_ok, other=0.0)
        w = g_i[:, None] * tl.exp(s - lse_i[:, None]) + g_j[None, :] * tl.exp(s - lse_j[None, :])
        acc = _dot(w.to(dt), z_j, acc)

    unscale = tl.load(G_SCALE).to(ACC) / w_scale
    part = (tl.program_id(2) * two_n + rows).to(tl.int64)
    tl.store(DZN_PART + part[:, None] * stride_part + offs_v[None, :], acc * unscale,
             mask=row_ok[:, None] & (offs_v < D)[None, :])


# ---------------------------------------------------------------------------------------------
# Queries against a queue of negatives

@triton.jit(do_not_specialize=["R"])
def _row_rnorm_kernel(X, OUT, R, D, stride_x, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """OUT[r] = 1 / max(||X[r]||, eps), read in X's dtype and summed in ACC (a torch reduction
    to fp32 would convert the whole queue first on some devices)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    ss = tl.zeros([BLOCK_R], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        x = _load_rows(X, rows64, row_ok, k0 + offs, D, stride_x, ACC)
        ss += tl.sum(x * x, axis=1)
    tl.store(OUT + rows, 1.0 / tl.maximum(tl.sqrt(ss), _EPS), mask=row_ok)


@triton.jit(do_not_specialize=["N", "KNEG", "tiles_per_split", "normalize"])
def _neg_partial_kernel(Q, NEG, RNEG, M_PART, L_PART, ACC_PART, N, D, KNEG, tiles_per_split,
                        stride_q, stride_neg, stride_part, inv_t: "fp64", normalize,
                        NEED_WSUM: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_DV: tl.constexpr, ONE_CHUNK: tl.constexpr):
    # Grid: (row blocks, queue splits, feature chunks of BLOCK_DV). MoCo has few queries
    # (N ~ 256) and a long queue (K ~ 65536): splitting the queue is what fills the GPU. Q holds
    # the normalized queries in the DOT dtype; the queue is read in place in its own dtype, and
    # RNEG holds its rows' 1/max(||n_j||, eps) when normalizing (one O(K*D) pass by the
    # launcher: forming the norms here would keep an fp32 copy of every tile live); normalize
    # is an int, not a bool (triton 3.6's interpreter cannot pass bools). With
    # NEED_WSUM each program also accumulates its feature chunk of sum_j exp(S_ij - m) Qn_j.
    inv_t = tl.full([], inv_t, ACC)
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=DOT)
    offs_b = offs_v
    if ONE_CHUNK:
        q_tile = _load_rows(Q, rows64, row_ok, offs_k, D, stride_q, DOT)
        offs_b = offs_k

    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    n_lo, n_hi = _split_range(pid_s, tiles_per_split, KNEG, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s, v = _column_tile(Q, q_tile, rows64, row_ok, NEG, cols.to(tl.int64), col_ok, offs_b,
                            D, stride_q, stride_neg, ACC, BLOCK_M, BLOCK_N, BLOCK_K, ONE_CHUNK,
                            NEED_WSUM)
        if normalize != 0:
            r_neg = tl.load(RNEG + cols, mask=col_ok, other=0.0)
        else:
            r_neg = tl.full([BLOCK_N], 1.0, ACC)
        s = tl.where(col_ok[None, :], s * inv_t * r_neg[None, :], float("-inf"))
        m, l, p, alpha = _online_lse(m, l, s)
        if NEED_WSUM:
            # V = Qn: the normalization folds into the weights instead of the (BLOCK_N, D) tile.
            # p <= 1; fp16 weights get 2^8 of headroom against its subnormals.
            if DOT == tl.float16:
                w = p * (r_neg * 256.0)[None, :]
            else:
                w = p * r_neg[None, :]
            acc = _dot(w.to(DOT), v, acc * alpha[:, None])

    part = pid_s * N + rows
    first = tl.program_id(2) == 0
    tl.store(M_PART + part, m, mask=row_ok & first)
    tl.store(L_PART + part, l, mask=row_ok & first)
    if NEED_WSUM:
        if DOT == tl.float16:
            acc = acc * (1.0 / 256.0)
        tl.store(ACC_PART + part.to(tl.int64)[:, None] * stride_part + offs_v[None, :], acc,
                 mask=row_ok[:, None] & (offs_v < D)[None, :])


@triton.jit(do_not_specialize=["N", "n_splits"])
def _combine_kernel(LPOS, M_PART, L_PART, ACC_PART, LOSS, LSE_NEG, WSUM, N, D, n_splits,
                    stride_part, stride_w, NEED_WSUM: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Merges the splits of _pair_lse_kernel or _neg_partial_kernel: N rows, each with its
    # positive logit LPOS. Grid: (row blocks, feature chunks). Each program merges the splits'
    # (max, sum) of its rows (cheap, repeated per chunk) and rescales its chunk of the
    # accumulators.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    l_pos = tl.load(LPOS + rows, mask=row_ok, other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    for sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(M_PART + sp * N + rows, mask=row_ok, other=0.0))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_M], dtype=ACC)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for sp in range(0, n_splits):
        part = sp * N + rows
        scale = tl.exp(tl.load(M_PART + part, mask=row_ok, other=0.0) - m_use)
        l += tl.load(L_PART + part, mask=row_ok, other=0.0) * scale
        if NEED_WSUM:
            a = tl.load(ACC_PART + part.to(tl.int64)[:, None] * stride_part + offs_d[None, :],
                        mask=tile_ok, other=0.0)
            acc += a * scale[:, None]
    lse_neg = m + tl.log(l)
    # loss = log(1 + sum_neg exp(s - l_pos)), with the negatives' max taken relative to the
    # positive before anything is rounded at the logits' magnitude (~1/T): exactly log(2N - 1)
    # when all logits are equal, full relative precision when the positive dominates (the C++
    # kernels' log_sum_states, csrc/info_nce.h).
    t = m - l_pos
    b = t + tl.log(l)
    near = _log1p(l * tl.exp(t))
    far = b + _log1p(tl.exp(-b))
    loss = tl.where(b > 20.0, far, near)
    first = tl.program_id(1) == 0
    tl.store(LSE_NEG + rows, lse_neg, mask=row_ok & first)
    tl.store(LOSS + rows, loss, mask=row_ok & first)
    if NEED_WSUM:
        # P_ij = exp(s_ij - lse) with lse = l_pos + loss: wsum = acc * exp(m - lse).
        w = acc * tl.exp(m_use - (l_pos + loss))[:, None]
        tl.store(WSUM + rows.to(tl.int64)[:, None] * stride_w + offs_d[None, :], w,
                 mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# Launch plans: the constexprs and launch options of every kernel, chosen from the problem's
# dtypes and D alone. The launchers and the compile gate both go through these functions.

class Plan(NamedTuple):
    kernel: object          # the @triton.jit function
    constexprs: dict        # name -> value (triton dtypes spelled as strings, see tl_dtype)
    num_warps: int
    num_stages: int


# Tile tables. Chosen offline for sm_90 and sm_80 by compiling candidates with triton's ptxas
# (tools/triton_tiles.py; tools/triton_gate.py checks the result: no spills, shared memory
# within the limit), keeping large tiles; not yet tuned on a GPU. Every tl.dot has K >= 16
# (triton 3.6 rejects less). "one": D <= ONE_CHUNK_MAX, the row block stays in registers and
# BLOCK_K = BLOCK_DV = ONE_CHUNK_MAX; "chunked": any D, in BLOCK_K chunks.
#   logits-only kernels: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
#   kernels with an accumulator: (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DV, num_warps, num_stages)
_PAIR_LSE = {  # dot dtype -> {"one": ..., "chunked": ...}
    "float16": {"one": (128, 64, 128, 8, 3), "chunked": (128, 64, 32, 8, 3)},
    "bfloat16": {"one": (128, 64, 128, 8, 3), "chunked": (128, 64, 32, 8, 3)},
    "float32": {"one": None, "chunked": (64, 64, 16, 4, 3)},
    "float64": {"one": None, "chunked": (64, 32, 16, 4, 3)},
}
_PAIR_GRAD = {
    "float16": {"one": (128, 64, 128, 128, 8, 3), "chunked": (64, 64, 64, 256, 8, 2)},
    "bfloat16": {"one": (128, 64, 128, 128, 8, 3), "chunked": (64, 64, 64, 256, 8, 2)},
    "float32": {"one": None, "chunked": (32, 32, 16, 128, 8, 2)},
    "float64": {"one": None, "chunked": (32, 16, 16, 64, 8, 2)},
}
# (query dtype, queue dtype) -> tiles, for the queues read in place (see neg_dot_name).
_NEG_LOGITS = {
    ("float16", "float16"): {"one": (64, 128, 128, 8, 3), "chunked": (64, 128, 64, 8, 3)},
    ("bfloat16", "bfloat16"): {"one": (64, 128, 128, 8, 3), "chunked": (64, 128, 64, 8, 3)},
    ("float16", "float32"): {"one": (64, 128, 128, 8, 3), "chunked": (64, 128, 64, 8, 3)},
    ("bfloat16", "float32"): {"one": (64, 128, 128, 8, 3), "chunked": (64, 128, 64, 8, 3)},
    ("float32", "float32"): {"one": None, "chunked": (64, 64, 16, 4, 3)},
    ("float32", "float16"): {"one": None, "chunked": (32, 64, 16, 4, 3)},
    ("float32", "bfloat16"): {"one": None, "chunked": (32, 64, 16, 4, 3)},
    ("float64", "float64"): {"one": None, "chunked": (64, 32, 16, 8, 3)},
}
_NEG_WSUM = {
    ("float16", "float16"): {"one": (128, 64, 128, 128, 8, 3), "chunked": (64, 64, 64, 256, 8, 2)},
    ("bfloat16", "bfloat16"): {"one": (128, 64, 128, 128, 8, 3), "chunked": (64, 64, 64, 256, 8, 2)},
    ("float16", "float32"): {"one": (128, 64, 128, 128, 8, 3), "chunked": (64, 64, 64, 256, 8, 2)},
    ("bfloat16", "float32"): {"one": (128, 64, 128, 128, 8, 3), "chunked": (64, 64, 64, 256, 8, 2)},
    ("float32", "float32"): {"one": None, "chunked": (32, 32, 16, 128, 8, 2)},
    ("float32", "float16"): {"one": None, "chunked": (32, 32, 16, 128, 8, 2)},
    ("float32", "bfloat16"): {"one": None, "chunked": (32, 32, 16, 128, 8, 2)},
    ("float64", "float64"): {"one": None, "chunked": (32, 16, 16, 64, 8, 2)},
}
_COMBINE = (16, 32, 4)  # BLOCK_M, BLOCK_D, num_warps: many small programs (N ~ 256)
_RNORM = (64, 64, 4)  # BLOCK_R, BLOCK_K, num_warps
# The interpreter runs on CPU: small tiles keep it fast and make the masked edges, the
# multi-block loops, the feature chunks and the queue splits all run at test sizes.
_INTERPRET_TILES = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, BLOCK_DV=32)


def check_d(d: int) -> None:
    if not 1 <= d <= MAX_D:
        raise ValueError(f"the Triton InfoNCE kernels support 1 to {MAX_D} features, got {d}")


def padded_width(d: int) -> int:
    """Row stride of the launchers' own copies: D rounded up to ALIGN (zeros change no dot)."""
    return -(-d // ALIGN) * ALIGN


def _tiles(entry: dict, d: int):
    """(one chunk?, tiles) for feature dimension d."""
    if entry["one"] is not None and d <= ONE_CHUNK_MAX:
        return True, entry["one"]
    return False, entry["chunked"]


def _interpret_tiles(one: bool, d: int, wide: bool) -> dict:
    t = dict(_INTERPRET_TILES)
    if one:
        t["BLOCK_K"] = t["BLOCK_DV"] = max(ALIGN, triton.next_power_of_2(d))
    if not wide:
        del t["BLOCK_DV"]
    return t


def _plan(kernel, entry: dict, d: int, wide: bool, interpret: bool, **fixed) -> Plan:
    one, tiles = _tiles(entry, d)
    if wide:
        bm, bn, bk, bdv, warps, stages = tiles
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DV=bdv)
    else:
        bm, bn, bk, warps, stages = tiles
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if interpret:
        blocks, stages = _interpret_tiles(one, d, wide), 1
    return Plan(kernel, dict(fixed, ONE_CHUNK=one, **blocks), warps, stages)


def pair_lse_plan(dtype: str, d: int, interpret: bool = False) -> Plan:
    return _plan(_pair_lse_kernel, _PAIR_LSE[dtype], d, False, interpret, ACC=acc_name(dtype))


def pair_grad_plan(dtype: str, d: int, interpret: bool = False) -> Plan:
    return _plan(_pair_grad_kernel, _PAIR_GRAD[dtype], d, True, interpret, ACC=acc_name(dtype))


def neg_dot_name(q_dtype: str, neg_dtype: str) -> str | None:
    """The dot dtype for queries of ``q_dtype`` against a queue of ``neg_dtype`` read in place,
    or None when the launcher converts the queue to ``q_dtype`` first (rare pairings: fp64
    queries, a queue of the other half type or of fp64)."""
    if neg_dtype == q_dtype:
        return q_dtype
    if q_dtype == "float32" and neg_dtype in HALF:
        return "float32"  # an fp32 model with a half-precision queue: tiles upcast exactly
    if q_dtype in HALF and neg_dtype == "float32":
        return q_dtype  # autocast: queue tiles round to the queries' dtype, as einsum would
    return None


def neg_partial_plan(q_dtype: str, neg_dtype: str, d: int, need_wsum: bool,
                     interpret: bool = False) -> Plan:
    dot = neg_dot_name(q_dtype, neg_dtype)
    if dot is None:
        raise ValueError(f"no in-place kernel for {q_dtype} queries with a {neg_dtype} queue")
    table = _NEG_WSUM if need_wsum else _NEG_LOGITS
    plan = _plan(_neg_partial_kernel, table[(q_dtype, neg_dtype)], d, need_wsum, interpret,
                 NEED_WSUM=need_wsum, DOT=dot, ACC=acc_name(q_dtype))
    if not need_wsum:  # the accumulator is dead code: any width will do
        plan.constexprs["BLOCK_DV"] = ALIGN
    return plan


def combine_plan(q_dtype: str, need_wsum: bool, interpret: bool = False) -> Plan:
    bm, bd, warps = (16, 16, 4) if interpret else _COMBINE
    return Plan(_combine_kernel, dict(NEED_WSUM=need_wsum, ACC=acc_name(q_dtype),
                                          BLOCK_M=bm, BLOCK_D=bd), warps, 1)


def row_rnorm_plan(dtype: str, interpret: bool = False) -> Plan:
    br, bk, warps = (16, 16, 4) if interpret else _RNORM
    return Plan(_row_rnorm_kernel, dict(ACC=acc_name(dtype), BLOCK_R=br, BLOCK_K=bk), warps, 1)


def tl_dtype(name: str):
    return getattr(tl, name)


def launch_constexprs(plan: Plan) -> dict:
    """A plan's constexprs as kernel keyword arguments (dtype names become triton dtypes)."""
    return {k: tl_dtype(v) if isinstance(v, str) else v for k, v in plan.constexprs.items()}


# ---------------------------------------------------------------------------------------------
# Everything the launchers can launch on a GPU, for the compile gate.

class Launch(NamedTuple):
    """One specialization: a plan plus the argument types its launch binds."""
    name: str
    plan: Plan
    pointers: dict   # pointer argument -> element dtype name
    ints: tuple      # int arguments the launchers pass as multiples of ALIGN
    dot: str | None  # dtype of its tl.dot operands (None: no tl.dot)


def _kind(plan: Plan) -> str:
    return "one" if plan.constexprs["ONE_CHUNK"] else "chunked"


def specializations() -> Iterator[Launch]:
    """Every (kernel, constexprs, argument types) a GPU launch can use: each input dtype, each
    in-place queue dtype, one-chunk and chunked D, with and without the softmax-weighted sum.
    Sizes are not specialized and strides are multiples of ALIGN, so nothing else varies."""
    for dt in DTYPES:
        acc = acc_name(dt)
        for d in (ONE_CHUNK_MAX, MAX_D):
            plan = pair_lse_plan(dt, d)
            yield Launch(f"pair_lse[{dt},{_kind(plan)}]", plan,
                         dict(Z=dt, M_PART=acc, L_PART=acc), ("D", "stride_z"), dt)
            plan = pair_grad_plan(dt, d)
            yield Launch(f"pair_grad[{dt},{_kind(plan)}]", plan,
                         dict(Z=dt, G=acc, LSE=acc, G_SCALE=acc, DZN_PART=acc),
                         ("D", "stride_z", "stride_part"), dt)
            for neg in DTYPES:
                dot = neg_dot_name(dt, neg)
                if dot is None:
                    continue
                ptrs = dict(Q=dot, NEG=neg, RNEG=acc, M_PART=acc, L_PART=acc, ACC_PART=acc)
                for wsum in (False, True):
                    plan = neg_partial_plan(dt, neg, d, wsum)
                    yield Launch(f"neg_partial[{dt},queue={neg},{_kind(plan)},wsum={wsum}]",
                                 plan, ptrs, ("D", "stride_q", "stride_neg", "stride_part"), dot)
        yield Launch(f"row_rnorm[{dt}]", row_rnorm_plan(dt), dict(X=dt, OUT=acc),
                     ("D", "stride_x"), None)
        for wsum in (False, True):
            yield Launch(f"combine[{acc},wsum={wsum}]", combine_plan(dt, wsum),
                         dict(LPOS=acc, M_PART=acc, L_PART=acc, ACC_PART=acc, LOSS=acc,
                              LSE_NEG=acc, WSUM=acc), ("D", "stride_part", "stride_w"), None)
