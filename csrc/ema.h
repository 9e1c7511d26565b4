// Host-side pieces of the in-place EMA op shared by the CPU and CUDA implementations: the checks
// of a whole call (run before anything is written) and the per-pair fallback for layouts the
// kernels do not stream.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "ema_math.h"

namespace pybind11 {
class module_;
}

namespace sslk::ema {

// A checked pair the kernels stream: raw pointers, element count and dtype combination.
struct Pair {
  void* t;
  const void* o;
  int64_t n;
  Kind kind;
};

// What check_lists found: the streamable pairs with at least one element, in list order, the
// indices of the pairs the kernels do not stream (strided views; see flat_pair), and the device.
struct Checked {
  std::vector<Pair> pairs;
  std::vector<size_t> strided;
  at::Device device = at::kCPU;
};

// Validates every pair of the call in one pass and returns what the kernels need. Throws
// c10::ValueError / c10::TypeError (Python ValueError / TypeError) naming "target[i]" or
// "online[i]"; sslkernels/ema.py relies on that form to add parameter names.
Checked check_lists(at::TensorList target, at::TensorList online, double weight,
                    c10::DeviceType device_type);

// The kernels proper, for lists that passed check_lists (`checked` is its result): they write
// without checking again; the lists are read only for the strided pairs. The ops are
// check_lists + these; the prepared step of sslkernels.EMA (ema_plan.cpp) calls them with the
// `checked` it made when it was built.
void lerp_cpu(at::TensorList target, at::TensorList online, double weight,
              const Checked& checked);
#ifdef SSLK_WITH_CUDA
void lerp_cuda(at::TensorList target, at::TensorList online, double weight,
               const Checked& checked);
#endif

// Registers sslkernels._C.EmaPlan and ema_check_lists (ema_plan.cpp) on the extension module.
void bind_plan(pybind11::module_& m);

// Bytes per element of a pair's target and online tensors.
inline int64_t target_size(Kind k) {
  return k == Kind::kDoubleDouble ? 8 : (k == Kind::kBFloat16BFloat16 || k == Kind::kHalfHalf) ? 2 : 4;
}
inline int64_t online_size(Kind k) {
  return k == Kind::kDoubleDouble ? 8 : k == Kind::kFloatFloat ? 4 : 2;
}

// Long lists touch thousands of TensorImpls (and their autograd metadata) that are rarely in
// cache: the checks prefetch the ones a few iterations ahead, which halves their cost.
inline void prefetch_impl(const at::Tensor& t) {
  const char* p = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
  for (int line = 0; line < 4; ++line) __builtin_prefetch(p + 64 * line);
}
// The autograd metadata (requires_grad) of a TensorImpl prefetched earlier.
inline void prefetch_autograd_meta(const at::Tensor& t) {
  if (const void* meta = t.unsafeGetTensorImpl()->autograd_meta()) __builtin_prefetch(meta);
}
constexpr size_t kPrefetchAhead = 6;

// True when the pair can be streamed as flat memory: both dense, non-overlapping and laid out
// with the same strides (contiguous, channels-last, ...), so element k of one is element k of
// the other.
inline bool flat_pair(const at::Tensor& t, const at::Tensor& o) {
  if (t.numel() <= 1) return true;
  if (t.is_contiguous() && o.is_contiguous()) return true;
  return t.is_non_overlapping_and_dense() && o.is_non_overlapping_and_dense() &&
         t.strides() == o.strides();
}

// A pair the kernels do not stream (a strided view): ATen's own lerp, which rounds the same way.
inline void lerp_fallback(const at::Tensor& t, const at::Tensor& o, double weight) {
  t.lerp_(o.to(t.scalar_type()), weight);
}

}  // namespace sslk::ema
