"""Triton kernels of the multi-positive InfoNCE ops (SupCon's L_out, V-view SimCLR): the O(M^2)
parts. Imports triton and the sibling kernel module only, so the offline compile gate loads it
where only triton is installed. Launchers: :mod:`.supcon_launch`; the op contract:
``csrc/supcon.cpp``.

Rows ``Z`` (M, D), integer labels, ``S = Z Z^T / T`` without the diagonal; row i's positives are
the other rows with its label.

* ``_supcon_fwd_kernel``: for each row and column split, a running max over the row's other
  rows and two sums of exponentials against it - its positives' and the rest - plus the sum of
  the positives' logits and their count. The launcher merges the splits and forms
  ``l_i = log(sum_j e^S_ij) - mean_p S_ip`` with the maxima meeting only as differences.
* ``_supcon_grad_kernel``: ``dZn_i = sum_{j != i} (G_ij + G_ji) Z_j`` with
  ``G_ij = g_i (P_ij - [j in P(i)] / c_i)`` and ``P = exp(S - lse)``, both terms from one
  recomputed tile (S is symmetric); a row's only positive uses ``expm1(-loss_i)`` for
  ``P_ip - 1``, exact when P_ip rounds to 1.

Same precision, tiles and specialization rules as :mod:`.info_nce`.
"""
# No ``from __future__ import annotations``: triton reads kernel annotations as written.
from typing import Iterator

import triton
import triton.language as tl

from .info_nce import (ALIGN, DTYPES, MAX_D, ONE_CHUNK_MAX, Launch, Plan, _column_tile, _dot,
                       _kind, _load_rows, _online_lse, _plan, _split_range, _weight_headroom,
                       acc_name, check_d, padded_width, tl_dtype)

__all__ = ["ALIGN", "DTYPES", "HALF", "MAX_D", "ONE_CHUNK_MAX", "N_STATES", "check_d",
           "padded_width", "supcon_fwd_plan", "supcon_grad_plan", "specializations",
           "tl_dtype"]

