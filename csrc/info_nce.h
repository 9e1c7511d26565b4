// Host-side pieces of the fused InfoNCE ops shared by the CPU and CUDA implementations: input
// preparation (upcast + L2 normalization) and the backward of the normalization, both written
// with ATen ops so one body serves every device.
#pragma once
#include <ATen/ATen.h>

namespace sslk::info_nce {

constexpr double kNormEps = 1e-12;  // F.normalize's eps

// Rows of x upcast to the accumulation dtype and, when `normalize`, divided by their clamped
// norm (exactly F.normalize). `rnorm` holds 1/max(||x||, eps) per row (undefined otherwise).
struct UnitRows {
  at::Tensor x;
  at::Tensor rnorm;
  at::Tensor norm;
};

inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline UnitRows unit_rows(const at::Tensor& x, bool normalize, at::ScalarType acc) {
  at::Tensor xc = x.to(acc).contiguous();
  if (!normalize) return {xc, at::Tensor(), at::Tensor()};
  at::Tensor norm = at::linalg_vector_norm(xc, 2, {1}, /*keepdim=*/true);
  at::Tensor denom = norm.clamp_min(kNormEps);
  return {xc / denom, denom.reciprocal(), norm};
}

// d/dx of x / max(||x||, eps) applied to the gradient of the normalized rows.
inline at::Tensor unit_rows_backward(const at::Tensor& dxn, const UnitRows& u, bool normalize) {
  if (!normalize) return dxn;
  at::Tensor dot = (u.x * dxn).sum(1, /*keepdim=*/true) * (u.norm > kNormEps);
  return (dxn - u.x * dot) * u.rnorm;
}

// Logit of each row with its positive: rows i and i+N of the stacked views pair up.
inline at::Tensor pair_positive_logits(const at::Tensor& zn, int64_t n, double inv_t) {
  at::Tensor p = (zn.narrow(0, 0, n) * zn.narrow(0, n, n)).sum(1) * inv_t;
  return at::cat({p, p});
}

// The gradient of the MoCo loss needs no pass over the negatives: the forward saved
// wsum_i = sum_j P_ij * Qn_j, so with p0_i = P_i,pos the rows get
//   dqn_i = g_i/tau * ((p0_i - 1) * kn_i + wsum_i),   dkn_i = g_i/tau * (p0_i - 1) * qn_i.
inline std::tuple<at::Tensor, at::Tensor> negatives_backward(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
    const at::Tensor& wsum, double inv_t, bool normalize) {
  const auto acc = acc_dtype(q);
  UnitRows uq = unit_rows(q, normalize, acc);
  UnitRows uk = unit_rows(k, normalize, acc);
  at::Tensor g = grad_loss.to(acc);
  at::Tensor l_pos = (uq.x * uk.x).sum(1) * inv_t;
  at::Tensor coef = ((l_pos - lse.to(acc)).exp() - 1.0) * g * inv_t;
  at::Tensor dqn = uk.x * coef.unsqueeze(1) + wsum.to(acc) * (g * inv_t).unsqueeze(1);
  at::Tensor dkn = uq.x * coef.unsqueeze(1);
  return {unit_rows_backward(dqn, uq, normalize).to(q.scalar_type()),
          unit_rows_backward(dkn, uk, normalize).to(k.scalar_type())};
}

void check_pair(const at::Tensor& z0, const at::Tensor& z1);
void check_negatives(const at::Tensor& q, const at::Tensor& k, const at::Tensor& negatives);

}  // namespace sslk::info_nce
