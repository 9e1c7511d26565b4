#!/usr/bin/env python3
"""Registers, stack, shared and local memory, and spill instructions of every CUDA kernel in the
built extension, read offline from its embedded cubins (no GPU needed).

    python tools/cuda_resources.py [path/to/_C*.so] [--json OUT]

Uses ``cuobjdump`` (the CUDA toolkit's, or the one that ships with triton): ``-res-usage`` for
the resources, ``-sass`` to count local-memory stores/loads (STL/LDL), which is what register
spills compile to.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    raise SystemExit("cuobjdump not found (CUDA toolkit or triton's NVIDIA backend)")


def _demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


def _short(name: str) -> str:
    """sslk::ns::(anon)::kernel<float, c10::BFloat16, ...>(args) -> ns::kernel<float, BFloat16>"""
    name = name.replace("(anonymous namespace)::", "").replace("c10::", "").replace("sslk::", "")
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i, ch in enumerate(name):  # cut the argument list: the first "(" outside <...>
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def kernels(so: str) -> list[dict]:
    tool = _cuobjdump()
    res = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, check=True)
    rows, arch = [], None
    lines = res.stdout.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"arch = (sm_\d+)", line.strip())
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            rows.append(dict(mangled=m.group(1), arch=arch, registers=int(usage.get("REG", 0)),
                             stack=int(usage.get("STACK", 0)),
                             shared=int(usage.get("SHARED", 0)),
                             local=int(usage.get("LOCAL", 0))))
    sass = subprocess.run([tool, "-sass", so], capture_output=True, text=True, check=True).stdout
    spills, current = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            spills[current] = [0, 0]
        elif current is not None:
            if re.search(r"\bSTL(\.\w+)*\b", line):
                spills[current][0] += 1
            elif re.search(r"\bLDL(\.\w+)*\b", line):
                spills[current][1] += 1
    for row, name in zip(rows, _demangle([r["mangled"] for r in rows])):
        row["name"] = _short(name)
        row["local_stores"], row["local_loads"] = spills.get(row["mangled"], [0, 0])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("so", nargs="?")
    ap.add_argument("--json")
    opts = ap.parse_args()
    so = opts.so or next(iter(sorted(glob.glob(os.path.join(ROOT, "sslkernels", "_C*.so")))),
                         None)
    if so is None:
        raise SystemExit("no built extension found: build first (tools/build_dev.sh)")
    rows = kernels(so)
    if not rows:
        print(f"{so}: no CUDA kernels (a build without CUDA?)")
        return 1
    print(f"{'kernel':<90} {'arch':<6} {'regs':>4} {'stack':>5} {'smem':>6} {'STL':>4} {'LDL':>4}")
    for r in sorted(rows, key=lambda r: r["name"]):
        print(f"{r['name'][:90]:<90} {r['arch']:<6} {r['registers']:>4} {r['stack']:>5} "
              f"{r['shared']:>6} {r['local_stores']:>4} {r['local_loads']:>4}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
