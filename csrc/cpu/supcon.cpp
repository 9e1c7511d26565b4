// CPU kernel of the multi-positive InfoNCE (SupCon) ops; the contract is in csrc/supcon.cpp.
//
// The rows are first sorted by label (stable), so that each class is one contiguous run: in any
// tile of S the same-label entries are then the rectangles where a class run crosses the row
// block and the column block (a few small squares on the diagonal tiles, rarely anything off
// them), and everything else is a negative. The M x M matrix is swept in the symmetric tiles of
// gram_tiles.h, each tile serving its row block and, by symmetry, its column block: the
// rectangles are read into the positives' states and masked, then the vectorized row / column
// statistics of the rest update the negatives' states. Memory: the sorted unit rows (and their
// gradient in the backward), per-row states, one tile per thread: O(M*D).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "gram_tiles.h"
#include "info_nce.h"
#include "info_nce_math.h"
#include "supcon.h"

namespace sslk::supcon {
namespace {

using gram::GramTiles;
using gram::Vec;

// Rows grouped by label: perm[r] is the original row at sorted position r; cls[r] its class
// (0.., in sorted order); class k holds sorted positions [begin[k], begin[k + 1]).
struct Classes {
  at::Tensor perm;
  std::vector<int64_t> cls, begin;

  int64_t count(int64_t r) const { return begin[cls[r] + 1] - begin[cls[r]] - 1; }
};

Classes group_by_label(const at::Tensor& labels) {
  auto [sorted, perm] = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int64_t m = labels.size(0);
  const int64_t* y = sorted.data_ptr<int64_t>();
  Classes c{perm, std::vector<int64_t>(m), {}};
  for (int64_t r = 0; r < m; ++r) {
    if (r == 0 || y[r] != y[r - 1]) c.begin.push_back(r);
    c.cls[r] = (int64_t)c.begin.size() - 1;
  }
  c.begin.push_back(m);
  return c;
}

// The unit rows in sorted order, in a padded buffer for the tiles (gram::padded_unit_rows).
UnitRows sorted_unit_rows(const at::Tensor& z, const at::Tensor& perm, bool normalize) {
  const auto acc = acc_dtype(z);
  const int64_t m = z.size(0);
  at::Tensor buf = info_nce::row_buffer(m, gram::kMinGemm, z.size(1), z, acc);
  at::Tensor head = buf.narrow(0, 0, m);
  if (z.scalar_type() == acc) {
    at::index_select_out(head, z, 0, perm);
  } else {
    head.copy_(z.index_select(0, perm));
  }
  return info_nce::normalize_rows(buf, m, normalize);
}

// Calls fn(r0, r1, c0, c1) for each class run that meets both the rows [a0, a1) and the
// columns [b0, b1) (sorted positions): the rectangles of same-label entries of that tile.
template <typename Fn>
void for_each_class_block(const Classes& c, int64_t a0, int64_t a1, int64_t b0, int64_t b1,
                          const Fn& fn) {
  const int64_t k0 = std::max(c.cls[a0], c.cls[b0]), k1 = std::min(c.cls[a1 - 1], c.cls[b1 - 1]);
  for (int64_t k = k0; k <= k1; ++k) {
    const int64_t r0 = std::max(c.begin[k], a0), r1 = std::min(c.begin[k + 1], a1);
    const int64_t c0 = std::max(c.begin[k], b0), c1 = std::min(c.begin[k + 1], b1);
    if (r0 < r1 && c0 < c1) fn(r0, r1, c0, c1);
  }
}

// Per-row running states (sorted order), see csrc/supcon.h.
template <typename T>
struct States {
  std::vector<T> mp, lp, psum, mn, ln;
  explicit States(int64_t m)
      : mp(m, -std::numeric_limits<T>::infinity()), lp(m, T(0)), psum(m, T(0)),
        mn(m, -std::numeric_limits<T>::infinity()), ln(m, T(0)) {}
};

// Reads the same-label rectangle [r0, r1) x [c0, c1) of tile x (rows from a0, columns from
// b0, row stride rb) into the positives' states of its rows and, off the diagonal, of its
// columns; then masks it (and, on a diagonal tile, each row's own entry) to -inf.
template <typename T>
void take_positives(T* x, int64_t a0, int64_t b0, int64_t rb, bool diagonal, int64_t r0,
                    int64_t r1, int64_t c0, int64_t c1, States<T>& st) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t len = c1 - c0;
  for (int64_t r = r0; r < r1; ++r) {
    T* row = x + (r - a0) * rb + (c0 - b0);
    const int64_t self = diagonal ? r - c0 : -1;  // own column inside the run (diagonal tiles)
    T sum;
    if (self >= 0 && self < len) {
      row[self] = ninf;
      sum = gram::run_sum(row, self) + gram::run_sum(row + self + 1, len - self - 1);
    } else {
      sum = gram::run_sum(row, len);
    }
    T mt, lt;
    gram::row_stats(row, len, mt, lt);
    lse_merge(st.mp[r], st.lp[r], mt, lt);
    st.psum[r] += sum;
  }
  if (!diagonal) {
    const int64_t rows = r1 - r0;
    const T* blk = x + (r0 - a0) * rb + (c0 - b0);
    std::vector<T> cm(len), cl(len), cs(len, T(0));
    gram::col_stats(blk, rows, len, rb, cm.data(), cl.data());
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < len; ++j) cs[j] += blk[i * rb + j];
    for (int64_t j = 0; j < len; ++j) {
      lse_merge(st.mp[c0 + j], st.lp[c0 + j], cm[j], cl[j]);
      st.psum[c0 + j] += cs[j];
    }
  }
  for (int64_t r = r0; r < r1; ++r) std::fill_n(x + (r - a0) * rb + (c0 - b0), len, ninf);
}

