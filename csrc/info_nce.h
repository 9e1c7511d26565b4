// Host-side pieces of the fused InfoNCE ops shared by the CPU and CUDA implementations: input
// preparation (upcast + L2 normalization) and the backward of the normalization, both written
// with ATen ops so one body serves every device.
#pragma once
#include <ATen/ATen.h>

namespace sslk::info_nce {

constexpr double kNormEps = 1e-12;  // F.normalize's eps

// Rows of x upcast to the accumulation dtype and, when `normalize`, divided by their clamped
// norm (exactly F.normalize). `rnorm` holds 1/max(||x||, eps) per row (undefined otherwise).
// `padded` is the buffer x is the head of: x followed by the zero rows asked for (the tiled
// CPU kernels read past the end to keep their GEMMs above a minimum size).
struct UnitRows {
  at::Tensor x;
  at::Tensor rnorm;
  at::Tensor norm;
  at::Tensor padded;
};

inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A (rows + pad_rows, d) buffer of the accumulation dtype whose last pad_rows rows are zero;
// the caller fills the first `rows` and hands it to normalize_rows.
inline at::Tensor row_buffer(int64_t rows, int64_t pad_rows, int64_t d, const at::Tensor& like,
                             at::ScalarType acc) {
  at::Tensor buf = at::empty({rows + pad_rows, d}, like.options().dtype(acc));
  if (pad_rows > 0) buf.narrow(0, rows, pad_rows).zero_();
  return buf;
}

// Normalizes (in place) the first `rows` rows of a filled row_buffer.
inline UnitRows normalize_rows(const at::Tensor& buf, int64_t rows, bool normalize) {
  at::Tensor x = buf.narrow(0, 0, rows);
  if (!normalize) return {x, at::Tensor(), at::Tensor(), buf};
  at::Tensor norm = at::linalg_vector_norm(x, 2, {1}, /*keepdim=*/true);
  at::Tensor denom = norm.clamp_min(kNormEps);
  x.div_(denom);
  return {x, denom.reciprocal(), norm, buf};
}

// The rows of `parts`, stacked, upcast and normalized in one new buffer (no other copy: this is
// the only N x D temporary of a forward).
inline UnitRows unit_rows(at::TensorList parts, bool normalize, at::ScalarType acc,
                          int64_t pad_rows = 0) {
  int64_t rows = 0;
  for (const auto& p : parts) rows += p.size(0);
  at::Tensor buf = row_buffer(rows, pad_rows, parts[0].size(1), parts[0], acc);
  int64_t r0 = 0;
  for (const auto& p : parts) {
    buf.narrow(0, r0, p.size(0)).copy_(p);
    r0 += p.size(0);
  }
  return normalize_rows(buf, rows, normalize);
}

// <a_i, b_i> for every row, without an N x D temporary.
inline at::Tensor row_dot(const at::Tensor& a, const at::Tensor& b) {
  return at::bmm(a.unsqueeze(1), b.unsqueeze(2)).view({a.size(0)});
}

// In place on dxn: d/dx of x / max(||x||, eps) applied to the gradient of the normalized rows.
inline at::Tensor& unit_rows_backward_(at::Tensor& dxn, const UnitRows& u, bool normalize) {
  if (!normalize) return dxn;
  at::Tensor dot = row_dot(u.x, dxn).unsqueeze(1) * (u.norm > kNormEps);
  dxn.addcmul_(u.x, dot, -1).mul_(u.rnorm);
  return dxn;
}

// S = a b^T / tau into `out` (the scale rides on the GEMM's alpha: no scaled copy of a).
inline void scaled_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double inv_t) {
  at::addmm_out(out, out, a, b.t(), /*beta=*/0, /*alpha=*/inv_t);
}

// Logit of each row with its positive: rows i and i+N of the stacked views pair up.
inline at::Tensor pair_positive_logits(const at::Tensor& zn, int64_t n, double inv_t) {
  at::Tensor p = row_dot(zn.narrow(0, 0, n), zn.narrow(0, n, n)) * inv_t;
  return at::cat({p, p});
}

// The kernels reduce over the negatives only (the positive and the diagonal are masked) and
// return lse_neg; the loss is then softplus(lse_neg - pos) = log(1 + sum_neg e^(s - pos)), which
// keeps full relative precision when the positive dominates and the loss is tiny (forming
// lse - pos from a full log-sum-exp of ~1/tau would lose it to rounding). An empty set of
// negatives (lse_neg = -inf) gives 0.
inline at::Tensor loss_from_lse_neg(const at::Tensor& lse_neg, const at::Tensor& pos) {
  return at::softplus(lse_neg - pos);
}

