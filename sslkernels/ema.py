r"""In-place EMA of parameters: the momentum encoder of MoCo, the target network of BYOL/DINO.

For every parameter pair, in place,

.. math:: t \leftarrow m\,t + (1 - m)\,o = \operatorname{lerp}(t, o, 1 - m),

evaluated exactly as ``torch.lerp`` rounds it (``csrc/ema_math.h``), so the result is
bit-identical to ``torch._foreach_lerp_(target, online, 1 - m)`` in float32. One call updates the
whole list: the op ``torch.ops.sslkernels.ema_lerp_`` (C++ CPU kernel: the elements of all
tensors split evenly over the threads, vectorized; CUDA: a multi-tensor apply).

Public API:

* :class:`EMA` - built once for a (target, online) pair of modules or tensor lists; holds the
  prepared update, and ``ema.update(momentum)`` runs it. What the methods use every step.
* :func:`ema_update_` - the same update as one stateless call, for lists that change.
* :func:`flatten_parameters_` / :func:`is_flat` - one contiguous buffer per (dtype, device) for
  a module's parameters, which :class:`EMA` then updates in one pass per buffer.
* :func:`cosine_momentum` - BYOL's momentum schedule.

Nothing is cached at module level: every piece of state lives in an :class:`EMA` object.
"""
from __future__ import annotations

import numbers
import re
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from . import _ext, _validate
from .reference import ema as _ref

BUFFER_MODES = ("copy", "ema", "skip")
BACKENDS = ("kernel", "reference")


# ---------------------------------------------------------------------------------------------
# The op's fake kernel: it mutates its targets and returns nothing.

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
        if t.requires_grad:
            raise ValueError(f"target[{i}] requires grad, but the parameters of a target (EMA) "
                             f"network must have requires_grad=False")
    return None


# ---------------------------------------------------------------------------------------------
# Arguments, and the pairs an update touches.

def _weight(momentum: Any) -> float:
    """The lerp weight ``1 - momentum`` of a checked momentum."""
    if isinstance(momentum, (str, bytes, bool)) or not isinstance(
            momentum, (numbers.Real, torch.Tensor)):
        raise TypeError(f"momentum must be a real number, got {type(momentum).__name__}")
    return 1.0 - _validate.in_range("momentum", momentum, 0.0, 1.0)


def _check_options(buffers: str, backend: str | None) -> None:
    _validate.choice("buffers", buffers, BUFFER_MODES)
    if backend is not None:
        _validate.choice("backend", backend, BACKENDS)


class _Pairs(NamedTuple):
    """What one update touches: ``lerp_t[i] <- lerp(lerp_t[i], lerp_o[i], 1 - m)`` (parameters,
    and floating buffers with ``buffers="ema"``), then ``copy_t[i] <- copy_o[i]`` (buffers).
    ``names`` holds the parameter names of ``lerp_t`` and ``lerp_o`` (modules only), which
    error messages add to the kernels' ``target[i]`` / ``online[i]``."""
    lerp_t: list
    lerp_o: list
    copy_t: list
    copy_o: list
    names: tuple[list, list]


_PLAIN = {torch.Tensor, nn.Parameter}


def _tensors(name: str, seq) -> list:
    items = list(seq)
    if not _PLAIN.issuperset(map(type, items)):  # else look for the culprit
        for i, x in enumerate(items):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(x).__name__}")
    return items


def _pairs(target, online, buffers: str, who: str) -> _Pairs:
    """The pairs of two modules (parameters in ``named_parameters()`` order, buffers in
    ``named_buffers()`` order, by ``buffers``) or of two sequences of tensors. Checks the counts
    and the copied buffers; the averaged pairs are the kernels' to check."""
    if isinstance(target, nn.Module) and isinstance(online, nn.Module):
        return _module_pairs(target, online, buffers, who)
    if (isinstance(target, (nn.Module, torch.Tensor, str)) or isinstance(
            online, (nn.Module, torch.Tensor, str)) or not _iterable(target)
            or not _iterable(online)):
        raise TypeError(f"{who}: target and online must both be nn.Modules or both be sequences "
                        f"of tensors, got {type(target).__name__} and {type(online).__name__}")
    t, o = _tensors("target", target), _tensors("online", online)
    return _Pairs(t, o, [], [], ([], []))