template <typename T>
void forward_states(const UnitRows& u, const Classes& cls, double inv_t, States<T>& st) {
  const int64_t m = u.x.size(0);
  GramTiles<T> tiles{u.padded, inv_t, m};
  tiles.for_each_pair([&](at::Tensor& buf, int64_t a, int64_t b) {
    at::Tensor s = tiles.tile(buf, a, b);
    T* x = s.data_ptr<T>();
    const int64_t ra = tiles.len(a), rb = tiles.len(b), a0 = tiles.start(a), b0 = tiles.start(b);
    for_each_class_block(cls, a0, a0 + ra, b0, b0 + rb,
                         [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
                           take_positives(x, a0, b0, rb, a == b, r0, r1, c0, c1, st);
                         });
    gram::merge_tile_stats(x, a0, ra, b0, rb, a == b, st.mn.data(), st.ln.data());
  });
}

template <typename T>
at::Tensor to_tensor(const std::vector<T>& v, const at::TensorOptions& opts) {
  at::Tensor t = at::empty({(int64_t)v.size()}, opts);
  std::copy(v.begin(), v.end(), t.data_ptr<T>());
  return t;
}

at::Tensor sorted_counts(const Classes& cls, const at::TensorOptions& opts) {
  const int64_t m = (int64_t)cls.cls.size();
  at::Tensor c = at::empty({m}, opts.dtype(at::kLong));
  int64_t* p = c.data_ptr<int64_t>();
  for (int64_t r = 0; r < m; ++r) p[r] = cls.count(r);
  return c.to(opts.dtype());
}

// Values of sorted position r back at original row perm[r].
at::Tensor unsort(const at::Tensor& sorted, const at::Tensor& perm) {
  return at::empty_like(sorted).index_copy_(0, perm, sorted);
}

std::tuple<at::Tensor, at::Tensor> supcon_fwd(const at::Tensor& z, const at::Tensor& labels,
                                              double inv_t, bool normalize) {
  check_rows("z", z, labels);
  const Classes cls = group_by_label(labels.contiguous());
  const UnitRows u = sorted_unit_rows(z, cls.perm, normalize);
  const auto opts = u.x.options();
  at::Tensor loss, lse;
  AT_DISPATCH_FLOATING_TYPES(u.x.scalar_type(), "supcon_fwd", [&] {
    States<scalar_t> st(z.size(0));
    forward_states(u, cls, inv_t, st);
    std::tie(loss, lse) = finish_rows(to_tensor(st.mp, opts), to_tensor(st.lp, opts),
                                      to_tensor(st.psum, opts), to_tensor(st.mn, opts),
                                      to_tensor(st.ln, opts), sorted_counts(cls, opts));
  });
  return {unsort(loss, cls.perm), unsort(lse, cls.perm)};
}

