"""Ahead-of-time compilation of Triton kernels for a GPU that is not here.

``compile_launch`` binds a kernel's arguments the way ``kernel[grid](...)`` does at run time
(triton's own specializer, so divisibility and ``== 1`` specializations come out as on a GPU),
compiles it for ``GPUTarget("cuda", arch, 32)`` without a driver, and reads the result: the
PTX (tensor-core instructions), and registers, spills and shared memory from the cubin, through
the ``cuobjdump`` that ships with triton. Imports triton only, like the kernel modules it
compiles, so it runs in an environment that has nothing but triton.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import traceback
from dataclasses import asdict, dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

try:  # triton >= 3.3 (every version this project supports)
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
except ImportError:  # pragma: no cover
    make_backend = create_function_from_signature = None

# Instructions that only tensor cores execute: Hopper's warpgroup MMA, and mma.sync (Ampere and
# later), whose f64 form is the DMMA unit.
TENSOR_CORE_OPS = ("wgmma.mma_async", "mma.sync")


@dataclass
class Result:
    name: str
    arch: int
    ok: bool
    error: str = ""
    registers: int | None = None
    spill_bytes: int | None = None   # local memory per thread: spill stores/loads land there
    shared_bytes: int | None = None
    tensor_core_ops: list = field(default_factory=list)
    num_warps: int = 0
    num_stages: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class _Pointer:
    """What a launch binds for a tensor argument: its dtype and a 16-byte aligned address."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    @staticmethod
    def data_ptr() -> int:
        return 0


def _tool(name: str) -> str | None:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return here if os.path.exists(here) else shutil.which(name)


def _resource_usage(cubin: bytes) -> dict:
    """REG / LOCAL / SHARED of the (single) kernel in ``cubin``, from ``cuobjdump -res-usage``."""
    tool = _tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships with triton's NVIDIA backend)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = {}
    for key in ("REG", "LOCAL", "SHARED", "STACK"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key] = int(m.group(1)) if m else None
    return usage


def bind(kernel, args: dict, target: GPUTarget, num_warps: int, num_stages: int):
    """(signature, constexprs, attrs, options) exactly as ``kernel[grid](**args)`` would make
    them on ``target``."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(args, num_warps=num_warps, num_stages=num_stages, debug=False)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return signature, constexprs, attrs, options


def compile_launch(name: str, kernel, args: dict, arch: int, num_warps: int,
                   num_stages: int) -> Result:
    """Compile one launch for sm_<arch>; a compile error becomes ``Result(ok=False)``."""
    res = Result(name=name, arch=arch, ok=False, num_warps=num_warps, num_stages=num_stages)
    target = GPUTarget("cuda", arch, 32)
    try:
        signature, constexprs, attrs, options = bind(kernel, args, target, num_warps, num_stages)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - every compiler failure is a gate failure
        # Triton nests the reason (e.g. "K >= 16") under errors that quote the source: report
        # the innermost cause first.
        chain = [exc]
        while chain[-1].__cause__ is not None and len(chain) < 10:
            chain.append(chain[-1].__cause__)
        text = " | ".join(" ".join(traceback.format_exception_only(type(e), e)).strip()
                          for e in reversed(chain))
        res.error = " ".join(text.split())[:2000]
        return res
    ptx = compiled.asm["ptx"]
    res.tensor_core_ops = sorted({op for op in TENSOR_CORE_OPS if op in ptx})
    usage = _resource_usage(compiled.asm["cubin"])
    res.registers = usage["REG"]
    res.spill_bytes = (usage["LOCAL"] or 0) + (usage["STACK"] or 0)
    res.shared_bytes = compiled.metadata.shared
    res.ok = True
    return res


def mock_args(kernel, pointers: dict, aligned_ints: tuple, constexprs: dict,
              tl_dtype) -> dict:
    """Arguments for :func:`bind`: pointers as aligned mocks of their dtype, ``aligned_ints`` as
    a multiple of 16, other ints as an odd count (they are not specialized), floats and bools as
    such, constexprs from the plan (dtype names through ``tl_dtype``)."""
    args = {}
    for p in kernel.params:
        n = p.name
        if n in constexprs:
            v = constexprs[n]
            args[n] = tl_dtype(v) if isinstance(v, str) else v
        elif n in pointers:
            args[n] = _Pointer(pointers[n])
        elif n in aligned_ints:
            args[n] = 128
        elif p.annotation_type == "fp64" or n.startswith("inv_"):
            args[n] = 0.5
        elif n == "normalize":
            args[n] = 1
        else:
            args[n] = 1001
    return args
