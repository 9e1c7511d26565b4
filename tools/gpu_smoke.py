#!/usr/bin/env python3
"""One quick call of every op on a CUDA device, each checked against its plain-PyTorch
reference; stops at the first failure. The first stage of tools/gpu_check.sh: it fails in
seconds where a broken build or kernel would otherwise fail a whole test session.

    python tools/gpu_smoke.py [--json OUT] [--device cpu]

``--device cpu`` runs the same checks on the CPU kernels (how the test suite keeps this script
in step with the API on machines without a GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch


def _close(a, b, atol, rtol=0.0, what=""):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=rtol):
        err = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {a.shape} {b.shape}"
        raise AssertionError(f"{what}: max error {err} > {atol}")


def check_info_nce_pair(dev):
    from sslkernels import fused_info_nce
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
        z0 = torch.randn(300, 128, device=dev, dtype=dtype, requires_grad=True)
        z1 = torch.randn(300, 128, device=dev, dtype=dtype, requires_grad=True)
        loss = fused_info_nce(z0, z1, temperature=0.1)
        g0, g1 = torch.autograd.grad(loss, (z0, z1))
        r0, r1 = z0.detach().double().requires_grad_(), z1.detach().double().requires_grad_()
        ref = fused_info_nce(r0, r1, temperature=0.1, backend="reference")
        e0, e1 = torch.autograd.grad(ref, (r0, r1))
        _close(loss, ref, tol, what=f"pair loss {dtype}")
        _close(g0, e0, tol * 1e-2 + 1e-4, rtol=0.05, what=f"pair dz0 {dtype}")
        _close(g1, e1, tol * 1e-2 + 1e-4, rtol=0.05, what=f"pair dz1 {dtype}")


def check_info_nce_neg(dev):
    from sslkernels import fused_info_nce
    for dtype, qdt, tol in ((torch.float32, torch.float32, 1e-4),
                            (torch.bfloat16, torch.bfloat16, 5e-2),
                            (torch.float32, torch.bfloat16, 1e-4)):
        q = torch.randn(256, 128, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(256, 128, device=dev, dtype=dtype)
        neg = torch.randn(4096, 128, device=dev).to(qdt)
        loss = fused_info_nce(q, k, neg, temperature=0.2)
        (gq,) = torch.autograd.grad(loss, (q,))
        rq = q.detach().double().requires_grad_()
        ref = fused_info_nce(rq, k.double(), neg.double(), temperature=0.2, backend="reference")
        (eq,) = torch.autograd.grad(ref, (rq,))
        _close(loss, ref, tol, what=f"neg loss {dtype}/{qdt}")
        _close(gq, eq, 1e-4, rtol=0.05, what=f"neg dq {dtype}/{qdt}")


def check_info_nce_slice(dev):
    keys = torch.randn(64, 32, device=dev, dtype=torch.float64)
    rows, _ = torch.ops.sslkernels.info_nce_slice_fwd(keys, 0, 16, 16, 5.0, True)
    from sslkernels.reference import info_nce as ref
    _close(rows, ref.info_nce_slice_rows(keys, 0, 16, 16, 0.2), 1e-9, what="slice")


def check_supcon(dev):
    from sslkernels import fused_supcon, view_labels
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        z = torch.randn(400, 128, device=dev, dtype=dtype, requires_grad=True)
        y = view_labels(100, 4, device=dev)
        loss = fused_supcon(z, y, temperature=0.1)
        (g,) = torch.autograd.grad(loss, (z,))
        r = z.detach().double().requires_grad_()
        ref = fused_supcon(r, y, temperature=0.1, backend="reference")
        (e,) = torch.autograd.grad(ref, (r,))
        _close(loss, ref, tol, what=f"supcon loss {dtype}")
        _close(g, e, tol * 1e-2 + 1e-4, rtol=0.05, what=f"supcon dz {dtype}")


def check_ema(dev):
    from sslkernels import ema_update_
    t = [torch.randn(n, device=dev) for n in (1, 1000, 70000)]
    o = [torch.randn_like(x) for x in t]
    want = [x.clone() for x in t]
    torch._foreach_lerp_(want, o, 0.01)
    ema_update_(t, o, 0.99)
    for a, b in zip(t, want):
        if not torch.equal(a, b):
            raise AssertionError("ema_update_ differs from torch._foreach_lerp_")


def check_queue(dev):
    from sslkernels import NegativeQueue
    q = NegativeQueue(100, 16, device=dev)
    keys = [torch.randn(n, 16, device=dev) for n in (30, 90, 250)]
    for x in keys:
        q.enqueue(x)
    # Key j of the 370 lands in slot j mod 100; the last 100 (j = 270 ... 369) survive.
    last = torch.nn.functional.normalize(torch.cat(keys), dim=1)[-100:]
    want = last[(torch.arange(100, device=dev) + 30) % 100]
    _close(q.negatives.float(), want, 1e-5, what="queue contents")
    if int(q.ptr) != 70:
        raise AssertionError(f"queue pointer {int(q.ptr)}, expected 70")


def check_augment(dev):
    from sslkernels import augment as A
    imgs = torch.randint(0, 256, (8, 3, 64, 80), dtype=torch.uint8)
    config = A.simclr(size=32)[0]
    cpu, params = A.augment(imgs, config, generator=torch.Generator().manual_seed(0))
    gpu, _ = A.augment(imgs.to(dev), config, params=params)
    _close(gpu, cpu, 1e-4, what="augment cuda vs cpu")


CHECKS = [check_info_nce_pair, check_info_nce_neg, check_info_nce_slice, check_supcon,
          check_ema, check_queue, check_augment]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda")
    opts = ap.parse_args()
    dev = torch.device(opts.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    results = []
    status = 0
    for check in CHECKS:
        t0 = time.time()
        try:
            check(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            results.append(dict(check=check.__name__, ok=True, seconds=time.time() - t0))
            print(f"ok   {check.__name__} ({time.time() - t0:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001 - report and stop at the first failure
            results.append(dict(check=check.__name__, ok=False, error=traceback.format_exc()))
            print(f"FAIL {check.__name__}\n{traceback.format_exc()}", flush=True)
            status = 1
            break
    if opts.json:
        with open(opts.json, "w") as f:
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
            json.dump({"device": name, "results": results}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
