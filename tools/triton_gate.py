#!/usr/bin/env python3
"""Offline compile gate for the Triton kernels: no GPU, no driver, no torch needed.

Compiles every specialization the launchers can use (``specializations()`` of each kernel
module) for each target architecture, and fails on any compile error, on register spills, and
on a half-precision specialization whose sm_90 PTX lacks tensor-core instructions. Run it under
every triton the project supports: CI runs it under the installed triton (through
python_tests/test_triton_gate.py) and under triton 3.6.0 in a side environment (.ci/run).

    python tools/triton_gate.py [--arch 90 --arch 80] [--jobs N] [--json OUT] [--only SUBSTR]

The kernel modules are loaded by path, so importing them does not import torch or sslkernels.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_DIR = os.path.join(ROOT, "sslkernels", "triton_kernels")
MODULES = ("info_nce", "supcon")  # kernel modules that define specializations()


PACKAGE = "_sslk_gate"


def _load(name: str):
    """sslkernels/triton_kernels/<name>.py as a module of a stand-in package over that folder,
    so its relative imports of sibling kernel modules work without importing sslkernels."""
    if PACKAGE not in sys.modules:
        pkg = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(
            PACKAGE, None, is_package=True))
        pkg.__path__ = [KERNEL_DIR]
        sys.modules[PACKAGE] = pkg
    return importlib.import_module(f"{PACKAGE}.{name}")


def _job(args):
    module_name, index, arch = args
    aot, mod = _load("aot"), _load(module_name)
    launch = list(_unique(mod))[index]
    plan = launch.plan
    kargs = aot.mock_args(plan.kernel, launch.pointers, launch.ints, plan.constexprs,
                          mod.tl_dtype)
    res = aot.compile_launch(launch.name, plan.kernel, kargs, arch, plan.num_warps,
                             plan.num_stages)
    out = res.as_dict()
    out["module"] = module_name
    out["dot_dtype"] = launch.dot
    out["half"] = launch.dot in mod.HALF
    return out


def _unique(mod):
    """Specializations with duplicates (same kernel, constexprs, pointers, options) dropped."""
    seen = set()
    for launch in mod.specializations():
        p = launch.plan
        key = (p.kernel.fn.__name__, tuple(sorted(p.constexprs.items())),
               tuple(sorted(launch.pointers.items())), p.num_warps, p.num_stages)
        if key not in seen:
            seen.add(key)
            yield launch


# Shared memory a block may use (opt-in maximum): A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


def check(results: list[dict]) -> list[str]:
    """The gate's verdicts: one line per failure."""
    problems = []
    for r in results:
        where = f"{r['name']} sm_{r['arch']}"
        if not r["ok"]:
            problems.append(f"{where}: compile error: {r['error']}")
            continue
        if r["spill_bytes"]:
            problems.append(f"{where}: spills ({r['spill_bytes']} bytes of local memory per "
                            f"thread, {r['registers']} registers)")
        limit = SHARED_LIMIT.get(r["arch"])
        if limit is not None and r["shared_bytes"] > limit:
            problems.append(f"{where}: needs {r['shared_bytes']} bytes of shared memory, "
                            f"sm_{r['arch']} allows {limit}")
        if r["half"] and not r["tensor_core_ops"]:
            problems.append(f"{where}: {r['dot_dtype']} dots without tensor-core instructions")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="sm version (default: 90 and 80)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--only", help="compile only specializations whose name contains this")
    opts = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 is set: the interpreter cannot compile; unset it")
    archs = opts.arch or [90, 80]

    import triton
    jobs = []
    for module_name in MODULES:
        for i, launch in enumerate(_unique(_load(module_name))):
            if opts.only and opts.only not in launch.name:
                continue
            jobs += [(module_name, i, arch) for arch in archs]
    t0 = time.time()
    print(f"triton {triton.__version__}: compiling {len(jobs)} specializations "
          f"for sm_{', sm_'.join(map(str, archs))} with {opts.jobs} processes", flush=True)
    if opts.jobs > 1:
        with cf.ProcessPoolExecutor(opts.jobs) as pool:
            results = list(pool.map(_job, jobs))
    else:
        results = [_job(j) for j in jobs]
    for r in results:
        if r["ok"]:
            tc = ",".join(r["tensor_core_ops"]) or "-"
            print(f"  sm_{r['arch']} {r['name']:<48} regs {r['registers']:>3} "
                  f"spill {r['spill_bytes']:>4} smem {r['shared_bytes']:>6} "
                  f"warps {r['num_warps']} stages {r['num_stages']} tc {tc}")
        else:
            print(f"  sm_{r['arch']} {r['name']:<48} FAILED")
    problems = check(results)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"triton": triton.__version__, "archs": archs, "results": results,
                       "problems": problems}, f, indent=1)
    print(f"{len(results)} compiled in {time.time() - t0:.0f} s; {len(problems)} problems")
    for p in problems:
        print("FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
