"""The offline compile gate (tools/triton_gate.py): every Triton specialization the launchers can
use compiles for sm_90 and sm_80 under the installed triton, without spills, within shared
memory, and with tensor-core instructions for bf16/fp16. CI runs the same gate again under
triton 3.6.0 (.ci/run). No GPU is needed: triton compiles for a target, not a device.

The compiles run in a subprocess without TRITON_INTERPRET (the interpreter, which the other
Triton tests use on CPU, replaces @triton.jit functions with something that cannot compile).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = os.path.join(ROOT, "tools", "triton_gate.py")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ""  # the gate must not need torch or the package
    return env


def _gate_module():
    spec = importlib.util.spec_from_file_location("triton_gate", GATE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(code: str) -> dict:
    """Run ``code`` (which prints one JSON line last) in a clean interpreter."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_specialization_compiles_without_spills(tmp_path):
    report = tmp_path / "gate.json"
    out = subprocess.run([sys.executable, GATE, "--jobs", str(min(4, os.cpu_count() or 1)),
                          "--json", str(report)], capture_output=True, text=True, env=_env(),
                         cwd=ROOT, timeout=1800)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["problems"] == []
    results = data["results"]
    assert {r["arch"] for r in results} == {80, 90}
    names = {r["name"] for r in results}
    # Every kernel family is in it, for every input dtype.
    for dt in ("float16", "bfloat16", "float32", "float64"):
        for family in ("pair_lse", "pair_grad", "neg_partial", "row_rnorm", "supcon_fwd",
                       "supcon_grad"):
            assert any(n.startswith(f"{family}[{dt}") for n in names), (family, dt)
    # Half-precision dots run on tensor cores: warpgroup MMA on sm_90.
    half = [r for r in results if r["half"] and r["arch"] == 90]
    assert half and all("wgmma.mma_async" in r["tensor_core_ops"] for r in half)
    # fp32 stays IEEE: no tensor-core instruction in fp32 dots.
    fp32 = [r for r in results if r["dot_dtype"] == "float32"]
    assert fp32 and all(not r["tensor_core_ops"] for r in fp32)


def test_gate_reports_spills_compile_errors_and_missing_tensor_cores():
    # A deliberately oversized fp32 tile spills; a non-power-of-two block does not compile; both
    # must come back as gate failures, as must a half dot without tensor cores.
    code = r"""
import json, sys
sys.path.insert(0, "tools")
import triton_gate as gate
aot, mod = gate._load("aot"), gate._load("info_nce")
launch = next(l for l in gate._unique(mod) if l.name.startswith("pair_grad[float32"))
def run(**blocks):
    cx = dict(launch.plan.constexprs, **blocks)
    args = aot.mock_args(launch.plan.kernel, launch.pointers, launch.ints, cx, mod.tl_dtype)
    r = aot.compile_launch(launch.name, launch.plan.kernel, args, 90, 4, 1).as_dict()
    r["half"], r["dot_dtype"] = False, "float32"
    return r
big = run(BLOCK_M=128, BLOCK_N=128, BLOCK_DV=256)
bad = run(BLOCK_M=24)
print(json.dumps({"big": big, "bad": bad}))
"""
    res = _run(code)
    gate = _gate_module()
    big, bad = res["big"], res["bad"]
    assert big["ok"] and big["spill_bytes"] > 0
    assert any("spills" in p for p in gate.check([big]))
    assert not bad["ok"] and bad["error"]
    assert any("compile error" in p for p in gate.check([bad]))
    no_tc = dict(big, spill_bytes=0, half=True, dot_dtype="bfloat16", tensor_core_ops=[])
    assert any("tensor-core" in p for p in gate.check([no_tc]))
    too_big = dict(big, spill_bytes=0, shared_bytes=10 ** 6)
    assert any("shared memory" in p for p in gate.check([too_big]))


def test_kernel_module_imports_without_torch():
    # The gate runs where only triton is installed (CI's triton 3.6.0 environment): the kernel
    # module and the compile helper must not import torch.
    code = r"""
import json, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not allowed here")
sys.meta_path.insert(0, NoTorch())
sys.path.insert(0, "tools")
import triton_gate as gate
mod = gate._load("info_nce")
gate._load("aot")
print(json.dumps({"n": len(list(gate._unique(mod))), "torch": "torch" in sys.modules}))
"""
    res = _run(code)
    assert res["n"] > 0 and not res["torch"]
