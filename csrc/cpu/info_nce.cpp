// CPU kernels of the fused InfoNCE ops.
//
// Two views: the 2N x 2N similarity matrix is never built. Rows are cut into blocks of kTile and
// each unordered pair of blocks (I, J) is one GEMM tile that serves both row block I (row-wise
// reductions) and row block J (column-wise reductions) because S is symmetric. Pairs are run in
// round-robin rounds in which no block appears twice, so the threads of a round write disjoint
// rows: no atomics, no per-thread copies of the gradient, O(N*D) memory.
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

#include "info_nce.h"
#include "info_nce_math.h"

namespace sslk {

template <typename T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
};

namespace info_nce {
namespace {

constexpr int64_t kTile = 256;      // rows per block in the two-view tiling
constexpr int64_t kNegTile = 512;   // negatives per tile

// Round-robin ("circle method") schedule of all unordered pairs of T blocks: T-1 rounds (T
// even) in which every block appears at most once.
std::vector<std::vector<std::pair<int64_t, int64_t>>> round_robin(int64_t T) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  if (T < 2) return rounds;
  const int64_t P = T + (T & 1);  // odd T gets a dummy block that idles its partner
  std::vector<int64_t> ring(P);
  for (int64_t i = 0; i < P; ++i) ring[i] = i;
  for (int64_t r = 0; r < P - 1; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    for (int64_t i = 0; i < P / 2; ++i) {
      int64_t a = ring[i], b = ring[P - 1 - i];
      if (a < T && b < T) round.emplace_back(std::min(a, b), std::max(a, b));
    }
    rounds.push_back(std::move(round));
    std::rotate(ring.begin() + 1, ring.end() - 1, ring.end());  // keep ring[0] fixed
  }
  return rounds;
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Max and sum of exp(x - max) over a contiguous row; the sum is zero for an all -inf row.
template <typename T>
void row_stats(const T* x, int64_t n, T& m_out, T& l_out) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T m = ninf;
  int64_t j = 0;
  if (n >= Vec<T>::size()) {
    Vec<T> vm(ninf);
    for (; j + Vec<T>::size() <= n; j += Vec<T>::size())
      vm = Math<Vec<T>>::max(vm, Vec<T>::loadu(x + j));
    T buf[Vec<T>::size()];
    vm.store(buf);
    for (int64_t t = 0; t < Vec<T>::size(); ++t) m = Math<T>::max(m, buf[t]);
  }
  for (; j < n; ++j) m = Math<T>::max(m, x[j]);
  if (m == ninf) {
    m_out = ninf;
    l_out = T(0);
    return;
  }
  Vec<T> vs(T(0));
  const Vec<T> vmx(m);
  j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size())
    vs = vs + softmax_weight(Vec<T>::loadu(x + j), vmx);
  T buf[Vec<T>::size()];
  vs.store(buf);
  T s = 0;
  for (int64_t t = 0; t < Vec<T>::size(); ++t) s += buf[t];
  for (; j < n; ++j) s += softmax_weight(x[j], m);
  m_out = m;
  l_out = s;
}

// Column-wise max and sum of exp(x - max) of a row-major (rows x cols) tile.
template <typename T>
void col_stats(const T* x, int64_t rows, int64_t cols, T* m, T* l) {
  const T ninf = -std::numeric_limits<T>::infinity();
  std::fill(m, m + cols, ninf);
  std::fill(l, l + cols, T(0));
  constexpr int64_t W = Vec<T>::size();
  for (int64_t i = 0; i < rows; ++i) {
    const T* r = x + i * cols;
    int64_t j = 0;
    for (; j + W <= cols; j += W)
      Math<Vec<T>>::max(Vec<T>::loadu(m + j), Vec<T>::loadu(r + j)).store(m + j);
    for (; j < cols; ++j) m[j] = Math<T>::max(m[j], r[j]);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* r = x + i * cols;
    int64_t j = 0;
    for (; j + W <= cols; j += W)
      (Vec<T>::loadu(l + j) + softmax_weight(Vec<T>::loadu(r + j), Vec<T>::loadu(m + j)))
          .store(l + j);
    for (; j < cols; ++j) l[j] += softmax_weight(r[j], m[j]);
  }
}

