r"""In-place EMA of parameters: the momentum encoder of MoCo, the target network of BYOL/DINO.

For every parameter pair, in place,

.. math:: t \leftarrow m\,t + (1 - m)\,o = \operatorname{lerp}(t, o, 1 - m),

evaluated exactly as ``torch.lerp`` rounds it (``ema_math.h``), so the result is bit-identical to
``torch._foreach_lerp_(target, online, 1 - m)`` in float32. One op call updates the whole list:
``torch.ops.sslkernels.ema_lerp_`` (C++ CPU kernel: the elements of all tensors split evenly over
the threads, vectorized; CUDA: a multi-tensor apply, a few launches per list).

Public API:

* :func:`ema_update_` - the update for two modules or two lists of tensors, with buffers
  copied, averaged or skipped;
* :func:`flatten_parameters_` - re-homes a module's parameters (and optionally buffers) as views
  into one contiguous buffer per (dtype, device); two flattened modules are then updated with
  one contiguous lerp per buffer;
* :func:`cosine_momentum` - BYOL's momentum schedule.
"""
from __future__ import annotations

import math
import numbers
import re
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import _ext, _validate  # noqa: F401  (_ext loads the op library)
from .reference import ema as _ref

BUFFER_MODES = ("copy", "ema", "skip")
BACKENDS = ("kernel", "reference")


# ---------------------------------------------------------------------------------------------
# The op: fake kernel (it mutates its targets and returns nothing).

_COMBOS = {(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
           (torch.float32, torch.float16), (torch.float64, torch.float64),
           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)}


@torch.library.register_fake("sslkernels::ema_lerp_")
def _ema_lerp_fake(target, online, weight):
    """The kernels' checks that need no data (so tracing rejects what eager rejects)."""
    if len(target) != len(online):
        raise ValueError(f"target and online must hold the same number of tensors, got "
                         f"{len(target)} and {len(online)}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight (1 - momentum) must be in [0, 1], got {weight}")
    for i, (t, o) in enumerate(zip(target, online)):
        if t.device != target[0].device or o.device != target[0].device:
            raise ValueError(f"target[{i}] and online[{i}] must be on {target[0].device} like "
                             f"target[0], got {t.device} and {o.device}")
        if t.shape != o.shape:
            raise ValueError(f"target[{i}] and online[{i}] must have the same shape, got "
                             f"{list(t.shape)} and {list(o.shape)}")
        if (t.dtype, o.dtype) not in _COMBOS:
            raise TypeError(f"target[{i}] has dtype {t.dtype} and online[{i}] has dtype "
                            f"{o.dtype}, which cannot be combined")
    return None


_Plan = torch.classes.sslkernels.EmaPlan


