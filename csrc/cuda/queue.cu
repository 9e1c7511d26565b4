// CUDA kernel of the ring-buffer queue enqueue: ONE launch reads the pointer on the device,
// writes the surviving keys (normalized by the shared per-row math of queue_math.h, one warp per
// row) and advances the pointer and fill count. The host never reads the pointer.
//
// The launch is a single block: every thread reads *ptr before the barrier, and thread 0 writes
// the new pointer after it, so no thread can see a half-advanced queue. One block of 1024
// threads moves a MoCo batch (B = 256 ... 4096 rows of D = 128) in microseconds; a multi-block
// version would need a grid-wide ticket to know when every block has read the pointer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "queue.h"
#include "queue_math.h"

namespace sslk::queue {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarp = 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename acc_t, typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    enqueue_kernel(out_t* __restrict__ buf, int64_t* __restrict__ ptr, int64_t* __restrict__ fill,
                   const in_t* __restrict__ keys, int64_t B, int64_t K, int64_t D,
                   bool normalize) {
  const int64_t start = wrap_ptr(*ptr, K);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
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
  __syncthreads();  // every thread has read *ptr
  if (threadIdx.x == 0) {
    *ptr = next_ptr(start, B, K);
    *fill = next_fill(*fill, B, K);
  }
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
      int64_t* p = ptr.mutable_data_ptr<int64_t>();
      int64_t* f = fill.mutable_data_ptr<int64_t>();
      if (wide)
        enqueue_kernel<double, in_t, out_t><<<1, kThreads, 0, stream>>>(dst, p, f, src, B, K, D,
                                                                        normalize);
      else
        enqueue_kernel<float, in_t, out_t><<<1, kThreads, 0, stream>>>(dst, p, f, src, B, K, D,
                                                                       normalize);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace sslk::queue

TORCH_LIBRARY_IMPL(sslkernels, CUDA, m) {
  m.impl("queue_enqueue_", &sslk::queue::enqueue_cuda);
}