template <typename T>
struct PairTiles {
  const at::Tensor& zn;  // unit rows
  double inv_t;
  int64_t rows;

  int64_t blocks() const { return (rows + kTile - 1) / kTile; }
  int64_t start(int64_t b) const { return b * kTile; }
  int64_t len(int64_t b) const { return std::min(kTile, rows - b * kTile); }

  // S tile of blocks (a, b) into `buf` (at least kTile^2 elements), returned as (ra, rb).
  at::Tensor tile(at::Tensor& buf, int64_t a, int64_t b) const {
    at::Tensor s = buf.narrow(0, 0, len(a) * len(b)).view({len(a), len(b)});
    scaled_mm_out(s, zn.narrow(0, start(a), len(a)), zn.narrow(0, start(b), len(b)), inv_t);
    return s;
  }

  // Runs fn(buf, a, b) on every block pair a <= b: the diagonal blocks in one parallel round,
  // then the round-robin rounds, with a barrier between rounds.
  template <typename Fn>
  void for_each_pair(const Fn& fn) const {
    const int64_t T_ = blocks();
    auto opts = zn.options();
    at::parallel_for(0, T_, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor buf = at::empty({kTile * kTile}, opts);
      for (int64_t b = b0; b < b1; ++b) fn(buf, b, b);
    });
    for (const auto& round : round_robin(T_)) {
      at::parallel_for(0, (int64_t)round.size(), 1, [&](int64_t p0, int64_t p1) {
        at::Tensor buf = at::empty({kTile * kTile}, opts);
        for (int64_t p = p0; p < p1; ++p) fn(buf, round[p].first, round[p].second);
      });
    }
  }
};

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

template <typename T>
void pair_lse(const at::Tensor& zn, double inv_t, T* lse) {
  const int64_t rows = zn.size(0);
  PairTiles<T> tiles{zn, inv_t, rows};
  std::vector<T> m(rows, -std::numeric_limits<T>::infinity()), l(rows, T(0));
  tiles.for_each_pair([&](at::Tensor& buf, int64_t a, int64_t b) {
    at::Tensor s = tiles.tile(buf, a, b);
    T* x = s.data_ptr<T>();
    const int64_t ra = tiles.len(a), rb = tiles.len(b), a0 = tiles.start(a), b0 = tiles.start(b);
    mask_non_negatives(x, a0, ra, b0, rb, rows, -std::numeric_limits<T>::infinity());
    for (int64_t i = 0; i < ra; ++i) {
      T mt, lt;
      row_stats(x + i * rb, rb, mt, lt);
      lse_merge(m[a0 + i], l[a0 + i], mt, lt);
    }
    if (a != b) {
      std::vector<T> cm(rb), cl(rb);
      col_stats(x, ra, rb, cm.data(), cl.data());
      for (int64_t j = 0; j < rb; ++j) lse_merge(m[b0 + j], l[b0 + j], cm[j], cl[j]);
    }
  });
  for (int64_t i = 0; i < rows; ++i) lse[i] = m[i] + std::log(l[i]);  // -inf if no negatives
}

