// Shared by every kernel, host and device: the host+device qualifier and small helpers.
#pragma once

#if defined(__CUDACC__)
#define SSLK_HD __host__ __device__ __forceinline__
#else
#define SSLK_HD inline
#endif

#include <cmath>

namespace sslk {

// exp for the compute types. The CPU kernels specialize this for at::vec::Vectorized so that the
// per-element formulas below are written once and instantiated for scalars (CPU tails, CUDA) and
// vectors (CPU bodies).
template <typename T>
struct Math;

template <>
struct Math<float> {
  static SSLK_HD float exp(float x) { return ::expf(x); }
  static SSLK_HD float max(float a, float b) { return a > b ? a : b; }
};

template <>
struct Math<double> {
  static SSLK_HD double exp(double x) { return ::exp(x); }
  static SSLK_HD double max(double a, double b) { return a > b ? a : b; }
};

}  // namespace sslk
