"""fused_info_nce against the plain-PyTorch reference: values and gradients over odd shapes,
temperatures and dtypes (bounded by the reference's own error, flash-attention's rule), fp64
gradcheck, opcheck, torch.compile, the Triton kernels under the interpreter, hypothesis over
shapes, O(N*D) memory at N = 16384, and bad input."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sslkernels
from sslkernels import fused_info_nce
from sslkernels.info_nce import triton_available
from sslkernels.reference import info_nce as ref

from conftest import triton_interpreter_problem

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1, 3), (3, 1), (3, 129), (127, 129), (127, 1), (1000, 3)]
TEMPS = [0.01, 0.1, 1.0]


def _inputs(n, d, dtype, device, seed, count=2, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
            for _ in range(count)]


def _truth_and_ref32(fn, tensors, upstream):
    """fn's rows and input gradients in fp64 (the truth) and in fp32 (the reference's own error)."""
    out = {}
    for dt in (torch.float64, torch.float32):
        xs = [t.detach().to(dt).requires_grad_() for t in tensors]
        rows = fn(*xs)
        grads = torch.autograd.grad(rows, xs, upstream.to(dt))
        out[dt] = (rows.detach().double(), [g.double() for g in grads])
    return out[torch.float64], out[torch.float32]


def _check(ours, truth, ref32, dtype, what):
    """|ours - truth| <= 4 |ref32 - truth| + floor, the floor covering fp32 accumulation and the
    final rounding of gradients to the input dtype."""
    err = (ours.double() - truth).abs()
    ref_err = (ref32 - truth).abs()
    scale = truth.abs().max().clamp_min(1.0)
    eps = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 1e-3,
           torch.bfloat16: 8e-3}[dtype]
    floor = 2e-6 * scale + eps * truth.abs()
    bad = err > 4 * ref_err + floor
    assert not bad.any(), (f"{what}: max err {err.max().item():.3g}, reference's own error "
                           f"{ref_err.max().item():.3g}, at {bad.nonzero()[:3].tolist()}")


def _run(z0, z1, negatives, temperature, backend, normalize=True):
    a = z0.detach().requires_grad_()
    b = z1.detach().requires_grad_()
    rows = fused_info_nce(a, b, negatives, temperature=temperature, normalize=normalize,
                          reduction="none", backend=backend)
    return a, b, rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("temperature", TEMPS)
def test_pair_matches_reference(device, dtype, n, d, temperature):
    if dtype in (torch.float16, torch.bfloat16) and n * d > 50000:
        pytest.skip("covered by fp32/fp64 at this size")
    z0, z1 = _inputs(n, d, dtype, device, seed=n * 31 + d)
    a, b, rows = _run(z0, z1, None, temperature, backend=None)
    assert rows.shape == (2 * n,) and rows.dtype == (torch.float64 if dtype == torch.float64
                                                     else torch.float32)
    assert torch.isfinite(rows).all()
    up = torch.rand(2 * n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    da, db = torch.autograd.grad(rows, (a, b), up.to(device, rows.dtype))
    assert da.dtype == dtype and torch.isfinite(da).all() and torch.isfinite(db).all()
    fn = lambda x, y: ref.info_nce_pair_rows(x, y, temperature)  # noqa: E731
    (t_rows, t_grads), (r_rows, r_grads) = _truth_and_ref32(fn, [z0, z1], up.to(device))
    _check(rows, t_rows, r_rows, dtype, "loss")
    _check(da, t_grads[0], r_grads[0], dtype, "grad z0")
    _check(db, t_grads[1], r_grads[1], dtype, "grad z1")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,k", [(1, 3, 1), (3, 1, 7), (3, 129, 1000), (127, 129, 7),
                                   (1000, 3, 1000), (5, 3, 0)])
@pytest.mark.parametrize("temperature", TEMPS)
def test_negatives_match_reference(device, dtype, n, d, k, temperature):
    q, kk = _inputs(n, d, dtype, device, seed=n + d + k)
    (neg,) = _inputs(k, d, dtype, device, seed=7, count=1)
    a, b, rows = _run(q, kk, neg, temperature, backend=None)
    assert rows.shape == (n,) and torch.isfinite(rows).all()
    up = torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    da, db = torch.autograd.grad(rows, (a, b), up.to(device, rows.dtype))
    fn = lambda x, y: ref.info_nce_negatives_rows(x, y, neg.to(x.dtype), temperature)  # noqa
    (t_rows, t_grads), (r_rows, r_grads) = _truth_and_ref32(fn, [q, kk], up.to(device))
    _check(rows, t_rows, r_rows, dtype, "loss")
    _check(da, t_grads[0], r_grads[0], dtype, "grad q")
    _check(db, t_grads[1], r_grads[1], dtype, "grad k")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_reduced_precision_negatives(device, storage):
    q, k = _inputs(64, 32, torch.float32, device, seed=3)
    neg = torch.nn.functional.normalize(_inputs(500, 32, torch.float32, device, 4, 1)[0], dim=1)
    neg_lp = neg.to(storage)
    ours = fused_info_nce(q, k, neg_lp, temperature=0.07, reduction="none")
    want = ref.info_nce_negatives_rows(q.double(), k.double(), neg_lp.double(), 0.07)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["pair", "negatives"])
def test_unnormalized_inputs(device, mode):
    z0, z1, neg = _inputs(33, 17, torch.float64, device, seed=5, count=3, scale=0.3)
    negatives = neg if mode == "negatives" else None
    a, b, rows = _run(z0, z1, negatives, 0.2, backend=None, normalize=False)
    a2, b2, rows2 = _run(z0, z1, negatives, 0.2, backend="reference", normalize=False)
    torch.testing.assert_close(rows, rows2)
    g = torch.autograd.grad(rows.sum(), (a, b))
    g2 = torch.autograd.grad(rows2.sum(), (a2, b2))
    torch.testing.assert_close(g, g2)


def test_reductions_and_lightly_equivalence(device):
    z0, z1 = _inputs(50, 20, torch.float32, device, seed=9)
    rows = fused_info_nce(z0, z1, temperature=0.3, reduction="none")
    torch.testing.assert_close(fused_info_nce(z0, z1, temperature=0.3), rows.mean())
    torch.testing.assert_close(fused_info_nce(z0, z1, temperature=0.3, reduction="sum"),
                               rows.sum())
    a = z0.clone().requires_grad_()
    b = z1.clone().requires_grad_()
    a2 = z0.clone().requires_grad_()
    b2 = z1.clone().requires_grad_()
    ours = fused_info_nce(a, b, temperature=0.3)
    theirs = ref.lightly_ntxent(a2, b2, temperature=0.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["pair", "negatives"])
def test_finite_at_small_temperature(device, dtype, mode):
    z0, z1, neg = _inputs(300, 64, dtype, device, seed=11, count=3)
    # near-duplicates make the largest logits approach 1/tau = 100
    z1 = (z0.float() + 0.01 * z1.float()).to(dtype)
    a, b, rows = _run(z0, z1, neg if mode == "negatives" else None, 0.01, backend=None)
    assert torch.isfinite(rows).all()
    ga, gb = torch.autograd.grad(rows.mean(), (a, b))
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_fp64(normalize):
    z0, z1, neg = _inputs(4, 5, torch.float64, "cpu", seed=13, count=3, scale=0.5)
    for negatives in (None, neg):
        f = lambda a, b: fused_info_nce(a, b, negatives, temperature=0.3,  # noqa: E731
                                        normalize=normalize, reduction="none")
        assert torch.autograd.gradcheck(f, (z0.clone().requires_grad_(),
                                            z1.clone().requires_grad_()))


def test_opcheck_cpu_ops():
    z0, z1, neg = _inputs(6, 5, torch.float64, "cpu", seed=17, count=3)
    ops = torch.ops.sslkernels
    for normalize in (True, False):
        torch.library.opcheck(ops.info_nce_pair_fwd.default,
                              (z0.clone().requires_grad_(), z1.clone().requires_grad_(), 2.0,
                               normalize))
        loss, lse = ops.info_nce_pair_fwd(z0, z1, 2.0, normalize)
        torch.library.opcheck(ops.info_nce_pair_bwd.default,
                              (torch.ones_like(loss), z0, z1, lse, 2.0, normalize))
        for need_grad in (True, False):
            torch.library.opcheck(ops.info_nce_neg_fwd.default,
                                  (z0.clone().requires_grad_(), z1.clone().requires_grad_(), neg,
                                   2.0, normalize, need_grad))
        loss, lse, w = ops.info_nce_neg_fwd(z0, z1, neg, 2.0, normalize, True)
        torch.library.opcheck(ops.info_nce_neg_bwd.default,
                              (torch.ones_like(loss), z0, z1, lse, w, 2.0, normalize))


@pytest.mark.parametrize("mode", ["pair", "negatives"])
def test_torch_compile_fullgraph(mode):
    z0, z1, neg = _inputs(20, 8, torch.float32, "cpu", seed=19, count=3)
    negatives = neg if mode == "negatives" else None

    def step(a, b):
        return fused_info_nce(a, b, negatives, temperature=0.2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = z0.clone().requires_grad_()
    b = z1.clone().requires_grad_()
    loss = compiled(a, b)
    grads = torch.autograd.grad(loss, (a, b))
    loss2 = step(a, b)
    grads2 = torch.autograd.grad(loss2, (a, b))
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(grads, grads2)


def test_torch_compile_inductor_module():
    z0, z1 = _inputs(16, 8, torch.float32, "cpu", seed=23)
    lin = torch.nn.Linear(8, 8)
    loss_fn = sslkernels.losses.NTXentLoss(temperature=0.5)
    model = lambda x, y: loss_fn(lin(x), lin(y))  # noqa: E731
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(z0, z1)
    out.backward()
    g = lin.weight.grad.clone()
    lin.weight.grad = None
    want = model(z0, z1)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(g, lin.weight.grad)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("mode", ["pair", "negatives"])
def test_triton_backend_through_public_api(mode):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    if dev == "cpu" and triton_interpreter_problem():
        pytest.skip(triton_interpreter_problem())
    z0, z1, neg = _inputs(13, 9, torch.float64, dev, seed=29, count=3)
    negatives = neg if mode == "negatives" else None
    a, b, rows = _run(z0, z1, negatives, 0.1, backend="triton")
    a2, b2, rows2 = _run(z0, z1, negatives, 0.1, backend="reference")
    torch.testing.assert_close(rows, rows2)
    torch.testing.assert_close(torch.autograd.grad(rows.sum(), (a, b)),
                               torch.autograd.grad(rows2.sum(), (a2, b2)))
    if mode == "pair":
        torch.library.opcheck(torch.ops.sslkernels_triton.info_nce_pair_fwd.default,
                              (z0.clone().requires_grad_(), z1.clone().requires_grad_(), 10.0,
                               True))
    else:
        torch.library.opcheck(torch.ops.sslkernels_triton.info_nce_neg_fwd.default,
                              (z0.clone().requires_grad_(), z1.clone().requires_grad_(), neg,
                               10.0, True, True))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 300), d=st.integers(1, 70), k=st.integers(0, 600),
       temperature=st.sampled_from([0.05, 0.5]), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(n, d, k, temperature, seed):
    z0, z1, neg = _inputs(max(n, k), d, torch.float64, "cpu", seed=seed, count=3)
    z0, z1, neg = z0[:n], z1[:n], neg[:k]
    torch.testing.assert_close(
        fused_info_nce(z0, z1, temperature=temperature, reduction="none"),
        ref.info_nce_pair_rows(z0, z1, temperature))
    torch.testing.assert_close(
        fused_info_nce(z0, z1, neg, temperature=temperature, reduction="none"),
        ref.info_nce_negatives_rows(z0, z1, neg, temperature))


_MEMORY_PROBE = textwrap.dedent(r"""
    import re, sys, torch, sslkernels
    torch.manual_seed(0)
    n, d, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    a = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, d, requires_grad=True)
    neg = torch.randn(65536, d) if mode == "negatives" else None
    # warm up at a small size so allocator and thread pools exist before the baseline
    sslkernels.fused_info_nce(a[:64], b[:64], None if neg is None else neg[:64]).backward()
    a.grad = b.grad = None
    # reset the high-water mark so that transient peaks of the imports cannot hide this one
    open("/proc/self/clear_refs", "w").write("5")
    hwm = lambda: int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
    base = hwm()
    loss = sslkernels.fused_info_nce(a, b, neg, temperature=0.1)
    loss.backward()
    peak = hwm()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    print((peak - base) / 1024)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode,n", [("pair", 16384), ("negatives", 4096)])
