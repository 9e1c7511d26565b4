"""Argument checks shared by the public API: each names the argument, what was expected and what
it got, and runs before anything is written."""
from __future__ import annotations

import math
from typing import Any

import torch


def tensor(name: str, x: Any, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    return x


def same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {n: t.device for n, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError("expected all tensors on one device, got "
                         + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    return first


def positive(name: str, value: Any) -> float:
    if isinstance(value, (str, bytes)):  # float("0.5") would accept it; a number is expected
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return v


def in_range(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (lo <= v <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return v


def choice(name: str, value: Any, options: tuple) -> Any:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def backend(value: Any, options: tuple, device: torch.device) -> str:
    """A ``backend=`` argument: one of ``options``, and usable for tensors on ``device``
    (``"cpu"`` needs CPU tensors; ``"cuda"`` needs CUDA tensors and a build with CUDA kernels).
    Backend-specific conditions (Triton's) are the caller's."""
    choice("backend", value, options)
    if value == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if value == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        from . import _ext
        if not _ext.cuda_built():
            raise RuntimeError("backend='cuda': this build of sslkernels has no CUDA kernels "
                               "(torch without CUDA or no nvcc at build time)")
    return value
