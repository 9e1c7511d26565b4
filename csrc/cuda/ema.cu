// CUDA kernel of the in-place EMA op: a multi-tensor apply. The pointers, sizes and dtype
// combinations of up to kMaxTensors pairs travel in the kernel's argument block (no device
// metadata, no host-device copy, safe under CUDA graph capture); every CUDA block owns one chunk
// of kChunk elements of one tensor and finds it by a binary search over the packed prefix of
// chunk counts. A list of L tensors takes ceil(L / kMaxTensors) launches (ResNet-50's 161
// parameters: 2; 2000 small tensors: 16), against two or three launches per tensor for the
// per-parameter loop. The element math is sslk::ema::lerp (ema_math.h), shared with the CPU
// kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "ema.h"
#include "ema_math.h"

namespace sslk::ema {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;                // elements in flight per thread
constexpr int64_t kChunk = 32768;      // elements per CUDA block
constexpr int kMaxTensors = 128;       // pairs per launch: the argument block stays < 4 KB
constexpr int32_t kMaxBlocks = 1 << 30;

struct Meta {
  void* t[kMaxTensors];
  const void* o[kMaxTensors];
  int64_t n[kMaxTensors];
  int32_t first_block[kMaxTensors];  // first CUDA block of pair i; pair i owns blocks up to the next
  unsigned char kind[kMaxTensors];
  int32_t count;
};
static_assert(sizeof(Meta) + sizeof(LerpWeight<float>) + sizeof(LerpWeight<double>) <= 4000,
              "kernel arguments must fit the 4 KB argument block");

template <typename TT, typename OT, typename Acc>
__device__ __forceinline__ void lerp_chunk(TT* __restrict__ t, const OT* __restrict__ o,
                                           int64_t begin, int64_t end,
                                           const LerpWeight<Acc>& w) {
  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t(kThreads) * kIlp) {
    Acc x[kIlp], y[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t k = base + int64_t(j) * kThreads;
      if (k < end) {
        x[j] = static_cast<Acc>(t[k]);
        y[j] = static_cast<Acc>(o[k]);
      }
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t k = base + int64_t(j) * kThreads;
      if (k < end) t[k] = static_cast<TT>(lerp(x[j], y[j], w));
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    ema_lerp_kernel(const Meta meta, const LerpWeight<float> wf, const LerpWeight<double> wd) {
  const int32_t b = blockIdx.x;
  int lo = 0, hi = meta.count - 1;  // the last pair whose first block is <= b
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta.first_block[mid] <= b) lo = mid;
    else hi = mid - 1;
  }
  const int64_t begin = int64_t(b - meta.first_block[lo]) * kChunk;
  const int64_t end = begin + kChunk < meta.n[lo] ? begin + kChunk : meta.n[lo];
  void* t = meta.t[lo];
  const void* o = meta.o[lo];
  switch (static_cast<Kind>(meta.kind[lo])) {
    case Kind::kFloatFloat:
      return lerp_chunk(static_cast<float*>(t), static_cast<const float*>(o), begin, end, wf);
    case Kind::kFloatBFloat16:
      return lerp_chunk(static_cast<float*>(t), static_cast<const c10::BFloat16*>(o), begin, end,
                        wf);
    case Kind::kFloatHalf:
      return lerp_chunk(static_cast<float*>(t), static_cast<const c10::Half*>(o), begin, end, wf);
    case Kind::kDoubleDouble:
      return lerp_chunk(static_cast<double*>(t), static_cast<const double*>(o), begin, end, wd);
    case Kind::kBFloat16BFloat16:
      return lerp_chunk(static_cast<c10::BFloat16*>(t), static_cast<const c10::BFloat16*>(o),
                        begin, end, wf);
    case Kind::kHalfHalf:
      return lerp_chunk(static_cast<c10::Half*>(t), static_cast<const c10::Half*>(o), begin, end,
                        wf);
  }
}

}  // namespace

void lerp_cuda(at::TensorList target, at::TensorList online, double weight,
               const Checked& checked) {
  if (checked.pairs.empty() && checked.strided.empty()) return;
  c10::cuda::CUDAGuard guard(checked.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LerpWeight<float> wf = make_weight(static_cast<float>(weight));
  const LerpWeight<double> wd = make_weight(weight);

  Meta meta;
  meta.count = 0;
  int32_t blocks = 0;
  auto flush = [&]() {
    if (meta.count == 0) return;
    ema_lerp_kernel<<<blocks, kThreads, 0, stream>>>(meta, wf, wd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    meta.count = 0;
    blocks = 0;
  };
  for (const Pair& p : checked.pairs) {
    const int64_t chunks = (p.n + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= kMaxBlocks, "ema_lerp_: a tensor of ", p.n, " elements is too large");
    if (meta.count == kMaxTensors || blocks + chunks > kMaxBlocks) flush();
    const int c = meta.count++;
    meta.t[c] = p.t;
    meta.o[c] = p.o;
    meta.n[c] = p.n;
    meta.kind[c] = static_cast<unsigned char>(p.kind);
    meta.first_block[c] = blocks;
    blocks += static_cast<int32_t>(chunks);
  }
  flush();
  for (size_t i : checked.strided) lerp_fallback(target[i], online[i], weight);
}

namespace {

void ema_lerp_cuda(at::TensorList target, at::TensorList online, double weight) {
  const Checked checked = check_lists(target, online, weight, c10::DeviceType::CUDA);
  // Nothing has been written yet; from here on nothing can fail but a launch.
  lerp_cuda(target, online, weight, checked);
}

}  // namespace
}  // namespace sslk::ema

TORCH_LIBRARY_IMPL(sslkernels, CUDA, m) {
  m.impl("ema_lerp_", &sslk::ema::ema_lerp_cuda);
}