class _IdentityOnly(torch.overrides.TorchFunctionMode):
    """Active only while :func:`_same` compares two tuples: the tuple comparison short-cuts on
    identical elements without calling ``__eq__``, and any element that is not the cached object
    reaches ``Tensor.__eq__``, which this mode answers with ``False``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return False


_IDENTITY_ONLY = _IdentityOnly()


def _same(*pairs: tuple[Sequence, Sequence]) -> bool:
    """For every pair (a, b): ``a`` holds the very objects of the cached ``b``, in order
    (identity, never value equality). About 2 ns per element, against 20 ns for
    ``all(map(operator.is_, a, b))``."""
    with _IDENTITY_ONLY:
        for a, b in pairs:
            if len(a) != len(b):
                return False
            if type(a) is not type(b):
                a, b = tuple(a), tuple(b)
            if not a == b:
                return False
    return True


# ---------------------------------------------------------------------------------------------
# Module snapshots: the parameters and buffers of a module, in ``named_parameters()`` /
# ``named_buffers()`` order, re-derived only when the module's structure changed. Checking a
# snapshot costs one walk over the submodules and an identity comparison of the raw dictionary
# values, so a module whose parameter is replaced, deleted or re-registered, or whose buffers
# ``.to()`` replaced, gets a new snapshot (and a new plan) on the next call.

class _Snapshot:
    __slots__ = ("mods", "raw_params", "raw_buffers", "params", "buffers", "entry",
                 "__weakref__")

    def __init__(self, mods, raw_params, raw_buffers):
        self.mods, self.raw_params, self.raw_buffers = mods, raw_params, raw_buffers
        self.params = _dedup(raw_params)
        self.buffers = _dedup(raw_buffers)
        self.entry = None  # the cached _Entry whose target is this snapshot


def _dedup(raw: list) -> tuple:
    seen: set[int] = set()
    out = []
    for t in raw:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return tuple(out)


def _walk(module: nn.Module) -> tuple[list, list, list]:
    """Submodules (pre-order, shared ones once, the root left out so that a snapshot never
    references its own module) and the raw values of every ``_parameters``/``_buffers`` dict."""
    mods: list = []
    raw_p = list(module._parameters.values())
    raw_b = list(module._buffers.values())
    if not module._modules:
        return mods, raw_p, raw_b
    seen = {id(module)}
    stack = list(reversed(module._modules.values()))
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        mods.append(m)
        if m._modules:
            stack.extend(reversed(m._modules.values()))
    for m in mods:
        raw_p.extend(m._parameters.values())
        raw_b.extend(m._buffers.values())
    return mods, raw_p, raw_b


_SNAPSHOTS: "weakref.WeakKeyDictionary[nn.Module, _Snapshot]" = weakref.WeakKeyDictionary()


def _snapshot(module: nn.Module) -> _Snapshot:
    mods, raw_p, raw_b = _walk(module)
    snap = _SNAPSHOTS.get(module)
    if snap is None or not _same((mods, snap.mods), (raw_p, snap.raw_params),
                                 (raw_b, snap.raw_buffers)):
        snap = _Snapshot(mods, raw_p, raw_b)
        _SNAPSHOTS[module] = snap
    return snap


# ---------------------------------------------------------------------------------------------
# Flat-buffer mode.

_ALIGN = 32  # every view starts on a multiple of 32 elements (128 B in float32), in every dtype,
#              so two modules of different dtypes get the same element offsets

_FLAT_GENERATION = 0  # bumped by every flatten_parameters_ call: cached plans are rebuilt


class _FlatGroup:
    """One contiguous buffer holding the members of one (dtype, device) group."""
    __slots__ = ("flat", "members", "offsets", "shapes", "strides")

    def __init__(self, flat, members, offsets, shapes, strides):
        self.flat, self.members, self.offsets = flat, members, offsets
        self.shapes, self.strides = shapes, strides

    def intact(self, tensors: Sequence[torch.Tensor]) -> bool:
        base, size = self.flat.data_ptr(), self.flat.element_size()
        for i, off, shape, stride in zip(self.members, self.offsets, self.shapes, self.strides):
            t = tensors[i]
            if ((t.numel() and t.data_ptr() != base + off * size) or t.dtype != self.flat.dtype
                    or t.device != self.flat.device or t.shape != shape
                    or t.stride() != stride):
                return False
        return True

    def matches(self, other: "_FlatGroup") -> bool:
        return (self.members == other.members and self.offsets == other.offsets
                and self.shapes == other.shapes and self.strides == other.strides
                and self.flat.shape == other.flat.shape)


class _FlatLayout:
    __slots__ = ("snapshot", "params", "buffers")

    def __init__(self, snapshot, params, buffers):
        self.snapshot = snapshot
        self.params: list[_FlatGroup] = params
        self.buffers: list[_FlatGroup] | None = buffers

    def intact(self, snap: _Snapshot) -> bool:
        return (snap is self.snapshot and all(g.intact(snap.params) for g in self.params)
                and (self.buffers is None or all(g.intact(snap.buffers) for g in self.buffers)))


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, _FlatLayout]" = weakref.WeakKeyDictionary()


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides when it is dense and non-overlapping (contiguous, channels-last, ...),
    else the contiguous strides."""
    dims = sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return torch.empty(t.shape, device="meta").stride()
        expected *= n
    return tuple(t.stride())


