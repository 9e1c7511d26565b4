// CUDA kernels of the ring-buffer queue enqueue: the pointer is read on the device and the host
// never reads it. Two launches on the current stream:
//   1. enqueue_rows_kernel, a grid of blocks (one warp per row, grid-stride): every block reads
//      *ptr, then writes its surviving keys (normalized by the shared per-row math of
//      queue_math.h);
//   2. advance_kernel, one thread: moves the pointer and the fill count.
// Stream order puts the advance after every block of the first launch has read *ptr, so no block
// can see a half-advanced queue, with no grid-wide synchronization; a MoCo batch (B = 256 ...
// 4096 rows) spreads over B / 8 blocks instead of one SM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "queue.h"
#include "queue_math.h"

namespace sslk::queue {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxBlocks = 65535;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename acc_t, typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    enqueue_rows_kernel(out_t* __restrict__ buf, const int64_t* __restrict__ ptr,
                        const in_t* __restrict__ keys, int64_t B, int64_t K, int64_t D,
                        bool normalize) {
  const int64_t start = wrap_ptr(*ptr, K);
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / kWarp;
  for (int64_t i = first_kept(B, K) + warp; i < B; i += warps) {
    const in_t* src = keys + i * D;
    out_t* dst = buf + slot_of(start, i, K) * D;
    acc_t denom = acc_t(1);
    if (normalize) {
      acc_t s = acc_t(0);
      for (int64_t j = lane; j < D; j += kWarp) s = add_square(s, static_cast<acc_t>(src[j]));
      denom = norm_denom(warp_sum(s));
    }
    for (int64_t j = lane; j < D; j += kWarp)
      dst[j] = stored_value<out_t, acc_t>(src[j], denom, normalize);
  }
}

__global__ void advance_kernel(int64_t* __restrict__ ptr, int64_t* __restrict__ fill, int64_t B,
                               int64_t K) {
  const int64_t start = wrap_ptr(*ptr, K);
  *ptr = next_ptr(start, B, K);
  *fill = next_fill(*fill, B, K);
}

void enqueue_cuda(at::Tensor& buffer, at::Tensor& ptr, at::Tensor& fill,
                  const at::Tensor& keys_in, bool normalize) {
  check_enqueue(buffer, ptr, fill, keys_in);
  const int64_t B = keys_in.size(0), K = buffer.size(0), D = buffer.size(1);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(buffer.device());
  const at::Tensor keys = keys_in.contiguous();
  const bool wide = wide_acc(buffer, keys);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "queue_enqueue_", [&] {
    using in_t = scalar_t;
    const in_t* src = keys.const_data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "queue_enqueue_", [&] {
      using out_t = scalar_t;
      out_t* dst = buffer.mutable_data_ptr<out_t>();
      const int64_t* p = ptr.const_data_ptr<int64_t>();
      const int blocks = static_cast<int>(std::min<int64_t>(
          (std::min(B, K) + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
      if (wide)
        enqueue_rows_kernel<double, in_t, out_t><<<blocks, kThreads, 0, stream>>>(
            dst, p, src, B, K, D, normalize);
      else
        enqueue_rows_kernel<float, in_t, out_t><<<blocks, kThreads, 0, stream>>>(
            dst, p, src, B, K, D, normalize);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  advance_kernel<<<1, 1, 0, stream>>>(ptr.mutable_data_ptr<int64_t>(),
                                      fill.mutable_data_ptr<int64_t>(), B, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sslk::queue

TORCH_LIBRARY_IMPL(sslkernels, CUDA, m) {
  m.impl("queue_enqueue_", &sslk::queue::enqueue_cuda);
}
