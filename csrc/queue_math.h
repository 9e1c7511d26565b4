// Per-row math of the ring-buffer queue, shared by the CPU (csrc/cpu/queue.cpp) and CUDA
// (csrc/cuda/queue.cu) enqueue kernels so that the CPU tests also check what the GPU computes.
//
// Ring semantics: enqueuing B keys at pointer p into K slots is the same as enqueuing them one
// by one: key i goes to slot (p + i) mod K, the pointer becomes (p + B) mod K and the fill count
// min(K, fill + B). When B > K only keys B-K ... B-1 survive (earlier ones would be overwritten
// in the same call), so only those are written; their slots are distinct.
#pragma once
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace sslk::queue {

constexpr double kNormEps = 1e-12;  // F.normalize's eps

// A pointer brought into [0, K) (a corrupted or hand-edited pointer never writes out of bounds).
SSLK_HD int64_t wrap_ptr(int64_t p, int64_t K) {
  p %= K;
  return p < 0 ? p + K : p;
}

// First key of a batch of B that survives in a queue of K slots.
SSLK_HD int64_t first_kept(int64_t B, int64_t K) { return B > K ? B - K : 0; }

// Slot of key i for a batch written at pointer `start` (start in [0, K), i >= 0).
SSLK_HD int64_t slot_of(int64_t start, int64_t i, int64_t K) { return (start + i % K) % K; }

SSLK_HD int64_t next_ptr(int64_t start, int64_t B, int64_t K) { return (start + B % K) % K; }

// min(K, fill + B) without overflow; a fill outside [0, K] is clamped first.
SSLK_HD int64_t next_fill(int64_t fill, int64_t B, int64_t K) {
  fill = fill < 0 ? 0 : (fill > K ? K : fill);
  return B >= K - fill ? K : fill + B;
}

SSLK_HD float sqrt_(float x) { return ::sqrtf(x); }
SSLK_HD double sqrt_(double x) { return ::sqrt(x); }

// Running sum of squares of a row, in the accumulation type.
template <typename acc_t>
SSLK_HD acc_t add_square(acc_t s, acc_t x) {
  return s + x * x;
}

// F.normalize's denominator max(||x||, eps). NaN propagates (as torch's clamp_min does).
template <typename acc_t>
SSLK_HD acc_t norm_denom(acc_t sumsq) {
  const acc_t n = sqrt_(sumsq);
  return n < acc_t(kNormEps) ? acc_t(kNormEps) : n;
}

// Round an accumulator value to the storage type (reduced types go through float, as torch's
// own conversions do).
template <typename out_t, typename acc_t>
SSLK_HD out_t to_storage(acc_t v) {
  if constexpr (std::is_same_v<out_t, double> || std::is_same_v<out_t, float>) {
    return static_cast<out_t>(v);
  } else {
    return static_cast<out_t>(static_cast<float>(v));
  }
}

// One stored element: x / denom (normalize) or x, computed in acc_t, rounded to out_t.
template <typename out_t, typename acc_t, typename in_t>
SSLK_HD out_t stored_value(in_t x, acc_t denom, bool normalize) {
  const acc_t v = static_cast<acc_t>(x);
  return to_storage<out_t>(normalize ? v / denom : v);
}

// Sum of squares of one row in kLanes independent partial sums (a serial chain of D dependent
// adds would cost D add latencies per row; the compiler turns the lanes into one vector
// register), combined pairwise. The CUDA kernel uses the same lanes idea across a warp.
constexpr int kLanes = 8;

template <typename acc_t, typename in_t>
SSLK_HD acc_t row_sumsq(const in_t* x, int64_t D) {
  acc_t s[kLanes];
  for (int t = 0; t < kLanes; ++t) s[t] = acc_t(0);
  int64_t j = 0;
  for (; j + kLanes <= D; j += kLanes)
    for (int t = 0; t < kLanes; ++t) s[t] = add_square(s[t], static_cast<acc_t>(x[j + t]));
  for (int t = 0; j < D; ++j, ++t) s[t] = add_square(s[t], static_cast<acc_t>(x[j]));
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int t = 0; t < w; ++t) s[t] += s[t + w];
  return s[0];
}

// The whole per-row operation, used by the CPU kernel (the CUDA kernel splits the same two
// loops over a warp): dst[0:D] = normalize(src[0:D]).
template <typename acc_t, typename in_t, typename out_t>
SSLK_HD void store_row(out_t* dst, const in_t* src, int64_t D, bool normalize) {
  const acc_t denom = normalize ? norm_denom(row_sumsq<acc_t>(src, D)) : acc_t(1);
  for (int64_t j = 0; j < D; ++j) dst[j] = stored_value<out_t, acc_t>(src[j], denom, normalize);
}

}  // namespace sslk::queue
