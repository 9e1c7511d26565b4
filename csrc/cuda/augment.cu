// CUDA kernel of the batched augmentation op: the same chain as the CPU kernel with the same
// per-pixel math (augment_math.h), one thread per output pixel, grid (pixel blocks, images):
//   1. resize_pre: crop + antialiased bilinear resize (weights computed on the fly, as ATen's
//      CUDA _upsample_bilinear2d_aa does), flip, the jitter ops before contrast; the grayscale
//      sum of each image is reduced per block and added to a per-image total;
//   2. post: contrast with that mean, the remaining jitter ops, grayscale; without blur it also
//      solarizes, normalizes and stores the output;
//   3./4. blur (only samples with blur on): vertical then horizontal separable pass with
//      reflect padding, the second fused with solarize, normalize and the store.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "augment.h"
#include "augment_math.h"
#include "cuda/reduce.cuh"

namespace sslk::augment {
namespace {

constexpr int kThreads = 256;

struct Box {
  int64_t top, left, h, w;
};

// The sample's crop box, clamped into its image (the host validated it; this only keeps a
// direct op call with a bad box from reading out of bounds).
__device__ __forceinline__ Box crop_box(const float* p, int64_t H, int64_t W) {
  auto clamp = [](int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); };
  Box b;
  b.top = clamp(static_cast<int64_t>(p[kTop]), 0, H - 1);
  b.left = clamp(static_cast<int64_t>(p[kLeft]), 0, W - 1);
  b.h = clamp(static_cast<int64_t>(p[kHeight]), 1, H - b.top);
  b.w = clamp(static_cast<int64_t>(p[kWidth]), 1, W - b.left);
  return b;
}

__device__ __forceinline__ bool blur_on(const float* p, int64_t ksize) {
  return p[kBlur] != 0.f && ksize > 1;
}

template <typename out_t>
__device__ __forceinline__ void finish_store(float r, float g, float b, const float* p,
                                             const CallArgs& k, out_t* out, int64_t so0,
                                             int64_t sc, int64_t sh, int64_t sw, int64_t img,
                                             int64_t y, int64_t x) {
  float v[3] = {r, g, b};
  const bool sol = p[kSolarize] != 0.f;
  out_t* o = out + img * so0 + y * sh + x * sw;
  for (int c = 0; c < 3; ++c) {
    const float s = sol ? solarize(v[c], k.threshold) : v[c];
    o[c * sc] = static_cast<out_t>(normalize(s, k.mean[c], k.std[c]));
  }
}

__global__ void resize_pre_kernel(const uint8_t* __restrict__ data,
                                  const int64_t* __restrict__ meta,
                                  const float* __restrict__ params, CallArgs k,
                                  float* __restrict__ buf, double* __restrict__ sums) {
  __shared__ double shared[32];
  const int64_t img = blockIdx.y, S = k.S, plane = S * S;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const float* p = params + img * kNumParams;
  const JitterPlan plan = jitter_plan(p);
  double gsum = 0.0;
  if (pix < plane) {
    const int64_t y = pix / S, x = pix % S;
    const int64_t off = meta[3 * img], H = meta[3 * img + 1], W = meta[3 * img + 2];
    const Box bx = crop_box(p, H, W);
    const int64_t xs = p[kFlip] != 0.f ? S - 1 - x : x;  // flip after the resize
    const AAFilter fx = aa_filter(bx.w, S), fy = aa_filter(bx.h, S);
    int64_t xmin, xsize, ymin, ysize;
    const float cx = aa_range(fx, xs, bx.w, xmin, xsize);
    const float cy = aa_range(fy, y, bx.h, ymin, ysize);
    float totx = 0.f, toty = 0.f;
    for (int64_t i = 0; i < xsize; ++i) totx += aa_weight(fx, cx, xmin + i);
    for (int64_t j = 0; j < ysize; ++j) toty += aa_weight(fy, cy, ymin + j);
    const float nx = totx != 0.f ? 1.f / totx : 0.f;
    const float ny = toty != 0.f ? 1.f / toty : 0.f;
    float acc[3] = {0.f, 0.f, 0.f};
    const uint8_t* src = data + off + (bx.top + ymin) * W + bx.left + xmin;
    for (int64_t j = 0; j < ysize; ++j) {
      const float wy = aa_weight(fy, cy, ymin + j) * ny;
      float row[3] = {0.f, 0.f, 0.f};
      for (int64_t i = 0; i < xsize; ++i) {
        const float wx = aa_weight(fx, cx, xmin + i) * nx;
        for (int c = 0; c < 3; ++c) row[c] += wx * static_cast<float>(src[c * H * W + j * W + i]);
      }
      for (int c = 0; c < 3; ++c) acc[c] += wy * row[c];
    }
    float r = acc[0] * (1.f / 255.f), g = acc[1] * (1.f / 255.f), b = acc[2] * (1.f / 255.f);
#pragma unroll
    for (int q = 0; q < 4; ++q)  // constant trip count: plan.ops stays in registers
      if (q < plan.split) jitter_op(plan.ops[q], r, g, b, p, 0.f);
    float* o = buf + img * 3 * plane + pix;
    o[0] = r;
    o[plane] = g;
    o[2 * plane] = b;
    gsum = gray(r, g, b);
  }
  if (plan.split < plan.n_ops) {
    gsum = cuda::block_reduce(gsum, cuda::SumOp(), 0.0, shared);
    if (threadIdx.x == 0) atomicAdd(sums + img, gsum);
  }
}

template <typename out_t>
__global__ void post_kernel(const float* __restrict__ params, CallArgs k, float* __restrict__ buf,
                            const double* __restrict__ sums, out_t* __restrict__ out,
                            int64_t so0, int64_t sc, int64_t sh, int64_t sw) {
  const int64_t img = blockIdx.y, S = k.S, plane = S * S;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pix >= plane) return;
  const float* p = params + img * kNumParams;
  const JitterPlan plan = jitter_plan(p);
  float* o = buf + img * 3 * plane + pix;
  float r = o[0], g = o[plane], b = o[2 * plane];
  const float mean = static_cast<float>(sums[img] / static_cast<double>(plane));
#pragma unroll
  for (int q = 0; q < 4; ++q)
    if (q >= plan.split && q < plan.n_ops) jitter_op(plan.ops[q], r, g, b, p, mean);
  if (p[kGray] != 0.f) to_gray3(r, g, b);
  if (blur_on(p, k.ksize)) {
    o[0] = r;
    o[plane] = g;
    o[2 * plane] = b;
  } else {
    finish_store(r, g, b, p, k, out, so0, sc, sh, sw, img, pix / S, pix % S);
  }
}