def _flatten_group(tensors: Sequence[torch.Tensor]) -> list[_FlatGroup]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out = []
    for (dtype, device), members in groups.items():
        offsets, total = [], 0
        for i in members:
            offsets.append(total)
            total += -(-tensors[i].numel() // _ALIGN) * _ALIGN
        flat = torch.zeros(total, dtype=dtype, device=device)
        shapes, strides = [], []
        for i, off in zip(members, offsets):
            t = tensors[i]
            view = flat.as_strided(t.shape, _dense_strides(t), off)
            view.copy_(t)
            t.data = view  # same Parameter/buffer object, now living in `flat`
            shapes.append(t.shape)
            strides.append(tuple(view.stride()))
        out.append(_FlatGroup(flat, tuple(members), tuple(offsets), tuple(shapes),
                              tuple(strides)))
    return out


@torch.no_grad()
def flatten_parameters_(module: nn.Module, *, buffers: bool = False) -> nn.Module:
    r"""Re-homes ``module``'s parameters (and, with ``buffers=True``, its buffers) as views into
    one contiguous 1-D buffer per (dtype, device), in place; returns ``module``.

    Every parameter stays the same :class:`~torch.nn.Parameter` object with the same values,
    shape, strides (channels-last weights stay channels-last), ``requires_grad`` and ``.grad``,
    so forward, ``state_dict``/``load_state_dict``, optimizers and hooks work as before. Views
    start on multiples of 32 elements; the gaps are zeros.

    :func:`ema_update_` on two flattened modules with matching layouts (same parameter shapes and
    strides in the same order, e.g. a module and its ``copy.deepcopy`` each flattened) updates
    each flat buffer with one contiguous lerp pass instead of one pass per tensor. If a
    flattened module is later moved or cast (``.to()``, ``.half()``), or a parameter is
    replaced, its parameters no longer live in the buffer: :func:`ema_update_` notices, warns
    once and falls back to the per-tensor update (call ``flatten_parameters_`` again).
    ``copy.deepcopy`` of a flattened module gives an ordinary (unflattened) module.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    global _FLAT_GENERATION
    snap = _snapshot(module)
    pg = _flatten_group(snap.params)
    bg = _flatten_group(snap.buffers) if buffers else None
    _LAYOUTS[module] = _FlatLayout(snap, pg, bg)
    _FLAT_GENERATION += 1
    return module


def is_flat(module: nn.Module) -> bool:
    """True while ``module``'s parameters live in the buffers of :func:`flatten_parameters_`."""
    layout = _LAYOUTS.get(module)
    return layout is not None and layout.intact(_snapshot(module))


# ---------------------------------------------------------------------------------------------
# Plans: a prepared C++ update (torch.classes.sslkernels.EmaPlan) for one (target, online) pair
# of modules or lists, reused while the pair is unchanged. The plan holds the tensors, so a step
# costs one method call rather than converting two lists of tensors; it re-runs every check of
# every pair on every call, before writing anything.

class _Entry:
    __slots__ = ("plan", "online", "mode", "generation", "flat", "lists", "names", "direct")

    def __init__(self, plan, online, mode, flat, lists, names):
        self.plan, self.online, self.mode, self.flat = plan, online, mode, flat
        self.generation = _FLAT_GENERATION
        self.lists = lists          # (lerp_t, lerp_o, copy_t, copy_o) as Python lists
        self.names = names          # () -> {"target": [...], "online": [...], ...} for messages
        # plain CPU/CUDA tensors may skip the dispatcher (EmaPlan.update's `direct`); tensor
        # subclasses (FakeTensor, DTensor, ...) and meta tensors always go through the op
        self.direct = all(type(t) in _PLAIN and t.device.type in ("cpu", "cuda")
                          for lst in lists[:2] for t in lst)


_PLAIN = (torch.Tensor, nn.Parameter)


def _make_plan(lt, lo, ct, co, views=None):
    plan = _Plan(lt, lo, ct, co)
    if views is not None:
        plan.set_views(*views)
    return plan


def _module_names(module: nn.Module | None, n_params: int, n_buffers: int):
    if module is None:
        return None, None
    pn = [n for n, _ in module.named_parameters()]
    bn = [n for n, _ in module.named_buffers()]
    return (pn if len(pn) == n_params else None), (bn if len(bn) == n_buffers else None)


def _split_buffers(tb, ob, mode):
    """(lerp pairs, copy pairs) of the buffers: indices into the buffer lists."""
    if mode == "skip":
        return [], []
    if mode == "copy":
        return [], list(range(len(tb)))
    lerp, copy = [], []
    for i, (t, o) in enumerate(zip(tb, ob)):
        (lerp if t.is_floating_point() and o.is_floating_point() else copy).append(i)
    return lerp, copy


def _flat_pair(target, online, st, so):
    """The matching flat layouts of two modules, or None (with a warning when both are flat but
    cannot be used together)."""
    lt, lo = _LAYOUTS.get(target), _LAYOUTS.get(online)
    if lt is None or lo is None:
        return None
    for mod, layout, snap in ((target, lt, st), (online, lo, so)):
        if not layout.intact(snap):
            del _LAYOUTS[mod]
            warnings.warn("ema_update_: a module flattened by flatten_parameters_ no longer keeps "
                          "its parameters in the flat buffer (moved, cast, or a parameter was "
                          "replaced); using the per-tensor update. Call flatten_parameters_ "
                          "again to restore the single-pass update.", stacklevel=4)
            return None
    if len(lt.params) != len(lo.params) or not all(
            a.matches(b) for a, b in zip(lt.params, lo.params)):
        warnings.warn("ema_update_: target and online are both flattened but their flat layouts "
                      "differ (parameter order, shapes, strides or dtype grouping); using the "
                      "per-tensor update", stacklevel=4)
        return None
    return lt, lo


def _build_module_entry(target, online, st, so, mode) -> _Entry:
    tp, op = st.params, so.params
    if len(tp) != len(op):
        raise ValueError(f"ema_update_: target has {len(tp)} parameters but online has "
                         f"{len(op)}; target must be a copy of online's architecture")
    tb, ob = (st.buffers, so.buffers) if mode != "skip" else ((), ())
    if len(tb) != len(ob):
        raise ValueError(f"ema_update_: target has {len(tb)} buffers but online has {len(ob)} "
                         f"(buffers={mode!r}); pass buffers='skip' to leave buffers alone")

    # weak: the entry lives in the target's snapshot, which must not keep the module alive
    target_ref, online_ref = weakref.ref(target), weakref.ref(online)
    n_tb, n_ob = len(st.buffers), len(so.buffers)

    def names():
        tpn, tbn = _module_names(target_ref(), len(tp), n_tb)
        opn, obn = _module_names(online_ref(), len(op), n_ob)
        return tpn, tbn, opn, obn

    flat = _flat_pair(target, online, st, so)
    views_t: list = []
    views_o: list = []
    if flat is not None:
        lay_t, lay_o = flat
        lt = [g.flat for g in lay_t.params]
        lo = [g.flat for g in lay_o.params]
        ct, co = [], []
        views_t, views_o = list(tp), list(op)
        flat_buffers = lay_t.buffers is not None and lay_o.buffers is not None and (
            len(lay_t.buffers) == len(lay_o.buffers)
            and all(a.matches(b) for a, b in zip(lay_t.buffers, lay_o.buffers)))
        if mode != "skip" and flat_buffers:
            gt = [g.flat for g in lay_t.buffers]
            go = [g.flat for g in lay_o.buffers]
            li, ci = _split_buffers(gt, go, mode)
            lt += [gt[i] for i in li]
            lo += [go[i] for i in li]
            ct += [gt[i] for i in ci]
            co += [go[i] for i in ci]
            views_t += list(tb)
            views_o += list(ob)
        elif mode != "skip":
            li, ci = _split_buffers(tb, ob, mode)
            # float buffers of unflattened modules are averaged as their own pairs
            lt += [tb[i] for i in li]
            lo += [ob[i] for i in li]
            ct += [tb[i] for i in ci]
            co += [ob[i] for i in ci]
        else:
            li, ci = [], []

        def flat_names():
            tpn, tbn, opn, obn = names()
            flat_t = [f"flat {g.flat.dtype} buffer on {g.flat.device}" for g in lay_t.params]
            flat_o = [f"flat {g.flat.dtype} buffer on {g.flat.device}" for g in lay_o.params]
            if flat_buffers and mode != "skip":
                bt = [f"flat {g.flat.dtype} buffer of buffers" for g in lay_t.buffers]
                bo = [f"flat {g.flat.dtype} buffer of buffers" for g in lay_o.buffers]
            else:
                bt, bo = tbn, obn
            return {"target": flat_t + _pick(bt, li), "online": flat_o + _pick(bo, li),
                    "buffer target": _pick(bt, ci), "buffer online": _pick(bo, ci),
                    "target parameter": (tpn or []) + ((tbn or []) if len(views_t) > len(tp)
                                                       else [])}

        plan = _make_plan(lt, lo, ct, co, (views_t, views_o))
        return _Entry(plan, so, mode, True, (lt, lo, ct, co), flat_names)

    li, ci = _split_buffers(tb, ob, mode)
    lt = list(tp) + [tb[i] for i in li]
    lo = list(op) + [ob[i] for i in li]
    ct = [tb[i] for i in ci]
    co = [ob[i] for i in ci]

    def list_names():
        tpn, tbn, opn, obn = names()
        return {"target": (tpn or []) + _pick(tbn, li), "online": (opn or []) + _pick(obn, li),
                "buffer target": _pick(tbn, ci), "buffer online": _pick(obn, ci)}

    plan = _make_plan(lt, lo, ct, co)
    return _Entry(plan, so, mode, False, (lt, lo, ct, co), list_names)


def _pick(names, idx):
    return [names[i] for i in idx] if names is not None else []


_LIST_ENTRIES: "OrderedDict[tuple[int, int], tuple]" = OrderedDict()
_MAX_LIST_ENTRIES = 4


def _list_entry(target, online, cache: bool) -> _Entry:
    key = (id(target), id(online))
    hit = _LIST_ENTRIES.get(key)
    if hit is not None:
        t_obj, o_obj, t_items, o_items, entry = hit
        if t_obj is target and o_obj is online and _same((target, t_items), (online, o_items)):
            return entry
    t_items = list(target) if isinstance(target, list) else tuple(target)
    o_items = list(online) if isinstance(online, list) else tuple(online)
    for name, items in (("target", t_items), ("online", o_items)):
        for i, x in enumerate(items):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"ema_update_: {name}[{i}] must be a torch.Tensor, got "
                                f"{type(x).__name__}")
    if len(t_items) != len(o_items):
        raise ValueError(f"ema_update_: target and online must hold the same number of tensors, "
                         f"got {len(t_items)} and {len(o_items)}")
    lt, lo = list(t_items), list(o_items)
    entry = _Entry(_make_plan(lt, lo, [], []), None, None, False, (lt, lo, [], []), dict)
    if cache:
        _LIST_ENTRIES[key] = (target, online, t_items, o_items, entry)
        while len(_LIST_ENTRIES) > _MAX_LIST_ENTRIES:
            _LIST_ENTRIES.popitem(last=False)
    return entry