def test_memory_is_linear(mode, n):
    """N = 16384 per view: logits would take 32768^2 * 4 B = 4 GiB; the fused loss must stay
    within 64 MB of extra memory (inputs, their gradients and the normalized copies included)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(n), "128", mode],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    extra_mb = float(out.stdout.strip().splitlines()[-1])
    assert extra_mb <= 64, f"extra peak memory {extra_mb:.1f} MB"


# ---------------------------------------------------------------------------------------------
# The slice op: one rank's 2n rows against the gathered keys (the distributed SimCLR loss; the
# 2-process run itself is in test_distributed.py). Offsets place the rank's views anywhere in
# the keys, including across the op's 1024-column tiles and in reverse view order.

SLICES = [(2, 1, 0, 1), (6, 3, 0, 3), (9, 3, 6, 1), (40, 7, 20, 3), (2100, 5, 1020, 1500)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,off0,off1", SLICES)
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_slice_matches_reference(device, dtype, m, n, off0, off1, temperature):
    (keys,) = _inputs(m, 33, dtype, device, seed=m + off0, count=1)
    k = keys.detach().requires_grad_()
    rows, lse_neg = torch.ops.sslkernels.info_nce_slice_fwd(k, off0, off1, n, 1 / temperature,
                                                            True)
    assert rows.shape == (2 * n,) and torch.isfinite(rows).all()
    up = torch.rand(2 * n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (dk,) = torch.autograd.grad(rows, k, up.to(device, rows.dtype))
    assert dk.dtype == dtype and torch.isfinite(dk).all()
    fn = lambda x: ref.info_nce_slice_rows(x, off0, off1, n, temperature)  # noqa: E731
    (t_rows, t_grads), (r_rows, r_grads) = _truth_and_ref32(fn, [keys], up.to(device))
    _check(rows, t_rows, r_rows, dtype, "loss")
    _check(dk, t_grads[0], r_grads[0], dtype, "grad keys")


def test_slice_of_the_whole_batch_is_the_pair_loss(device):
    z0, z1 = _inputs(37, 9, torch.float64, device, seed=23)
    rows, _ = torch.ops.sslkernels.info_nce_slice_fwd(torch.cat([z0, z1]), 0, 37, 37, 4.0, True)
    torch.testing.assert_close(rows, fused_info_nce(z0, z1, temperature=0.25, reduction="none"))


@pytest.mark.parametrize("normalize", [True, False])
def test_slice_gradcheck_and_opcheck(normalize):
    (keys,) = _inputs(11, 4, torch.float64, "cpu", seed=29, count=1, scale=0.5)
    ops = torch.ops.sslkernels
    f = lambda k: ops.info_nce_slice_fwd(k, 7, 2, 3, 3.0, normalize)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (keys.clone().requires_grad_(),))
    torch.library.opcheck(ops.info_nce_slice_fwd.default,
                          (keys.clone().requires_grad_(), 7, 2, 3, 3.0, normalize))
    loss, lse = ops.info_nce_slice_fwd(keys, 7, 2, 3, 3.0, normalize)
    torch.library.opcheck(ops.info_nce_slice_bwd.default,
                          (torch.rand_like(loss), keys, lse, 7, 2, 3, 3.0, normalize))


@pytest.mark.parametrize("offsets,match", [((0, 2, 3), "overlap"), ((0, 8, 3), "inside the M"),
                                           ((-1, 4, 3), "inside the M"), ((0, 3, 0), "n must")])
def test_slice_bad_offsets(offsets, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sslkernels.info_nce_slice_fwd(torch.randn(10, 3), *offsets, 2.0, True)


_SLICE_MEMORY_PROBE = textwrap.dedent("""
    import re, sys, torch, sslkernels
    n, d, world = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    keys = torch.randn(2 * world * n, d, requires_grad=True)
    fwd = torch.ops.sslkernels.info_nce_slice_fwd
    fwd(keys[:64], 0, 32, 32, 10.0, True)[0].mean().backward()
    keys.grad = None
    open("/proc/self/clear_refs", "w").write("5")
    hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    base = hwm()
    fwd(keys, 0, n, n, 10.0, True)[0].mean().backward()
    assert torch.isfinite(keys.grad).all()
    print((hwm() - base) / 1024)