template <typename T>
void pair_grad(const at::Tensor& zn, double inv_t, const T* lse, const T* g, at::Tensor& dzn) {
  const int64_t rows = zn.size(0);
  PairTiles<T> tiles{zn, inv_t, rows};
  constexpr int64_t W = Vec<T>::size();
  tiles.for_each_pair([&](at::Tensor& buf, int64_t a, int64_t b) {
    at::Tensor s = tiles.tile(buf, a, b);
    T* x = s.data_ptr<T>();
    const int64_t ra = tiles.len(a), rb = tiles.len(b), a0 = tiles.start(a), b0 = tiles.start(b);
    const T* lse_b = lse + b0;
    const T* g_b = g + b0;
    for (int64_t i = 0; i < ra; ++i) {
      T* r = x + i * rb;
      const T lse_i = lse[a0 + i], g_i = g[a0 + i];
      const Vec<T> vlse_i(lse_i), vg_i(g_i);
      int64_t j = 0;
      for (; j + W <= rb; j += W)
        pair_grad_coef(Vec<T>::loadu(r + j), vlse_i, Vec<T>::loadu(lse_b + j), vg_i,
                       Vec<T>::loadu(g_b + j))
            .store(r + j);
      for (; j < rb; ++j) r[j] = pair_grad_coef(r[j], lse_i, lse_b[j], g_i, g_b[j]);
    }
    mask_non_negatives(x, a0, ra, b0, rb, rows, T(0));
    if (a == b) {
      dzn.narrow(0, a0, ra).addmm_(s, zn.narrow(0, b0, rb));
    } else {
      dzn.narrow(0, a0, ra).addmm_(s, zn.narrow(0, b0, rb));
      dzn.narrow(0, b0, rb).addmm_(s.t(), zn.narrow(0, a0, ra));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pair_fwd(const at::Tensor& z0, const at::Tensor& z1,
                                            double inv_t, bool normalize) {
  check_pair(z0, z1);
  const auto acc = acc_dtype(z0);
  const int64_t n = z0.size(0);
  UnitRows u = unit_rows({z0, z1}, normalize, acc);
  at::Tensor lse_neg = at::empty({2 * n}, u.x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "info_nce_pair_fwd", [&] {
    pair_lse<scalar_t>(u.x, inv_t, lse_neg.data_ptr<scalar_t>());
  });
  return {loss_from_lse_neg(lse_neg, pair_positive_logits(u.x, n, inv_t)), lse_neg};
}

std::tuple<at::Tensor, at::Tensor> pair_bwd(const at::Tensor& grad_loss, const at::Tensor& z0,
                                            const at::Tensor& z1, const at::Tensor& lse_neg,
                                            double inv_t, bool normalize) {
  check_pair(z0, z1);
  auto [u, g, loss, lse] = prepare_pair_backward(grad_loss, z0, z1, lse_neg, inv_t, normalize);
  at::Tensor dzn = at::zeros_like(u.x);
  AT_DISPATCH_FLOATING_TYPES(u.x.scalar_type(), "info_nce_pair_bwd", [&] {
    pair_grad<scalar_t>(u.x, inv_t, lse.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), dzn);
  });
  return pair_backward_epilogue(dzn, u, g, loss, inv_t, normalize, z0, z1);
}

// Per-chunk state of the negatives pass: running max, sum and the rescaled P @ Qn.
template <typename T>
struct NegState {
  std::vector<T> m, l;
  at::Tensor w;
};

template <typename T>
void negatives_chunk(const at::Tensor& qs, const at::Tensor& negatives, bool normalize,
                     bool need_grad, int64_t k0, int64_t k1, NegState<T>& st) {
  const int64_t n = qs.size(0);
  const auto acc = qs.scalar_type();
  at::Tensor buf = at::empty({n * kNegTile}, qs.options());
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
    at::mm_out(s, qs, qt.t());
    T* x = s.data_ptr<T>();
    at::Tensor alpha = at::empty({n, 1}, qs.options());
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
  UnitRows uq = unit_rows({q}, normalize, acc);
  UnitRows uk = unit_rows({k}, normalize, acc);
  at::Tensor qs = uq.x * inv_t;  // N x D: small next to the K negatives
  at::Tensor l_pos = row_dot(uq.x, uk.x) * inv_t;
  at::Tensor lse_neg = at::empty({n}, uq.x.options());
  at::Tensor loss;
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
        negatives_chunk<T>(qs, negatives, normalize, need_grad, std::min(K, t0 * kNegTile),
                           std::min(K, t1 * kNegTile), states[c]);
      }
    });
    // Merge the chunks into lse_neg, then rescale wsum to the full log-sum-exp
    // lse = l_pos + loss.
    T* out = lse_neg.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) {
      T m = -std::numeric_limits<T>::infinity(), l = T(0);
      for (const auto& st : states) lse_merge(m, l, st.m[i], st.l[i]);
      out[i] = m + std::log(l);
    }
    loss = loss_from_lse_neg(lse_neg, l_pos);
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