def clear_cache() -> None:
    """Drops every prepared update :func:`ema_update_` keeps. They hold references to the
    tensors of the last few lists and of each target/online module pair; under
    ``torch.__future__.set_swap_module_params_on_conversion(True)`` a module whose tensors are
    referenced cannot be converted (``.to()``, ``.half()``), so call this first if the flag was
    switched on after updates were made (with the flag on, no module plan is kept)."""
    _LIST_ENTRIES.clear()
    for snap in list(_SNAPSHOTS.values()):
        snap.entry = None


_INDEX = re.compile(r"(target parameter|buffer target|buffer online|target|online)\[(\d+)\]")


def _named_error(exc: Exception, entry: _Entry) -> Exception:
    try:
        names = entry.names()
    except Exception:  # pragma: no cover - naming is best effort
        names = {}
    if "buffer target" in names:
        names.setdefault("online", [])

    def sub(m):
        kind, i = m.group(1), int(m.group(2))
        lst = names.get(kind)
        return f"{m.group(0)} ({lst[i]!r})" if lst and i < len(lst) and lst[i] else m.group(0)

    return type(exc)("ema_update_: " + _INDEX.sub(sub, str(exc)))


def _reference_update(entry: _Entry, weight: float) -> None:
    lt, lo, ct, co = entry.lists
    if lt:
        torch._foreach_lerp_(lt, [o.to(t.dtype) for t, o in zip(lt, lo)], weight)
    for t, o in zip(ct, co):
        t.copy_(o)