def _module_pairs(target: nn.Module, online: nn.Module, buffers: str, who: str) -> _Pairs:
    tp, op = list(target.named_parameters()), list(online.named_parameters())
    if len(tp) != len(op):
        raise ValueError(f"{who}: target has {len(tp)} parameters but online has {len(op)}; "
                         f"target must be a copy of online's architecture")
    lerp_t, lerp_o = [p for _, p in tp], [p for _, p in op]
    names = ([n for n, _ in tp], [n for n, _ in op])
    copy_t, copy_o = [], []
    if buffers != "skip":
        tb, ob = list(target.named_buffers()), list(online.named_buffers())
        if len(tb) != len(ob):
            raise ValueError(f"{who}: target has {len(tb)} buffers but online has {len(ob)} "
                             f"(buffers={buffers!r}); pass buffers='skip' to leave buffers alone")
        for (tn, t), (on, o) in zip(tb, ob):
            if buffers == "ema" and t.is_floating_point() and o.is_floating_point():
                lerp_t.append(t)
                lerp_o.append(o)
                names[0].append(tn)
                names[1].append(on)
            else:
                _check_copy(len(copy_t), t, o, tn, who)
                copy_t.append(t)
                copy_o.append(o)
    return _Pairs(lerp_t, lerp_o, copy_t, copy_o, names)


def _check_copy(i: int, t: torch.Tensor, o: torch.Tensor, name: str, who: str) -> None:
    pair = f"{who}: buffer target[{i}] ({name!r}) and online[{i}]"
    if t.device != o.device:
        raise ValueError(f"{pair} must be on the same device, got {t.device} and {o.device}")
    if t.shape != o.shape:
        raise ValueError(f"{pair} must have the same shape, got {list(t.shape)} and "
                         f"{list(o.shape)}")
    if t.dtype != o.dtype and not (t.is_floating_point() and o.is_floating_point()):
        raise TypeError(f"{pair} have dtypes {t.dtype} and {o.dtype}: a buffer is copied only "
                        f"between equal dtypes or two floating dtypes")
    if t.requires_grad:
        raise ValueError(f"{pair}: the buffer requires grad; buffers of a target network must not")


def _iterable(x: Any) -> bool:
    try:
        iter(x)
    except TypeError:
        return False
    return True


_INDEX = re.compile(r"\b(target|online)\[(\d+)\]")


def _named(exc: Exception, pairs: _Pairs, who: str) -> Exception:
    """``exc`` (a kernel's check) with the parameter name after each ``target[i]``/``online[i]``."""
    def sub(m):
        names = pairs.names[m.group(1) == "online"]
        i = int(m.group(2))
        return f"{m.group(0)} ({names[i]!r})" if i < len(names) else m.group(0)
    return type(exc)(f"{who}: " + _INDEX.sub(sub, str(exc)))


def _run(pairs: _Pairs, weight: float, backend: str | None, who: str) -> None:
    """One update through the op (or ``_foreach_lerp_`` for the reference backend), every pair
    checked before the first write; then the buffer copies."""
    with torch.no_grad():
        try:
            if backend == "reference":
                if not torch.compiler.is_compiling():
                    _ext._C.ema_check_lists(pairs.lerp_t, pairs.lerp_o, weight)
                if pairs.lerp_t:
                    torch._foreach_lerp_(pairs.lerp_t, [o.to(t.dtype) for t, o in
                                                        zip(pairs.lerp_t, pairs.lerp_o)], weight)
            else:
                torch.ops.sslkernels.ema_lerp_(pairs.lerp_t, pairs.lerp_o, weight)
        except (ValueError, TypeError) as exc:
            raise _named(exc, pairs, who) from None
        if pairs.copy_t:
            torch._foreach_copy_(pairs.copy_t, pairs.copy_o)


# ---------------------------------------------------------------------------------------------
# The object.

