"""Tests of sslkernels.queue.NegativeQueue and the queue_enqueue_ op.

Oracles: the official MoCo ``_dequeue_and_enqueue`` (written below in plain torch) where it is
defined (K % B == 0), and a key-by-key Python ring buffer everywhere else.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from sslkernels import _ext
from sslkernels.info_nce import fused_info_nce
from sslkernels.queue import NegativeQueue
from sslkernels.reference.info_nce import info_nce_negatives_rows

HAS_CUDA = torch.cuda.is_available() and _ext.cuda_built()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA,
                                                                 reason="needs CUDA"))]
REDUCED = [torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# Oracles

class OfficialMoCoQueue:
    """facebookresearch/moco builder.py's queue, single process: (D, K) columns, host pointer."""

    def __init__(self, dim, K):
        self.K = K
        self.queue = F.normalize(torch.randn(dim, K), dim=0)
        self.queue_ptr = torch.zeros(1, dtype=torch.long)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0  # for simplicity
        self.queue[:, ptr:ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.K
        self.queue_ptr[0] = ptr


class RingModel:
    """Key-by-key ring buffer: key i of a batch goes to slot ptr, then ptr += 1 (mod K)."""

    def __init__(self, queue: NegativeQueue):
        self.buf = queue.buffer.detach().cpu().clone()
        self.ptr = int(queue.ptr)
        self.fill = int(queue.fill)
        self.normalize = queue.normalize

    def enqueue(self, keys):
        keys = keys.detach().cpu()
        dt = self.buf.dtype
        acc = torch.float64 if torch.float64 in (keys.dtype, dt) else torch.float32
        rows = keys.to(acc)
        if self.normalize:
            rows = F.normalize(rows, dim=1, eps=1e-12)
        for row in rows.to(dt):
            self.buf[self.ptr] = row
            self.ptr = (self.ptr + 1) % self.buf.shape[0]
            self.fill = min(self.buf.shape[0], self.fill + 1)


def assert_matches(queue: NegativeQueue, model: RingModel):
    dt = queue.buffer.dtype
    tol = dict(rtol=torch.finfo(dt).eps, atol=1e-6) if dt != torch.float64 else dict(rtol=1e-14,
                                                                                     atol=1e-15)
    torch.testing.assert_close(queue.buffer.cpu().float(), model.buf.float(), **tol)
    assert int(queue.ptr) == model.ptr
    assert int(queue.fill) == model.fill


def snapshot(queue):
    return {n: t.clone() for n, t in queue.state_dict().items()}


def assert_untouched(queue, before):
    for name, t in queue.state_dict().items():
        assert torch.equal(t, before[name]), f"{name} was modified"


# ---------------------------------------------------------------------------------------------
# Semantics

@pytest.mark.parametrize("normalize", [False, True])
def test_matches_official_moco_when_k_divisible(normalize):
    torch.manual_seed(0)
    K, D, B = 48, 8, 8
    official = OfficialMoCoQueue(D, K)
    queue = NegativeQueue(K, D, normalize=normalize)
    queue.buffer.copy_(official.queue.T)
    for _ in range(11):  # wraps around
        keys = F.normalize(torch.randn(B, D), dim=1)  # MoCo's key encoder normalizes
        official._dequeue_and_enqueue(keys)
        queue.enqueue(keys)
        if normalize:
            torch.testing.assert_close(queue.buffer, official.queue.T, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(queue.buffer, official.queue.T)
        assert int(queue.ptr) == int(official.queue_ptr)
    # Where the official code stops (K % B != 0), the queue goes on.
    with pytest.raises(AssertionError):
        official._dequeue_and_enqueue(torch.randn(5, D))
    queue.enqueue(torch.randn(5, D))
    assert int(queue.ptr) == (11 * B + 5) % K


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,D,batches", [
    (10, 3, [3, 3, 3, 3, 7]),     # B does not divide K
    (10, 4, [25, 4, 12]),         # B > K, not a multiple: keeps the last K, in ring order
    (10, 5, [10, 10, 3, 10]),     # B = K, from 0 and from mid-ring
    (7, 2, [1] * 16),             # B = 1
    (64, 129, [300, 17, 64]),     # rows split over threads; odd width
    (1, 3, [1, 4]),               # K = 1
])
def test_wraparound_vs_ring_model(device, K, D, batches):
    torch.manual_seed(1)
    queue = NegativeQueue(K, D, device=device, init="empty")
    model = RingModel(queue)
    for b in batches:
        keys = torch.randn(b, D, device=device) * 3
        queue.enqueue(keys)
        model.enqueue(keys)
        assert_matches(queue, model)


