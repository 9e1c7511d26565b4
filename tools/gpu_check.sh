#!/usr/bin/env bash
# The GPU pass, in one command, for a machine with a CUDA GPU and torch but no package registry
# (scikit-build-core, cmake, ninja, pytest, pytest-benchmark, hypothesis already installed):
#
#     tools/gpu_check.sh OUT_DIR
#
# 1. build:   pip install -e . --no-build-isolation (MAX_JOBS = cores, TORCH_CUDA_ARCH_LIST=9.0)
# 2. smoke:   every op once on CUDA against its reference, stop at the first failure
# 3. tests:   the CUDA test cases (device-parametrized cases, the Triton kernels compiled)
# 4. bench:   the GPU benchmarks (pytest-benchmark JSON)
# 5. report:  registers/spills of the CUDA kernels (cuobjdump), and OUT_DIR/gpu_check.json with
#             the device, versions, each stage's status and time
# Everything is logged to OUT_DIR/log.txt. Each stage has a time limit so that the whole pass
# stays under 8 minutes on an H100-class machine with 16 cores; a failed build or smoke test
# stops the pass, failed tests do not stop the benchmarks. The exit status is the last failure's.
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
log="$out/log.txt"
: > "$log"
cores=$(nproc)
export MAX_JOBS=$cores CMAKE_BUILD_PARALLEL_LEVEL=$cores TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
unset TRITON_INTERPRET
stages=()
status=0

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  echo "== $name: exit $rc after ${dt}s" | tee -a "$log"
  stages+=("{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $dt}")
  [ "$rc" -eq 0 ] || status=$rc
  return "$rc"
}

finish() {
  local joined
  joined=$(IFS=,; echo "${stages[*]}")
  python - "$out" "$joined" "$status" <<'EOF'
import datetime, json, sys
out, stages, status = sys.argv[1], json.loads("[" + sys.argv[2] + "]"), int(sys.argv[3])
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": status, "stages": stages}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    import triton
    info["triton"] = triton.__version__
except Exception as exc:  # the report must be written whatever failed
    info["error"] = repr(exc)
json.dump(info, open(f"{out}/gpu_check.json", "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
  exit "$status"
}
trap finish EXIT

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$log" || { status=2; exit; }

stage build 150 pip install -e . --no-build-isolation --no-deps -v || exit
stage smoke 60 python tools/gpu_smoke.py --json "$out/smoke.json" || exit
stage resources 15 python tools/cuda_resources.py --json "$out/cuda_resources.json" || true
# A failing test stage is recorded (exit status, junit XML) but the pass goes on to the
# benchmarks: one GPU session should bring back as much as it can.
stage tests-triton 75 python -m pytest python_tests/test_triton_info_nce.py \
  python_tests/test_triton_supcon.py -q --junitxml "$out/tests-triton.xml"
stage tests-cuda 75 python -m pytest python_tests -q -k "cuda or contract or tf32" \
  --deselect python_tests/test_triton_gate.py --junitxml "$out/tests-cuda.xml"
stage bench 100 python -m pytest benchmarks/ --benchmark-only -q -k "gpu or cuda" \
  --benchmark-json "$out/bench.json"
