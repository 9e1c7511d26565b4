"""tools/gpu_smoke.py, the first stage of tools/gpu_check.sh, run on the CPU kernels so that it
stays in step with the API where there is no GPU (on a GPU machine gpu_check.sh runs it on CUDA)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_checks_pass_on_cpu():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_smoke.py"),
                          "--device", "cpu"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == 7
