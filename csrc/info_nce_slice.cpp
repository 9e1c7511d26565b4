// Two-view NT-Xent rows of one slice of a larger stacked batch: the distributed SimCLR loss.
//
// Each rank holds its own N pairs; the keys are every rank's rows gathered (M = world * 2N rows).
// The rank's 2N query rows are rows of the keys themselves (view 0 at offset0, view 1 at
// offset1), so one differentiable input carries both roles and the gather's backward routes the
// query gradient home with the key gradient. Row i's logits are its similarities with all M keys
// except itself; its positive is its other view at its global column. The kernels reduce over the
// negatives only (self and positive masked) and return lse_neg, as the other InfoNCE ops do.
//
// The keys are swept in tiles of kSliceTile columns with ATen ops (a GEMM for the tile, the
// masking of at most four diagonal runs, a row log-sum-exp merged into the running one), so the
// only temporaries are the unit keys and one (2N x tile) block: memory O(M*D + N*tile), never
// O(N*M). The same body runs on every device (CPU: BLAS GEMM and vectorized ATen elementwise
// ops, multi-threaded by ATen; CUDA: cuBLAS), registered as CompositeExplicitAutograd.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "info_nce.h"

namespace sslk::info_nce {
namespace {

constexpr int64_t kSliceTile = 1024;

struct Slice {
  int64_t off0, off1, n;
};

void check_slice(const at::Tensor& keys, const Slice& s) {
  TORCH_CHECK(keys.dim() == 2, "keys must be 2-D (M, D), got ", keys.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(keys.scalar_type()), "keys must be floating point");
  const int64_t m = keys.size(0);
  TORCH_CHECK(s.n >= 1, "n must be >= 1, got ", s.n);
  TORCH_CHECK(s.off0 >= 0 && s.off0 + s.n <= m && s.off1 >= 0 && s.off1 + s.n <= m,
              "offset0 and offset1 must leave n rows inside the M = ", m, " keys, got ",
              s.off0, " and ", s.off1, " with n = ", s.n);
  TORCH_CHECK(s.off0 + s.n <= s.off1 || s.off1 + s.n <= s.off0,
              "the rows of the two views overlap: offset0 = ", s.off0, ", offset1 = ", s.off1,
              ", n = ", s.n);
}

// Calls fn(query_row, tile_col, len) for each diagonal run of excluded entries (a query row's
// own column, or its positive's) that meets columns [c0, c1) of the keys.
template <typename Fn>
void for_each_excluded(const Slice& s, int64_t c0, int64_t c1, const Fn& fn) {
  // (first query row, its column) of the runs: self of view 0, self of view 1, positive of view
  // 0 (the view-1 rows), positive of view 1.
  const int64_t runs[4][2] = {{0, s.off0}, {s.n, s.off1}, {0, s.off1}, {s.n, s.off0}};
  for (const auto& r : runs) {
    const int64_t lo = std::max(r[1], c0), hi = std::min(r[1] + s.n, c1);
    if (lo < hi) fn(r[0] + lo - r[1], lo - c0, hi - lo);
  }
}

void fill_excluded_(at::Tensor& tile, const Slice& s, int64_t c0, double value) {
  for_each_excluded(s, c0, c0 + tile.size(1), [&](int64_t r, int64_t c, int64_t len) {
    tile.narrow(0, r, len).narrow(1, c, len).diagonal().fill_(value);
  });
}

// The query rows [view 0; view 1] and, row for row, their positives [view 1; view 0].
std::pair<at::Tensor, at::Tensor> queries_and_positives(const at::Tensor& kn, const Slice& s) {
  at::Tensor v0 = kn.narrow(0, s.off0, s.n), v1 = kn.narrow(0, s.off1, s.n);
  return {at::cat({v0, v1}), at::cat({v1, v0})};
}

// Calls fn(c0, S tile) for each tile of the (2N x M) logits, S = q kn^T / tau.
template <typename Fn>
void for_each_tile(const at::Tensor& q, const at::Tensor& kn, double inv_t, const Fn& fn) {
  const int64_t m = kn.size(0), rows = q.size(0);
  at::Tensor buf = at::empty({rows * std::min(kSliceTile, m)}, q.options());
  for (int64_t c0 = 0; c0 < m; c0 += kSliceTile) {
    const int64_t len = std::min(kSliceTile, m - c0);
    at::Tensor s = buf.narrow(0, 0, rows * len).view({rows, len});
    scaled_mm_out(s, q, kn.narrow(0, c0, len), inv_t);
    fn(c0, s);
  }
}

std::tuple<at::Tensor, at::Tensor> slice_fwd(const at::Tensor& keys, int64_t offset0,
                                             int64_t offset1, int64_t n, double inv_t,
                                             bool normalize) {
  const Slice sl{offset0, offset1, n};
  check_slice(keys, sl);
  UnitRows u = unit_rows({keys}, normalize, acc_dtype(keys));
  auto [q, p] = queries_and_positives(u.x, sl);
  at::Tensor lse_neg = at::full({2 * n}, -std::numeric_limits<double>::infinity(), q.options());
  for_each_tile(q, u.x, inv_t, [&](int64_t c0, at::Tensor& s) {
    fill_excluded_(s, sl, c0, -std::numeric_limits<double>::infinity());
    // logsumexp and logaddexp both keep an all -inf row at -inf (no negatives yet).
    lse_neg = at::logaddexp(lse_neg, at::logsumexp(s, {1}));
  });
  return {loss_from_lse_neg(lse_neg, row_dot(q, p) * inv_t), lse_neg};
}

// dL/dS_ij = g_i P_ij for the negatives (P_ij = exp(S_ij - lse_i), lse over all of row i's
// logits) and g_i (P_ip - 1) = g_i expm1(-loss_i) for the positive. Each tile gives the queries
// C kn_tile and its own keys C^T q; then the positive terms, and the query gradient joins the
// keys' since the queries are key rows.
at::Tensor slice_bwd(const at::Tensor& grad_loss, const at::Tensor& keys, const at::Tensor& lse_neg,
                     int64_t offset0, int64_t offset1, int64_t n, double inv_t, bool normalize) {
  const Slice sl{offset0, offset1, n};
  check_slice(keys, sl);
  TORCH_CHECK(grad_loss.numel() == 2 * n && lse_neg.numel() == 2 * n,
              "grad_loss and lse_neg must have 2n = ", 2 * n, " elements, got ",
              grad_loss.numel(), " and ", lse_neg.numel());
  const auto acc = acc_dtype(keys);
  UnitRows u = unit_rows({keys}, normalize, acc);
  auto [q, p] = queries_and_positives(u.x, sl);
  at::Tensor loss = loss_from_lse_neg(lse_neg.to(acc), row_dot(q, p) * inv_t);
  at::Tensor lse = (row_dot(q, p) * inv_t + loss).unsqueeze(1);
  at::Tensor g = grad_loss.to(acc).reshape({2 * n, 1});
  at::Tensor dkn = at::zeros_like(u.x);
  at::Tensor dq = at::zeros_like(q);
  for_each_tile(q, u.x, inv_t, [&](int64_t c0, at::Tensor& s) {
    // exp may overflow on the masked self column (S_ii can exceed lse_i); the fill discards it.
    s.sub_(lse).exp_().mul_(g);
    fill_excluded_(s, sl, c0, 0.0);
    dq.addmm_(s, u.x.narrow(0, c0, s.size(1)));
    dkn.narrow(0, c0, s.size(1)).addmm_(s.t(), q);
  });
  at::Tensor ge = g * at::expm1(-loss).unsqueeze(1);
  dq.addcmul_(p, ge);
  dkn.narrow(0, offset1, n).addcmul_(q.narrow(0, 0, n), ge.narrow(0, 0, n));
  dkn.narrow(0, offset0, n).addcmul_(q.narrow(0, n, n), ge.narrow(0, n, n));
  dkn.narrow(0, offset0, n).add_(dq.narrow(0, 0, n));
  dkn.narrow(0, offset1, n).add_(dq.narrow(0, n, n));
  dkn.mul_(inv_t);
  unit_rows_backward_(dkn, u, normalize);
  return dkn.to(keys.scalar_type());
}

}  // namespace
}  // namespace sslk::info_nce

TORCH_LIBRARY_FRAGMENT(sslkernels, m) {
  // Rows: [keys[offset0 : offset0+n]; keys[offset1 : offset1+n]], the positive of each being the
  // same row of the other view; outputs per-row losses and lse_neg like info_nce_pair_fwd.
  m.def("info_nce_slice_fwd(Tensor keys, int offset0, int offset1, int n,"
        " float inv_temperature, bool normalize) -> (Tensor, Tensor)");
  m.def("info_nce_slice_bwd(Tensor grad_loss, Tensor keys, Tensor lse_neg, int offset0,"
        " int offset1, int n, float inv_temperature, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(sslkernels, CompositeExplicitAutograd, m) {
  m.impl("info_nce_slice_fwd", &sslk::info_nce::slice_fwd);
  m.impl("info_nce_slice_bwd", &sslk::info_nce::slice_bwd);
}
