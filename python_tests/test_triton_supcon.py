"""Triton multi-positive InfoNCE kernels (sslkernels.triton_kernels.supcon) against the
plain-PyTorch reference and the C++ ops' contract. On CPU they run under the Triton interpreter
(small sizes; 32-row tiles and 16-feature chunks so masked edges, splits and chunked D all run);
on a GPU the same tests run the compiled kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import triton_interpreter_problem  # noqa: E402
from sslkernels import fused_info_nce, fused_supcon, view_labels  # noqa: E402
from sslkernels.info_nce import triton_available  # noqa: E402
from sslkernels.reference import supcon as ref  # noqa: E402

if not triton_available():
    pytest.skip("triton >= 3.6 is not installed", allow_module_level=True)

from sslkernels.supcon import _triton_ops  # noqa: E402
from sslkernels.triton_kernels import supcon as K  # noqa: E402
from test_triton_info_nce import DEVICE, REL, assert_close, make  # noqa: E402

if DEVICE == "cpu" and (os.environ.get("TRITON_INTERPRET") != "1"
                        or triton_interpreter_problem()):
    pytest.skip(triton_interpreter_problem() or "TRITON_INTERPRET is not 1",
                allow_module_level=True)

ops = _triton_ops()


def labels(layout, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "views2":
        return torch.arange(m) % max(1, (m + 1) // 2)
    if layout == "views4":
        return torch.arange(m) % max(1, (m + 3) // 4)
    if layout == "classes":
        return torch.randint(0, 3, (m,), generator=g) * 1000 - 7
    if layout == "one":
        return torch.zeros(m, dtype=torch.long)
    if layout == "unique":
        return torch.randperm(m, generator=g) * 10**12
    if layout == "mixed":
        base = torch.arange(m) // 3
        alone = torch.rand(m, generator=g) < 0.2
        base[alone] = -1 - torch.arange(int(alone.sum()))
        return base[torch.randperm(m, generator=g)]
    raise ValueError(layout)


def truth(z, y, temperature, normalize, g):
    a = z.detach().double().requires_grad_()
    rows = ref.supcon_rows(a, y, temperature, normalize)
    (rows * g.double()).sum().backward()
    return rows.detach(), a.grad


def check(m, d, layout, temperature, dtype, rel, normalize=True, seed=0, grad_rel=None):
    z = make(m, d, dtype, normalize, seed)
    y = labels(layout, m, seed).to(DEVICE)
    g = torch.randn(m, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64).to(DEVICE)
    inv_t = 1.0 / temperature
    loss, lse = ops.supcon_fwd(z, y, inv_t, normalize)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and lse.dtype == torch.float64 and loss.shape == (m,)
    e_loss, e_dz = truth(z, y, temperature, normalize, g)
    assert_close(loss, e_loss, rel, inv_t)
    dz = ops.supcon_bwd(g.to(acc), z, y, loss, lse, inv_t, normalize)
    assert dz.dtype == dtype and dz.shape == z.shape
    grad_rel, grad_inv_t = (grad_rel, 1.0) if grad_rel else (rel, inv_t)
    assert_close(dz, e_dz, grad_rel, grad_inv_t)
    return loss, lse


CASES = [  # (M, D, layout, temperature, normalize): M = 130 spans five 32-row tiles
    (1, 3, "unique", 0.5, True), (2, 1, "views2", 0.1, True), (9, 33, "mixed", 0.01, True),
    (64, 5, "views4", 0.5, False), (130, 33, "classes", 0.1, True), (65, 16, "unique", 1.0, True),
    (40, 8, "one", 0.2, True), (17, 150, "mixed", 0.1, True),
]


@pytest.mark.parametrize("m,d,layout,temperature,normalize", CASES)
def test_fp64_matches_reference(m, d, layout, temperature, normalize):
    check(m, d, layout, temperature, torch.float64, REL[torch.float64], normalize)


@pytest.mark.parametrize("m,d,layout,temperature,normalize", CASES[1:6])
def test_fp32_matches_reference(m, d, layout, temperature, normalize):
    check(m, d, layout, temperature, torch.float32, REL[torch.float32], normalize)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.01, 0.2])
def test_half_within_reference_error(dtype, temperature):
    # Against the fp64 truth on the same half inputs, within 2x the reference's own error in
    # that dtype (the reference computed in bf16/fp16, as a plain-PyTorch user would).
    m, d = 48, 33
    z = make(m, d, dtype, True, 3)
    y = labels("views4", m).to(DEVICE)
    g = torch.full((m,), 1.0 / m, dtype=torch.float64, device=DEVICE)
    t_loss, t_dz = truth(z, y, temperature, True, g)
    r = z.clone().requires_grad_()
    r_loss = ref.supcon_rows(r, y, temperature, True)
    (r_loss.float() * g.float()).sum().backward()
    inv_t = 1.0 / temperature
    loss, lse = ops.supcon_fwd(z, y, inv_t, True)
    dz = ops.supcon_bwd(g.float(), z, y, loss, lse, inv_t, True)
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    assert torch.isfinite(loss).all() and torch.isfinite(dz).all()
    assert err(loss, t_loss) <= 2 * err(r_loss, t_loss) + 1e-6 * inv_t
    assert err(dz, t_dz) <= 2 * err(r.grad, t_dz) + 1e-5


def test_same_contract_as_the_cpu_ops():
    z = make(37, 20, torch.float64, True, 5)
    y = labels("mixed", 37, 5).to(DEVICE)
    loss, lse = ops.supcon_fwd(z, y, 5.0, True)
    c_loss, c_lse = torch.ops.sslkernels.supcon_fwd(z.cpu(), y.cpu(), 5.0, True)
    assert_close(loss, c_loss.to(DEVICE), 1e-12, 5.0)
    assert_close(lse, c_lse.to(DEVICE), 1e-12, 5.0)
    g = torch.randn(37, dtype=torch.float64)
    dz = ops.supcon_bwd(g.to(DEVICE), z, y, loss, lse, 5.0, True)
    c_dz = torch.ops.sslkernels.supcon_bwd(g, z.cpu(), y.cpu(), c_loss, c_lse, 5.0, True)
    assert_close(dz, c_dz.to(DEVICE), 1e-12, 5.0)
    e = z[:0]
    loss, lse = ops.supcon_fwd(e, y[:0], 5.0, True)
    assert loss.shape == lse.shape == (0,)


def test_two_views_equal_the_pair_kernel():
    # Labels = image index of 2 views: the SupCon kernels give the two-view NT-Xent rows.
    n, d = 21, 33
    z0, z1 = make(n, d, torch.float32, True, 7), make(n, d, torch.float32, True, 8)
    z = torch.cat([z0, z1])
    rows = fused_supcon(z, view_labels(n, 2, DEVICE), temperature=0.1, reduction="none",
                        backend="triton")
    want = fused_info_nce(z0, z1, temperature=0.1, reduction="none", backend="triton")
    assert_close(rows, want, REL[torch.float32], 10.0)


def test_public_function_and_opcheck():
    z = make(30, 7, torch.float64, True, 9)
    y = labels("views4", 30).to(DEVICE)
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = fused_supcon(a, y, temperature=0.2, reduction="mean", backend="triton")
    want = fused_supcon(b, y, temperature=0.2, reduction="mean", backend="reference")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, a), torch.autograd.grad(want, b))
    torch.library.opcheck(ops.supcon_fwd.default, (z.clone().requires_grad_(), y, 5.0, True))


def test_gpu_plans_are_all_in_the_gate():
    gated = {(l.plan.kernel.fn.__name__, tuple(sorted(l.plan.constexprs.items())),
              l.plan.num_warps, l.plan.num_stages) for l in K.specializations()}
    for dt in K.DTYPES:
        for d in (1, 3, 64, 128, 129, 500, 1024):
            for plan in (K.supcon_fwd_plan(dt, d), K.supcon_grad_plan(dt, d)):
                key = (plan.kernel.fn.__name__, tuple(sorted(plan.constexprs.items())),
                       plan.num_warps, plan.num_stages)
                assert key in gated