# ---------------------------------------------------------------------------------------------
# Public API.

def ema_update_(target: nn.Module | Sequence[torch.Tensor],
                online: nn.Module | Sequence[torch.Tensor], momentum: float, *,
                buffers: str = "copy", backend: str | None = None) -> None:
    r"""In-place EMA of ``target``'s parameters towards ``online``'s:

    .. math:: t \leftarrow m\,t + (1 - m)\,o \quad\text{for every parameter pair } (t, o),

    computed as ``lerp(t, o, 1 - m)`` and bit-identical to
    ``torch._foreach_lerp_(target, online, 1 - m)`` in float32 (for ``1 - m < 0.5``:
    ``t + w (o - t)``, else ``o - (o - t)(1 - w)``, each with one rounding). Runs under
    ``torch.no_grad()`` and records no autograd history.

    Args:
        target: the target (momentum) network: an ``nn.Module`` whose parameters have
            ``requires_grad=False``, or a sequence of such tensors. Written in place.
        online: the online network: a module of the same architecture (its parameters in the
            same order, e.g. the module ``target`` was deep-copied from), or a sequence of
            tensors of the same length. Read only.
        momentum: :math:`m \in [0, 1]`; 1 keeps ``target``, 0 copies ``online``.
        buffers: modules only - what happens to the buffers (BatchNorm ``running_mean``,
            ``running_var``, ``num_batches_tracked``): ``"copy"`` (default, what MoCo/BYOL
            implementations that track buffers do), ``"ema"`` (floating buffers averaged like
            parameters, integer buffers copied) or ``"skip"``.
        backend: ``None``/``"kernel"`` (the C++/CUDA op) or ``"reference"`` (plain PyTorch
            ``_foreach_lerp_``, after the same checks).

    Pairs (shapes must match; tensors of one call on one device):

    ============  ==========================================
    target dtype  online dtype
    ============  ==========================================
    float32       float32, bfloat16 or float16 (widened)
    bfloat16      bfloat16 (computed in float32, rounded once)
    float16       float16 (computed in float32, rounded once)
    float64       float64
    ============  ==========================================

    Every pair is checked before anything is written: bad input (mismatched counts, shapes,
    dtypes, devices, a target that requires grad, ``momentum`` outside [0, 1], an unknown
    ``buffers``) raises ``ValueError``/``TypeError`` naming the tensor (and, for modules, the
    parameter) and leaves every tensor untouched.

    Speed: one op call per update. The prepared call is cached per (target, online) pair of
    modules or lists, so a training loop pays no per-tensor Python cost; modules flattened with
    :func:`flatten_parameters_` are updated with one contiguous pass per flat buffer. The cached
    update holds references to the tensors (modules themselves are held weakly); see
    :func:`clear_cache`.
    """
    _update(target, online, momentum, buffers, backend, retry=True)


