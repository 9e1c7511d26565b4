// Per-element math of the in-place EMA (target <- m*target + (1-m)*online, written as a lerp with
// weight w = 1 - m), shared by the CPU kernel (scalar tails and at::vec::Vectorized bodies) and
// the CUDA kernel, so that the CPU tests also check the arithmetic the GPU runs.
//
// Bit-compatibility with torch.lerp / torch._foreach_lerp_: ATen computes (ATen/native/Lerp.h)
//   |w| < 0.5 ? self + w * (end - self) : end - (end - self) * (1 - w)
// in the op-math type (float for float/bfloat16/half, double for double). Its vectorized CPU
// kernel evaluates both branches as one fused multiply-add (fmadd(w, d, self) and
// fmadd(w - 1, d, end)), its scalar CPU code is contracted to the same FMA, and nvcc contracts the
// CUDA kernel's expression the same way. Since fl(w - 1) = -fl(1 - w) exactly, the FMA forms
// below round exactly like ATen's on every path.
#pragma once

#include "common.h"

namespace sslk::ema {

// a * b + c with one rounding. The CPU kernel specializes this for at::vec::Vectorized.
template <typename T>
struct Fma;

template <>
struct Fma<float> {
  static SSLK_HD float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
};

template <>
struct Fma<double> {
  static SSLK_HD double fma(double a, double b, double c) { return ::fma(a, b, c); }
};

// The interpolation weight w = 1 - momentum, which is the same for every element of a call, so
// ATen's per-element branch on |w| < 0.5 is decided once. `w` and `w_minus_one` are T (scalar or
// broadcast vector); `small` is |w| < 0.5 of the scalar weight in the op-math type.
template <typename T>
struct LerpWeight {
  T w;
  T w_minus_one;
  bool small;
};

template <typename S>
SSLK_HD LerpWeight<S> make_weight(S w) {
  return {w, w - S(1), (w < S(0) ? -w : w) < S(0.5)};
}

// lerp(self, end, w): self + w * (end - self) for small w, else end - (end - self) * (1 - w),
// each rounded once, exactly as torch.lerp. In the EMA self = target, end = online.
template <typename T>
SSLK_HD T lerp(T self, T end, const LerpWeight<T>& w) {
  const T d = end - self;
  return w.small ? Fma<T>::fma(w.w, d, self) : Fma<T>::fma(w.w_minus_one, d, end);
}

// The dtype combinations the kernels support, (target, online): the target's dtype is the
// storage of the result, the op-math type is float (double for double targets). Online tensors
// are read in their own dtype and widened exactly.
enum class Kind : unsigned char {
  kFloatFloat = 0,
  kFloatBFloat16 = 1,
  kFloatHalf = 2,
  kDoubleDouble = 3,
  kBFloat16BFloat16 = 4,
  kHalfHalf = 5,
};

}  // namespace sslk::ema