// Normalized 1-D Gaussian of every sample (K taps), one thread per sample.
__global__ void gauss_kernel(const float* __restrict__ params, int64_t B, int64_t K,
                             float* __restrict__ gk) {
  const int64_t img = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (img >= B) return;
  const float sigma = params[img * kNumParams + kSigma];
  float* w = gk + img * K;
  float total = 0.f;
  for (int64_t t = 0; t < K; ++t) total += (w[t] = gauss_unnormalized(int(t - K / 2), sigma));
  for (int64_t t = 0; t < K; ++t) w[t] /= total;
}

__global__ void blur_v_kernel(const float* __restrict__ params, CallArgs k,
                              const float* __restrict__ buf, const float* __restrict__ gk,
                              float* __restrict__ buf2) {
  const int64_t img = blockIdx.y, S = k.S, plane = S * S, K = k.ksize, pad = K / 2;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pix >= plane || !blur_on(params + img * kNumParams, K)) return;
  const int64_t y = pix / S, x = pix % S;
  const float* w = gk + img * K;
  const float* src = buf + img * 3 * plane + x;
  float acc[3] = {0.f, 0.f, 0.f};
  for (int64_t t = 0; t < K; ++t) {
    const int64_t yy = reflect(y + t - pad, S);
    for (int c = 0; c < 3; ++c) acc[c] += w[t] * src[c * plane + yy * S];
  }
  float* o = buf2 + img * 3 * plane + pix;
  for (int c = 0; c < 3; ++c) o[c * plane] = acc[c];
}

