// The extension module: the `sslkernels` op library is declared here (each concept adds its ops
// with TORCH_LIBRARY_FRAGMENT in its own file) and pybind11 carries what is not an op.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ema.h"

TORCH_LIBRARY(sslkernels, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslkernels compiled kernels; the ops live in torch.ops.sslkernels";
  m.def("cuda_built", []() {
#ifdef SSLK_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when this build compiled the CUDA kernels.");
  sslk::ema::bind_plan(m);
}