""")


@pytest.mark.slow
def test_slice_memory_is_linear():
    """One rank of two with 8192 pairs: its (16384 x 32768) logits would take 2 GiB. The op may
    hold a few copies of the 16 MB keys (unit rows, their gradient, the queries) and one 16 MB
    tile: 128 MB in all."""
    out = subprocess.run([sys.executable, "-c", _SLICE_MEMORY_PROBE, "8192", "128", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    extra_mb = float(out.stdout.strip().splitlines()[-1])
    assert extra_mb <= 128, f"extra peak memory {extra_mb:.1f} MB"


def test_gather_distributed_single_process_is_the_plain_loss():
    z0, z1 = _inputs(9, 5, torch.float64, "cpu", seed=31)
    torch.testing.assert_close(fused_info_nce(z0, z1, gather_distributed=True),
                               fused_info_nce(z0, z1))


class TestBadInput:
    def setup_method(self):
        self.z = torch.randn(4, 3)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="z0 and z1 must have the same shape"):
            fused_info_nce(self.z, torch.randn(4, 5))
        with pytest.raises(ValueError, match="z0 must be 2-D"):
            fused_info_nce(torch.randn(4), self.z)

    def test_width_mismatch_negatives(self):
        with pytest.raises(ValueError, match="negatives must have width D = 3"):
            fused_info_nce(self.z, self.z, torch.randn(10, 4))

    def test_empty_batch(self):
        e = torch.randn(0, 3)
        with pytest.raises(ValueError, match="N = 0"):
            fused_info_nce(e, e)
        with pytest.raises(ValueError, match="D = 0"):
            fused_info_nce(torch.randn(2, 0), torch.randn(2, 0))

    @pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
    def test_bad_temperature(self, t):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            fused_info_nce(self.z, self.z, temperature=t)

    def test_integer_dtype(self):
        i = torch.ones(4, 3, dtype=torch.int64)
        with pytest.raises(TypeError, match="z0 must have a floating-point dtype"):
            fused_info_nce(i, i)
        with pytest.raises(TypeError, match="negatives must have a floating-point dtype"):
            fused_info_nce(self.z, self.z, torch.ones(5, 3, dtype=torch.int32))
        with pytest.raises(TypeError, match="same dtype"):
            fused_info_nce(self.z, self.z.double())

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="z1 must be a torch.Tensor"):
            fused_info_nce(self.z, [[1.0, 2.0, 3.0]])

    def test_device_mismatch(self):
        meta = torch.empty(4, 3, device="meta")
        with pytest.raises(ValueError, match="one device"):
            fused_info_nce(self.z, meta)

    def test_gather_distributed_rejects_negatives(self):
        with pytest.raises(ValueError, match="gather_distributed=True applies to the two-view"):
            fused_info_nce(self.z, self.z, torch.randn(5, 3), gather_distributed=True)

    def test_bad_reduction_and_backend(self):
        with pytest.raises(ValueError, match="reduction must be one of"):
            fused_info_nce(self.z, self.z, reduction="avg")
        with pytest.raises(ValueError, match="backend must be one of"):
            fused_info_nce(self.z, self.z, backend="tpu")
        with pytest.raises(ValueError, match="GPU implementation of the fused InfoNCE losses "
                                             "is backend='triton'"):
            fused_info_nce(self.z, self.z, backend="cuda")


# ---------------------------------------------------------------------------------------------
# One contract across backends: ops of the same name return the same things.

def _op_sets():
    sets = [pytest.param(torch.ops.sslkernels, "cpu", id="cpu")]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    interp = os.environ.get("TRITON_INTERPRET") == "1" and not triton_interpreter_problem()
    if triton_available() and (dev == "cuda" or interp):
        from sslkernels.info_nce import _triton_ops
        sets.append(pytest.param(_triton_ops(), dev, id="triton"))
    return sets


@pytest.mark.parametrize("ops,dev", _op_sets())
def test_ops_share_one_contract(ops, dev):
    """Every backend's ops give per-row losses and lse_neg (log-sum-exp over the negatives only),
    equal to the oracle's, and empty outputs for an empty batch."""
    z0, z1, neg = _inputs(9, 5, torch.float64, dev, seed=3, count=3)
    loss, lse_neg = ops.info_nce_pair_fwd(z0, z1, 5.0, True)
    zn = torch.nn.functional.normalize(torch.cat([z0, z1]), dim=1)
    s = zn @ zn.T * 5.0
    s.fill_diagonal_(float("-inf"))
    idx = torch.arange(18, device=dev)
    s[idx, (idx + 9) % 18] = float("-inf")
    torch.testing.assert_close(lse_neg, torch.logsumexp(s, 1))
    torch.testing.assert_close(loss, ref.info_nce_pair_rows(z0, z1, 0.2))
    loss, lse_neg, wsum = ops.info_nce_neg_fwd(z0, z1, neg, 5.0, True, True)
    qn = torch.nn.functional.normalize(z0, dim=1)
    nn = torch.nn.functional.normalize(neg, dim=1)
    torch.testing.assert_close(lse_neg, torch.logsumexp(qn @ nn.T * 5.0, 1))
    torch.testing.assert_close(loss, ref.info_nce_negatives_rows(z0, z1, neg, 0.2))
    assert wsum.shape == (9, 5)
    _, _, no_w = ops.info_nce_neg_fwd(z0, z1, neg, 5.0, True, False)
    assert no_w.shape == (0,)

    e = z0[:0]
    loss, lse_neg = ops.info_nce_pair_fwd(e, e, 5.0, True)
    assert loss.shape == lse_neg.shape == (0,)
    dz0, dz1 = ops.info_nce_pair_bwd(loss, e, e, lse_neg, 5.0, True)
    assert dz0.shape == dz1.shape == (0, 5)
    loss, lse_neg, wsum = ops.info_nce_neg_fwd(e, e, neg, 5.0, True, True)
    assert loss.shape == lse_neg.shape == (0,) and wsum.shape == (0, 5)