template <typename out_t>
__global__ void blur_h_kernel(const float* __restrict__ params, CallArgs k,
                              const float* __restrict__ buf2, const float* __restrict__ gk,
                              out_t* __restrict__ out, int64_t so0, int64_t sc, int64_t sh,
                              int64_t sw) {
  const int64_t img = blockIdx.y, S = k.S, plane = S * S, K = k.ksize, pad = K / 2;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const float* p = params + img * kNumParams;
  if (pix >= plane || !blur_on(p, K)) return;
  const int64_t y = pix / S, x = pix % S;
  const float* w = gk + img * K;
  const float* src = buf2 + img * 3 * plane + y * S;
  float acc[3] = {0.f, 0.f, 0.f};
  for (int64_t t = 0; t < K; ++t) {
    const int64_t xx = reflect(x + t - pad, S);
    for (int c = 0; c < 3; ++c) acc[c] += w[t] * src[c * plane + xx];
  }
  finish_store(acc[0], acc[1], acc[2], p, k, out, so0, sc, sh, sw, img, y, x);
}

template <typename out_t>
void launch(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& params,
            const CallArgs& k, at::Tensor& out) {
  const int64_t B = params.size(0), S = k.S, plane = S * S;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto fopt = params.options();
  at::Tensor buf = at::empty({B, 3, S, S}, fopt);
  at::Tensor sums = at::zeros({B}, fopt.dtype(at::kDouble));
  const dim3 grid(static_cast<unsigned>((plane + kThreads - 1) / kThreads),
                  static_cast<unsigned>(B));
  out_t* o = reinterpret_cast<out_t*>(out.data_ptr());
  const int64_t so0 = out.stride(0), sc = out.stride(1), sh = out.stride(2), sw = out.stride(3);
  const float* p = params.data_ptr<float>();
  resize_pre_kernel<<<grid, kThreads, 0, stream>>>(data.data_ptr<uint8_t>(),
                                                   meta.data_ptr<int64_t>(), p, k,
                                                   buf.data_ptr<float>(),
                                                   sums.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  post_kernel<out_t><<<grid, kThreads, 0, stream>>>(p, k, buf.data_ptr<float>(),
                                                    sums.data_ptr<double>(), o, so0, sc, sh, sw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (k.ksize > 1) {
    at::Tensor gk = at::empty({B, k.ksize}, fopt);
    at::Tensor buf2 = at::empty_like(buf);
    gauss_kernel<<<static_cast<unsigned>((B + 127) / 128), 128, 0, stream>>>(
        p, B, k.ksize, gk.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blur_v_kernel<<<grid, kThreads, 0, stream>>>(p, k, buf.data_ptr<float>(),
                                                 gk.data_ptr<float>(), buf2.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blur_h_kernel<out_t><<<grid, kThreads, 0, stream>>>(p, k, buf2.data_ptr<float>(),
                                                        gk.data_ptr<float>(), o, so0, sc, sh,
                                                        sw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor augment_cuda(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& params,
                        int64_t size, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                        double solarize_threshold, int64_t blur_kernel_size,
                        at::ScalarType dtype, bool channels_last) {
  const CallArgs k = call_args(data, meta, params, size, mean, std, solarize_threshold,
                               blur_kernel_size, dtype);
  TORCH_CHECK(params.size(0) <= 65535, "augment: at most 65535 images per call on CUDA");
  c10::cuda::CUDAGuard guard(params.device());
  at::Tensor out = empty_output(params, size, dtype, channels_last);
  if (params.size(0) == 0) return out;
  dispatch_out(dtype, [&](auto t) { launch<decltype(t)>(data, meta, params, k, out); });
  return out;
}

}  // namespace
}  // namespace sslk::augment

TORCH_LIBRARY_IMPL(sslkernels, CUDA, m) {
  m.impl("augment", &sslk::augment::augment_cuda);
}
