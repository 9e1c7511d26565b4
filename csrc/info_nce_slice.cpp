// Two-view NT-Xent rows of one slice of a larger stacked batch: the distributed SimCLR loss.
//
// Each rank holds its own N pairs; the keys are every rank's rows gathered (M = world * 2N rows).
// The rank's 2N query rows are rows of the keys themselves (view 0 at offset0, view 1 at
// offset1), so one differentiable input carries both roles and the gather's backward routes the
// query gradient home with the key gradient. Row i's logits are its similarities with all M keys
// except itself; its positive is its other view at its global column. The kernels reduce over the
// negatives only (self and positive masked) and return lse_neg, as the other InfoNCE ops do.
//
// The keys are swept in tiles of at most 1024 columns with ATen ops (a GEMM for the tile, the
// masking of at most four diagonal runs, a row log-sum-exp merged into the running one), so the
// only temporaries are the unit keys, their gradient and one (2N x tile) block (16 MB in fp32
// up to 2N = 32768 rows): memory O(M*D), never O(N*M). The same body runs on every device (CPU: BLAS GEMM and vectorized ATen elementwise
// ops, multi-threaded by ATen; CUDA: cuBLAS), registered as CompositeExplicitAutograd.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "info_nce.h"

namespace sslk::info_nce {
namespace {

// Key columns per tile: up to 1024, fewer when the rank has many rows, so that one tile stays
// within kTileElems values (16 MB in fp32) down to a floor of 128 columns that keeps the GEMMs
// efficient.
constexpr int64_t kSliceTile = 1024, kMinSliceTile = 128, kTileElems = int64_t(1) << 22;

int64_t tile_columns(int64_t rows) {
  return std::clamp(kTileElems / std::max<int64_t>(rows, 1), kMinSliceTile, kSliceTile);
}

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

// The query rows [view 0; view 1], a view of the keys when the views are adjacent (the layout
// fused_info_nce gathers), and the two views themselves.
struct Queries {
  at::Tensor q, v0, v1;
};

Queries queries(const at::Tensor& kn, const Slice& s) {
  at::Tensor v0 = kn.narrow(0, s.off0, s.n), v1 = kn.narrow(0, s.off1, s.n);
  at::Tensor q = s.off1 == s.off0 + s.n ? kn.narrow(0, s.off0, 2 * s.n) : at::cat({v0, v1});
  return {q, v0, v1};
}

// Each row's logit with its positive, [view 0; view 1] order.
at::Tensor positive_logits(const Queries& qs, double inv_t) {
  at::Tensor p = row_dot(qs.v0, qs.v1) * inv_t;
  return at::cat({p, p});
}

// Calls fn(c0, S tile) for each tile of the (2N x M) logits, S = q kn^T / tau.
template <typename Fn>
void for_each_tile(const at::Tensor& q, const at::Tensor& kn, double inv_t, const Fn& fn) {
  const int64_t m = kn.size(0), rows = q.size(0), cols = tile_columns(rows);
  at::Tensor buf = at::empty({rows * std::min(cols, m)}, q.options());
  for (int64_t c0 = 0; c0 < m; c0 += cols) {
    const int64_t len = std::min(cols, m - c0);
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
  // ATen GEMMs run on every device here: on CUDA they would follow the global TF32 switches,
  // and an fp32 loss must not depend on them.
  const at::NoTF32Guard exact_fp32;
  UnitRows u = unit_rows({keys}, normalize, acc_dtype(keys));
  const Queries qs = queries(u.x, sl);
  const at::Tensor& q = qs.q;
  at::Tensor lse_neg = at::full({2 * n}, -std::numeric_limits<double>::infinity(), q.options());
  for_each_tile(q, u.x, inv_t, [&](int64_t c0, at::Tensor& s) {
    fill_excluded_(s, sl, c0, -std::numeric_limits<double>::infinity());
    // logsumexp and logaddexp both keep an all -inf row at -inf (no negatives yet).
    lse_neg = at::logaddexp(lse_neg, at::logsumexp(s, {1}));
  });
  return {loss_from_lse_neg(lse_neg, positive_logits(qs, inv_t)), lse_neg};
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
  const at::NoTF32Guard exact_fp32;
  UnitRows u = unit_rows({keys}, normalize, acc);
  const Queries qs = queries(u.x, sl);
  const at::Tensor& q = qs.q;
  at::Tensor pos = positive_logits(qs, inv_t);
  at::Tensor loss = loss_from_lse_neg(lse_neg.to(acc), pos);
  at::Tensor lse = (pos + loss).unsqueeze(1);
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
  dq.narrow(0, 0, n).addcmul_(qs.v1, ge.narrow(0, 0, n));
  dq.narrow(0, n, n).addcmul_(qs.v0, ge.narrow(0, n, n));
  dkn.narrow(0, offset1, n).addcmul_(qs.v0, ge.narrow(0, 0, n));
  dkn.narrow(0, offset0, n).addcmul_(qs.v1, ge.narrow(0, n, n));
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
