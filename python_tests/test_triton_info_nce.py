"""Triton InfoNCE kernels (sslkernels.triton_kernels) against the plain-PyTorch oracle.

Without a GPU the kernels run under the Triton interpreter on CPU, so sizes stay small; odd
sizes (N, K, D not multiples of any block) and the interpreter's 32-row / 16-feature tiles make
every masked edge, the multi-block loops, the feature chunks and the queue-split path run here.
Half-precision tiles reach tl.dot as bf16/fp16 values; the interpreter multiplies them upcast
(exact), which is what tensor cores compute up to the order of fp32 accumulation. On a GPU the
same tests run the compiled kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (and of the kernels module).
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import triton_interpreter_problem  # noqa: E402
from sslkernels.info_nce import triton_available  # noqa: E402
from sslkernels.reference import info_nce as ref  # noqa: E402

if not triton_available():
    pytest.skip("triton >= 3.6 is not installed", allow_module_level=True)

from sslkernels.triton_kernels import info_nce as K  # noqa: E402
from sslkernels.triton_kernels import info_nce_launch as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (triton imported before this module?)",
                allow_module_level=True)
if DEVICE == "cpu" and triton_interpreter_problem():
    pytest.skip(triton_interpreter_problem(), allow_module_level=True)

neg_bwd = torch.ops.sslkernels.info_nce_neg_bwd  # the one backward of the MoCo form

# Error allowed, relative to max(1, 1/T, max|expected|): logits are O(1/T), so an fp32 rounding
# error of a unit-vector dot product shows up multiplied by 1/T in losses and gradients.
REL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_close(actual, expected, rel, inv_t=1.0):
    assert actual.shape == expected.shape
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert torch.isfinite(actual).all() or not torch.isfinite(expected).all()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite)
    assert torch.equal(actual[~finite], expected[~finite])
    actual, expected = actual[finite], expected[finite]
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


def _lse_neg_pair(z, n, temperature):
    s = z @ z.T / temperature
    s.fill_diagonal_(float("-inf"))
    idx = torch.arange(2 * n, device=z.device)
    s[idx, (idx + n) % (2 * n)] = float("-inf")
    return torch.logsumexp(s, dim=1)


def pair_reference(z0, z1, temperature, normalize, g):
    """fp64 oracle on the (exactly upcast) inputs: loss, lse_neg, dz0, dz1."""
    a0 = z0.detach().to(torch.float64).requires_grad_()
    a1 = z1.detach().to(torch.float64).requires_grad_()
    loss = ref.info_nce_pair_rows(a0, a1, temperature, normalize)
    (loss * g.to(torch.float64)).sum().backward()
    z = torch.cat([ref._unit(a0.detach(), normalize), ref._unit(a1.detach(), normalize)])
    return loss.detach(), _lse_neg_pair(z, z0.shape[0], temperature), a0.grad, a1.grad


def neg_reference(q, k, negatives, temperature, normalize, g):
    a0 = q.detach().to(torch.float64).requires_grad_()
    a1 = k.detach().to(torch.float64).requires_grad_()
    neg = negatives.to(torch.float64)
    loss = ref.info_nce_negatives_rows(a0, a1, neg, temperature, normalize)
    (loss * g.to(torch.float64)).sum().backward()
    qn, kn = ref._unit(a0.detach(), normalize), ref._unit(a1.detach(), normalize)
    nn = ref._unit(neg, normalize)
    l_neg = qn @ nn.T / temperature
    logits = torch.cat([(qn * kn).sum(1, keepdim=True) / temperature, l_neg], dim=1)
    lse_neg = torch.logsumexp(l_neg, dim=1) if neg.shape[0] else \
        torch.full((q.shape[0],), float("-inf"), dtype=torch.float64, device=q.device)
    wsum = torch.softmax(logits, dim=1)[:, 1:] @ nn
    return loss.detach(), lse_neg, wsum, a0.grad, a1.grad


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_pair(n, d, temperature, normalize, dtype, rel, seed=0, zero_row=False, grad_rel=None):
    z0 = make(n, d, dtype, normalize, seed, zero_row)
    z1 = make(n, d, dtype, normalize, seed + 1)
    g = torch.randn(2 * n, generator=torch.Generator().manual_seed(seed + 2),
                    dtype=torch.float64).to(DEVICE)
    inv_t = 1.0 / temperature
    loss, lse_neg = tk.pair_fwd(z0, z1, inv_t, normalize)
    acc = _acc(dtype)
    assert loss.dtype == acc and lse_neg.dtype == acc and loss.shape == (2 * n,)
    e_loss, e_lse, e_dz0, e_dz1 = pair_reference(z0, z1, temperature, normalize, g)
    assert_close(loss, e_loss, rel, inv_t)
    assert_close(lse_neg, e_lse, rel, inv_t)
    dz0, dz1 = tk.pair_bwd(g.to(acc), z0, z1, lse_neg, inv_t, normalize)
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
    loss, lse_neg, wsum = tk.neg_fwd(q, k, negatives, inv_t, normalize, True)
    acc = _acc(dtype)
    assert loss.dtype == lse_neg.dtype == wsum.dtype == acc and wsum.shape == (n, d)
    e_loss, e_lse, e_wsum, e_dq, e_dk = neg_reference(q, k, negatives, temperature, normalize, g)
    assert_close(loss, e_loss, rel, inv_t)
    assert_close(lse_neg, e_lse, rel, inv_t)
    assert_close(wsum, e_wsum, rel)
    dq, dk = neg_bwd(g.to(acc), q, k, lse_neg, wsum, inv_t, normalize)
    assert dq.dtype == dtype and dk.dtype == dtype
    grad_rel, grad_inv_t = (grad_rel, 1.0) if grad_rel else (rel, inv_t)
    assert_close(dq, e_dq, grad_rel, grad_inv_t)
    assert_close(dk, e_dk, grad_rel, grad_inv_t)


# (n, d, temperature, normalize): every N in {1, 3, 17, 65}, D in {1, 3, 33}, T in
# {0.01, 0.1, 0.5, 1.0} appears; 2N = 130 spans five 32-row blocks, D = 33 three 16-feature
# chunks; D = 150 > 128 takes the chunked kernels (feature chunks of 32 in the gradient).
PAIR_CASES_FP64 = [
    (1, 1, 0.5, True),
    (3, 3, 0.1, False),
    (17, 33, 0.01, True),
    (65, 33, 1.0, True),
    (65, 3, 0.1, False),
    (17, 1, 0.5, False),
    (9, 150, 0.1, True),
]
PAIR_CASES_FP32 = [
    (1, 33, 1.0, True),
    (3, 33, 0.1, True),
    (17, 3, 0.01, True),
    (65, 33, 0.5, False),
    (9, 150, 0.2, True),
]


@pytest.mark.parametrize("n,d,temperature,normalize", PAIR_CASES_FP64)
def test_pair_fp64(n, d, temperature, normalize):
    check_pair(n, d, temperature, normalize, torch.float64, REL[torch.float64])


@pytest.mark.parametrize("n,d,temperature,normalize", PAIR_CASES_FP32)
def test_pair_fp32(n, d, temperature, normalize):
    check_pair(n, d, temperature, normalize, torch.float32, REL[torch.float32])


def test_pair_single_sample_has_no_negatives():
    # N = 1: each row's only other row is its positive: lse_neg = -inf and the loss is 0.
    z0, z1 = make(1, 5, torch.float32, True, 0), make(1, 5, torch.float32, True, 1)
    loss, lse_neg = tk.pair_fwd(z0, z1, 10.0, True)
    assert torch.equal(loss, torch.zeros(2, device=DEVICE))
    assert torch.isneginf(lse_neg).all()
    dz0, dz1 = tk.pair_bwd(torch.ones(2, device=DEVICE), z0, z1, lse_neg, 10.0, True)
    assert torch.isfinite(dz0).all() and torch.isfinite(dz1).all()


# (n, d, k, temperature, normalize). With 32-column tiles and the interpreter's tiny split
# target, K = 100 runs 2 or 4 queue splits and K <= 32 one; K = 0 is an empty queue.
NEG_CASES_FP64 = [
    (1, 1, 1, 0.5, True),
    (3, 3, 7, 0.1, False),
    (3, 33, 100, 0.07, True),
    (17, 33, 100, 0.01, True),
    (65, 33, 100, 1.0, True),
    (65, 3, 7, 0.1, False),
    (17, 1, 100, 0.5, False),
    (5, 3, 0, 0.1, True),
    (5, 150, 70, 0.1, True),
]
NEG_CASES_FP32 = [
    (1, 33, 1, 1.0, True),
    (3, 33, 100, 0.1, True),
    (17, 3, 7, 0.01, True),
    (65, 33, 100, 0.5, False),
    (5, 150, 70, 0.2, True),
]


@pytest.mark.parametrize("n,d,k_neg,temperature,normalize", NEG_CASES_FP64)
def test_neg_fp64(n, d, k_neg, temperature, normalize):
    check_neg(n, d, k_neg, temperature, normalize, torch.float64, REL[torch.float64])


@pytest.mark.parametrize("n,d,k_neg,temperature,normalize", NEG_CASES_FP32)
def test_neg_fp32(n, d, k_neg, temperature, normalize):
    check_neg(n, d, k_neg, temperature, normalize, torch.float32, REL[torch.float32])


def test_zero_rows_follow_f_normalize():
    # ||z|| = 0 < eps: F.normalize maps the row to 0 and its gradient is dzn / eps (no
    # projection); the launchers must reproduce that, not divide by zero.
    check_pair(17, 3, 0.1, True, torch.float64, REL[torch.float64], zero_row=True)
    check_neg(17, 3, 7, 0.1, True, torch.float64, REL[torch.float64], zero_row=True)


@pytest.mark.parametrize("queue", [torch.bfloat16, torch.float16])
def test_neg_half_queue_fp32_queries(queue):
    # fp32 encoder outputs with a half-precision queue: tiles upcast exactly, fp32 accuracy.
    check_neg(17, 33, 100, 0.07, True, torch.float32, REL[torch.float32], neg_dtype=queue)


@pytest.mark.parametrize("dtype,queue", [(torch.float64, torch.float16),
                                         (torch.bfloat16, torch.float16),
                                         (torch.float32, torch.float64)])
def test_neg_converted_queue_pairings(dtype, queue):
    # Pairings without an in-place kernel: the launcher converts the queue to the queries'
    # dtype first. Checked against the oracle on the converted values.
    q = make(5, 33, dtype, True, 0)
    k = make(5, 33, dtype, True, 1)
    negatives = make(40, 33, queue, True, 2)
    loss, lse_neg, wsum = tk.neg_fwd(q, k, negatives, 10.0, True, True)
    e = neg_reference(q, k, negatives.to(dtype), 0.1, True, torch.ones(5, dtype=torch.float64))
    rel = REL[torch.float64] if dtype == torch.float64 else 2e-2 if dtype in K_HALF else 1e-5
    assert_close(loss, e[0], rel, 10.0)
    assert_close(lse_neg, e[1], rel, 10.0)


K_HALF = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Half precision: bounded by the reference's own error in the same dtype (flash-attention's
# rule), against the fp64 truth on the same half inputs.

def _err(actual, truth):
    return (actual.double() - truth.double()).abs().max().item()


@pytest.mark.parametrize("dtype", K_HALF)
@pytest.mark.parametrize("temperature", [0.01, 0.2])
def test_pair_half_within_reference_error(dtype, temperature):
    n, d = 40, 33
    z0 = make(n, d, dtype, True, 5)
    z1 = make(n, d, dtype, True, 6)
    g = torch.full((2 * n,), 1.0 / (2 * n), dtype=torch.float64, device=DEVICE)  # mean
    truth = pair_reference(z0, z1, temperature, True, g)
    # The reference in the half dtype itself (what a user's plain-PyTorch loss computes).
    r0, r1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    r_loss = ref.info_nce_pair_rows(r0, r1, temperature, True)
    (r_loss.float() * g.float()).sum().backward()
    inv_t = 1.0 / temperature
    loss, lse_neg = tk.pair_fwd(z0, z1, inv_t, True)
    dz0, dz1 = tk.pair_bwd(g.float(), z0, z1, lse_neg, inv_t, True)
    assert torch.isfinite(loss).all() and torch.isfinite(dz0).all() and torch.isfinite(dz1).all()
    floor = 1e-6 * inv_t
    assert _err(loss, truth[0]) <= 2 * _err(r_loss, truth[0]) + floor
    assert _err(dz0, truth[2]) <= 2 * _err(r0.grad, truth[2]) + 1e-5
    assert _err(dz1, truth[3]) <= 2 * _err(r1.grad, truth[3]) + 1e-5


@pytest.mark.parametrize("dtype", K_HALF)
@pytest.mark.parametrize("temperature", [0.01, 0.2])
def test_neg_half_within_reference_error(dtype, temperature):
    n, d, k_neg = 17, 33, 100
    q, k = make(n, d, dtype, True, 7), make(n, d, dtype, True, 8)
    negatives = make(k_neg, d, dtype, True, 9)
    g = torch.full((n,), 1.0 / n, dtype=torch.float64, device=DEVICE)
    truth = neg_reference(q, k, negatives, temperature, True, g)
    rq, rk = q.clone().requires_grad_(), k.clone().requires_grad_()
    r_loss = ref.info_nce_negatives_rows(rq, rk, negatives, temperature, True)
    (r_loss.float() * g.float()).sum().backward()
    inv_t = 1.0 / temperature
    loss, lse_neg, wsum = tk.neg_fwd(q, k, negatives, inv_t, True, True)
    dq, dk = neg_bwd(g.float(), q, k, lse_neg, wsum, inv_t, True)
    assert torch.isfinite(loss).all() and torch.isfinite(dq).all()
    assert _err(loss, truth[0]) <= 2 * _err(r_loss, truth[0]) + 1e-6 * inv_t
    assert _err(dq, truth[3]) <= 2 * _err(rq.grad, truth[3]) + 1e-5
    assert _err(dk, truth[4]) <= 2 * _err(rk.grad, truth[4]) + 1e-5


def test_fp16_gradient_weights_do_not_underflow():
    # A loss weighted 1e-3 and averaged over 2N = 400 rows: g_i P_ij ~ 1e-3 / 400^2 = 6e-9,
    # below fp16's smallest subnormal (6e-8). The kernel rescales the weights by max|g| (and
    # 2^8) before rounding them to fp16 for the tensor-core dot; without that the negatives'
    # part of the gradient would round to zero.
    n, d = 200, 16
    z0 = make(n, d, torch.float16, True, 11)
    z1 = make(n, d, torch.float16, True, 12)
    g = torch.full((2 * n,), 1e-3 / (2 * n), dtype=torch.float64, device=DEVICE)
    truth = pair_reference(z0, z1, 0.5, True, g)
    _, lse_neg = tk.pair_fwd(z0, z1, 2.0, True)
    dz0, _ = tk.pair_bwd(g.float(), z0, z1, lse_neg, 2.0, True)
    # The gradient itself is ~1e-5, in fp16's subnormal range: compare with what rounding the
    # exact gradient to fp16 loses.
    rounding = (truth[2].half().double() - truth[2]).norm() / truth[2].norm()
    rel = (dz0.double() - truth[2]).norm() / truth[2].norm()
    assert rel < 1.25 * rounding, f"relative error {rel:.2e}, fp16 rounding alone {rounding:.2e}"


def test_non_contiguous_inputs():
    # Column-major / strided views of all inputs (the launchers copy what they normalize; a
    # queue that is not row-aligned is copied once).
    n, d, k_neg, temperature = 17, 33, 100, 0.1
    inv_t = 1.0 / temperature
    big = make(n, 2 * d, torch.float32, True, 7)
    z0, z1 = big[:, ::2], make(d, n, torch.float32, True, 8).T
    # A stride-0 upstream gradient, as the backward of loss.sum() delivers it.
    g = torch.randn(1).to(DEVICE).expand(2 * n)
    loss, lse_neg = tk.pair_fwd(z0, z1, inv_t, True)
    dz0, dz1 = tk.pair_bwd(g, z0, z1, lse_neg, inv_t, True)
    e_loss, e_lse, e_dz0, e_dz1 = pair_reference(z0, z1, temperature, True, g)
    for a, e in ((loss, e_loss), (lse_neg, e_lse), (dz0, e_dz0), (dz1, e_dz1)):
        assert_close(a, e, REL[torch.float32], inv_t)

    q = make(d, n, torch.float32, True, 9).T
    k = make(n, 3 * d, torch.float32, True, 10)[:, d:2 * d]
    queue_t = make(d, k_neg, torch.bfloat16, True, 11)  # (D, K) storage, used as (K, D)
    for negatives in (queue_t.T, make(2 * k_neg, d, torch.bfloat16, True, 12)[::2]):
        assert not negatives.is_contiguous()
        gq = torch.randn(n, dtype=torch.float64).to(DEVICE)
        loss, lse_neg, wsum = tk.neg_fwd(q, k, negatives, inv_t, True, True)
        dq, dk = neg_bwd(gq.float(), q, k, lse_neg, wsum, inv_t, True)
        expected = neg_reference(q, k, negatives, temperature, True, gq)
        for a, e in zip((loss, lse_neg, wsum, dq, dk), expected):
            assert_close(a, e, REL[torch.float32], inv_t)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 32), (torch.bfloat16, 32),
                                     (torch.bfloat16, 150)])
def test_neg_fwd_without_grad_returns_empty_wsum(dtype, d):
    # bf16 queries take the one-chunk (D <= 128) and chunked kernels without the weighted sum.
    q = make(17, d, dtype, True, 0)
    k = make(17, d, dtype, True, 1)
    negatives = make(100, d, torch.bfloat16, True, 2)
    loss, lse_neg, wsum = tk.neg_fwd(q, k, negatives, 10.0, True, False)
    assert wsum.numel() == 0
    loss_g, lse_g, wsum_g = tk.neg_fwd(q, k, negatives, 10.0, True, True)
    assert wsum_g.shape == (17, d)
    assert_close(loss, loss_g, 1e-6, 10.0)
    assert_close(lse_neg, lse_g, 1e-6, 10.0)
    expected = ref.info_nce_negatives_rows(q.double(), k.double(), negatives.double(), 0.1)
    assert_close(loss, expected, REL[torch.float32] if dtype == torch.float32 else 2e-3, 10.0)


@pytest.mark.skipif(DEVICE != "cpu", reason="split heuristic differs on GPU")
def test_split_paths_all_run():
    # With the interpreter's target of 4 programs, the test sizes above run 1, 2 and 4 splits
    # of the columns (two views) and of the queue.
    dev = torch.device("cpu")
    assert tk._splits(1, 100, 32, dev) == (4, 1)   # neg, N = 3: one row block
    assert tk._splits(2, 100, 32, dev) == (2, 2)   # neg, N = 17
    assert tk._splits(5, 100, 32, dev) == (1, 4)   # neg, N = 65
    assert tk._splits(1, 7, 32, dev) == (1, 1)
    assert tk._splits(1, 34, 32, dev) == (2, 1)    # pair, N = 17: 2N = 34 columns
    assert tk._splits(5, 130, 32, dev) == (1, 5)   # pair, N = 65


def test_aligned_queue_is_read_in_place(monkeypatch):
    """An aligned queue reaches the kernel as is: no torch op copies or writes it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    negatives = make(100, 32, torch.bfloat16, True, 3)
    q = make(5, 32, torch.float32, True, 4)
    k = make(5, 32, torch.float32, True, 5)
    storage = negatives.untyped_storage().data_ptr()
    launched = []

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.touched = []
            self.in_kernel = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
            if not self.in_kernel and any(isinstance(t, torch.Tensor) and t.numel()
                                          and t.untyped_storage().data_ptr() == storage
                                          for t in flat):
                self.touched.append(func)
            return func(*args, **(kwargs or {}))

    real_launch = tk._launch

    def recording_launch(plan, grid, *args):
        # What the interpreter does to move arguments in and out of numpy is not the
        # launcher's doing: only torch ops outside kernel launches count.
        launched.append(args)
        watch.in_kernel = True
        try:
            real_launch(plan, grid, *args)
        finally:
            watch.in_kernel = False

    monkeypatch.setattr(tk, "_launch", recording_launch)
    watch = Watch()
    with watch:
        tk.neg_fwd(q, k, negatives, 10.0, True, True)
    assert watch.touched == []
    # The kernels that read it (its rows' norms, then the loss) get the caller's tensor.
    assert sum(any(a is negatives for a in args) for args in launched) == 2
    monkeypatch.undo()

    before, version = negatives.clone(), negatives._version
    loss, _, _ = tk.neg_fwd(q, k, negatives, 10.0, True, False)
    assert negatives._version == version and torch.equal(negatives, before)
    expected = ref.info_nce_negatives_rows(q.double(), k.double(), negatives.double(), 0.1)
    assert_close(loss, expected, REL[torch.float32], 10.0)