class EMA:
    r"""The EMA of a target network towards an online network, built once, updated every step:

    .. math:: t \leftarrow m\,t + (1 - m)\,o \quad\text{for every parameter pair } (t, o),

    computed as ``lerp(t, o, 1 - m)``, bit-identical to ``torch._foreach_lerp_`` in float32,
    under ``torch.no_grad()``.

    Args:
        target: the target (momentum) network, written in place: an ``nn.Module`` whose
            parameters have ``requires_grad=False``, or a list or tuple of such tensors.
        online: the online network, read only: a module of the same architecture (parameters in
            the same order, e.g. the module ``target`` was deep-copied from), or a list or tuple
            of tensors of the same length.
        momentum: the default :math:`m \in [0, 1]` of :meth:`update` (1 keeps ``target``, 0
            copies ``online``).
        buffers: modules only - ``"copy"`` (default: BatchNorm running statistics and
            ``num_batches_tracked`` copied), ``"ema"`` (floating buffers averaged like
            parameters, integer buffers copied) or ``"skip"``.
        backend: ``None``/``"kernel"`` (the C++/CUDA kernels) or ``"reference"``
            (``torch._foreach_lerp_``, after the same checks).
        flat: move the averaged tensors of both sides (parameters, and floating buffers with
            ``buffers="ema"``) into one contiguous buffer per (dtype, device), as
            :func:`flatten_parameters_` does (same objects, values and strides), at
            construction and again whenever a rebuild finds them moved out (``.to()``), so an
            update is one pass over each buffer. This re-homes ``online``'s tensors too.

    Supported pairs (target dtype, online dtype), one device per object: (float32, float32 /
    bfloat16 / float16), (float64, float64), (bfloat16, bfloat16), (float16, float16). Shapes
    must match.

    Construction checks every pair, as :func:`ema_update_` does (mismatched counts, shapes,
    dtypes or devices, a target that requires grad, tensors sharing memory; ``ValueError`` /
    ``TypeError`` naming the parameter), and prepares the update: the pairs with their data
    pointers, and a record of what it depends on. :meth:`update` first checks that nothing it
    depends on changed, in a few nanoseconds per tensor:

    * every module of ``target`` and ``online`` still holds the same parameter, submodule and
      (unless ``buffers="skip"``) buffer objects: nothing replaced, added or deleted
      (``module.fc = nn.Linear(...)``, ``module.w = nn.Parameter(...)``); a list still holds the
      same tensors;
    * every tensor still has its dtype, device, shape, strides and data pointer (``.to()``,
      ``.half()``, ``.cuda()``, ``.data = ...``, ``swap_tensors``), and every target still has
      ``requires_grad=False``.

    When something changed it rebuilds the prepared update, which checks everything again, so a
    change that makes the pair invalid raises before anything is written. Otherwise an update
    is one kernel call on the prepared pairs. Parameters that lie back to back in memory in both
    networks (two modules flattened by :func:`flatten_parameters_`) are one pair: one pass over
    each flat buffer.

    Under ``torch.compile`` (``fullgraph=True`` works), in a dispatch mode, for tensor
    subclasses and with ``backend="reference"``, :meth:`update` instead collects the pairs again
    and calls the op (as :func:`ema_update_` does), so the tracer sees the op and guards on the
    modules itself. The op's weight is a constant of a compiled graph: a momentum that changes
    every step (BYOL's schedule) recompiles, so call such an update outside the compiled
    region; a fixed one (MoCo's, inside its training step) compiles once.

    The object references ``target`` and ``online`` (and their tensors) and nothing else; it is
    not an ``nn.Module``, so a module holding it keeps its ``state_dict``. ``copy.deepcopy`` and
    pickling carry the configuration and re-prepare on the next update.
    """

    def __init__(self, target: nn.Module | Sequence[torch.Tensor],
                 online: nn.Module | Sequence[torch.Tensor], momentum: float, *,
                 buffers: str = "copy", backend: str | None = None, flat: bool = False):
        _check_options(buffers, backend)
        _weight(momentum)
        if not all(isinstance(x, nn.Module) for x in (target, online)) and not all(
                isinstance(x, (list, tuple)) for x in (target, online)):
            raise TypeError(f"EMA: target and online must both be nn.Modules or both be lists or "
                            f"tuples of tensors, got {type(target).__name__} and "
                            f"{type(online).__name__}")
        self.target, self.online = target, online
        self.momentum = float(momentum)
        self.buffers, self.backend, self.flat = buffers, backend, bool(flat)
        self._prepare()

    def update(self, momentum: float | None = None) -> None:
        """One EMA step with ``momentum`` (default: ``self.momentum``); see the class docstring
        for what it checks first."""
        weight = _weight(self.momentum if momentum is None else momentum)
        if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._len_torch_function_stack()):
            _run(_pairs(self.target, self.online, self.buffers, "EMA"), weight, self.backend,
                 "EMA")
            return
        # the prepared step records no autograd history: it writes through the kernels and
        # bumps the targets' versions itself
        if self._plan is not None and self._plan.step(*self._watched, weight):
            return
        with torch.no_grad():
            self._prepare()
            if self._plan is None:
                _run(self._pairs, weight, self.backend, "EMA")
            elif not self._plan.step(*self._watched, weight):
                raise RuntimeError("EMA: internal error: a freshly prepared update was refused")

    def state_dict(self) -> dict:
        """``{"momentum": m}``: the object's only state (the networks belong to their owner)."""
        return {"momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"momentum"}:
            raise ValueError(f"EMA.load_state_dict: expected the key 'momentum', got {sorted(state)}")
        _weight(state["momentum"])
        self.momentum = float(state["momentum"])

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("target", "online", "momentum", "buffers",
                                              "backend", "flat")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plan, self._pairs, self._watched = None, None, ()

    def __repr__(self) -> str:
        kind = "modules" if isinstance(self.target, nn.Module) else "tensors"
        return (f"EMA({kind}, momentum={self.momentum}, buffers={self.buffers!r}, "
                f"backend={self.backend!r}, flat={self.flat})")

    def _prepare(self) -> None:
        """Collects and checks the pairs, moves them into flat buffers (``flat=True``) and
        prepares the kernel step when the tensors allow it."""
        pairs = _pairs(self.target, self.online, self.buffers, "EMA")
        try:
            _ext._C.ema_check_lists(pairs.lerp_t, pairs.lerp_o, 0.0)
        except (ValueError, TypeError) as exc:
            self._plan = None
            raise _named(exc, pairs, "EMA") from None
        if self.flat and not (_one_storage_each(pairs.lerp_t) and _one_storage_each(pairs.lerp_o)):
            with torch.no_grad():
                _flatten(pairs.lerp_t)
                _flatten(pairs.lerp_o)
        tensors = (*pairs.lerp_t, *pairs.lerp_o, *pairs.copy_t, *pairs.copy_o)
        plain = self.backend != "reference" and all(
            type(t) in _PLAIN and t.device.type in ("cpu", "cuda") and not t.is_inference()
            for t in tensors)
        containers = self._containers()
        expected = tuple(v for c in containers for v in (c.values() if isinstance(c, dict) else c))
        self._plan = (_ext._C.EmaPlan(pairs.lerp_t, pairs.lerp_o, pairs.copy_t, pairs.copy_o,
                                      containers) if plain else None)
        # what the plan's step checks: the tensors, and the containers holding what they held
        self._pairs, self._watched = pairs, (tensors, containers, expected)

    def _containers(self) -> tuple:
        """Every container whose contents the prepared update depends on: the parameter,
        submodule and buffer dicts of every module, or the lists given."""
        if not isinstance(self.target, nn.Module):
            return tuple(seq for seq in (self.target, self.online) if isinstance(seq, list))
        out: list = []
        for module in (self.target, self.online):
            for m in module.modules():
                out += [m._parameters, m._modules]
                if self.buffers != "skip":
                    out.append(m._buffers)
        return tuple(out)


# ---------------------------------------------------------------------------------------------
# The stateless form.

def ema_update_(target: nn.Module | Sequence[torch.Tensor],
                online: nn.Module | Sequence[torch.Tensor], momentum: float, *,
                buffers: str = "copy", backend: str | None = None) -> None:
    r"""In-place EMA of ``target``'s parameters towards ``online``'s, as one stateless call:

    .. math:: t \leftarrow m\,t + (1 - m)\,o \quad\text{for every parameter pair } (t, o),

    computed as ``lerp(t, o, 1 - m)`` and bit-identical to
    ``torch._foreach_lerp_(target, online, 1 - m)`` in float32 (for ``1 - m < 0.5``:
    ``t + w (o - t)``, else ``o - (o - t)(1 - w)``, each with one rounding). Runs under
    ``torch.no_grad()`` and records no autograd history.

    Args:
        target, online: two modules or two sequences of tensors, as for :class:`EMA`.
        momentum: :math:`m \in [0, 1]`.
        buffers, backend: as for :class:`EMA`.

    Every pair is checked before anything is written: bad input raises ``ValueError`` /
    ``TypeError`` naming the tensor (and, for modules, the parameter) and leaves every tensor
    untouched. One op call updates the whole list, and nothing is kept between calls: each call
    pays for collecting and checking the pairs. A training loop that updates the same networks
    every step should hold an :class:`EMA` instead, which checks once and is several times
    faster on long parameter lists.
    """
    weight = _weight(momentum)
    _check_options(buffers, backend)
    _run(_pairs(target, online, buffers, "ema_update_"), weight, backend, "ema_update_")


# ---------------------------------------------------------------------------------------------
# Flat buffers.

_ALIGN = 32  # every view starts on a multiple of 32 elements (128 B in float32), in every dtype,
#              so two modules of different dtypes get the same element offsets


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


def _flatten(tensors: Sequence[torch.Tensor]) -> None:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), members in groups.items():
        offsets, total = [], 0
        for t in members:
            offsets.append(total)
            total += -(-t.numel() // _ALIGN) * _ALIGN
        flat = torch.zeros(total, dtype=dtype, device=device)
        for t, off in zip(members, offsets):
            view = flat.as_strided(t.shape, _dense_strides(t), off)
            view.copy_(t)
            t.data = view  # the same Parameter/buffer object, now living in `flat`


@torch.no_grad()
def flatten_parameters_(module: nn.Module, *, buffers: bool = False) -> nn.Module:
    r"""Re-homes ``module``'s parameters (and, with ``buffers=True``, its buffers) as views into
    one contiguous 1-D buffer per (dtype, device), in ``parameters()`` order, in place; returns
    ``module``.

    Every parameter stays the same :class:`~torch.nn.Parameter` object with the same values,
    shape, strides (channels-last weights stay channels-last), ``requires_grad`` and ``.grad``,
    so forward, ``state_dict``/``load_state_dict``, optimizers and hooks work as before. Views
    start on multiples of 32 elements; the gaps are zeros.

    An :class:`EMA` of two flattened modules with the same layout (e.g. a module and its
    ``copy.deepcopy``, each flattened) updates each run of back-to-back parameters in one pass.
    Moving or casting a flattened module (``.to()``, ``.half()``) or replacing a parameter
    takes those parameters out of the buffer (:func:`is_flat` turns false); the :class:`EMA`
    notices and updates them one by one. ``copy.deepcopy`` of a flattened module gives an
    ordinary (unflattened) module.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _flatten(list(module.parameters()))
    if buffers:
        _flatten(list(module.buffers()))
    return module


def is_flat(module: nn.Module) -> bool:
    """True when all of ``module``'s parameters of each (dtype, device) share one storage, as
    :func:`flatten_parameters_` leaves them (and False once one was moved out of it)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return _one_storage_each(module.parameters())


def _one_storage_each(tensors) -> bool:
    """True when the tensors of each (dtype, device) share one storage."""
    storage: dict[tuple, int] = {}
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if storage.setdefault((t.dtype, t.device), ptr) != ptr:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# The momentum schedule.

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


__all__ = ["EMA", "ema_update_", "flatten_parameters_", "is_flat", "cosine_momentum"]
