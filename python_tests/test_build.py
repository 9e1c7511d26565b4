"""The extension is built, loads, and carries the kernels its build says it has."""
import os
import shutil

import pytest
import torch

import sslkernels
from sslkernels import _ext


def _has_kernel(op: str, key: str) -> bool:
    name = f"sslkernels::{op}"
    return (torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            or torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"))


def test_ops_registered():
    names = _ext.op_names()
    for op in ["info_nce_pair_fwd", "info_nce_pair_bwd", "info_nce_neg_fwd", "info_nce_neg_bwd"]:
        assert op in names


def test_every_op_has_cpu_kernel():
    for op in _ext.op_names():
        assert _has_kernel(op, "CPU"), op


# Ops whose GPU implementation is Triton (torch.ops.sslkernels_triton.<same name>), not C++.
TRITON_ON_GPU = ("info_nce_pair_fwd", "info_nce_pair_bwd", "info_nce_neg_fwd")


def test_cuda_kernels_registered_when_built():
    if not sslkernels.cuda_built():
        pytest.skip("this build has no CUDA kernels")
    for op in _ext.op_names():
        if op in TRITON_ON_GPU:
            continue
        assert _has_kernel(op, "CUDA"), f"{op} has no CUDA kernel although the build had CUDA"


def test_triton_ops_cover_the_gpu():
    # One GPU implementation per kernel: the InfoNCE ops without a C++ CUDA kernel have a
    # Triton twin of the same name that runs on CUDA.
    from sslkernels.info_nce import _triton_ops, triton_available
    if not triton_available():
        pytest.skip("triton >= 3.6 is not installed")
    ops = _triton_ops()
    for op in TRITON_ON_GPU:
        name = f"sslkernels::{op}"
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sslkernels_triton::{op}",
                                                              "CUDA"), op
        assert hasattr(ops, op)


def test_cuda_built_where_expected():
    # CI sets SSLK_EXPECT_CUDA=1: there torch has CUDA and nvcc exists, so a build that silently
    # skipped the .cu files (or a broken one) must fail here.
    if os.environ.get("SSLK_EXPECT_CUDA") != "1":
        pytest.skip("SSLK_EXPECT_CUDA is not set")
    assert torch.version.cuda is not None and shutil.which("nvcc")
    assert sslkernels.cuda_built()