def test_width_limit_and_empty_batches():
    # The public function validates; the launchers keep the checks memory safety needs and
    # return empty outputs for N = 0, like the C++ ops.
    wide = torch.zeros(2, K.MAX_D + 1, device=DEVICE)
    with pytest.raises(ValueError, match="features"):
        tk.pair_fwd(wide, wide, 10.0, True)
    z = make(3, 5, torch.float32, True, 0)
    empty = z[:0]
    loss, lse_neg = tk.pair_fwd(empty, empty, 10.0, True)
    assert loss.shape == lse_neg.shape == (0,)
    dz0, dz1 = tk.pair_bwd(loss, empty, empty, lse_neg, 10.0, True)
    assert dz0.shape == (0, 5)
    loss, lse_neg, wsum = tk.neg_fwd(empty, empty, make(7, 5, torch.float32, True, 3), 10.0,
                                     True, True)
    assert loss.shape == (0,) and wsum.shape == (0, 5)


# ---------------------------------------------------------------------------------------------
# The plans the launchers pick on a GPU are exactly the specializations the compile gate builds.

def _key(plan):
    return (plan.kernel.fn.__name__ if hasattr(plan.kernel, "fn") else plan.kernel.__name__,
            tuple(sorted(plan.constexprs.items())), plan.num_warps, plan.num_stages)


