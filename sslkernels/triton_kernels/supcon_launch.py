"""Torch-side launchers of the Triton multi-positive InfoNCE kernels (:mod:`.supcon`).

They implement ``supcon_fwd`` / ``supcon_bwd`` with the C++ CPU kernels' contract
(``csrc/supcon.cpp``): loss in the accumulation dtype, lse in float64, the same finishing
arithmetic (``csrc/supcon.h``: finish_rows, split_lse, row_grad) written here in torch. Rows,
padding and splits follow :mod:`.info_nce_launch`.
"""
from __future__ import annotations

import torch
import triton

from ..supcon import _positive_counts
from . import supcon as K
from .info_nce_launch import (_acc, _dot_operand, _interpreting, _launch, _name, _on_device,
                              _splits, _unit_rows, _unit_rows_backward_)

_FAR = 20.0  # log_sum_states: beyond this the near form's exponential could overflow


def _check(z: torch.Tensor, labels: torch.Tensor) -> None:
    """What memory safety needs (the public function validates with friendly messages)."""
    if labels.dtype != torch.int64 or labels.shape != (z.shape[0],) or labels.device != z.device:
        raise ValueError("labels must be an int64 (M,) tensor on z's device")
    K.check_d(z.shape[1])


def _merge(m: torch.Tensor, *sums: torch.Tensor):
    """Merge per-split states (a max and sums against it) over dim 0."""
    mx = m.amax(0)
    pivot = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    scale = torch.exp(m - pivot)
    return (mx, *[(l * scale).sum(0) for l in sums])


def _log_sum_states(ta, la, tb, lb):
    """log(la e^ta + lb e^tb) with the maxima meeting only as differences (csrc/info_nce.h)."""
    a = ta + torch.log(la)
    b = tb + torch.log(lb)
    near = a + torch.log1p(lb / la * torch.exp(tb - ta))
    far = b + torch.log1p(torch.exp(a - b))
    return torch.where(b - a > _FAR, far, near)


def _finish(m, lp, ln, psum, count):
    """(loss, lse float64) of each row from its merged states, as csrc/supcon.h finish_rows:
    the loss pivoted at the positives' mean logit mu, the lse formed in float64."""
    has = count > 0
    t = m - psum / count.clamp_min(1)
    loss = _log_sum_states(t, lp, t, ln)
    loss = torch.where(has, loss, torch.zeros_like(loss))
    lse = m.double() + torch.log(lp.double() + ln.double())
    return loss, lse


def supcon_fwd(z: torch.Tensor, labels: torch.Tensor, inv_t: float, normalize: bool):
    """(loss, lse): per-row losses (accumulation dtype) and log-sum-exps (float64), (M,)."""
    m, d = z.shape
    _check(z, labels)
    acc = _acc(z.dtype)
    if m == 0:
        return z.new_empty(0, dtype=acc), z.new_empty(0, dtype=torch.float64)
    interp = _interpreting()
    with _on_device(z):
        zn, _ = _unit_rows([z], normalize, acc)
        zd = _dot_operand(zn, z.dtype)
        plan = K.supcon_fwd_plan(_name(z.dtype), d, interp)
        c = plan.constexprs
        row_blocks = triton.cdiv(m, c["BLOCK_M"])
        splits, per_split = _splits(row_blocks, m, c["BLOCK_N"], z.device)
        plane = K.padded_width(splits * m)
        part = torch.empty((K.N_STATES, plane), dtype=acc, device=z.device)
        _launch(plan, (row_blocks, splits), zd, labels, part, m, zd.shape[1], per_split,
                zd.stride(0), plane, float(inv_t))
        mx, lp, ln, psum, count = part[:, :splits * m].view(K.N_STATES, splits, m).unbind(0)
        return _finish(*_merge(mx, lp, ln), psum.sum(0), count.sum(0))


def supcon_bwd(grad_loss: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
               loss: torch.Tensor, lse: torch.Tensor, inv_t: float, normalize: bool):
    """dz: the gradient of ``sum_i grad_loss[i] * loss[i]`` w.r.t. z, in z's dtype."""
    m, d = z.shape
    _check(z, labels)
    if m == 0:
        return torch.empty_like(z, memory_format=torch.contiguous_format)
    acc = _acc(z.dtype)
    with _on_device(z):
        zn, norm = _unit_rows([z], normalize, acc)
        zd = _dot_operand(zn, z.dtype)
        # Per-row terms (csrc/supcon.h row_grad): counts from the labels, as the CPU kernel.
        count = _positive_counts(labels, labels).to(acc)
        has = count > 0
        g = torch.where(has, grad_loss.to(acc), torch.zeros((), dtype=acc, device=z.device))
        g_max = g.abs().amax()
        g_max = torch.where(g_max > 0, g_max, torch.ones_like(g_max)).reshape(1)
        wide = lse.to(torch.float64)
        wide = torch.where(torch.isinf(wide), torch.zeros_like(wide), wide)  # M = 1: no logit
        hi = wide.to(acc)
        lo = (wide - hi.double()).to(acc)
        stride_row = K.padded_width(m)
        row = torch.zeros((6, stride_row), dtype=acc, device=z.device)
        row[0, :m] = g / g_max
        row[1, :m] = torch.where(has, count.clamp_min(1).reciprocal(), torch.zeros_like(count))
        row[2, :m] = (count == 1).to(acc)
        row[3, :m] = torch.expm1(-loss.to(acc))
        row[4, :m] = hi
        row[5, :m] = lo

        plan = K.supcon_grad_plan(_name(z.dtype), d, _interpreting())
        c = plan.constexprs
        width = zd.shape[1]
        row_blocks = triton.cdiv(m, c["BLOCK_M"])
        chunks = 1 if c["ONE_CHUNK"] else triton.cdiv(width, c["BLOCK_DV"])
        splits, per_split = _splits(row_blocks * chunks, m, c["BLOCK_N"], z.device)
        part = torch.empty((splits, m, width), dtype=acc, device=z.device)
        _launch(plan, (row_blocks, chunks, splits), zd, labels, row, g_max, part, m, width,
                per_split, zd.stride(0), stride_row, part.stride(1), float(inv_t))
        dzn = (part[0] if splits == 1 else part.sum(0))[:, :d]
        dzn.mul_(inv_t)
        _unit_rows_backward_(dzn, zn, norm, normalize)
        return dzn.to(z.dtype, copy=True)
