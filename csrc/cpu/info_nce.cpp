// CPU kernels of the fused InfoNCE ops.
//
// Two views: the 2N x 2N similarity matrix is never built; it is swept in symmetric tiles
// (gram_tiles.h), each serving its row block and its mirror. The forward keeps each row's
// log-sum-exp state over its negatives and reads its positive logit from the tile that holds it
// (the same GEMM rounding as the negatives: a degenerate batch gets the exact loss).
//
// Negatives: the K negatives are split into contiguous chunks, one per thread; each thread keeps
// an online log-sum-exp and a FlashAttention-style rescaled accumulator of P @ Qn for the N
// queries; the partial states are merged at the end. The negatives are read in place, tile by
// tile (a reduced-precision queue is upcast one tile at a time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "gram_tiles.h"
#include "info_nce.h"
#include "info_nce_math.h"

namespace sslk {
namespace info_nce {
namespace {

using gram::GramTiles;
using gram::row_stats;
using gram::Vec;

constexpr int64_t kNegTile = 512;   // negatives per tile

// Sets the entries of tile (a0.., b0..) that are not negatives (the diagonal, and each row's
// positive at column (i + rows/2) mod rows) to `value`. Both are their own mirror images, so the
// same mask serves the tile's rows and its columns.
template <typename T>
void mask_non_negatives(T* x, int64_t a0, int64_t ra, int64_t b0, int64_t rb, int64_t rows,
                        T value) {
  const int64_t half = rows / 2;
  for (int64_t i = 0; i < ra; ++i) {
    const int64_t gi = a0 + i;
    const int64_t self = gi - b0, pos = (gi + half) % rows - b0;
    if (self >= 0 && self < rb) x[i * rb + self] = value;
    if (pos >= 0 && pos < rb) x[i * rb + pos] = value;
  }
}

// Copies the positive logits the tile holds into pos (both rows of a pair get the one entry).
template <typename T>
void read_positives(const T* x, int64_t a0, int64_t ra, int64_t b0, int64_t rb, int64_t rows,
                    T* pos) {
  const int64_t half = rows / 2;
  for (int64_t i = 0; i < ra; ++i) {
    const int64_t gi = a0 + i, gp = (gi + half) % rows;
    if (gp >= b0 && gp < b0 + rb) pos[gi] = pos[gp] = x[i * rb + gp - b0];
  }
}

// Per row: max and sum of exp over its negatives, and its positive logit.
template <typename T>
void pair_stats(const at::Tensor& padded, int64_t rows, double inv_t, T* m, T* l, T* pos) {
  GramTiles<T> tiles{padded, inv_t, rows};
  std::fill(m, m + rows, -std::numeric_limits<T>::infinity());
  std::fill(l, l + rows, T(0));
  tiles.for_each_pair([&](at::Tensor& buf, int64_t a, int64_t b) {
    at::Tensor s = tiles.tile(buf, a, b);
    T* x = s.data_ptr<T>();
    const int64_t ra = tiles.len(a), rb = tiles.len(b), a0 = tiles.start(a), b0 = tiles.start(b);
    read_positives(x, a0, ra, b0, rb, rows, pos);
    mask_non_negatives(x, a0, ra, b0, rb, rows, -std::numeric_limits<T>::infinity());
    gram::merge_tile_stats(x, a0, ra, b0, rb, a == b, m, l);
  });
}

template <typename T>
void pair_grad(const at::Tensor& padded, int64_t rows, double inv_t, const T* lse, const T* g,
               at::Tensor& dzn) {
  GramTiles<T> tiles{padded, inv_t, rows};
  tiles.for_each_pair([&](at::Tensor& buf, int64_t a, int64_t b) {
    at::Tensor s = tiles.tile(buf, a, b);
    T* x = s.data_ptr<T>();
    const int64_t ra = tiles.len(a), rb = tiles.len(b), a0 = tiles.start(a), b0 = tiles.start(b);
    const T* lse_a = lse + a0;
    const T* g_a = g + a0;
    const T* lse_b = lse + b0;
    const T* g_b = g + b0;
    gram::map_tile(
        x, ra, rb,
        [&](const Vec<T>& v, int64_t i, int64_t j) {
          return pair_grad_coef(v, Vec<T>(lse_a[i]), Vec<T>::loadu(lse_b + j), Vec<T>(g_a[i]),
                                Vec<T>::loadu(g_b + j));
        },
        [&](T v, int64_t i, int64_t j) {
          return pair_grad_coef(v, lse_a[i], lse_b[j], g_a[i], g_b[j]);
        });
    mask_non_negatives(x, a0, ra, b0, rb, rows, T(0));
    gram::accumulate_tile_grad(dzn, tiles, s, a, b);
  });
}

std::tuple<at::Tensor, at::Tensor> pair_fwd(const at::Tensor& z0, const at::Tensor& z1,
                                            double inv_t, bool normalize) {
  check_pair(z0, z1);
  const auto acc = acc_dtype(z0);
  const int64_t rows = 2 * z0.size(0);
  UnitRows u = gram::padded_unit_rows({z0, z1}, normalize, acc);
  at::Tensor m = at::empty({rows}, u.x.options()), l = at::empty_like(m), pos = at::empty_like(m);
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_pair_fwd", [&] {
    pair_stats<scalar_t>(u.padded, rows, inv_t, m.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                         pos.data_ptr<scalar_t>());
  });
  // lse_neg is -inf for a row without negatives (N = 1); its loss is 0.
  return {loss_from_negative_state(m, l, pos), m + at::log(l)};
}

std::tuple<at::Tensor, at::Tensor> pair_bwd(const at::Tensor& grad_loss, const at::Tensor& z0,
                                            const at::Tensor& z1, const at::Tensor& lse_neg,
                                            double inv_t, bool normalize) {
  check_pair(z0, z1);
  auto [u, g, loss, lse] = prepare_pair_backward(grad_loss, z0, z1, lse_neg, inv_t, normalize,
                                                 gram::kMinGemm);
  at::Tensor dzn = at::zeros_like(u.x);
  AT_DISPATCH_FLOATING_TYPES(u.x.scalar_type(), "info_nce_pair_bwd", [&] {
    pair_grad<scalar_t>(u.padded, u.x.size(0), inv_t, lse.data_ptr<scalar_t>(),
                        g.data_ptr<scalar_t>(), dzn);
  });
  return pair_backward_epilogue(dzn, u, g, loss, inv_t, normalize, z0, z1);
}

// Per-chunk state of the negatives pass: running max, sum and the rescaled P @ Qn.
template <typename T>
struct NegState {
  std::vector<T> m, l;
  at::Tensor w;
};

// q_pad: the N unit queries followed by kMinGemm zero rows.
template <typename T>
void negatives_chunk(const at::Tensor& q_pad, int64_t n, const at::Tensor& negatives,
                     double inv_t, bool normalize, bool need_grad, int64_t k0, int64_t k1,
                     NegState<T>& st) {
  const auto acc = q_pad.scalar_type();
  at::Tensor buf = at::empty({n * kNegTile}, q_pad.options());
  std::vector<T> rq(kNegTile, T(1));
  constexpr int64_t W = Vec<T>::size();
  for (int64_t t0 = k0; t0 < k1; t0 += kNegTile) {
    const int64_t kt = std::min(kNegTile, k1 - t0);
    at::Tensor qt = negatives.narrow(0, t0, kt);
    if (qt.scalar_type() != acc) qt = qt.to(acc);  // one tile, never the whole queue
    if (normalize) {
      at::Tensor nr = at::linalg_vector_norm(qt, 2, {1}).clamp_min(kNormEps).reciprocal();
      std::copy_n(nr.data_ptr<T>(), kt, rq.begin());
    }
    at::Tensor s = buf.narrow(0, 0, n * kt).view({n, kt});
    at::Tensor qt_rows = qt;
    if (kt < gram::kMinGemm) {  // a short last tile: zero rows keep the GEMM's rounding
      qt_rows = at::zeros({gram::kMinGemm, qt.size(1)}, qt.options());
      qt_rows.narrow(0, 0, kt).copy_(qt);
    }
    gram::padded_scaled_mm(s, q_pad, qt_rows, n, kt, inv_t);
    T* x = s.data_ptr<T>();
    at::Tensor alpha = at::empty({n, 1}, q_pad.options());
    T* al = alpha.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) {
      T* r = x + i * kt;
      if (normalize) {
        int64_t j = 0;
        for (; j + W <= kt; j += W) (Vec<T>::loadu(r + j) * Vec<T>::loadu(rq.data() + j)).store(r + j);
        for (; j < kt; ++j) r[j] *= rq[j];
      }
      T mt, lt;
      row_stats(r, kt, mt, lt);
      const T m_old = st.m[i];
      lse_merge(st.m[i], st.l[i], mt, lt);
      if (!need_grad) continue;
      // Weights relative to the new running max, times the negative's inverse norm so the GEMM
      // below accumulates P @ Qn from the raw tile.
      const T mnew = st.m[i];
      al[i] = softmax_weight(m_old, mnew);
      int64_t j = 0;
      const Vec<T> vm(mnew);
      for (; j + W <= kt; j += W) {
        Vec<T> e = softmax_weight(Vec<T>::loadu(r + j), vm);
        if (normalize) e = e * Vec<T>::loadu(rq.data() + j);
        e.store(r + j);
      }
      for (; j < kt; ++j) r[j] = softmax_weight(r[j], mnew) * (normalize ? rq[j] : T(1));
    }
    if (need_grad) {
      st.w.mul_(alpha);
      st.w.addmm_(s, qt);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neg_fwd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& negatives, double inv_t,
                                                       bool normalize, bool need_grad) {
  check_negatives(q, k, negatives);
  const auto acc = acc_dtype(q);
  const int64_t n = q.size(0), d = q.size(1), K = negatives.size(0);
  UnitRows uq = gram::padded_unit_rows({q}, normalize, acc);
  UnitRows uk = gram::padded_unit_rows({k}, normalize, acc);
  // The positive logits through the same GEMM rounding as the negatives' (gemm_row_dot).
  at::Tensor l_pos = gram::gemm_row_dot(uq.padded, uk.padded, n, inv_t);
  at::Tensor m_neg = at::empty({n}, uq.x.options()), l_neg = at::empty_like(m_neg);
  at::Tensor lse_neg, loss;
  at::Tensor wsum = need_grad ? at::zeros({n, d}, uq.x.options()) : at::empty({0}, uq.x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_neg_fwd", [&] {
    using T = scalar_t;
    const int64_t tiles = (K + kNegTile - 1) / kNegTile;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
    std::vector<NegState<T>> states(chunks);
    for (auto& st : states) {
      st.m.assign(n, -std::numeric_limits<T>::infinity());
      st.l.assign(n, T(0));
      if (need_grad) st.w = at::zeros({n, d}, uq.x.options());
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t t0 = tiles * c / chunks, t1 = tiles * (c + 1) / chunks;
        negatives_chunk<T>(uq.padded, n, negatives, inv_t, normalize, need_grad,
                           std::min(K, t0 * kNegTile), std::min(K, t1 * kNegTile), states[c]);
      }
    });
    // Merge the chunks, then rescale wsum to the full log-sum-exp lse = l_pos + loss.
    T* mo = m_neg.data_ptr<T>();
    T* lo = l_neg.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) {
      mo[i] = -std::numeric_limits<T>::infinity();
      lo[i] = T(0);
      for (const auto& st : states) lse_merge(mo[i], lo[i], st.m[i], st.l[i]);
    }
    lse_neg = m_neg + at::log(l_neg);
    loss = loss_from_negative_state(m_neg, l_neg, l_pos);
    if (need_grad) {
      at::Tensor lse = l_pos + loss;
      const T* full = lse.data_ptr<T>();
      for (const auto& st : states) {
        at::Tensor scale = at::empty({n, 1}, uq.x.options());
        T* sc = scale.data_ptr<T>();
        for (int64_t i = 0; i < n; ++i)
          sc[i] = st.l[i] == T(0) ? T(0) : softmax_weight(st.m[i], full[i]);
        wsum.addcmul_(st.w, scale);
      }
    }
  });
  return {loss, lse_neg, wsum};
}

}  // namespace
}  // namespace info_nce
}  // namespace sslk

TORCH_LIBRARY_IMPL(sslkernels, CPU, m) {
  m.impl("info_nce_pair_fwd", &sslk::info_nce::pair_fwd);
  m.impl("info_nce_pair_bwd", &sslk::info_nce::pair_bwd);
  m.impl("info_nce_neg_fwd", &sslk::info_nce::neg_fwd);
}
