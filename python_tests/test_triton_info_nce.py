"""Triton InfoNCE kernels against the plain-PyTorch oracle (sslkernels.reference.info_nce).

Without a GPU the kernels run under the Triton interpreter on CPU, so sizes stay small; odd
sizes (N, K, D not multiples of any block) and the interpreter's 32-row/16-feature tiles make
every masked edge, the multi-block loops and the queue-split path run here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (and of the kernels module).
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from sslkernels.reference import info_nce as ref  # noqa: E402
from sslkernels.triton_kernels import info_nce as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (triton imported before this module?)",
                allow_module_level=True)

# Error allowed, relative to max(1, 1/T, max|expected|): logits are O(1/T), so an fp32 rounding
# error of a unit-vector dot product shows up multiplied by 1/T in losses and gradients.
REL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Half-precision gradients: their own rounding (8 / 11 mantissa bits), relative to their size.
HALF_GRAD_REL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close(actual, expected, rel, inv_t=1.0):
    assert actual.shape == expected.shape
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert torch.isfinite(actual).all()
    scale = max(1.0, inv_t, expected.abs().max().item() if expected.numel() else 0.0)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.1e} * {scale:.3g}"


def make(n, d, dtype, normalize, seed, zero_row=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if not normalize:
        # Norm ~0.5, so |logits| <= 0.25 / T and exp stays finite without normalization.
        x = x * (0.5 / max(d, 1) ** 0.5)
    if zero_row and n > 0:
        x[n // 2] = 0.0
    return x.to(dtype=dtype, device=DEVICE)


def pair_reference(z0, z1, temperature, normalize, g):
    """fp64 oracle on the (exactly upcast) inputs: loss, lse, dz0, dz1."""
    a0 = z0.detach().to(torch.float64).requires_grad_()
    a1 = z1.detach().to(torch.float64).requires_grad_()
    loss = ref.info_nce_pair_rows(a0, a1, temperature, normalize)
    (loss * g.to(torch.float64)).sum().backward()
    z = torch.cat([ref._unit(a0.detach(), normalize), ref._unit(a1.detach(), normalize)])
    s = z @ z.T / temperature
    s.fill_diagonal_(float("-inf"))
    return loss.detach(), torch.logsumexp(s, dim=1), a0.grad, a1.grad


def neg_reference(q, k, negatives, temperature, normalize, g):
    a0 = q.detach().to(torch.float64).requires_grad_()
    a1 = k.detach().to(torch.float64).requires_grad_()
    neg = negatives.to(torch.float64)
    loss = ref.info_nce_negatives_rows(a0, a1, neg, temperature, normalize)
    (loss * g.to(torch.float64)).sum().backward()
    qn, kn = ref._unit(a0.detach(), normalize), ref._unit(a1.detach(), normalize)
    nn = ref._unit(neg, normalize)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ nn.T], dim=1) / temperature
    lse = torch.logsumexp(logits, dim=1)
    wsum = torch.softmax(logits, dim=1)[:, 1:] @ nn
    return loss.detach(), lse, wsum, a0.grad, a1.grad


def check_pair(n, d, temperature, normalize, dtype, rel, seed=0, zero_row=False, grad_rel=None):
    z0 = make(n, d, dtype, normalize, seed, zero_row)
    z1 = make(n, d, dtype, normalize, seed + 1)
    g = torch.randn(2 * n, generator=torch.Generator().manual_seed(seed + 2),
                    dtype=torch.float64).to(DEVICE)
    inv_t = 1.0 / temperature
    loss, lse = tk.pair_fwd(z0, z1, inv_t, normalize)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and lse.dtype == acc and loss.shape == (2 * n,)
    e_loss, e_lse, e_dz0, e_dz1 = pair_reference(z0, z1, temperature, normalize, g)
    assert_close(loss, e_loss, rel, inv_t)
    assert_close(lse, e_lse, rel, inv_t)
    dz0, dz1 = tk.pair_bwd(g.to(acc), z0, z1, lse, inv_t, normalize)
    assert dz0.dtype == dtype and dz1.dtype == dtype
    grad_rel, grad_inv_t = (grad_rel, 1.0) if grad_rel else (rel, inv_t)
    assert_close(dz0, e_dz0, grad_rel, grad_inv_t)
    assert_close(dz1, e_dz1, grad_rel, grad_inv_t)


def check_neg(n, d, k_neg, temperature, normalize, dtype, rel, neg_dtype=None, seed=0,
              zero_row=False, grad_rel=None):
    q = make(n, d, dtype, normalize, seed, zero_row)
    k = make(n, d, dtype, normalize, seed + 1)
    negatives = make(k_neg, d, neg_dtype or dtype, normalize, seed + 2)
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed + 3),
                    dtype=torch.float64).to(DEVICE)
    inv_t = 1.0 / temperature
    loss, lse, wsum = tk.neg_fwd(q, k, negatives, inv_t, normalize, True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == lse.dtype == wsum.dtype == acc and wsum.shape == (n, d)
    e_loss, e_lse, e_wsum, e_dq, e_dk = neg_reference(q, k, negatives, temperature, normalize, g)
    assert_close(loss, e_loss, rel, inv_t)
    assert_close(lse, e_lse, rel, inv_t)
    assert_close(wsum, e_wsum, rel)
    dq, dk = tk.neg_bwd(g.to(acc), q, k, lse, wsum, inv_t, normalize)
    assert dq.dtype == dtype and dk.dtype == dtype
    grad_rel, grad_inv_t = (grad_rel, 1.0) if grad_rel else (rel, inv_t)
    assert_close(dq, e_dq, grad_rel, grad_inv_t)
    assert_close(dk, e_dk, grad_rel, grad_inv_t)


# (n, d, temperature, normalize): every N in {1, 3, 17, 65}, D in {1, 3, 33}, T in
# {0.01, 0.1, 0.5, 1.0} appears; 2N = 130 spans five 32-row blocks and D = 33 three chunks.
PAIR_CASES_FP64 = [
    (1, 1, 0.5, True),
    (3, 3, 0.1, False),
    (17, 33, 0.01, True),
    (65, 33, 1.0, True),
    (65, 3, 0.1, False),
    (17, 1, 0.5, False),
]
PAIR_CASES_FP32 = [
    (1, 33, 1.0, True),
    (3, 33, 0.1, True),
    (17, 3, 0.01, True),
    (65, 33, 0.5, False),
]


@pytest.mark.parametrize("n,d,temperature,normalize", PAIR_CASES_FP64)
def test_pair_fp64(n, d, temperature, normalize):
    check_pair(n, d, temperature, normalize, torch.float64, REL[torch.float64])


@pytest.mark.parametrize("n,d,temperature,normalize", PAIR_CASES_FP32)
def test_pair_fp32(n, d, temperature, normalize):
    check_pair(n, d, temperature, normalize, torch.float32, REL[torch.float32])


# (n, d, k, temperature, normalize). With 32-column tiles and the interpreter's tiny split
# target, K = 100 runs the split-queue + combine path (2 or 4 splits) and K <= 32 the fused one.
NEG_CASES_FP64 = [
    (1, 1, 1, 0.5, True),
    (3, 3, 7, 0.1, False),
    (3, 33, 100, 0.07, True),
    (17, 33, 100, 0.01, True),
    (65, 33, 100, 1.0, True),
    (65, 3, 7, 0.1, False),
    (17, 1, 100, 0.5, False),
    (5, 3, 0, 0.1, True),
]
NEG_CASES_FP32 = [
    (1, 33, 1, 1.0, True),
    (3, 33, 100, 0.1, True),
    (17, 3, 7, 0.01, True),
    (65, 33, 100, 0.5, False),
]


@pytest.mark.parametrize("n,d,k_neg,temperature,normalize", NEG_CASES_FP64)
def test_neg_fp64(n, d, k_neg, temperature, normalize):
    check_neg(n, d, k_neg, temperature, normalize, torch.float64, REL[torch.float64])


@pytest.mark.parametrize("n,d,k_neg,temperature,normalize", NEG_CASES_FP32)
def test_neg_fp32(n, d, k_neg, temperature, normalize):
    check_neg(n, d, k_neg, temperature, normalize, torch.float32, REL[torch.float32])


def test_zero_rows_follow_f_normalize():
    # ||z|| = 0 < eps: F.normalize maps the row to 0 and its gradient is dzn / eps (no
    # projection); the kernels must reproduce that, not divide by zero.
    check_pair(17, 3, 0.1, True, torch.float64, REL[torch.float64], zero_row=True)
    check_neg(17, 3, 7, 0.1, True, torch.float64, REL[torch.float64], zero_row=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_half_inputs_low_temperature(dtype):
    # Upcast before tl.dot: against the fp64 oracle on the same (exact) half values the kernel
    # is fp32-accurate; the gradients are then rounded to the input dtype.
    check_pair(17, 33, 0.01, True, dtype, REL[torch.float32], grad_rel=HALF_GRAD_REL[dtype])


def test_neg_bf16_queue_fp32_queries():
    # The common MoCo setup: fp32 encoder outputs, bf16 queue storage, upcast per tile.
    check_neg(17, 33, 100, 0.07, True, torch.float32, REL[torch.float32],
              neg_dtype=torch.bfloat16)


def test_neg_bf16_everything_low_temperature():
    check_neg(17, 33, 100, 0.01, True, torch.bfloat16, REL[torch.float32],
              neg_dtype=torch.bfloat16, grad_rel=HALF_GRAD_REL[torch.bfloat16])


def test_neg_fp64_queries_half_queue():
    # fp64 accumulation fed by 16-bit tiles takes the kernel's layout-barrier branch.
    check_neg(3, 33, 100, 0.1, True, torch.float64, REL[torch.float64], neg_dtype=torch.float16)


def test_non_contiguous_inputs():
    # Column-major / strided views of all inputs, none copied by the caller.
    n, d, k_neg, temperature = 17, 33, 100, 0.1
    inv_t = 1.0 / temperature
    big = make(n, 2 * d, torch.float32, True, 7)
    z0, z1 = big[:, ::2], make(d, n, torch.float32, True, 8).T
    # A stride-0 upstream gradient, as the backward of loss.sum() delivers it.
    g = torch.randn(1).to(DEVICE).expand(2 * n)
    loss, lse = tk.pair_fwd(z0, z1, inv_t, True)
    dz0, dz1 = tk.pair_bwd(g, z0, z1, lse, inv_t, True)
    e_loss, e_lse, e_dz0, e_dz1 = pair_reference(z0, z1, temperature, True, g)
    for a, e in ((loss, e_loss), (lse, e_lse), (dz0, e_dz0), (dz1, e_dz1)):
        assert_close(a, e, REL[torch.float32], inv_t)

    q = make(d, n, torch.float32, True, 9).T
    k = make(n, 3 * d, torch.float32, True, 10)[:, d:2 * d]
    queue_t = make(d, k_neg, torch.bfloat16, True, 11)  # (D, K) storage, used as (K, D)
    for negatives in (queue_t.T, make(2 * k_neg, d, torch.bfloat16, True, 12)[::2]):
        assert not negatives.is_contiguous()
        gq = torch.randn(n, dtype=torch.float64).to(DEVICE)
        loss, lse, wsum = tk.neg_fwd(q, k, negatives, inv_t, True, True)
        dq, dk = tk.neg_bwd(gq.float(), q, k, lse, wsum, inv_t, True)
        expected = neg_reference(q, k, negatives, temperature, True, gq)
        for a, e in zip((loss, lse, wsum, dq, dk), expected):
            assert_close(a, e, REL[torch.float32], inv_t)


def test_neg_fwd_without_grad_returns_empty_wsum():
    q = make(17, 33, torch.float32, True, 0)
    k = make(17, 33, torch.float32, True, 1)
    negatives = make(100, 33, torch.bfloat16, True, 2)
    loss, lse, wsum = tk.neg_fwd(q, k, negatives, 10.0, True, False)
    assert wsum.numel() == 0
    loss_g, lse_g, wsum_g = tk.neg_fwd(q, k, negatives, 10.0, True, True)
    assert wsum_g.shape == (17, 33)
    assert_close(loss, loss_g, 1e-6, 10.0)
    assert_close(lse, lse_g, 1e-6, 10.0)


@pytest.mark.skipif(DEVICE != "cpu", reason="split heuristic differs on GPU")
def test_split_and_fused_queue_paths_both_run():
    blocks = tk._cfg(33, wide=True, acc=torch.float32)
    dev = torch.device("cpu")
    assert tk._queue_splits(3, 100, blocks.block_m, blocks.block_n, dev)[0] == 4
    assert tk._queue_splits(65, 100, blocks.block_m, blocks.block_n, dev)[0] == 2
    assert tk._queue_splits(65, 7, blocks.block_m, blocks.block_n, dev)[0] == 1


def test_queue_is_read_in_place(monkeypatch):
    """neg_fwd hands the caller's queue to the kernel as is and runs no torch op on it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    negatives = make(100, 33, torch.bfloat16, True, 3)
    q = make(5, 33, torch.float32, True, 4)
    k = make(5, 33, torch.float32, True, 5)
    storage = negatives.untyped_storage().data_ptr()
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(args)

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.touched = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.numel()
                   and t.untyped_storage().data_ptr() == storage for t in flat):
                self.touched.append(func)
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(tk, "_neg_fwd_kernel", Recorder())
    monkeypatch.setattr(tk, "_neg_combine_kernel", Recorder())
    with Watch() as watch:
        tk.neg_fwd(q, k, negatives, 10.0, True, True)
    assert watch.touched == []
    assert launched and launched[0][2] is negatives
    monkeypatch.undo()

    # And for real: values and version counter untouched, result matches the oracle.
    before, version = negatives.clone(), negatives._version
    loss, _, _ = tk.neg_fwd(q, k, negatives, 10.0, True, False)
    assert negatives._version == version and torch.equal(negatives, before)
    assert negatives.untyped_storage().data_ptr() == storage
    expected = ref.info_nce_negatives_rows(q.double(), k.double(), negatives.double(), 0.1)
    assert_close(loss, expected, REL[torch.float32], 10.0)


def test_argument_checks_and_empty_batches():
    z = make(3, 5, torch.float32, True, 0)
    with pytest.raises(ValueError):
        tk.pair_fwd(z, make(4, 5, torch.float32, True, 1), 10.0, True)
    wide = torch.zeros(2, tk.MAX_D + 1, device=DEVICE)
    with pytest.raises(ValueError):
        tk.pair_fwd(wide, wide, 10.0, True)
    with pytest.raises(ValueError):
        tk.neg_fwd(z, z, make(7, 4, torch.float32, True, 2), 10.0, True, True)
    with pytest.raises(ValueError):  # backward without the forward's wsum
        tk.neg_bwd(torch.ones(3, device=DEVICE), z, z, torch.zeros(3, device=DEVICE),
                   torch.empty(0, device=DEVICE), 10.0, True)
    empty = z[:0]
    loss, lse = tk.pair_fwd(empty, empty, 10.0, True)
    assert loss.shape == lse.shape == (0,)
    loss, lse, wsum = tk.neg_fwd(empty, empty, make(7, 5, torch.float32, True, 3), 10.0, True,
                                 True)
    assert loss.shape == (0,) and wsum.shape == (0, 5)