@settings(max_examples=25, deadline=None)
@given(K=st.integers(1, 40), D=st.integers(1, 9),
       batches=st.lists(st.integers(1, 90), min_size=1, max_size=6),
       init=st.sampled_from(["random", "empty"]), normalize=st.booleans())
def test_ring_model_property(K, D, batches, init, normalize):
    queue = NegativeQueue(K, D, init=init, normalize=normalize)
    model = RingModel(queue)
    g = torch.Generator().manual_seed(K * 1000 + D)
    for b in batches:
        keys = torch.randn(b, D, generator=g)
        queue.enqueue(keys)
        model.enqueue(keys)
    assert_matches(queue, model)
    # The filled rows are a prefix; negatives_filled() is that prefix as a view.
    filled = queue.negatives_filled()
    assert filled.shape == (model.fill, D)
    assert filled.data_ptr() == queue.buffer.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reduced_storage_dtypes(device, dtype, key_dtype):
    torch.manual_seed(2)
    queue = NegativeQueue(13, 33, dtype=dtype, device=device)
    model = RingModel(queue)
    for b in (5, 9, 20):
        keys = (torch.randn(b, 33) * 4).to(key_dtype).to(device)
        queue.enqueue(keys)
        model.enqueue(keys)
        assert queue.buffer.dtype == dtype
        assert_matches(queue, model)


@pytest.mark.parametrize("device", DEVICES)
def test_double_storage_is_exact_to_fp64(device):
    queue = NegativeQueue(6, 5, dtype=torch.float64, device=device, init="empty")
    model = RingModel(queue)
    keys = torch.randn(8, 5, dtype=torch.float64, device=device)
    queue.enqueue(keys)
    model.enqueue(keys)
    assert_matches(queue, model)


def test_init_modes():
    torch.manual_seed(3)
    q = NegativeQueue(50, 7)
    torch.testing.assert_close(q.buffer.norm(dim=1), torch.ones(50))
    assert int(q.fill) == 50 and int(q.ptr) == 0
    assert q.negatives_filled().shape == (50, 7)
    e = NegativeQueue(50, 7, dtype=torch.bfloat16, init="empty")
    assert not e.buffer.any() and int(e.fill) == 0 and e.buffer.dtype == torch.bfloat16
    assert e.negatives_filled().shape == (0, 7)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(NegativeQueue(9, 4, generator=g1).buffer,
                       NegativeQueue(9, 4, generator=g2).buffer)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert set(NegativeQueue(4, 3, dtype=dt).state_dict()) == {"buffer", "ptr", "fill"}


def test_negatives_is_the_buffer():
    q = NegativeQueue(32, 4)
    assert q.negatives is q.buffer
    q.enqueue(torch.randn(5, 4))
    assert q.negatives.data_ptr() == q.buffer.data_ptr()


def test_state_dict_round_trip_mid_wrap():
    torch.manual_seed(4)
    a = NegativeQueue(10, 6, dtype=torch.bfloat16, init="empty")
    a.enqueue(torch.randn(7, 6))
    a.enqueue(torch.randn(6, 6))  # wrapped: ptr 3, fill 10
    f = io.BytesIO()
    torch.save(a.state_dict(), f)
    f.seek(0)
    b = NegativeQueue(10, 6, dtype=torch.bfloat16, init="random")
    b.load_state_dict(torch.load(f))
    assert int(b.ptr) == 3 and int(b.fill) == 10
    assert torch.equal(a.buffer, b.buffer)
    for _ in range(3):
        keys = torch.randn(4, 6)
        a.enqueue(keys)
        b.enqueue(keys)
        assert torch.equal(a.buffer, b.buffer) and torch.equal(a.ptr, b.ptr)
    # A partly filled queue restores its fill count, and negatives_filled follows it.
    c = NegativeQueue(10, 6, init="empty")
    c.enqueue(torch.randn(4, 6))
    d = NegativeQueue(10, 6, init="random")
    d.load_state_dict(c.state_dict())
    assert d.negatives_filled().shape == (4, 6)
    assert torch.equal(d.negatives_filled(), c.negatives_filled())


def test_gather_without_process_group_enqueues_local_keys():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    a, b = NegativeQueue(8, 3, init="empty"), NegativeQueue(8, 3, init="empty")
    keys = torch.randn(5, 3)
    a.enqueue(keys, gather=True)
    b.enqueue(keys)
    assert torch.equal(a.buffer, b.buffer) and torch.equal(a.ptr, b.ptr)


def test_keys_requiring_grad_are_not_tracked():
    q = NegativeQueue(8, 3)
    k = torch.randn(4, 3, requires_grad=True)
    q.enqueue(k * 2)
    assert not q.buffer.requires_grad and q.buffer.grad_fn is None


