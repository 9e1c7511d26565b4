"""Benchmark plumbing: every benchmark records its median under (group, name); at the end of the
session each group prints its ratios to the group's baseline, measured in the same run, next to
the peak memory and the machine. Ratios, not absolute times, are what to compare across runs."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

_RESULTS: dict[str, dict[str, float]] = defaultdict(dict)
_NOTES: dict[str, list[str]] = defaultdict(list)
_BASELINES: dict[str, list[str]] = {}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


class Recorder:
    """Wraps pytest-benchmark's fixture: ``rec(group, name, fn)`` times fn and records it."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def __call__(self, group: str, name: str, fn, *, baselines=(), rounds=None, warmup=1):
        self.benchmark.group = group
        self.benchmark.name = name
        if baselines:
            _BASELINES[group] = list(baselines)
        for _ in range(warmup):
            fn()
        if rounds:
            self.benchmark.pedantic(fn, rounds=rounds, iterations=1)
        else:
            self.benchmark(fn)
        _RESULTS[group][name] = self.benchmark.stats.stats.median
        self.benchmark.extra_info["machine"] = machine()


@pytest.fixture
def rec(benchmark):
    return Recorder(benchmark)


def note(group: str, text: str) -> None:
    _NOTES[group].append(text)


def peak_memory_mb(code: str, *args: str) -> float:
    """Peak resident memory a snippet adds over its own warm-up, measured in a fresh process:
    the snippet prints nothing and defines ``setup()`` and ``run()``. The kernel's high-water
    mark is reset after setup (/proc/self/clear_refs), so earlier transient peaks (imports)
    cannot hide the run's."""
    probe = code + (
        "\nimport re as _re\n"
        "def _hwm():\n"
        "    return int(_re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "setup()\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "_b = _hwm()\nrun()\nprint((_hwm() - _b) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def peak_extra_mib(fn, device: str) -> float | None:
    """Extra memory one call of ``fn`` takes at its peak, in MiB, measured in this process.
    CUDA: ``max_memory_allocated`` above what was allocated before; CPU: the rise of the
    resident high-water mark after resetting it (/proc/self/clear_refs) to the current RSS.
    ``None`` where the kernel offers no way to measure it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def kib(field):
        return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = kib("VmRSS")
        fn()
        return (kib("VmHWM") - rss) / 1024
    except OSError:
        return None


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("sslkernels: ratios measured in this run")
    tr.write_line(f"machine: {machine()}")
    summary = {"machine": machine(), "groups": {}}
    for group, times in _RESULTS.items():
        tr.write_line("")
        tr.write_line(f"[{group}]")
        g = summary["groups"][group] = {"median_ms": {k: v * 1e3 for k, v in times.items()}}
        for name, t in times.items():
            parts = [f"{name:<34s} {t * 1e3:10.3f} ms"]
            for base in _BASELINES.get(group, []):
                if base in times and base != name:
                    parts.append(f"{t / times[base]:7.2f}x time of {base}")
            tr.write_line("  ".join(parts))
        for text in _NOTES.get(group, []):
            tr.write_line("  " + text)
        g["notes"] = _NOTES.get(group, [])
    out = os.environ.get("SSLK_BENCH_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(summary, f, indent=2)