HALF = ("float16", "bfloat16")
# Row states the forward leaves per split: max, positives' sum, others' sum, psum, count.
N_STATES = 5


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _supcon_fwd_kernel(Z, LAB, PART, M, D, tiles_per_split, stride_z, stride_state,
                       inv_t: "fp64",
                       ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr):
    # Grid: (row blocks, column splits). PART holds N_STATES planes of (splits, M): state k of
    # split s of row r at k * stride_state + s * M + r (stride_state padded to ALIGN).
    inv_t = tl.full([], inv_t, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    lab_i = tl.load(LAB + rows, mask=row_ok, other=-1)
    offs_k = tl.arange(0, BLOCK_K)
    dt = Z.dtype.element_ty
    a_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=dt)
    if ONE_CHUNK:
        a_tile = _load_rows(Z, rows64, row_ok, offs_k, D, stride_z, dt)

    # One running max over all of a row's other rows, and two sums against it: its positives'
    # and the rest. One exp per logit (two separate states would cost two), and the two sums
    # stay apart, so a tiny loss keeps its relative precision (log1p of their ratio).
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    lp = tl.zeros([BLOCK_M], dtype=ACC)
    ln = tl.zeros([BLOCK_M], dtype=ACC)
    psum = tl.zeros([BLOCK_M], dtype=ACC)
    count = tl.zeros([BLOCK_M], dtype=ACC)
    n_lo, n_hi = _split_range(tl.program_id(1), tiles_per_split, M, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        lab_j = tl.load(LAB + cols, mask=col_ok, other=-1)
        s, _v = _column_tile(Z, a_tile, rows64, row_ok, Z, cols.to(tl.int64), col_ok, offs_k,
                             D, stride_z, stride_z, ACC, BLOCK_M, BLOCK_N, BLOCK_K, ONE_CHUNK,
                             False)
        valid = col_ok[None, :] & (cols[None, :] != rows[:, None])
        s = tl.where(valid, s * inv_t, float("-inf"))
        same = valid & (lab_j[None, :] == lab_i[:, None])
        psum += tl.sum(tl.where(same, s, 0.0), axis=1)
        count += tl.sum(same.to(ACC), axis=1)
        m, _l, p, alpha = _online_lse(m, lp, s)
        lp = lp * alpha + tl.sum(tl.where(same, p, 0.0), axis=1)
        ln = ln * alpha + tl.sum(tl.where(same, 0.0, p), axis=1)

    part = tl.program_id(1) * M + rows
    tl.store(PART + part, m, mask=row_ok)
    tl.store(PART + stride_state + part, lp, mask=row_ok)
    tl.store(PART + 2 * stride_state + part, ln, mask=row_ok)
    tl.store(PART + 3 * stride_state + part, psum, mask=row_ok)
    tl.store(PART + 4 * stride_state + part, count, mask=row_ok)


@triton.jit
def _anchor_term(p, same, g, inv_c, only, e):
    """g_a (P_ab - [same] / c_a) for the anchor a whose terms g, inv_c, only, e are given
    broadcastable to the tile ((rows, 1) or (1, cols)); an anchor's only positive is
    g_a expm1(-loss_a)."""
    pos = tl.where(only != 0, e, p - inv_c)
    return g * tl.where(same, pos, p)


@triton.jit
def _row_terms(ROW, idx, ok, stride_row):
    """The six per-row planes of ROW (see _supcon_grad_kernel) at rows idx."""
    g = tl.load(ROW + idx, mask=ok, other=0.0)
    inv_c = tl.load(ROW + stride_row + idx, mask=ok, other=0.0)
    only = tl.load(ROW + 2 * stride_row + idx, mask=ok, other=0.0)
    e = tl.load(ROW + 3 * stride_row + idx, mask=ok, other=0.0)
    hi = tl.load(ROW + 4 * stride_row + idx, mask=ok, other=0.0)
    lo = tl.load(ROW + 5 * stride_row + idx, mask=ok, other=0.0)
    return g, inv_c, only, e, hi, lo


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _supcon_grad_kernel(Z, LAB, ROW, G_SCALE, DZN_PART, M, D, tiles_per_split, stride_z,
                        stride_row, stride_part, inv_t: "fp64",
                        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
                        ONE_CHUNK: tl.constexpr):
    # Grid: (row blocks, feature chunks, column splits), as _pair_grad_kernel. ROW holds six
    # planes of per-row terms (stride_row apart, padded to ALIGN): g / max|g| (0 for rows
    # without positives), 1/c, [c == 1], expm1(-loss), and lse = hi + lo (see csrc/supcon.h
    # split_lse).
    inv_t = tl.full([], inv_t, ACC)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dt = Z.dtype.element_ty
    a_tile = tl.zeros([BLOCK_M, BLOCK_K], dtype=dt)
    offs_b = offs_v
    if ONE_CHUNK:
        a_tile = _load_rows(Z, rows64, row_ok, offs_k, D, stride_z, dt)
        offs_b = offs_k
    w_scale = _weight_headroom(dt)
    lab_i = tl.load(LAB + rows, mask=row_ok, other=-1)
    g_i, ic_i, only_i, e_i, hi_i, lo_i = _row_terms(ROW, rows, row_ok, stride_row)
    g_i = g_i * w_scale

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    n_lo, n_hi = _split_range(tl.program_id(2), tiles_per_split, M, BLOCK_N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_hi
        s, z_j = _column_tile(Z, a_tile, rows64, row_ok, Z, cols.to(tl.int64), col_ok, offs_b,
                              D, stride_z, stride_z, ACC, BLOCK_M, BLOCK_N, BLOCK_K, ONE_CHUNK,
                              True)
        valid = col_ok[None, :] & (cols[None, :] != rows[:, None])
        s = tl.where(valid, s * inv_t, float("-inf"))
        lab_j = tl.load(LAB + cols, mask=col_ok, other=-1)
        same = valid & (lab_j[None, :] == lab_i[:, None])
        g_j, ic_j, only_j, e_j, hi_j, lo_j = _row_terms(ROW, cols, col_ok, stride_row)
        g_j = g_j * w_scale
        # Softmax weights of row i (P_ij) and of row j (P_ji = the same logit against lse_j);
        # masked logits give exactly 0.
        p_ij = tl.exp((s - hi_i[:, None]) - lo_i[:, None])
        p_ji = tl.exp((s - hi_j[None, :]) - lo_j[None, :])
        w = _anchor_term(p_ij, same, g_i[:, None], ic_i[:, None], only_i[:, None],
                         e_i[:, None]) + \
            _anchor_term(p_ji, same, g_j[None, :], ic_j[None, :], only_j[None, :], e_j[None, :])
        w = tl.where(valid, w, 0.0)
        acc = _dot(w.to(dt), z_j, acc)

    unscale = tl.load(G_SCALE).to(ACC) / w_scale
    part = (tl.program_id(2) * M + rows).to(tl.int64)
    tl.store(DZN_PART + part[:, None] * stride_part + offs_v[None, :], acc * unscale,
             mask=row_ok[:, None] & (offs_v < D)[None, :])


# ---------------------------------------------------------------------------------------------
# Launch plans. Tiles chosen like info_nce's (tools/triton_tiles.py, checked by the gate); the
# forward holds two running states, the backward a dozen per-row terms: smaller than the
# two-view kernels' where registers ran out.
_SUPCON_FWD = {
    "float16": {"one": (128, 32, 128, 8, 3), "chunked": (128, 32, 32, 8, 3)},
    "bfloat16": {"one": (128, 32, 128, 8, 3), "chunked": (128, 32, 32, 8, 3)},
    "float32": {"one": None, "chunked": (64, 32, 16, 8, 3)},
    "float64": {"one": None, "chunked": (64, 32, 16, 8, 3)},
}
_SUPCON_GRAD = {
    "float16": {"one": (128, 32, 128, 128, 8, 3), "chunked": (64, 64, 64, 256, 8, 2)},
    "bfloat16": {"one": (128, 32, 128, 128, 8, 3), "chunked": (64, 64, 64, 256, 8, 2)},
    "float32": {"one": None, "chunked": (32, 32, 16, 128, 8, 2)},
    "float64": {"one": None, "chunked": (32, 16, 16, 64, 8, 2)},
}


def supcon_fwd_plan(dtype: str, d: int, interpret: bool = False) -> Plan:
    return _plan(_supcon_fwd_kernel, _SUPCON_FWD[dtype], d, False, interpret,
                 ACC=acc_name(dtype))


def supcon_grad_plan(dtype: str, d: int, interpret: bool = False) -> Plan:
    return _plan(_supcon_grad_kernel, _SUPCON_GRAD[dtype], d, True, interpret,
                 ACC=acc_name(dtype))


def specializations() -> Iterator[Launch]:
    """Every (kernel, constexprs, argument types) a GPU launch of the SupCon ops can use."""
    for dt in DTYPES:
        acc = acc_name(dt)
        for d in (ONE_CHUNK_MAX, MAX_D):
            plan = supcon_fwd_plan(dt, d)
            yield Launch(f"supcon_fwd[{dt},{_kind(plan)}]", plan,
                         dict(Z=dt, LAB="int64", PART=acc), ("D", "stride_z", "stride_state"),
                         dt)
            plan = supcon_grad_plan(dt, d)
            yield Launch(f"supcon_grad[{dt},{_kind(plan)}]", plan,
                         dict(Z=dt, LAB="int64", ROW=acc, G_SCALE=acc, DZN_PART=acc),
                         ("D", "stride_z", "stride_row", "stride_part"), dt)