# ---------------------------------------------------------------------------------------------
# The loss step with queue negatives

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,qdtype,tol", [
    (torch.float64, torch.float64, 1e-10),
    (torch.float32, torch.float32, 2e-5),
    (torch.bfloat16, torch.float32, 2e-5),
])
def test_loss_with_queue_matches_moco_reference(device, dtype, qdtype, tol):
    torch.manual_seed(5)
    N, D, K, T = 6, 16, 40, 0.2
    queue = NegativeQueue(K, D, dtype=dtype, device=device, init="empty")
    queue.enqueue(torch.randn(23, D, device=device))
    queue.enqueue(torch.randn(30, D, device=device))  # wrapped, ptr 13
    q0 = torch.randn(N, D, dtype=qdtype, device=device)
    k0 = torch.randn(N, D, dtype=qdtype, device=device)
    q1, k1 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    q2, k2 = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    ours = fused_info_nce(q1, k1, negatives=queue.negatives, temperature=T)
    ref = info_nce_negatives_rows(q2, k2, queue.buffer, T).mean()
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(q1.grad, q2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(k1.grad, k2.grad, rtol=tol, atol=tol)


class AllocationProbe(TorchDispatchMode):
    """Records every op run while active (forward and backward) and the largest new storage (in
    bytes) that any of them returned; views of their inputs do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_loss_step_makes_no_queue_copy():
    torch.manual_seed(6)
    N, D, K = 8, 32, 4096
    queue = NegativeQueue(K, D)
    q = torch.randn(N, D, requires_grad=True)
    k = torch.randn(N, D)

    with AllocationProbe() as probe:
        fused_info_nce(q, k, negatives=queue.negatives, temperature=0.2).backward()
        queue.enqueue(k)
    kd_bytes = K * D * queue.buffer.element_size()
    assert probe.largest < kd_bytes // 8  # O(N*D) tensors only, never K x D (or N x K)
    fwd = [a for f, a in probe.calls if "info_nce_neg_fwd" in str(f)]
    assert len(fwd) == 1 and fwd[0][2].data_ptr() == queue.buffer.data_ptr()

    # The probe catches the builder's step (queue.clone() + einsum + cat): it can fail.
    with AllocationProbe() as probe:
        neg = queue.buffer.T.clone().detach()
        logits = torch.cat([torch.einsum("nc,nc->n", q, k)[:, None],
                            torch.einsum("nc,ck->nk", q, neg)], dim=1) / 0.2
        F.cross_entropy(logits, torch.zeros(N, dtype=torch.long)).backward()
    assert probe.largest >= kd_bytes


# ---------------------------------------------------------------------------------------------
# No host synchronization

def test_enqueue_on_meta_never_reads_values():
    # Any host read (.item(), int(), bool(), Python branching on values) of a meta tensor raises.
    queue = NegativeQueue(16, 4, device="meta", init="empty")
    for b in (5, 20, 3):
        queue.enqueue(torch.empty(b, 4, device="meta"), gather=True)
    assert queue.ptr.device.type == "meta" and queue.fill.device.type == "meta"
    # The filled prefix is known from the batch shapes: no read of `fill` either.
    assert queue.negatives_filled().shape == (16, 4)
    partial = NegativeQueue(16, 4, device="meta", init="empty")
    partial.enqueue(torch.empty(5, 4, device="meta"))
    assert partial.negatives_filled().shape == (5, 4)


def test_enqueue_compiles_fullgraph():
    torch.manual_seed(7)
    eager = NegativeQueue(10, 4, init="empty")
    compiled = NegativeQueue(10, 4, init="empty")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(queue, keys):
        queue.enqueue(keys)

    for b in (3, 3, 7, 3):
        keys = torch.randn(b, 4)
        eager.enqueue(keys)
        step(compiled, keys)
        assert torch.equal(eager.buffer, compiled.buffer)
        assert torch.equal(eager.ptr, compiled.ptr) and torch.equal(eager.fill, compiled.fill)
    # After compiled enqueues the host count is unknown; one read of `fill` restores it.
    assert torch.equal(compiled.negatives_filled(), eager.negatives_filled())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,B,dtype,normalize", [
    (7, 3, torch.float32, True), (5, 12, torch.bfloat16, True), (4, 4, torch.float16, False)])
def test_opcheck(device, K, B, dtype, normalize):
    buf = torch.randn(K, 6, device=device).to(dtype)
    ptr = torch.tensor(K - 1, device=device)
    fill = torch.tensor(2, device=device)
    keys = torch.randn(B, 6, device=device)
    torch.library.opcheck(torch.ops.sslkernels.queue_enqueue_, (buf, ptr, fill, keys, normalize))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error and nothing modified

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_keys,exc,match", [
    (lambda dev: torch.randn(4, 5, device=dev), ValueError, "width D = 6"),
    (lambda dev: torch.randn(4, 6, 1, device=dev), ValueError, "keys must be 2-D"),
    (lambda dev: torch.randn(6, device=dev), ValueError, "keys must be 2-D"),
    (lambda dev: torch.ones(4, 6, dtype=torch.long, device=dev), TypeError, "floating-point"),
    (lambda dev: torch.randn(0, 6, device=dev), ValueError, "B >= 1"),
    (lambda dev: torch.randn(4, 6, device="meta"), ValueError, "queue's device"),
    (lambda dev: [[0.0] * 6], TypeError, "keys must be a torch.Tensor"),
])
def test_bad_keys_raise_before_any_write(device, make_keys, exc, match):
    queue = NegativeQueue(10, 6, device=device)
    queue.enqueue(torch.randn(3, 6, device=device))
    before = snapshot(queue)
    with pytest.raises(exc, match=match):
        queue.enqueue(make_keys(device))
    assert_untouched(queue, before)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_keys(device):
    queue = NegativeQueue(10, 4, device=device)
    before = snapshot(queue)
    bad = torch.randn(3, 4, device=device)
    bad[1, 2] = float("nan")
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        queue.enqueue(bad, check_finite=True)
    assert_untouched(queue, before)
    # Default: stored as they are (no sync); the NaN row is NaN, loudly.
    queue.enqueue(bad)
    assert torch.isnan(queue.buffer[1]).all() and torch.isfinite(queue.buffer[0]).all()
    assert int(queue.ptr) == 3


def test_direct_op_call_checks_arguments():
    buf, ptr, fill = torch.zeros(5, 3), torch.tensor(0), torch.tensor(0)
    with pytest.raises(RuntimeError, match="width D = 3"):
        torch.ops.sslkernels.queue_enqueue_(buf, ptr, fill, torch.ones(2, 4), True)
    with pytest.raises(RuntimeError, match="0-d int64"):
        torch.ops.sslkernels.queue_enqueue_(buf, torch.tensor([0]), fill, torch.ones(2, 3), True)
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.sslkernels.queue_enqueue_(buf, ptr, fill, buf[1:3], True)
    assert not buf.any() and int(ptr) == 0
    # A corrupted pointer is wrapped into range, never written out of bounds.
    bad_ptr = torch.tensor(-1)
    torch.ops.sslkernels.queue_enqueue_(buf, bad_ptr, fill, torch.ones(2, 3), False)
    assert int(bad_ptr) == 1 and buf[4].eq(1).all() and buf[0].eq(1).all()


@pytest.mark.parametrize("kwargs,exc", [
    (dict(size=0, dim=4), ValueError), (dict(size=4, dim=0), ValueError),
    (dict(size=4, dim=4, dtype=torch.int32), TypeError),
    (dict(size=4, dim=4, init="zeros"), ValueError)])
def test_bad_constructor_arguments(kwargs, exc):
    with pytest.raises(exc):
        NegativeQueue(**kwargs)


# ---------------------------------------------------------------------------------------------
# Distributed: two gloo processes on CPU

def _gather_keys(step: int, rank: int) -> torch.Tensor:
    return torch.full((2, 3), float(10 * step + rank)) + torch.arange(3.0)


def _gather_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        queue = NegativeQueue(10, 3, init="empty")
        for step in range(3):  # 3 steps x 2 ranks x 2 keys wraps a K = 10 queue
            queue.enqueue(_gather_keys(step, rank), gather=True)
        torch.save(queue.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or sys.platform != "linux",
                    reason="needs torch.distributed and fork")
def test_gather_two_gloo_ranks_hold_the_same_queue():
    import torch.multiprocessing as mp

    # fork, not spawn: the workers start with torch already imported (spawn costs seconds of
    # imports per process). They run no intra-op parallel region, so fork is safe.
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_gather_worker, args=(2, os.path.join(tmp, "init"), tmp),
                                 nprocs=2, join=False, start_method="fork")
        deadline = time.monotonic() + 60
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("gloo workers did not finish within 60 s")
        states = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    model = RingModel(NegativeQueue(10, 3, init="empty"))
    for step in range(3):
        model.enqueue(torch.cat([_gather_keys(step, r) for r in range(2)]))
    for s in states:
        torch.testing.assert_close(s["buffer"], model.buf)
        assert int(s["ptr"]) == model.ptr and int(s["fill"]) == model.fill
