"""Fused multi-positive InfoNCE (SupCon / multi-view SimCLR) against the dense formulation the
popular implementations use (DESIGN.md section 7).

CPU, fp32, forward + backward. V = 4 views of N = 1024 images (M = 4096 rows), D = 128, against
one 4096 x 4096 x 128 GEMM (target: <= 2x its time) and the dense SupCon formulation - logits,
label masks, log-softmax, mean over positives (target: >= 4x faster). V = 2, N = 2048: the
multi-positive kernel against today's two-view NT-Xent kernel on the same rows (target: within
1.15x). Peak extra memory at M = 32768 (target: <= 64 MB).
"""
import pytest
import torch

from sslkernels import fused_info_nce, fused_supcon, view_labels
from sslkernels.reference import supcon as ref

from conftest import note, peak_memory_mb

D = 128
GROUP_V4 = "supcon-cpu fp32 V=4 N=1024 (M=4096) D=128 fwd+bwd"
GROUP_V2 = "supcon-cpu fp32 V=2 N=2048 (M=4096) D=128 fwd+bwd"
V4_BASE = ["GEMM 4096x4096x128", "dense SupCon (logits+masks+log-softmax)"]
V2_BASE = ["two-view kernel fused_info_nce"]
TEMPERATURE = 0.1


def _rows(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, D, generator=g).requires_grad_()


def _step(loss_fn, z):
    def step():
        z.grad = None
        loss_fn(z).backward()
    return step


def test_v4_gemm(rec):
    z = torch.randn(4096, D)
    rec(GROUP_V4, "GEMM 4096x4096x128", lambda: z @ z.T, baselines=V4_BASE, rounds=10)


def test_v4_dense(rec):
    z, y = _rows(4096), view_labels(1024, 4)
    rec(GROUP_V4, "dense SupCon (logits+masks+log-softmax)",
        _step(lambda x: ref.supcon_rows(x, y, TEMPERATURE).mean(), z), baselines=V4_BASE,
        rounds=5)


def test_v4_fused(rec):
    z, y = _rows(4096), view_labels(1024, 4)
    rec(GROUP_V4, "sslkernels fused_supcon",
        _step(lambda x: fused_supcon(x, y, temperature=TEMPERATURE), z), baselines=V4_BASE,
        rounds=10)


def test_v4_fused_supervised(rec):
    """Supervised labels: 10 classes of ~410 rows (CIFAR-10-like), so 10% of the entries are
    positives and every tile holds some."""
    z = _rows(4096)
    y = torch.randint(0, 10, (4096,), generator=torch.Generator().manual_seed(1))
    rec(GROUP_V4, "sslkernels fused_supcon, 10 classes",
        _step(lambda x: fused_supcon(x, y, temperature=TEMPERATURE), z), baselines=V4_BASE,
        rounds=10)


def test_v2_pair_kernel(rec):
    z0, z1 = _rows(2048, 1), _rows(2048, 2)

    def step():
        z0.grad = z1.grad = None
        fused_info_nce(z0, z1, temperature=TEMPERATURE).backward()
    rec(GROUP_V2, "two-view kernel fused_info_nce", step, baselines=V2_BASE, rounds=10)


def test_v2_fused(rec):
    z, y = _rows(4096, 1), view_labels(2048, 2)
    rec(GROUP_V2, "sslkernels fused_supcon V=2",
        _step(lambda x: fused_supcon(x, y, temperature=TEMPERATURE), z), baselines=V2_BASE,
        rounds=10)


_MEM = """
import torch, sys
from sslkernels import fused_supcon, view_labels
from sslkernels.reference import supcon as ref
m, kind = int(sys.argv[1]), sys.argv[2]
z = torch.randn(m, 128, requires_grad=True)
y = view_labels(m // 4, 4)
f = ((lambda x, l: fused_supcon(x, l, temperature=0.1)) if kind == "fused" else
     (lambda x, l: ref.supcon_rows(x, l, 0.1).mean()))
def setup():
    f(z[:64], y[:64]).backward()
def run():
    f(z, y).backward()
"""


def test_peak_memory(rec):
    fused = peak_memory_mb(_MEM, "32768", "fused")
    dense_small = peak_memory_mb(_MEM, "4096", "dense")
    note(GROUP_V4, f"peak extra memory, fused, M=32768: {fused:.1f} MB (target <= 64 MB)")
    note(GROUP_V4, f"peak extra memory, dense, M=4096: {dense_small:.1f} MB (grows as M^2: "
                   f"~{dense_small * 64 / 1024:.1f} GB at M=32768)")
    rec.benchmark.extra_info.update(fused_mb_32768=fused, dense_mb_4096=dense_small)
    rec(GROUP_V4 + " (memory probe)", "noop", lambda: None, rounds=1)


# --------------------------------------------------------------------------------------------
# GPU: V = 4 views of N = 2048 images (M = 8192 rows), bf16, against the dense formulation in
# eager and under torch.compile.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GROUP_GPU = "supcon-gpu bf16 V=4 N=2048 (M=8192) D=128 fwd+bwd"
GPU_BASE = ["dense SupCon eager", "dense SupCon torch.compile"]


def _gpu_step(loss_fn):
    z = torch.randn(8192, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = view_labels(2048, 4, device="cuda")

    def step():
        z.grad = None
        loss_fn(z, y).backward()
        torch.cuda.synchronize()
    return step


def _dense(z, y):
    return ref.supcon_rows(z, y, TEMPERATURE).float().mean()


@cuda
def test_gpu_dense(rec):
    rec(GROUP_GPU, "dense SupCon eager", _gpu_step(_dense), baselines=GPU_BASE, rounds=10)


@cuda
def test_gpu_dense_compiled(rec):
    rec(GROUP_GPU, "dense SupCon torch.compile", _gpu_step(torch.compile(_dense)),
        baselines=GPU_BASE, rounds=10, warmup=3)


@cuda
def test_gpu_fused(rec):
    rec(GROUP_GPU, "sslkernels fused_supcon (triton)",
        _gpu_step(lambda z, y: fused_supcon(z, y, temperature=TEMPERATURE)),
        baselines=GPU_BASE, rounds=10, warmup=3)