def test_gpu_plans_are_all_in_the_gate():
    gated = {_key(launch.plan) for launch in K.specializations()}
    dtypes = [str(t).removeprefix("torch.") for t in
              (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    for d in (1, 3, 16, 64, 127, 128, 129, 256, 500, 1024):
        for dt in dtypes:
            assert _key(K.pair_lse_plan(dt, d)) in gated
            assert _key(K.pair_grad_plan(dt, d)) in gated
            for queue in dtypes:
                if K.neg_dot_name(dt, queue) is None:
                    continue
                for wsum in (False, True):
                    assert _key(K.neg_partial_plan(dt, queue, d, wsum)) in gated
            for wsum in (False, True):
                assert _key(K.combine_plan(dt, wsum)) in gated
            assert _key(K.row_rnorm_plan(dt)) in gated


def test_half_inputs_dot_in_half():
    # bf16/fp16 inputs reach tl.dot as bf16/fp16 tiles (tensor cores), never upcast.
    for dt in ("float16", "bfloat16"):
        for launch in K.specializations():
            if launch.name.startswith(("pair_lse[" + dt, "pair_grad[" + dt)):
                assert launch.pointers["Z"] == dt and launch.dot == dt
            if launch.name.startswith(f"neg_partial[{dt},"):
                assert launch.dot == dt and launch.pointers["Q"] == dt


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_run_on_the_tensors_device():
    # Triton launches on the current device; the launchers switch to the tensors' own.
    torch.cuda.set_device(0)
    z0 = make(17, 33, torch.float32, True, 0).to("cuda:1")
    z1 = make(17, 33, torch.float32, True, 1).to("cuda:1")
    neg = make(100, 32, torch.bfloat16, True, 2).to("cuda:1")
    loss, lse_neg = tk.pair_fwd(z0, z1, 10.0, True)
    assert loss.device == torch.device("cuda:1")
    g = torch.ones(34, dtype=torch.float64, device="cuda:1")
    e = pair_reference(z0, z1, 0.1, True, g)
    assert_close(loss, e[0], REL[torch.float32], 10.0)
    dz0, _ = tk.pair_bwd(g.float(), z0, z1, lse_neg, 10.0, True)
    assert_close(dz0, e[2], REL[torch.float32], 10.0)
    loss, _, _ = tk.neg_fwd(z0[:, :32], z1[:, :32], neg, 10.0, True, True)
    expected = ref.info_nce_negatives_rows(z0[:, :32].double(), z1[:, :32].double(),
                                           neg.double(), 0.1)
    assert_close(loss, expected, REL[torch.float32], 10.0)
