// Multi-positive InfoNCE rows of one slice of a larger batch: the distributed SupCon loss.
//
// Each rank holds M_r rows; `keys` are every rank's rows gathered (M in all) with their labels.
// The rank's rows are keys[offset : offset + n] themselves, so one differentiable input carries
// both roles and the gather's backward routes the query gradient home with the key gradient
// (as csrc/info_nce_slice.cpp does for the two-view loss). Row r's logits are against all M
// keys except its own column offset + r; its positives are the other keys with its label.
//
// The keys are swept in column tiles with ATen ops (a GEMM for the tile, a label-equality mask,
// masked maxima and exponential sums merged into the running states of csrc/supcon.h), so the
// temporaries are the unit keys, their gradient and a few (n x tile) blocks: O(M*D) memory,
// never O(n*M). One body serves every device (registered CompositeExplicitAutograd).
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "supcon.h"

namespace sslk::supcon {
namespace {

// Key columns per tile: up to 1024, fewer for many rows, so that a tile holds at most
// kTileElems values (down to a floor of 128 columns that keeps the GEMMs efficient).
constexpr int64_t kSliceTile = 1024, kMinSliceTile = 128, kTileElems = int64_t(1) << 21;

struct Slice {
  int64_t offset, n;
};

void check_slice(const at::Tensor& keys, const at::Tensor& labels, const Slice& s) {
  check_rows("keys", keys, labels);
  TORCH_CHECK(s.n >= 1, "n must be >= 1, got ", s.n);
  TORCH_CHECK(s.offset >= 0 && s.offset + s.n <= keys.size(0), "offset and n must leave the ",
              "rows inside the M = ", keys.size(0), " keys, got offset ", s.offset, ", n ", s.n);
}

// Calls fn(c0, S tile, same-label mask) for each column tile of the (n x M) logits; the
// row's own column is -inf in S and false in the mask.
template <typename Fn>
void for_each_tile(const at::Tensor& q, const at::Tensor& kn, const at::Tensor& row_labels,
                   const at::Tensor& labels, const Slice& sl, double inv_t, const Fn& fn) {
  const int64_t m = kn.size(0), rows = q.size(0);
  const int64_t cols = std::clamp(kTileElems / std::max<int64_t>(rows, 1), kMinSliceTile, kSliceTile);
  at::Tensor buf = at::empty({rows * std::min(cols, m)}, q.options());
  for (int64_t c0 = 0; c0 < m; c0 += cols) {
    const int64_t len = std::min(cols, m - c0);
    at::Tensor s = buf.narrow(0, 0, rows * len).view({rows, len});
    info_nce::scaled_mm_out(s, q, kn.narrow(0, c0, len), inv_t);
    at::Tensor same = row_labels.unsqueeze(1) == labels.narrow(0, c0, len).unsqueeze(0);
    // Own columns: the diagonal run of the rows whose key index falls in [c0, c0 + len).
    const int64_t lo = std::max(sl.offset, c0), hi = std::min(sl.offset + sl.n, c0 + len);
    if (lo < hi) {
      s.narrow(0, lo - sl.offset, hi - lo).narrow(1, lo - c0, hi - lo).diagonal().fill_(
          -std::numeric_limits<double>::infinity());
      same.narrow(0, lo - sl.offset, hi - lo).narrow(1, lo - c0, hi - lo).diagonal().fill_(false);
    }
    fn(c0, s, same);
  }
}

// Merges the row-wise max / sum of exp of x (-inf entries excluded) into the state (m, l).
void merge_rows_(at::Tensor& m, at::Tensor& l, const at::Tensor& x) {
  at::Tensor m_new = at::maximum(m, std::get<0>(x.max(1)));
  // A row with nothing yet (-inf) pivots at 0 so that the exponentials stay 0, not NaN.
  at::Tensor pivot = m_new.masked_fill(at::isinf(m_new), 0);
  l = l * at::exp(m - pivot) + at::exp(x - pivot.unsqueeze(1)).sum(1);
  m = m_new;
}

std::tuple<at::Tensor, at::Tensor> slice_fwd(const at::Tensor& keys, const at::Tensor& labels,
                                             int64_t offset, int64_t n, double inv_t,
                                             bool normalize) {
  const Slice sl{offset, n};
  check_slice(keys, labels, sl);
  const at::NoTF32Guard exact_fp32;  // ATen GEMMs on any device: no TF32 for fp32 (see info_nce)
  UnitRows u = info_nce::unit_rows({keys}, normalize, acc_dtype(keys));
  at::Tensor q = u.x.narrow(0, offset, n);
  at::Tensor row_labels = labels.narrow(0, offset, n);
  const double ninf = -std::numeric_limits<double>::infinity();
  at::Tensor mp = at::full({n}, ninf, q.options()), lp = at::zeros({n}, q.options());
  at::Tensor mn = mp.clone(), ln = lp.clone(), psum = lp.clone();
  for_each_tile(q, u.x, row_labels, labels, sl, inv_t,
                [&](int64_t, at::Tensor& s, const at::Tensor& same) {
                  psum.add_(s.masked_fill(same.logical_not(), 0).sum(1));
                  merge_rows_(mp, lp, s.masked_fill(same.logical_not(), ninf));
                  merge_rows_(mn, ln, s.masked_fill_(same, ninf));
                });
  return finish_rows(mp, lp, psum, mn, ln, positive_counts(labels, row_labels, q.scalar_type()));
}

at::Tensor slice_bwd(const at::Tensor& grad_loss, const at::Tensor& keys, const at::Tensor& labels,
                     const at::Tensor& loss, const at::Tensor& lse, int64_t offset, int64_t n,
                     double inv_t, bool normalize) {
  const Slice sl{offset, n};
  check_slice(keys, labels, sl);
  TORCH_CHECK(grad_loss.numel() == n && loss.numel() == n && lse.numel() == n,
              "grad_loss, loss and lse must have n = ", n, " elements");
  const auto acc = acc_dtype(keys);
  const at::NoTF32Guard exact_fp32;
  UnitRows u = info_nce::unit_rows({keys}, normalize, acc);
  at::Tensor q = u.x.narrow(0, offset, n);
  at::Tensor row_labels = labels.narrow(0, offset, n);
  at::Tensor count = positive_counts(labels, row_labels, acc);
  const RowGrad rg = row_grad(grad_loss.to(acc), loss.to(acc), count);
  // A row with no other key at all (M = 1) has lse = -inf; its only logit is its own, masked.
  auto [hi, lo] = split_lse(lse.masked_fill(at::isinf(lse), 0), acc);
  hi = hi.unsqueeze(1);
  lo = lo.unsqueeze(1);
  at::Tensor g = rg.g.unsqueeze(1);
  // The positive's term P_ip - 1/c_i, or expm1(-loss_i) for a row's only positive.
  at::Tensor only = (count == 1).unsqueeze(1);
  at::Tensor inv_count = rg.inv_count.unsqueeze(1), one_minus = rg.one_minus.unsqueeze(1);
  at::Tensor dkn = at::zeros_like(u.x);
  at::Tensor dq = at::zeros_like(q);
  for_each_tile(q, u.x, row_labels, labels, sl, inv_t,
                [&](int64_t c0, at::Tensor& s, const at::Tensor& same) {
                  s.sub_(hi).sub_(lo).exp_();  // P; 0 on the own column (-inf logit)
                  at::Tensor pos = at::where(only, one_minus, s - inv_count);
                  at::Tensor c = at::where(same, pos, s).mul_(g);
                  dq.addmm_(c, u.x.narrow(0, c0, c.size(1)));
                  dkn.narrow(0, c0, c.size(1)).addmm_(c.t(), q);
                });
  dkn.narrow(0, offset, n).add_(dq);
  dkn.mul_(inv_t);
  info_nce::unit_rows_backward_(dkn, u, normalize);
  return dkn.to(keys.scalar_type());
}

}  // namespace
}  // namespace sslk::supcon

TORCH_LIBRARY_IMPL(sslkernels, CompositeExplicitAutograd, m) {
  m.impl("supcon_slice_fwd", &sslk::supcon::slice_fwd);
  m.impl("supcon_slice_bwd", &sslk::supcon::slice_bwd);
}
