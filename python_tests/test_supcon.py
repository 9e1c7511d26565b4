"""fused_supcon (multi-positive InfoNCE / SupCon L_out) against the plain-PyTorch reference:
values and gradients over odd shapes, label layouts (V views, classes spanning tiles, rows
without positives), temperatures and dtypes (bounded by the reference's own error), V = 2
against the two-view NT-Xent kernel, fp64 gradcheck, opcheck, torch.compile, hypothesis, the
slice op of the distributed loss, SupConLoss against SupContrast's formulation, O(M*D) memory
at M = 32768, and bad input. The 2-process run is in test_distributed.py."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sslkernels import fused_info_nce, fused_supcon, view_labels
from sslkernels.losses import SupConLoss
from sslkernels.reference import supcon as ref
from test_info_nce import DTYPES, _check, _inputs, _truth_and_ref32


def _labels(layout: str, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "views2":    # two-view SimCLR (M even) / one view short of it
        return torch.arange(m) % max(1, (m + 1) // 2)
    if layout == "views4":    # four views of each image, view-major
        return torch.arange(m) % max(1, (m + 3) // 4)
    if layout == "classes":   # a few large classes: runs span several 256-row tiles
        return torch.randint(0, 3, (m,), generator=g) * 1000 - 7  # arbitrary label values
    if layout == "one":       # a single class: no negatives at all
        return torch.zeros(m, dtype=torch.long)
    if layout == "unique":    # nobody has a positive
        return torch.randperm(m, generator=g) * 10**12
    if layout == "mixed":     # pairs, bigger groups and singletons, shuffled
        base = torch.arange(m) // torch.randint(1, 6, (1,), generator=g)
        alone = torch.rand(m, generator=g) < 0.2
        base[alone] = -1 - torch.arange(int(alone.sum()))
        return base[torch.randperm(m, generator=g)]
    raise ValueError(layout)


CASES = [  # (M, D, layout)
    (1, 3, "unique"), (2, 1, "views2"), (3, 129, "mixed"), (8, 5, "views4"),
    (127, 129, "mixed"), (300, 33, "classes"), (513, 17, "views2"), (1000, 3, "views4"),
    (700, 40, "classes"), (257, 16, "unique"), (300, 8, "one"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,d,layout", CASES)
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_matches_reference(device, dtype, m, d, layout, temperature):
    if dtype in (torch.float16, torch.bfloat16) and m * d > 20000:
        pytest.skip("covered by fp32/fp64 at this size")
    (z,) = _inputs(m, d, dtype, device, seed=m * 7 + d, count=1)
    y = _labels(layout, m, seed=m).to(device)
    x = z.detach().requires_grad_()
    rows = fused_supcon(x, y, temperature=temperature, reduction="none")
    assert rows.shape == (m,) and rows.dtype == (torch.float64 if dtype == torch.float64
                                                 else torch.float32)
    assert torch.isfinite(rows).all()
    up = torch.rand(m, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (dx,) = torch.autograd.grad(rows, x, up.to(device, rows.dtype))
    assert dx.dtype == dtype and torch.isfinite(dx).all()
    fn = lambda a: ref.supcon_rows(a, y, temperature)  # noqa: E731
    (t_rows, t_grads), (r_rows, r_grads) = _truth_and_ref32(fn, [z], up.to(device))
    _check(rows, t_rows, r_rows, dtype, "loss")
    _check(dx, t_grads[0], r_grads[0], dtype, "grad z")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 5, 300])
def test_two_views_equal_ntxent(dtype, n):
    z0, z1 = _inputs(n, 24, dtype, "cpu", seed=n)
    a0, a1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    b = torch.cat([z0, z1]).requires_grad_()
    want = fused_info_nce(a0, a1, temperature=0.1, reduction="none")
    got = fused_supcon(b, view_labels(n, 2), temperature=0.1, reduction="none")
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got, want, **tol)
    up = torch.rand(2 * n, dtype=dtype)
    g_want = torch.cat(torch.autograd.grad(want, (a0, a1), up))
    (g_got,) = torch.autograd.grad(got, b, up)
    torch.testing.assert_close(g_got, g_want, **tol)


def test_unnormalized_inputs_and_reductions():
    (z,) = _inputs(41, 7, torch.float64, "cpu", seed=3, count=1, scale=0.3)
    y = _labels("mixed", 41, seed=5)
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    rows = fused_supcon(a, y, temperature=0.2, normalize=False, reduction="none")
    want = fused_supcon(b, y, temperature=0.2, normalize=False, reduction="none",
                        backend="reference")
    torch.testing.assert_close(rows, want)
    torch.testing.assert_close(torch.autograd.grad(rows.sum(), a),
                               torch.autograd.grad(want.sum(), b))
    has = (y[:, None] == y[None, :]).sum(1) > 1
    assert (rows[~has] == 0).all() and (rows[has] > 0).all()
    mean = fused_supcon(z, y, temperature=0.2, normalize=False)
    torch.testing.assert_close(mean, rows[has].mean())
    torch.testing.assert_close(fused_supcon(z, y, temperature=0.2, normalize=False,
                                            reduction="sum"), rows.sum())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rows_without_positives_are_defined(backend):
    """A label that occurs once: the row is 0, left out of the mean, and still a negative of the
    others. Nobody with a positive (or a single row): the mean is 0 with zero gradient."""
    for m in (1, 6):
        z = torch.randn(m, 4, dtype=torch.float64, requires_grad=True)
        loss = fused_supcon(z, torch.arange(m), backend=backend)
        (g,) = torch.autograd.grad(loss, z)
        assert loss.item() == 0 and torch.equal(g, torch.zeros_like(g))
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 2, 3])  # rows 1, 3, 4 are alone but push rows 0 and 2 apart
    rows = fused_supcon(z, y, backend=backend, reduction="none")
    assert (rows[[1, 3, 4]] == 0).all() and torch.isfinite(rows).all()
    (g,) = torch.autograd.grad(fused_supcon(z, y, backend=backend), z)
    assert torch.isfinite(g).all() and (g[[1, 3, 4]] != 0).any()
    torch.testing.assert_close(fused_supcon(z, y, backend=backend), rows[[0, 2]].mean())


def test_labels_of_any_integer_dtype_and_noncontiguous_rows():
    z = torch.randn(30, 16, dtype=torch.float64).T.contiguous().T  # column-major storage
    y = _labels("mixed", 30, seed=1)
    want = ref.supcon_rows(z, y, 0.3)
    for dt in (torch.int64, torch.int32, torch.int16, torch.uint8):
        got = fused_supcon(z, (y - y.min()).to(dt), temperature=0.3, reduction="none")
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_fp64(normalize):
    (z,) = _inputs(9, 5, torch.float64, "cpu", seed=13, count=1, scale=0.5)
    y = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0, 5])
    for backend in ("cpu", "reference"):
        f = lambda a: fused_supcon(a, y, temperature=0.3, normalize=normalize,  # noqa: E731
                                   reduction="none", backend=backend)
        assert torch.autograd.gradcheck(f, (z.clone().requires_grad_(),))


def test_opcheck_ops():
    (z,) = _inputs(10, 5, torch.float64, "cpu", seed=17, count=1)
    y = torch.tensor([3, 1, 3, 2, 1, 1, 0, 3, 9, 2])
    ops = torch.ops.sslkernels
    for normalize in (True, False):
        torch.library.opcheck(ops.supcon_fwd.default, (z.clone().requires_grad_(), y, 2.0,
                                                       normalize))
        loss, lse = ops.supcon_fwd(z, y, 2.0, normalize)
        torch.library.opcheck(ops.supcon_bwd.default, (torch.rand_like(loss), z, y, loss, lse,
                                                       2.0, normalize))
        torch.library.opcheck(ops.supcon_slice_fwd.default,
                              (z.clone().requires_grad_(), y, 4, 5, 2.0, normalize))
        loss, lse = ops.supcon_slice_fwd(z, y, 4, 5, 2.0, normalize)
        torch.library.opcheck(ops.supcon_slice_bwd.default,
                              (torch.rand_like(loss), z, y, loss, lse, 4, 5, 2.0, normalize))


def test_op_outputs_follow_the_contract():
    """supcon_fwd's second output is each row's log-sum-exp over all other rows."""
    (z,) = _inputs(37, 6, torch.float64, "cpu", seed=19, count=1)
    y = _labels("mixed", 37, seed=2)
    loss, lse = torch.ops.sslkernels.supcon_fwd(z, y, 3.0, True)
    s = F.normalize(z, dim=1) @ F.normalize(z, dim=1).T * 3.0
    want = torch.logsumexp(s.masked_fill(torch.eye(37, dtype=torch.bool), float("-inf")), 1)
    torch.testing.assert_close(lse, want)
    torch.testing.assert_close(loss, ref.supcon_rows(z, y, 1 / 3.0))


def test_torch_compile_fullgraph():
    (z,) = _inputs(20, 8, torch.float32, "cpu", seed=19, count=1)
    y = _labels("views4", 20, seed=0)

    def step(a):
        return fused_supcon(a, y, temperature=0.2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = z.clone().requires_grad_()
    loss = compiled(a)
    (g,) = torch.autograd.grad(loss, a)
    loss2 = step(a)
    (g2,) = torch.autograd.grad(loss2, a)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(g, g2)


def test_torch_compile_inductor_module():
    feats = torch.randn(6, 3, 8)
    lin = torch.nn.Linear(8, 8)
    loss_fn = SupConLoss(temperature=0.1)
    model = lambda x: loss_fn(lin(x))  # noqa: E731
    out = torch.compile(model, fullgraph=True)(feats)
    out.backward()
    g = lin.weight.grad.clone()
    lin.weight.grad = None
    want = model(feats)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(g, lin.weight.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_reference():
    (z,) = _inputs(50, 12, torch.float32, "cuda", seed=23, count=1)
    y = _labels("mixed", 50, seed=3).cuda()
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = fused_supcon(a, y, temperature=0.2, reduction="none")
    want = fused_supcon(b, y, temperature=0.2, reduction="none", backend="reference")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), a),
                               torch.autograd.grad(want.sum(), b))


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 300), d=st.integers(1, 40), classes=st.integers(1, 400),
       temperature=st.sampled_from([0.05, 0.5, 5.0]), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(m, d, classes, temperature, seed):
    (z,) = _inputs(m, d, torch.float64, "cpu", seed=seed, count=1)
    y = torch.randint(0, classes, (m,), generator=torch.Generator().manual_seed(seed))
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = fused_supcon(a, y, temperature=temperature, reduction="none")
    want = ref.supcon_rows(b, y, temperature)
    torch.testing.assert_close(got, want)
    up = torch.rand(m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(torch.autograd.grad(got, a, up), torch.autograd.grad(want, b, up))


# ---------------------------------------------------------------------------------------------
# The slice op: one rank's rows against the gathered keys.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,off,n", [(1, 0, 1), (9, 3, 4), (40, 20, 20), (2100, 1020, 1000)])
def test_slice_matches_reference(device, dtype, m, off, n):
    (keys,) = _inputs(m, 33, dtype, device, seed=m + off, count=1)
    y = _labels("mixed", m, seed=m).to(device)
    k = keys.detach().requires_grad_()
    rows, _ = torch.ops.sslkernels.supcon_slice_fwd(k, y, off, n, 1 / 0.05, True)
    assert rows.shape == (n,) and torch.isfinite(rows).all()
    up = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (dk,) = torch.autograd.grad(rows, k, up.to(device, rows.dtype))
    assert dk.dtype == dtype and torch.isfinite(dk).all()
    fn = lambda x: ref.supcon_slice_rows(x, y, off, n, 0.05)  # noqa: E731
    (t_rows, t_grads), (r_rows, r_grads) = _truth_and_ref32(fn, [keys], up.to(device))
    _check(rows, t_rows, r_rows, dtype, "loss")
    _check(dk, t_grads[0], r_grads[0], dtype, "grad keys")


def test_slice_of_the_whole_batch_is_the_loss():
    (z,) = _inputs(77, 9, torch.float64, "cpu", seed=29, count=1)
    y = _labels("classes", 77, seed=4)
    rows, lse = torch.ops.sslkernels.supcon_slice_fwd(z, y, 0, 77, 4.0, True)
    want_rows, want_lse = torch.ops.sslkernels.supcon_fwd(z, y, 4.0, True)
    torch.testing.assert_close(rows, want_rows)
    torch.testing.assert_close(lse, want_lse)


def test_slice_bad_arguments():
    with pytest.raises(RuntimeError, match="inside the M"):
        torch.ops.sslkernels.supcon_slice_fwd(torch.randn(10, 3), torch.arange(10), 8, 3, 2.0,
                                              True)
    with pytest.raises(RuntimeError, match="n must be >= 1"):
        torch.ops.sslkernels.supcon_slice_fwd(torch.randn(10, 3), torch.arange(10), 0, 0, 2.0,
                                              True)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        torch.ops.sslkernels.supcon_fwd(torch.randn(10, 3), torch.arange(9), 2.0, True)


def test_gather_distributed_single_process_is_the_plain_loss():
    (z,) = _inputs(9, 5, torch.float64, "cpu", seed=31, count=1)
    y = _labels("mixed", 9, seed=1)
    torch.testing.assert_close(fused_supcon(z, y, gather_distributed=True), fused_supcon(z, y))


# ---------------------------------------------------------------------------------------------
# SupConLoss: SupContrast's interface and formulation.

def supcontrast_loss(features, labels=None, temperature=0.07, base_temperature=0.07):
    """HobbitLong/SupContrast's SupConLoss (contrast_mode="all"), formulation for formulation:
    view-major rows, logits minus their row max, a mask of same-label pairs without the
    diagonal, the log-probability of each positive, -(T / base_T) times its mean per anchor."""
    b, v = features.shape[:2]
    labels = torch.arange(b) if labels is None else labels
    mask = torch.eq(labels[:, None], labels[None, :]).float()
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = torch.matmul(contrast, contrast.T) / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(v, v)
    logits_mask = 1 - torch.eye(b * v)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("views", [2, 3])
def test_supconloss_equals_supcontrast(with_labels, views):
    """SupContrast expects normalized features (F.normalize in the model's head): the same
    head in front of both, ours normalizing again (a no-op on unit rows) or not."""
    g = torch.Generator().manual_seed(views)
    feats = torch.randn(12, views, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (12,), generator=g) if with_labels else None
    b = feats.clone().requires_grad_()
    theirs = supcontrast_loss(F.normalize(b, dim=-1), labels, temperature=0.1)
    (g_theirs,) = torch.autograd.grad(theirs, b)
    for normalize in (True, False):
        a = feats.clone().requires_grad_()
        ours = SupConLoss(temperature=0.1, normalize=normalize)(F.normalize(a, dim=-1), labels)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(torch.autograd.grad(ours, a)[0], g_theirs)


def test_supconloss_views_without_labels_is_multiview_simclr():
    feats = torch.randn(7, 4, 5, dtype=torch.float64)
    rows = SupConLoss(temperature=0.2, base_temperature=None, reduction="none")(feats)
    z = torch.cat(torch.unbind(feats, 1))
    torch.testing.assert_close(rows, fused_supcon(z, view_labels(7, 4), temperature=0.2,
                                                  reduction="none"))
    y = torch.arange(7) % 3
    torch.testing.assert_close(SupConLoss(temperature=0.2, base_temperature=None)(z, y.repeat(4)),
                               SupConLoss(temperature=0.2, base_temperature=None)(feats, y))


def test_supconloss_bad_arguments():
    with pytest.raises(ValueError, match="contrast_mode"):
        SupConLoss(contrast_mode="one")
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0)
    with pytest.raises(ValueError, match="need labels"):
        SupConLoss()(torch.randn(4, 3))
    with pytest.raises(ValueError, match="labels must be a"):
        SupConLoss()(torch.randn(4, 2, 3), torch.arange(5))
    with pytest.raises(ValueError, match="features must be"):
        SupConLoss()(torch.randn(4))


# ---------------------------------------------------------------------------------------------

class TestBadInput:
    def setup_method(self):
        self.z = torch.randn(4, 3)
        self.y = torch.tensor([0, 1, 0, 1])

    def test_labels(self):
        with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
            fused_supcon(self.z, [0, 1, 0, 1])
        with pytest.raises(TypeError, match="labels must have an integer dtype"):
            fused_supcon(self.z, self.y.float())
        with pytest.raises(TypeError, match="labels must have an integer dtype"):
            fused_supcon(self.z, self.y.bool())
        with pytest.raises(ValueError, match=r"labels must have shape \(M,\) = \(4,\)"):
            fused_supcon(self.z, torch.arange(5))
        with pytest.raises(ValueError, match="one device"):
            fused_supcon(self.z, torch.zeros(4, dtype=torch.long, device="meta"))

    def test_rows(self):
        with pytest.raises(ValueError, match="z must be 2-D"):
            fused_supcon(torch.randn(4), self.y)
        with pytest.raises(TypeError, match="z must have a floating-point dtype"):
            fused_supcon(self.y[:, None], self.y)
        with pytest.raises(ValueError, match="M = 0"):
            fused_supcon(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
        with pytest.raises(ValueError, match="D = 0"):
            fused_supcon(torch.randn(4, 0), self.y)

    @pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf"), "0.1"])
    def test_bad_temperature(self, t):
        with pytest.raises((ValueError, TypeError), match="temperature must be"):
            fused_supcon(self.z, self.y, temperature=t)

    def test_bad_reduction_and_backend(self):
        with pytest.raises(ValueError, match="reduction must be one of"):
            fused_supcon(self.z, self.y, reduction="avg")
        with pytest.raises(ValueError, match="backend must be one of"):
            fused_supcon(self.z, self.y, backend="tpu")


# ---------------------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent("""
    import re, sys, torch, sslkernels
    torch.manual_seed(0)
    m, d = int(sys.argv[1]), int(sys.argv[2])
    z = torch.randn(m, d, requires_grad=True)
    y = sslkernels.view_labels(m // 4, 4)
    sslkernels.fused_supcon(z[:64], y[:64]).backward()
    z.grad = None
    open("/proc/self/clear_refs", "w").write("5")
    hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
    base = hwm()
    loss = sslkernels.fused_supcon(z, y, temperature=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    print((hwm() - base) / 1024)
""")


@pytest.mark.slow
def test_memory_is_linear():
    """M = 32768 rows (V = 4): the logits would take 4 GiB; the fused loss must stay within
    64 MB of extra memory (the gradient of z and the sorted unit rows included)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "32768", "128"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    extra_mb = float(out.stdout.strip().splitlines()[-1])
    assert extra_mb <= 64, f"extra peak memory {extra_mb:.1f} MB"
