#!/usr/bin/env python3
"""Compile candidate tile configs of one Triton kernel plan offline and print registers,
spills and shared memory for each, to choose the tables in sslkernels/triton_kernels/*.py.

    python tools/triton_tiles.py SPECIALIZATION_NAME "BM,BN,BK[,BDV],WARPS,STAGES" ... [--arch 90]

SPECIALIZATION_NAME is a name the gate prints (e.g. "pair_grad[bfloat16,D<=128]"); each
candidate replaces the plan's BLOCK_M, BLOCK_N, BLOCK_K (or BLOCK_D), BLOCK_DV for kernels with
an accumulator, num_warps, num_stages.
"""
import argparse
import concurrent.futures as cf
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_gate as gate  # noqa: E402


def _one(job):
    name, cand, arch = job
    aot = gate._load("aot")
    launch = next(l for m in gate.MODULES for l in gate._unique(gate._load(m)) if l.name == name)
    mod = gate._load("info_nce")
    if len(cand) == 6:  # kernels with an accumulator: BM, BN, BK, BDV, warps, stages
        bm, bn, bk, bdv, warps, stages = cand
        cx = dict(launch.plan.constexprs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DV=bdv)
    else:
        bm, bn, bk, warps, stages = cand
        cx = dict(launch.plan.constexprs, BLOCK_M=bm, BLOCK_N=bn)
        cx["BLOCK_D" if "BLOCK_D" in cx else "BLOCK_K"] = bk
    args = aot.mock_args(launch.plan.kernel, launch.pointers, launch.ints, cx, mod.tl_dtype)
    r = aot.compile_launch(name, launch.plan.kernel, args, arch, warps, stages)
    return cand, r.as_dict()  # plain data: Result is a class of the stand-in package


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("cands", nargs="+")
    ap.add_argument("--arch", type=int, action="append")
    ap.add_argument("--jobs", type=int, default=2)
    o = ap.parse_args()
    jobs = [(o.name, tuple(int(x) for x in c.split(",")), a) for c in o.cands
            for a in (o.arch or [90, 80])]
    with cf.ProcessPoolExecutor(o.jobs) as pool:
        for (cand, r), (_, _, arch) in zip(pool.map(_one, jobs), jobs):
            if r["ok"]:
                print(f"sm_{arch} {cand}: regs {r['registers']} spill {r['spill_bytes']} "
                      f"smem {r['shared_bytes']} tc {r['tensor_core_ops']}")
            else:
                print(f"sm_{arch} {cand}: FAILED {r['error'][:300]}")


if __name__ == "__main__":
    main()
