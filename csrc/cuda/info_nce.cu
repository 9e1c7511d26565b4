// CUDA kernels of the fused InfoNCE ops (the C++ path; the default GPU path is Triton, see
// sslkernels/triton_kernels/info_nce.py). Row blocks of the similarity matrix are formed with
// ATen GEMMs, a bounded number of rows at a time (memory O(N*D) plus one bounded block), and the
// per-element work runs in the kernels below using the same math as the CPU kernels
// (info_nce_math.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda/reduce.cuh"
#include "info_nce.h"
#include "info_nce_math.h"

namespace sslk::info_nce {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockElems = int64_t(1) << 23;  // 32 MB of fp32 logits per block

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Column j is a negative of global row i unless it is i itself or i's other view.
__device__ __forceinline__ bool is_negative(int64_t i, int64_t j, int64_t rows) {
  return j != i && j != (i + rows / 2) % rows;
}

// One CUDA block per row of a (b x rows) block of S whose first row is global row `row0`:
// writes the row's log-sum-exp over its negatives (-inf when it has none).
template <typename T>
__global__ void pair_row_lse_kernel(const T* __restrict__ s, int64_t rows, int64_t row0,
                                    T* __restrict__ lse_neg) {
  __shared__ T shared[32];
  const int64_t i = row0 + blockIdx.x;
  const T* r = s + blockIdx.x * rows;
  T m = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < rows; j += blockDim.x)
    if (is_negative(i, j, rows)) m = Math<T>::max(m, r[j]);
  m = cuda::block_reduce(m, cuda::MaxOp(), neg_inf<T>(), shared);
  T l = T(0);
  if (m != neg_inf<T>())
    for (int64_t j = threadIdx.x; j < rows; j += blockDim.x)
      if (is_negative(i, j, rows)) l += softmax_weight(r[j], m);
  l = cuda::block_reduce(l, cuda::SumOp(), T(0), shared);
  if (threadIdx.x == 0) lse_neg[i] = m + ::log(l);
}

// In place: S_ij -> g_i P_ij + g_j P_ji over the negatives, 0 elsewhere (the positive pair is
// added exactly by the epilogue): the coefficient of zn_j in dzn_i.
template <typename T>
__global__ void pair_coef_kernel(T* __restrict__ s, int64_t b, int64_t rows, int64_t row0,
                                 const T* __restrict__ lse, const T* __restrict__ g) {
  const int64_t total = b * rows;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = row0 + idx / rows, j = idx % rows;
    s[idx] = is_negative(i, j, rows) ? pair_grad_coef(s[idx], lse[i], lse[j], g[i], g[j]) : T(0);
  }
}

// One CUDA block per query row over a chunk of negatives: scales logits by the negatives'
// inverse norms, folds the chunk into the running (m, l), and with need_grad leaves
// exp(S - m_new) * rnorm in place for the P @ Qn accumulation (alpha rescales the old one).
template <typename T>
__global__ void neg_chunk_kernel(T* __restrict__ s, int64_t cols, const T* __restrict__ rnorm,
                                 T* __restrict__ m, T* __restrict__ l, T* __restrict__ alpha,
                                 bool need_grad) {
  __shared__ T shared[32];
  const int64_t row = blockIdx.x;
  T* r = s + row * cols;
  T mt = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const T v = rnorm ? r[j] * rnorm[j] : r[j];
    r[j] = v;
    mt = Math<T>::max(mt, v);
  }
  mt = cuda::block_reduce(mt, cuda::MaxOp(), neg_inf<T>(), shared);
  const T m_old = m[row];
  const T m_new = Math<T>::max(m_old, mt);
  T lt = T(0);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const T e = softmax_weight(r[j], m_new);
    lt += e;
    if (need_grad) r[j] = rnorm ? e * rnorm[j] : e;
  }
  lt = cuda::block_reduce(lt, cuda::SumOp(), T(0), shared);
  if (threadIdx.x == 0) {
    const T a = softmax_weight(m_old, m_new);  // 0 while the row was empty (m_old = -inf)
    l[row] = l[row] * a + lt;
    m[row] = m_new;
    alpha[row] = a;
  }
}

int grid_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
}

