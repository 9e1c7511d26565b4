"""Benchmarks of the MoCo queue step (pytest-benchmark): run them side by side in one process.

    PYTHONPATH=. pytest benchmarks/bench_queue.py --benchmark-only

* the MoCo loss step with a K = 65536, D = 128 queue and N = 256 queries, forward + backward +
  enqueue: the official builder (``queue.clone()`` + einsum + cat + cross_entropy, then the
  official ``_dequeue_and_enqueue``) against :class:`NegativeQueue` + ``fused_info_nce``;
* the two GEMMs the step cannot avoid - (N x D) @ (D x K) for the logits and (N x K) @ (K x D)
  for the gradient - timed in the same run as the floor;
* enqueue alone at K = 4096 and K = 65536 (its cost must not depend on K).

A summary at the end of the module prints the ratios (medians) and the peak memory of each
step (CPU: growth of the process's peak RSS over one step, which misses memory the allocator
reuses, so it is a lower bound; CUDA: ``torch.cuda.max_memory_allocated`` over the step).
Targets (DESIGN.md section 7): builder / ours >= 2, ours / GEMMs <= 1.5, enqueue
K=65536 / K=4096 <= 1.2. CUDA variants skip without a GPU.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from sslkernels import _ext
from sslkernels.info_nce import fused_info_nce
from sslkernels.queue import NegativeQueue

from conftest import peak_extra_mib

K, D, N, T = 65536, 128, 256, 0.2
HAS_CUDA = torch.cuda.is_available() and _ext.cuda_built()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA,
                                                                 reason="needs CUDA"))]
STEP_ROUNDS = 12
ENQUEUE_ROUNDS, ENQUEUE_ITERS = 40, 50


# ---------------------------------------------------------------------------------------------
# Measurement helpers

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Results:
    def __init__(self):
        self.median: dict[str, float] = {}
        self.memory: dict[str, float | None] = {}
        self.interleaved: dict[str, float] = {}

    def record(self, name, benchmark, fn, device):
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            self.median[name] = stats.stats.median
        mem = peak_extra_mib(fn, device)
        self.memory[name] = mem
        benchmark.extra_info["peak_memory_MiB"] = None if mem is None else round(mem, 1)

    def ratio(self, a, b):
        if a in self.median and b in self.median:
            return self.median[a] / self.median[b]
        return None


@pytest.fixture(scope="module")
def results(request):
    res = Results()
    yield res
    lines = [f"queue benchmarks on {platform.machine()} {platform.processor() or ''}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads"
             + (f", {torch.cuda.get_device_name()}" if HAS_CUDA else "")]
    for name in res.median:
        mem = res.memory.get(name)
        lines.append(f"  {name:28s} median {res.median[name] * 1e3:9.3f} ms   peak memory "
                     + ("n/a" if mem is None else f"{mem:8.1f} MiB"))
    for dev in ("cpu", "cuda"):
        checks = [
            ("builder / ours (loss step)", res.ratio(f"builder_step[{dev}]", f"ours_step[{dev}]"),
             ">= 2"),
            ("ours / two GEMMs", res.ratio(f"ours_step[{dev}]", f"gemms[{dev}]"), "<= 1.5"),
            ("builder / two GEMMs", res.ratio(f"builder_step[{dev}]", f"gemms[{dev}]"), ""),
            ("enqueue K=65536 / K=4096", res.ratio(f"enqueue_K65536[{dev}]",
                                                   f"enqueue_K4096[{dev}]"), "<= 1.2"),
        ]
        if dev in res.interleaved:
            checks.append(("enqueue K ratio, interleaved", res.interleaved[dev], "<= 1.2"))
        for label, r, target in checks:
            if r is not None:
                lines.append(f"  [{dev}] {label:28s} {r:6.2f}   target {target}")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The MoCo step

def _inputs(device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(N, D, device=device, generator=g).requires_grad_()
    k = torch.randn(N, D, device=device, generator=g)
    return q, k


class BuilderQueue:
    """facebookresearch/moco builder.py: (D, K) queue, clone per step, host pointer, assert."""

    def __init__(self, device):
        self.queue = F.normalize(torch.randn(D, K, device=device), dim=0)
        self.queue_ptr = torch.zeros(1, dtype=torch.long, device=device)

    def step(self, q_raw, k_raw):
        q = F.normalize(q_raw, dim=1)
        with torch.no_grad():
            k = F.normalize(k_raw, dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        F.cross_entropy(logits, labels).backward()
        self._dequeue_and_enqueue(k)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert K % batch_size == 0
        self.queue[:, ptr:ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % K


@pytest.mark.parametrize("device", DEVICES)
def test_gemms(benchmark, results, device):
    """The floor: the logits GEMM and the gradient GEMM of one step."""
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(N, D, device=device, generator=g)
    neg = torch.randn(K, D, device=device, generator=g)
    p = torch.randn(N, K, device=device, generator=g)
    logits = torch.empty(N, K, device=device)  # preallocated: time the products, not page faults
    grad = torch.empty(N, D, device=device)

    def fn():
        torch.mm(q, neg.T, out=logits)   # (256 x 128) @ (128 x 65536)
        torch.mm(p, neg, out=grad)       # (256 x 65536) @ (65536 x 128)
        _sync(device)

    benchmark.pedantic(fn, rounds=STEP_ROUNDS, warmup_rounds=1)
    results.record(f"gemms[{device}]", benchmark, fn, device)


@pytest.mark.parametrize("device", DEVICES)
def test_builder_step(benchmark, results, device):
    """Official MoCo: clone + einsum + cat + cross_entropy + backward + enqueue."""
    torch.manual_seed(2)
    builder = BuilderQueue(device)
    q, k = _inputs(device)

    def fn():
        q.grad = None
        builder.step(q, k)
        _sync(device)

    benchmark.pedantic(fn, rounds=STEP_ROUNDS, warmup_rounds=1)
    results.record(f"builder_step[{device}]", benchmark, fn, device)


@pytest.mark.parametrize("device", DEVICES)
def test_ours_step(benchmark, results, device):
    """NegativeQueue + fused_info_nce: forward + backward + enqueue, the queue read in place."""
    torch.manual_seed(2)
    queue = NegativeQueue(K, D, device=device)
    q, k = _inputs(device)

    def fn():
        q.grad = None
        fused_info_nce(q, k, negatives=queue.negatives, temperature=T).backward()
        queue.enqueue(k)
        _sync(device)

    benchmark.pedantic(fn, rounds=STEP_ROUNDS, warmup_rounds=1)
    results.record(f"ours_step[{device}]", benchmark, fn, device)


# ---------------------------------------------------------------------------------------------
# Enqueue alone

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [4096, 65536])
def test_enqueue(benchmark, results, device, size):
    """One enqueue of N = 256 keys (normalized on the way in), cycling through the ring."""
    queue = NegativeQueue(size, D, device=device)
    keys = torch.randn(N, D, device=device)

    def fn():
        queue.enqueue(keys)

    def timed():
        fn()
        _sync(device)

    benchmark.pedantic(timed, rounds=ENQUEUE_ROUNDS, iterations=ENQUEUE_ITERS,
                       warmup_rounds=1)
    results.record(f"enqueue_K{size}[{device}]", benchmark, timed, device)


@pytest.mark.parametrize("device", DEVICES)
def test_enqueue_ratio_interleaved(benchmark, results, device):
    """K = 65536 / K = 4096 measured in alternating bursts (robust to a shared machine's drift):
    the median over rounds of the per-round ratio. The benchmarked call is the K = 65536 one."""
    queues = {size: NegativeQueue(size, D, device=device) for size in (4096, 65536)}
    keys = torch.randn(N, D, device=device)
    for q in queues.values():
        for _ in range(300):
            q.enqueue(keys)
    ratios = []
    for _ in range(ENQUEUE_ROUNDS * 2):
        t = {}
        for size, q in queues.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(ENQUEUE_ITERS // 2):
                q.enqueue(keys)
            _sync(device)
            t[size] = time.perf_counter() - t0
        ratios.append(t[65536] / t[4096])
    ratio = statistics.median(ratios)
    results.interleaved[device] = ratio
    benchmark.extra_info["K65536_over_K4096"] = round(ratio, 3)

    def timed():
        queues[65536].enqueue(keys)
        _sync(device)

    benchmark.pedantic(timed, rounds=ENQUEUE_ROUNDS, iterations=ENQUEUE_ITERS)