def _tf32_on():
    """Every global switch that lets fp32 matmuls run in TF32 (or bf16), turned on."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    return saved


def _tf32_restore(saved):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, precision = saved
    torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("mode", ["pair", "negatives", "slice"])
def test_fp32_results_do_not_depend_on_tf32_switches(device, mode):
    # The Triton dots ask for IEEE fp32 explicitly and the ATen GEMMs of the slice op run under
    # a no-TF32 guard: the global switches must not change one bit of an fp32 result.
    z0, z1, neg = _inputs(37, 65, torch.float32, device, seed=4, count=3)

    def run():
        a, b = z0.clone().requires_grad_(), z1.clone().requires_grad_()
        if mode == "slice":
            keys = torch.cat([a, b])
            rows, _ = torch.ops.sslkernels.info_nce_slice_fwd(keys, 0, 37, 37, 10.0, True)
        else:
            rows = fused_info_nce(a, b, neg if mode == "negatives" else None, temperature=0.1,
                                  reduction="none")
        grads = torch.autograd.grad(rows.sum(), (a, b))
        return rows.detach(), grads

    exact = run()
    saved = _tf32_on()
    try:
        switched = run()
    finally:
        _tf32_restore(saved)
    assert torch.equal(exact[0], switched[0])
    for g0, g1 in zip(exact[1], switched[1]):
        assert torch.equal(g0, g1)