std::tuple<at::Tensor, at::Tensor> pair_fwd(const at::Tensor& z0, const at::Tensor& z1,
                                            double inv_t, bool normalize) {
  check_pair(z0, z1);
  c10::cuda::CUDAGuard guard(z0.device());
  const auto acc = acc_dtype(z0);
  const int64_t n = z0.size(0), rows = 2 * n;
  UnitRows u = unit_rows({z0, z1}, normalize, acc);
  at::Tensor lse_neg = at::empty({rows}, u.x.options());
  const int64_t bm = std::clamp<int64_t>(kBlockElems / rows, 1, rows);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_pair_fwd_cuda", [&] {
    for (int64_t r0 = 0; r0 < rows; r0 += bm) {
      const int64_t b = std::min(bm, rows - r0);
      at::Tensor s = at::empty({b, rows}, u.x.options());
      scaled_mm_out(s, u.x.narrow(0, r0, b), u.x, inv_t);
      pair_row_lse_kernel<scalar_t><<<b, kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), rows, r0, lse_neg.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss_from_lse_neg(lse_neg, pair_positive_logits(u.x, n, inv_t)), lse_neg};
}

std::tuple<at::Tensor, at::Tensor> pair_bwd(const at::Tensor& grad_loss, const at::Tensor& z0,
                                            const at::Tensor& z1, const at::Tensor& lse_neg,
                                            double inv_t, bool normalize) {
  check_pair(z0, z1);
  c10::cuda::CUDAGuard guard(z0.device());
  auto [u, g, loss, lse_c] = prepare_pair_backward(grad_loss, z0, z1, lse_neg, inv_t, normalize);
  const auto acc = u.x.scalar_type();
  const int64_t rows = u.x.size(0);
  at::Tensor dzn = at::empty_like(u.x);
  const int64_t bm = std::clamp<int64_t>(kBlockElems / rows, 1, rows);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_pair_bwd_cuda", [&] {
    for (int64_t r0 = 0; r0 < rows; r0 += bm) {
      const int64_t b = std::min(bm, rows - r0);
      at::Tensor s = at::empty({b, rows}, u.x.options());
      scaled_mm_out(s, u.x.narrow(0, r0, b), u.x, inv_t);
      pair_coef_kernel<scalar_t><<<grid_for(b * rows), kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), b, rows, r0, lse_c.data_ptr<scalar_t>(),
          g.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor out = dzn.narrow(0, r0, b);
      at::mm_out(out, s, u.x);
    }
  });
  return pair_backward_epilogue(dzn, u, g, loss, inv_t, normalize, z0, z1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neg_fwd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& negatives, double inv_t,
                                                       bool normalize, bool need_grad) {
  check_negatives(q, k, negatives);
  c10::cuda::CUDAGuard guard(q.device());
  const auto acc = acc_dtype(q);
  const int64_t n = q.size(0), d = q.size(1), K = negatives.size(0);
  UnitRows uq = unit_rows({q}, normalize, acc);
  UnitRows uk = unit_rows({k}, normalize, acc);
  at::Tensor qs = uq.x * inv_t;
  at::Tensor l_pos = row_dot(uq.x, uk.x) * inv_t;
  auto opts = uq.x.options();
  at::Tensor m = at::full({n}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor l = at::zeros({n}, opts);
  at::Tensor alpha = at::empty({n}, opts);
  at::Tensor w = need_grad ? at::zeros({n, d}, opts) : at::empty({0}, opts);
  const int64_t kc = std::clamp<int64_t>(kBlockElems / n, 1, std::max<int64_t>(K, 1));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_neg_fwd_cuda", [&] {
    for (int64_t t0 = 0; t0 < K; t0 += kc) {
      const int64_t kt = std::min(kc, K - t0);
      at::Tensor qt = negatives.narrow(0, t0, kt);
      if (qt.scalar_type() != acc) qt = qt.to(acc);  // one chunk, never the whole queue
      at::Tensor rn;
      if (normalize) rn = at::linalg_vector_norm(qt, 2, {1}).clamp_min(kNormEps).reciprocal();
      at::Tensor s = at::mm(qs, qt.t());
      neg_chunk_kernel<scalar_t><<<n, kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), kt, normalize ? rn.data_ptr<scalar_t>() : nullptr,
          m.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
          need_grad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_grad) {
        w.mul_(alpha.unsqueeze(1));
        w.addmm_(s, qt);
      }
    }
  });
  at::Tensor lse_neg = m + l.log();  // -inf without negatives
  at::Tensor loss = loss_from_lse_neg(lse_neg, l_pos);
  if (need_grad) w.mul_((m - (l_pos + loss)).exp().unsqueeze(1));  // P relative to the full lse
  return {loss, lse_neg, w};
}

}  // namespace
}  // namespace sslk::info_nce

TORCH_LIBRARY_IMPL(sslkernels, CUDA, m) {
  m.impl("info_nce_pair_fwd", &sslk::info_nce::pair_fwd);
  m.impl("info_nce_pair_bwd", &sslk::info_nce::pair_bwd);
  m.impl("info_nce_neg_fwd", &sslk::info_nce::neg_fwd);
}
