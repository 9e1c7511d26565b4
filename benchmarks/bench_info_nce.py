"""Fused InfoNCE against the formulations popular libraries use (DESIGN.md section 7).

CPU (fp32, forward + backward): two views at N = 2048 per view, D = 128, against lightly's
NTXentLoss formulation and one 4096 x 4096 x 128 GEMM; MoCo with a 65536 x 128 queue, N = 256,
against the builder (clone + einsum + cat + cross_entropy) and its two unavoidable GEMMs. Peak
memory at N = 16384 per view. GPU (bf16, N = 8192) where CUDA is present.
"""
import pytest
import torch
import torch.nn.functional as F

from sslkernels import fused_info_nce
from sslkernels.info_nce import triton_available
from sslkernels.reference import info_nce as ref

from conftest import note, peak_memory_mb

N, D = 2048, 128
GROUP_PAIR = "ntxent-cpu fp32 N=2048 D=128 fwd+bwd"
GROUP_NEG = "moco-cpu fp32 N=256 K=65536 D=128 fwd+bwd"
PAIR_BASE = ["lightly NTXentLoss", "GEMM 4096x4096x128"]
NEG_BASE = ["builder (clone+einsum+cat+CE)", "two GEMMs"]


def _views(n, d, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g).to(device, dtype).requires_grad_(),
            torch.randn(n, d, generator=g).to(device, dtype).requires_grad_())


def _fwd_bwd(loss_fn, a, b):
    def step():
        a.grad = b.grad = None
        loss_fn(a, b).backward()
    return step


def test_pair_lightly(rec):
    a, b = _views(N, D)
    rec(GROUP_PAIR, "lightly NTXentLoss",
        _fwd_bwd(lambda x, y: ref.lightly_ntxent(x, y, 0.5), a, b), baselines=PAIR_BASE,
        rounds=5)


def test_pair_gemm(rec):
    z = torch.randn(2 * N, D)
    rec(GROUP_PAIR, "GEMM 4096x4096x128", lambda: z @ z.T, baselines=PAIR_BASE, rounds=10)


def test_pair_fused(rec):
    a, b = _views(N, D)
    rec(GROUP_PAIR, "sslkernels fused_info_nce",
        _fwd_bwd(lambda x, y: fused_info_nce(x, y, temperature=0.5), a, b),
        baselines=PAIR_BASE, rounds=10)


_PAIR_MEM = """
import torch, sys
from sslkernels import fused_info_nce
from sslkernels.reference import info_nce as ref
n, kind = int(sys.argv[1]), sys.argv[2]
a = torch.randn(n, 128, requires_grad=True); b = torch.randn(n, 128, requires_grad=True)
f = (lambda x, y: fused_info_nce(x, y)) if kind == "fused" else ref.lightly_ntxent
def setup():
    f(a[:64], b[:64]).backward()
def run():
    f(a, b).backward()
"""


def test_pair_peak_memory(rec):
    fused = peak_memory_mb(_PAIR_MEM, "16384", "fused")
    lightly_small = peak_memory_mb(_PAIR_MEM, "2048", "lightly")
    note(GROUP_PAIR, f"peak extra memory, fused, N=16384 per view: {fused:.1f} MB "
                     f"(target <= 64 MB)")
    note(GROUP_PAIR, f"peak extra memory, lightly, N=2048 per view: {lightly_small:.1f} MB "
                     f"(grows as N^2: ~{lightly_small * 64 / 1024:.1f} GB at N=16384)")
    rec.benchmark.extra_info.update(fused_mb_16384=fused, lightly_mb_2048=lightly_small)
    rec(GROUP_PAIR + " (memory probe)", "noop", lambda: None, rounds=1)


def _moco_inputs():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(256, D, generator=g, requires_grad=True)
    k = torch.randn(256, D, generator=g)
    queue = F.normalize(torch.randn(65536, D, generator=g), dim=1)
    return q, k, queue


