// Multi-positive InfoNCE (supervised contrastive, SupCon's L_out): the pieces shared by the CPU
// kernel (csrc/cpu/supcon.cpp) and the slice op of the distributed loss (csrc/supcon_slice.cpp).
//
// Rows z (M, D), integer labels (M,), S = Zn Zn^T / tau with Zn the (normalized) rows. Row i's
// positives P(i) are the other rows with its label, c_i = |P(i)|, and
//
//   l_i = logsumexp_{j != i} S_ij - (1/c_i) sum_{p in P(i)} S_ip      (l_i = 0 when c_i = 0).
//
// The kernels keep two running log-sum-exp states per row, over its positives (mp, lp, and the
// sum of their logits psum) and over its negatives (mn, ln), and finish each row with
// log_sum_states (info_nce.h) pivoted at mu_i = psum_i / c_i, so that the maxima only meet as
// differences: with one positive this is the two-view NT-Xent loss computed as its kernel
// computes it (log1p of the negatives' weights relative to the positive).
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "info_nce.h"

namespace sslk::supcon {

using info_nce::acc_dtype;
using info_nce::UnitRows;

// Each row's loss and full log-sum-exp (over all j != i) from its states; `count` = c_i in the
// accumulation dtype. Rows without positives get loss 0; their lse is the negatives' alone
// (-inf for a single row). The lse is float64 whatever the compute type: a float32 lse of
// magnitude ~1/tau = 100 is only good to 4e-6, which the backward's weights exp(S - lse) would
// inherit; split back into two floats (split_lse) it keeps them as good as the logits.
inline std::tuple<at::Tensor, at::Tensor> finish_rows(const at::Tensor& mp, const at::Tensor& lp,
                                                      const at::Tensor& psum,
                                                      const at::Tensor& mn, const at::Tensor& ln,
                                                      const at::Tensor& count) {
  at::Tensor has = count > 0;
  at::Tensor mu = psum / count.clamp_min(1);
  at::Tensor loss = info_nce::log_sum_states(mp - mu, lp, mn - mu, ln);
  loss = at::where(has, loss, at::zeros_like(loss));
  auto wide = [](const at::Tensor& m, const at::Tensor& l) {
    return m.to(at::kDouble) + at::log(l.to(at::kDouble));
  };
  return {loss, at::logaddexp(wide(mp, lp), wide(mn, ln))};
}

// A float64 lse as hi + lo in the compute type (see finish_rows); -inf stays (-inf, 0).
inline std::pair<at::Tensor, at::Tensor> split_lse(const at::Tensor& lse, at::ScalarType acc) {
  at::Tensor wide = lse.to(at::kDouble);
  at::Tensor hi = wide.to(acc);
  at::Tensor lo = (wide - hi.to(at::kDouble)).nan_to_num(0.0).to(acc);
  return {hi.contiguous(), lo.contiguous()};
}

// c_i = the number of entries of `all_labels` equal to rows_labels[i], minus one (row i itself,
// which must be among them), as a tensor of `dtype`. Sort + binary search: O(M log M), any device.
inline at::Tensor positive_counts(const at::Tensor& all_labels, const at::Tensor& row_labels,
                                  at::ScalarType dtype) {
  at::Tensor sorted = std::get<0>(at::sort(all_labels));
  at::Tensor hi = at::searchsorted(sorted, row_labels, /*out_int32=*/false, /*right=*/true);
  at::Tensor lo = at::searchsorted(sorted, row_labels, /*out_int32=*/false, /*right=*/false);
  return (hi - lo - 1).to(dtype);
}

// What the backward of a row needs besides its logits: the upstream gradient, zero for rows
// without positives (their loss is the constant 0); 1/c_i (0 when c_i = 0); and for c_i = 1,
// P_ip - 1 = expm1(-loss_i), the positive's coefficient, exact even when P_ip rounds to 1.
struct RowGrad {
  at::Tensor g, inv_count, one_minus;
};

inline RowGrad row_grad(const at::Tensor& grad_loss, const at::Tensor& loss,
                        const at::Tensor& count) {
  at::Tensor has = count > 0;
  at::Tensor g = at::where(has, grad_loss, at::zeros_like(grad_loss));
  at::Tensor inv_count = at::where(has, count.clamp_min(1).reciprocal(), at::zeros_like(count));
  return {g.contiguous(), inv_count.contiguous(), at::expm1(-loss).contiguous()};
}

void check_rows(const char* what, const at::Tensor& z, const at::Tensor& labels);

}  // namespace sslk::supcon