// log(l_a e^{t_a} + l_b e^{t_b}): the log-sum-exp of two running states (max, sum) whose maxima
// are given relative to a pivot (t = m - pivot), i.e. a row's loss when the pivot is its
// positive logit. Forming each log-sum-exp at the magnitude of the logits (~1/tau) and then
// subtracting the positive rounds at that scale (1e-6 relative on a loss of log(2N-1) at
// tau = 0.01); here the maxima only meet as differences. With side a the positive itself
// (t_a = 0, l_a = 1) this is log1p(l_b e^{t_b}): the correctly rounded log(2N-1) when all
// logits are equal, and full relative precision when the positive dominates. An empty side has
// t = -inf, l = 0; side a must not be empty unless b is not either (the caller masks such rows).
inline at::Tensor log_sum_states(const at::Tensor& ta, const at::Tensor& la, const at::Tensor& tb,
                                 const at::Tensor& lb) {
  constexpr double kFar = 20;  // b above a by more: e^(a-b) < 2e-9, the near form could overflow
  at::Tensor a = ta + at::log(la);
  at::Tensor b = tb + at::log(lb);
  at::Tensor near = a + at::log1p(lb / la * at::exp(tb - ta));
  at::Tensor far = b + at::log1p(at::exp(a - b));
  return at::where(b - a > kFar, far, near);
}

// The two-view / MoCo loss of each row from its negatives' state (m, l) and its positive logit.
inline at::Tensor loss_from_negative_state(const at::Tensor& m, const at::Tensor& l,
                                           const at::Tensor& pos) {
  return log_sum_states(at::zeros_like(pos), at::ones_like(pos), m - pos, l);
}

// What both two-view backward kernels start from: the stacked unit rows, the upstream gradient,
// and each row's loss and full log-sum-exp re-derived from lse_neg.
struct PairBackwardInputs {
  UnitRows u;
  at::Tensor g, loss, lse;
};

inline PairBackwardInputs prepare_pair_backward(const at::Tensor& grad_loss,
                                                const at::Tensor& z0, const at::Tensor& z1,
                                                const at::Tensor& lse_neg, double inv_t,
                                                bool normalize, int64_t pad_rows = 0) {
  const int64_t n = z0.size(0);
  TORCH_CHECK(grad_loss.numel() == 2 * n && lse_neg.numel() == 2 * n,
              "grad_loss and lse_neg must have 2N elements");
  const auto acc = acc_dtype(z0);
  UnitRows u = unit_rows({z0, z1}, normalize, acc, pad_rows);
  at::Tensor pos = pair_positive_logits(u.x, n, inv_t);
  at::Tensor loss = loss_from_lse_neg(lse_neg.to(acc), pos);
  at::Tensor lse = (pos + loss).contiguous();
  return {u, grad_loss.to(acc).contiguous(), loss, lse};
}

// Last step of the two-view backward, once dzn holds sum_j M_ij zn_j over the negatives: the
// positive pair (i, p) adds g_i (P_ip - 1) + g_p (P_pi - 1) = g_i expm1(-loss_i) + g_p
// expm1(-loss_p), exact even when P_ip is within rounding of 1; scale by 1/tau; undo the
// normalization; split the views.
inline std::tuple<at::Tensor, at::Tensor> pair_backward_epilogue(
    at::Tensor dzn, const UnitRows& u, const at::Tensor& g, const at::Tensor& loss, double inv_t,
    bool normalize, const at::Tensor& z0, const at::Tensor& z1) {
  const int64_t n = z0.size(0);
  at::Tensor ge = g * at::expm1(-loss);
  at::Tensor c = (ge.narrow(0, 0, n) + ge.narrow(0, n, n)).unsqueeze(1);
  dzn.narrow(0, 0, n).addcmul_(u.x.narrow(0, n, n), c);
  dzn.narrow(0, n, n).addcmul_(u.x.narrow(0, 0, n), c);
  dzn.mul_(inv_t);
  unit_rows_backward_(dzn, u, normalize);
  // copy=true: the two gradients must not share storage (an op's outputs may not alias).
  return {dzn.narrow(0, 0, n).to(z0.scalar_type(), false, true),
          dzn.narrow(0, n, n).to(z1.scalar_type(), false, true)};
}

// The gradient of the MoCo loss needs no pass over the negatives: the forward saved
// wsum_i = sum_j P_ij * Qn_j, so with P_i,pos - 1 = expm1(-loss_i) the rows get
//   dqn_i = g_i/tau * (expm1(-loss_i) * kn_i + wsum_i),   dkn_i = g_i/tau * expm1(-loss_i) * qn_i.
inline std::tuple<at::Tensor, at::Tensor> negatives_backward(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& lse_neg, const at::Tensor& wsum, double inv_t, bool normalize) {
  const auto acc = acc_dtype(q);
  UnitRows uq = unit_rows({q}, normalize, acc);
  UnitRows uk = unit_rows({k}, normalize, acc);
  at::Tensor g = grad_loss.to(acc);
  at::Tensor l_pos = row_dot(uq.x, uk.x) * inv_t;
  at::Tensor loss = loss_from_lse_neg(lse_neg.to(acc), l_pos);
  at::Tensor coef = at::expm1(-loss) * g * inv_t;
  at::Tensor dqn = uk.x * coef.unsqueeze(1) + wsum.to(acc) * (g * inv_t).unsqueeze(1);
  at::Tensor dkn = uq.x * coef.unsqueeze(1);
  return {unit_rows_backward_(dqn, uq, normalize).to(q.scalar_type()),
          unit_rows_backward_(dkn, uk, normalize).to(k.scalar_type())};
}

void check_pair(const at::Tensor& z0, const at::Tensor& z1);
void check_negatives(const at::Tensor& q, const at::Tensor& k, const at::Tensor& negatives);

}  // namespace sslk::info_nce