def test_neg_builder(rec):
    q, k, queue = _moco_inputs()

    def step():
        q.grad = None
        negatives = queue.clone().detach()  # the official builder's clone of the whole queue
        qn = F.normalize(q, dim=1)
        kn = F.normalize(k, dim=1)
        l_pos = torch.einsum("nc,nc->n", qn, kn).unsqueeze(-1)
        l_neg = torch.einsum("nc,kc->nk", qn, negatives)
        logits = torch.cat([l_pos, l_neg], dim=1) / 0.2
        F.cross_entropy(logits, torch.zeros(256, dtype=torch.long)).backward()
    rec(GROUP_NEG, "builder (clone+einsum+cat+CE)", step, baselines=NEG_BASE, rounds=10)


def test_neg_gemms(rec):
    q, _, queue = _moco_inputs()
    p = torch.randn(256, 65536)
    qd = q.detach()

    def step():
        qd @ queue.T
        p @ queue
    rec(GROUP_NEG, "two GEMMs", step, baselines=NEG_BASE, rounds=10)


def test_neg_fused(rec):
    q, k, queue = _moco_inputs()

    def step():
        q.grad = None
        fused_info_nce(q, k, queue, temperature=0.2).backward()
    rec(GROUP_NEG, "sslkernels fused_info_nce", step, baselines=NEG_BASE, rounds=10)


# --------------------------------------------------------------------------------------------
# GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GROUP_GPU = "ntxent-gpu bf16 N=8192 D=128 fwd+bwd"
GPU_BASE = ["eager reference", "torch.compile reference"]


def _gpu_step(loss_fn):
    a, b = _views(8192, 128, torch.bfloat16, "cuda")

    def step():
        a.grad = b.grad = None
        loss_fn(a, b).backward()
        torch.cuda.synchronize()
    return step


def _gpu_ref(x, y):
    return ref.info_nce_pair_rows(x, y, 0.1).float().mean()


@cuda
def test_gpu_eager_reference(rec):
    rec(GROUP_GPU, "eager reference", _gpu_step(_gpu_ref), baselines=GPU_BASE, rounds=20)


@cuda
def test_gpu_compiled_reference(rec):
    rec(GROUP_GPU, "torch.compile reference", _gpu_step(torch.compile(_gpu_ref)),
        baselines=GPU_BASE, rounds=20, warmup=3)


@cuda
@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_gpu_triton(rec):
    rec(GROUP_GPU, "sslkernels triton",
        _gpu_step(lambda x, y: fused_info_nce(x, y, temperature=0.1, backend="triton")),
        baselines=GPU_BASE, rounds=20, warmup=3)


@cuda
@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_gpu_peak_memory(rec):
    # Extra device memory of one fwd+bwd over the inputs: fused O(N*D) vs the reference's logits.
    for name, fn in (("fused", lambda x, y: fused_info_nce(x, y, temperature=0.1)),
                     ("eager reference", _gpu_ref)):
        step = _gpu_step(fn)
        step()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        note(GROUP_GPU, f"peak extra device memory, {name}: "
                        f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f} MiB")
    rec(GROUP_GPU + " (memory probe)", "noop", lambda: None, rounds=1)


GROUP_GPU_NEG = "moco-gpu bf16 N=1024 K=65536 D=128 fwd+bwd"
GPU_NEG_BASE = ["builder (clone+einsum+cat+CE)"]


def _gpu_neg_step(loss_fn):
    q, k = _views(1024, 128, torch.bfloat16, "cuda")
    queue = torch.nn.functional.normalize(torch.randn(65536, 128, device="cuda"), dim=1)
    queue = queue.to(torch.bfloat16)

    def step():
        q.grad = None
        loss_fn(q, k.detach(), queue).backward()
        torch.cuda.synchronize()
    return step


def _gpu_builder(q, k, queue):
    neg = queue.clone().detach()
    return ref.info_nce_negatives_rows(q, k, neg, 0.2).float().mean()


@cuda
def test_gpu_neg_builder(rec):
    rec(GROUP_GPU_NEG, "builder (clone+einsum+cat+CE)", _gpu_neg_step(_gpu_builder),
        baselines=GPU_NEG_BASE, rounds=20)


@cuda
@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_gpu_neg_triton(rec):
    rec(GROUP_GPU_NEG, "sslkernels triton",
        _gpu_neg_step(lambda q, k, n: fused_info_nce(q, k, n, temperature=0.2)),
        baselines=GPU_NEG_BASE, rounds=20, warmup=3)
