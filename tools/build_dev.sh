#!/usr/bin/env bash
# In-tree development build: configures and builds the extension with CMake directly and drops
# sslkernels/_C*.so next to the Python sources, so `PYTHONPATH=. pytest` works from any
# checkout or worktree. Set SSLK_WITH_CUDA=OFF to skip the CUDA kernels while iterating.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
build=${BUILD_DIR:-$here/build-dev}
cmake_bin=$("$py" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))" 2>/dev/null || echo cmake)
"$cmake_bin" -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" -DSSLK_WITH_CUDA="${SSLK_WITH_CUDA:-ON}" >/dev/null
"$cmake_bin" --build "$build" -j "${JOBS:-2}"
cp -f "$build"/_C*.so "$here/sslkernels/"
echo "built $(ls "$here"/sslkernels/_C*.so)"