// The coefficient tile C = G + G^T of one tile of logits x, in place (see the contract in
// csrc/supcon.cpp): pair_grad_coef everywhere, then the same-label rectangles recomputed from
// their logits (kept aside first) with their positive terms, and the diagonal zeroed.
template <typename T>
void coefficient_tile(T* x, int64_t a0, int64_t ra, int64_t b0, int64_t rb, bool diagonal,
                      const Classes& cls, const T* hi, const T* lo, const T* g,
                      const T* inv_count, const T* one_minus, std::vector<T>& kept) {
  struct Rect {
    int64_t r0, r1, c0, c1;
  };
  std::vector<Rect> rects;
  kept.clear();
  for_each_class_block(cls, a0, a0 + ra, b0, b0 + rb,
                       [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
                         rects.push_back({r0, r1, c0, c1});
                         for (int64_t r = r0; r < r1; ++r)
                           for (int64_t c = c0; c < c1; ++c)
                             kept.push_back(x[(r - a0) * rb + (c - b0)]);
                       });
  const T *hi_a = hi + a0, *lo_a = lo + a0, *g_a = g + a0;
  const T *hi_b = hi + b0, *lo_b = lo + b0, *g_b = g + b0;
  gram::map_tile(
      x, ra, rb,
      [&](const Vec<T>& v, int64_t i, int64_t j) {
        return pair_grad_coef_split(v, Vec<T>(hi_a[i]), Vec<T>(lo_a[i]), Vec<T>::loadu(hi_b + j),
                                    Vec<T>::loadu(lo_b + j), Vec<T>(g_a[i]),
                                    Vec<T>::loadu(g_b + j));
      },
      [&](T v, int64_t i, int64_t j) {
        return pair_grad_coef_split(v, hi_a[i], lo_a[i], hi_b[j], lo_b[j], g_a[i], g_b[j]);
      });
  // P_ij - 1/c_i for a positive, or expm1(-loss_i) when it is the row's only one.
  auto pos_term = [&](T s, int64_t r) {
    return cls.count(r) == 1 ? one_minus[r]
                             : Math<T>::exp((s - hi[r]) - lo[r]) - inv_count[r];
  };
  size_t k = 0;
  for (const Rect& q : rects) {
    for (int64_t r = q.r0; r < q.r1; ++r) {
      for (int64_t c = q.c0; c < q.c1; ++c) {
        const T s = kept[k++];
        x[(r - a0) * rb + (c - b0)] =
            (diagonal && r == c) ? T(0) : g[r] * pos_term(s, r) + g[c] * pos_term(s, c);
      }
    }
  }
}

at::Tensor supcon_bwd(const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& labels,
                      const at::Tensor& loss, const at::Tensor& lse, double inv_t,
                      bool normalize) {
  check_rows("z", z, labels);
  const int64_t m = z.size(0);
  TORCH_CHECK(grad_loss.numel() == m && loss.numel() == m && lse.numel() == m,
              "grad_loss, loss and lse must have M = ", m, " elements");
  const Classes cls = group_by_label(labels.contiguous());
  UnitRows u = sorted_unit_rows(z, cls.perm, normalize);
  const auto acc = u.x.scalar_type();
  auto sorted = [&](const at::Tensor& t) { return t.to(acc).index_select(0, cls.perm); };
  const RowGrad rg = row_grad(sorted(grad_loss), sorted(loss), sorted_counts(cls, u.x.options()));
  const auto [hi, lo] = split_lse(lse.index_select(0, cls.perm), acc);
  at::Tensor dzn = at::zeros_like(u.x);
  AT_DISPATCH_FLOATING_TYPES(acc, "supcon_bwd", [&] {
    using T = scalar_t;
    GramTiles<T> tiles{u.padded, inv_t, m};
    tiles.for_each_pair([&](at::Tensor& buf, int64_t a, int64_t b) {
      thread_local std::vector<T> kept;
      at::Tensor s = tiles.tile(buf, a, b);
      coefficient_tile(s.data_ptr<T>(), tiles.start(a), tiles.len(a), tiles.start(b),
                       tiles.len(b), a == b, cls, hi.data_ptr<T>(), lo.data_ptr<T>(),
                       rg.g.data_ptr<T>(), rg.inv_count.data_ptr<T>(),
                       rg.one_minus.data_ptr<T>(), kept);
      gram::accumulate_tile_grad(dzn, tiles, s, a, b);
    });
  });
  dzn.mul_(inv_t);
  info_nce::unit_rows_backward_(dzn, u, normalize);
  return at::empty_like(z, at::MemoryFormat::Contiguous)
      .index_copy_(0, cls.perm, dzn.to(z.scalar_type()));
}

}  // namespace
}  // namespace sslk::supcon

TORCH_LIBRARY_IMPL(sslkernels, CPU, m) {
  m.impl("supcon_fwd", &sslk::supcon::supcon_fwd);
  m.impl("supcon_bwd", &sslk::supcon::supcon_bwd);
}