def _update(target, online, momentum, buffers, backend, retry):
    if isinstance(momentum, (str, bytes, bool)) or not isinstance(
            momentum, (numbers.Real, torch.Tensor)):
        raise TypeError(f"momentum must be a real number, got {type(momentum).__name__}")
    weight = 1.0 - _validate.in_range("momentum", momentum, 0.0, 1.0)
    if buffers not in BUFFER_MODES:
        raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    t_mod, o_mod = isinstance(target, nn.Module), isinstance(online, nn.Module)
    if t_mod and o_mod:
        st, so = _snapshot(target), _snapshot(online)
        entry = st.entry
        if (entry is None or entry.online is not so or entry.mode != buffers
                or entry.generation != _FLAT_GENERATION):
            entry = st.entry = _build_module_entry(target, online, st, so, buffers)
        # With swap-on-conversion, .to()/.half() keep the Parameter objects but swap the
        # tensors inside them (no identity check sees it), and refuse to when another
        # reference to a tensor exists: keep no plan at all then.
        if torch.__future__.get_swap_module_params_on_conversion():
            st.entry = None
    elif t_mod or o_mod or isinstance(target, (torch.Tensor, str)) or isinstance(
            online, (torch.Tensor, str)) or not _iterable(target) or not _iterable(online):
        raise TypeError("ema_update_: target and online must both be nn.Modules or both be "
                        "sequences of tensors, got "
                        f"{type(target).__name__} and {type(online).__name__}")
    else:
        cache = isinstance(target, (list, tuple)) and isinstance(online, (list, tuple))
        if not cache:  # an iterator: read it once, nothing to cache
            target, online = list(target), list(online)
        entry = _list_entry(target, online, cache)
    with torch.no_grad():
        try:
            if backend == "reference":
                ok = entry.plan.check(weight)
                if ok:
                    _reference_update(entry, weight)
            else:
                ok = entry.plan.update(
                    weight, entry.direct and not torch._C._len_torch_dispatch_stack())
        except (ValueError, TypeError) as exc:
            raise _named_error(exc, entry) from None
    if not ok:  # a flat view moved (module moved or cast): nothing was written; redo per tensor
        if not retry:  # pragma: no cover - the rebuilt entry has no flat views
            raise RuntimeError("ema_update_: internal error: flat layout check failed twice")
        st.entry = None
        _update(target, online, momentum, buffers, backend, retry=False)


def _iterable(x: Any) -> bool:
    try:
        iter(x)
    except TypeError:
        return False
    return True


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    r"""BYOL's cosine momentum schedule,

    .. math:: m_k = m_{final} - (m_{final} - m_{base}) \frac{\cos(\pi k / K) + 1}{2},

    which for ``final = 1`` is BYOL's :math:`1 - (1 - m_{base})(\cos(\pi k/K) + 1)/2`:
    ``base`` at step 0, ``final`` at step ``K``.

    Args:
        step: :math:`k`, an integer in ``[0, total_steps]``.
        total_steps: :math:`K \ge 1`, an integer (BYOL: the number of training steps).
        base: :math:`m_{base} \in [0, 1]` (BYOL: 0.996).
        final: :math:`m_{final} \in [0, 1]`, default 1.
    """
    for name, v in (("step", step), ("total_steps", total_steps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps] = [0, {total_steps}], got {step}")
    base = _validate.in_range("base", base, 0.0, 1.0)
    final = _validate.in_range("final", final, 0.0, 1.0)
    return _ref.cosine_momentum(int(step), int(total_steps), base, final)


__all__ = ["ema_update_", "flatten_parameters_", "is_flat", "cosine_momentum", "clear_cache"]
