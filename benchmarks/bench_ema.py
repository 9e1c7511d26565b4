"""EMA of parameters: sslkernels.ema against the ways the popular code does it.

    pytest benchmarks/bench_ema.py --benchmark-only

Two parameter lists (float32), each with five variants measured side by side in one run:

* ``small``    - 2000 tensors of 512 elements (overhead-bound);
* ``resnet50`` - the 161 parameter shapes of torchvision's ResNet-50 (25.6M elements,
  bandwidth-bound).

Variants: ``loop`` (official MoCo: ``t.data = t.data * m + o.data * (1 - m)`` per parameter),
``foreach`` (``torch._foreach_lerp_``), ``ema_update_`` (sslkernels on the two lists), ``flat``
(sslkernels on two modules flattened by ``flatten_parameters_``: one lerp pass per buffer) and
``floor`` (one ``lerp_`` over two flat tensors of the same total size: the memory-traffic floor).

At the end of the module a table per group gives each variant's median time, its speed-up over
``loop`` and ``foreach``, its time relative to ``floor`` and the peak extra memory of one call
(CPU: the rise of the resident high-water mark; CUDA: ``max_memory_allocated``). The same numbers
go into each benchmark's ``extra_info``. Targets (DESIGN.md section 7), CPU: small list
``ema_update_`` >= 10x faster than ``foreach``; ResNet-50 >= 1.4x the loop, no slower than
``foreach``, <= 1.2x the floor. GPU variants run only where CUDA is available.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from sslkernels.ema import ema_update_, flatten_parameters_, is_flat

from conftest import machine, peak_extra_mib

MOMENTUM = 0.996
VARIANTS = ("loop", "foreach", "ema_update_", "flat", "floor")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


@functools.cache
def resnet50_shapes() -> tuple[tuple[int, ...], ...]:
    try:
        import torchvision
        model = torchvision.models.resnet50(weights=None)
        return tuple(tuple(p.shape) for p in model.parameters())
    except ImportError:  # pragma: no cover - torchvision is a dev dependency
        pytest.skip("needs torchvision for ResNet-50's parameter shapes")


def shapes(case: str) -> tuple[tuple[int, ...], ...]:
    return ((512,),) * 2000 if case == "small" else resnet50_shapes()


def make_lists(case: str, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device) for s in shapes(case)]


def make_variant(case: str, variant: str, device: str):
    """(function to time, objects to keep alive)."""
    online = make_lists(case, device, 1)
    target = make_lists(case, device, 0)
    m = MOMENTUM
    if variant == "loop":
        tparams = [nn.Parameter(t, requires_grad=False) for t in target]

        def fn():
            for t, o in zip(tparams, online):
                t.data = t.data * m + o.data * (1.0 - m)
        return fn, (tparams, online)
    if variant == "foreach":
        return (lambda: torch._foreach_lerp_(target, online, 1.0 - m)), (target, online)
    if variant == "ema_update_":
        return (lambda: ema_update_(target, online, m)), (target, online)
    if variant == "flat":
        mt = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in target])
        mo = nn.ParameterList([nn.Parameter(o) for o in online])
        flatten_parameters_(mt)
        flatten_parameters_(mo)
        assert is_flat(mt) and is_flat(mo)
        return (lambda: ema_update_(mt, mo, m)), (mt, mo)
    n = sum(t.numel() for t in target)
    ft, fo = torch.randn(n, device=device), torch.randn(n, device=device)
    del target, online
    return (lambda: ft.lerp_(fo, 1.0 - m)), (ft, fo)


RESULTS: dict[tuple[str, str], dict] = {}


def _fmt_mib(m):
    return "n/a" if m is None else f"{m:.1f} MiB"


class _Summary:
    """Prints the ratio table in pytest's terminal summary (next to pytest-benchmark's tables)."""

    def pytest_terminal_summary(self, terminalreporter):
        if RESULTS:
            terminalreporter.section("sslkernels EMA: ratios measured in this run")
            for line in summary_lines():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("sslk-ema-summary"):
        pm.register(_Summary(), "sslk-ema-summary")
    yield


def summary_lines() -> list[str]:
    lines = [f"machine: {machine()}"]
    for group in sorted({g for g, _ in RESULTS}):
        row = {v: RESULTS.get((group, v)) for v in VARIANTS}
        lines.append("")
        lines.append(f"[{group}]  {'variant':<12} {'median':>12}   {'vs loop':>8}  "
                     f"{'vs foreach':>10}  {'/ floor':>8}   peak extra")
        for v in VARIANTS:
            r = row[v]
            if r is None:
                continue
            t = r["median"]
            info = {
                "vs_loop": row["loop"]["median"] / t if row.get("loop") else None,
                "vs_foreach": row["foreach"]["median"] / t if row.get("foreach") else None,
                "over_floor": t / row["floor"]["median"] if row.get("floor") else None}
            r["bench"].extra_info.update(info)

            def fmt(x):
                return "       -" if x is None else f"{x:7.2f}x"
            lines.append(f"[{group}]  {v:<12} {t * 1e3:9.3f} ms   {fmt(info['vs_loop'])}  "
                         f"  {fmt(info['vs_foreach'])}  {fmt(info['over_floor'])}   "
                         f"{_fmt_mib(r['peak'])}")
    lines.append("")
    lines.append("targets (CPU): small ema_update_ vs foreach >= 10x; resnet50 ema_update_ vs "
                 "loop >= 1.4x, vs foreach >= 1.0x, / floor <= 1.2x")
    return lines


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["small", "resnet50"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_ema(benchmark, case, variant, device):
    group = f"ema-{case}-{device}"
    benchmark.group = group
    fn, keep = make_variant(case, variant, device)
    if device == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    fn()  # warm up (and build the cached plan of ema_update_)
    peak = peak_extra_mib(fn, device)
    benchmark.extra_info["peak_memory_MiB"] = None if peak is None else round(peak, 1)
    benchmark(fn)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to record
        return
    RESULTS[(group, variant)] = {"median": benchmark.stats.stats.median, "peak": peak,
                                 "bench": benchmark}
    del keep
