// Symmetric tiling of a Gram matrix S = X X^T / tau for the CPU kernels of the InfoNCE family
// (two-view NT-Xent, multi-positive SupCon): the M x M matrix is never built.
//
// Rows are cut into blocks of kTile and each unordered pair of blocks (I, J) is one GEMM tile
// that serves both row block I (row-wise reductions) and row block J (column-wise reductions)
// because S is symmetric. Pairs follow a round-robin schedule in which no block appears twice
// per round, and a pair waits only for the earlier pairs that share one of its blocks, so
// concurrent tiles write disjoint rows: no atomic adds, no per-thread copies of the gradient,
// O(M*D) memory, the same result on every run. Also here: the vectorized row / column log-sum-exp statistics of a tile.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <thread>
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

namespace gram {

using info_nce::scaled_mm_out;
using info_nce::UnitRows;

constexpr int64_t kTile = 256;  // rows per block

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Round-robin ("circle method") schedule of all unordered pairs of T blocks: T-1 rounds (T
// even) in which every block appears at most once.
inline std::vector<std::vector<std::pair<int64_t, int64_t>>> round_robin(int64_t T) {
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

// Max and sum of exp(x - max) over a contiguous run; the sum is zero for an all -inf run.
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

// Column-wise max and sum of exp(x - max) of a (rows x cols) block with row stride ld; the sum
// is zero for an all -inf column.
template <typename T>
void col_stats(const T* x, int64_t rows, int64_t cols, int64_t ld, T* m, T* l) {
  const T ninf = -std::numeric_limits<T>::infinity();
  std::fill(m, m + cols, ninf);
  std::fill(l, l + cols, T(0));
  constexpr int64_t W = Vec<T>::size();
  for (int64_t i = 0; i < rows; ++i) {
    const T* r = x + i * ld;
    int64_t j = 0;
    for (; j + W <= cols; j += W)
      Math<Vec<T>>::max(Vec<T>::loadu(m + j), Vec<T>::loadu(r + j)).store(m + j);
    for (; j < cols; ++j) m[j] = Math<T>::max(m[j], r[j]);
  }
  // An all -inf column pivots at 0 below (its exponentials are then 0, not NaN), then gets its
  // -inf back.
  std::vector<int64_t> empty;
  for (int64_t j = 0; j < cols; ++j)
    if (m[j] == ninf) {
      m[j] = T(0);
      empty.push_back(j);
    }
  for (int64_t i = 0; i < rows; ++i) {
    const T* r = x + i * ld;
    int64_t j = 0;
    for (; j + W <= cols; j += W)
      (Vec<T>::loadu(l + j) + softmax_weight(Vec<T>::loadu(r + j), Vec<T>::loadu(m + j)))
          .store(l + j);
    for (; j < cols; ++j) l[j] += softmax_weight(r[j], m[j]);
  }
  for (int64_t j : empty) m[j] = ninf;
}

// Sum of a contiguous run.
template <typename T>
T run_sum(const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> vs(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) vs = vs + Vec<T>::loadu(x + j);
  T buf[W];
  vs.store(buf);
  T s = 0;
  for (int64_t t = 0; t < W; ++t) s += buf[t];
  for (; j < n; ++j) s += x[j];
  return s;
}

// MKL computes GEMMs with a dimension below ~12 with other kernels than larger ones, and their
// dot products round differently: two equal logits from tiles of different shapes could then
// differ in the last bit, and a degenerate batch (identical rows) would lose the exact
// log(M - 1) that a single-GEMM formulation gets. Every tile is therefore a GEMM with both
// dimensions at least kMinGemm, reading zero rows past the end when the last block is smaller.
constexpr int64_t kMinGemm = 16;

// The unit rows of a tiled kernel, with kMinGemm zero rows after them for the padded GEMMs.
inline UnitRows padded_unit_rows(at::TensorList parts, bool normalize, at::ScalarType acc) {
  return info_nce::unit_rows(parts, normalize, acc, kMinGemm);
}

// alpha * a b^T into `out` (ra x rb, contiguous), where a and b are the first ra / rb rows of
// `a_rows` / `b_rows`, which must hold at least kMinGemm rows (or ra / rb if more).
inline void padded_scaled_mm(at::Tensor& out, const at::Tensor& a_rows, const at::Tensor& b_rows,
                             int64_t ra, int64_t rb, double alpha) {
  if (ra >= kMinGemm && rb >= kMinGemm) {
    scaled_mm_out(out, a_rows.narrow(0, 0, ra), b_rows.narrow(0, 0, rb), alpha);
    return;
  }
  const int64_t pa = std::max(ra, kMinGemm), pb = std::max(rb, kMinGemm);
  at::Tensor big = at::empty({pa, pb}, out.options());
  scaled_mm_out(big, a_rows.narrow(0, 0, pa), b_rows.narrow(0, 0, pb), alpha);
  out.copy_(big.narrow(0, 0, ra).narrow(1, 0, rb));
}

// alpha <a_i, b_i> for the first n rows, from the diagonals of block GEMMs: the rounding of the
// tiles' GEMMs, so that a positive logit equal to a negative one is equal bit for bit. Both
// inputs hold kMinGemm zero rows past n (padded_unit_rows).
inline at::Tensor gemm_row_dot(const at::Tensor& a_pad, const at::Tensor& b_pad, int64_t n,
                               double alpha) {
  constexpr int64_t kBlock = 64;
  at::Tensor out = at::empty({n}, a_pad.options());
  at::Tensor buf = at::empty({kBlock * kBlock}, a_pad.options());
  for (int64_t r = 0; r < n; r += kBlock) {
    const int64_t len = std::min(kBlock, n - r);
    at::Tensor s = buf.narrow(0, 0, len * len).view({len, len});
    padded_scaled_mm(s, a_pad.narrow(0, r, a_pad.size(0) - r), b_pad.narrow(0, r, b_pad.size(0) - r),
                     len, len, alpha);
    out.narrow(0, r, len).copy_(s.diagonal());
  }
  return out;
}

// The tiles of S = zn zn^T / tau over the first `rows` rows of `padded` (which holds kMinGemm
// zero rows after them; see padded_unit_rows).
template <typename T>
struct GramTiles {
  const at::Tensor& padded;
  double inv_t;
  int64_t rows;

  int64_t blocks() const { return (rows + kTile - 1) / kTile; }
  int64_t start(int64_t b) const { return b * kTile; }
  int64_t len(int64_t b) const { return std::min(kTile, rows - b * kTile); }
  at::Tensor block(int64_t b) const { return padded.narrow(0, start(b), len(b)); }

  // S tile of blocks (a, b) into `buf` (at least kTile^2 elements), returned as (ra, rb).
  // A diagonal tile is made exactly symmetric: the GEMM's S_ij and S_ji may differ in the last
  // bit, and row j's log-sum-exp (from S_ji) must match the S_ij that the backward weighs
  // with it, or the weight exp(S_ij - lse_j) of a dominant entry is off by that bit times
  // 1/tau (4e-6 relative at tau = 0.01 in float32).
  at::Tensor tile(at::Tensor& buf, int64_t a, int64_t b) const {
    const int64_t ra = len(a), rb = len(b);
    at::Tensor s = buf.narrow(0, 0, ra * rb).view({ra, rb});
    const int64_t avail = padded.size(0);
    padded_scaled_mm(s, padded.narrow(0, start(a), avail - start(a)),
                     padded.narrow(0, start(b), avail - start(b)), ra, rb, inv_t);
    if (a == b) {
      T* x = s.data_ptr<T>();
      for (int64_t i = 1; i < ra; ++i)
        for (int64_t j = 0; j < i; ++j) x[i * ra + j] = x[j * ra + i];
    }
    return s;
  }

  // Runs fn(buf, a, b) on every block pair a <= b, in the order of the schedule (the diagonal
  // tiles, then the round-robin rounds). The threads take the pairs one by one from a shared
  // counter, and a pair starts once the pairs before it that touch its blocks are done: each
  // block's rows are written by one tile at a time and always in the schedule's order (so the
  // result does not depend on the timing: bitwise reproducible), without a barrier between
  // rounds (a descheduled thread on a busy machine stalls only the pairs that need its blocks).
  template <typename Fn>
  void for_each_pair(const Fn& fn) const {
    const int64_t T_ = blocks();
    std::vector<std::pair<int64_t, int64_t>> tasks;
    for (int64_t b = 0; b < T_; ++b) tasks.emplace_back(b, b);
    for (const auto& round : round_robin(T_)) tasks.insert(tasks.end(), round.begin(), round.end());
    const int64_t n_tasks = (int64_t)tasks.size();
    // need[t]: how many earlier tasks touch each of task t's two blocks.
    std::vector<std::pair<int64_t, int64_t>> need(n_tasks);
    std::vector<int64_t> seen(T_, 0);
    for (int64_t t = 0; t < n_tasks; ++t) {
      const auto [a, b] = tasks[t];
      need[t] = {seen[a], seen[b]};
      ++seen[a];
      if (b != a) ++seen[b];
    }
    std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[T_]);
    for (int64_t b = 0; b < T_; ++b) done[b].store(0);
    std::atomic<int64_t> next{0};
    auto opts = padded.options();
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      at::Tensor buf = at::empty({kTile * kTile}, opts);
      for (int64_t t; (t = next.fetch_add(1)) < n_tasks;) {
        const auto [a, b] = tasks[t];
        // Tasks are taken in order, so the ones waited for are already running: no deadlock.
        while (done[a].load(std::memory_order_acquire) < need[t].first ||
               done[b].load(std::memory_order_acquire) < need[t].second)
          std::this_thread::yield();
        fn(buf, a, b);
        done[a].fetch_add(1, std::memory_order_release);
        if (b != a) done[b].fetch_add(1, std::memory_order_release);
      }
    });
  }
};

// Merges the row-wise statistics of a (ra x rb) tile of blocks starting at rows a0 and b0 into
// the running states (m, l) of its rows and, off the diagonal (the tile stands for its mirror
// too), its column-wise statistics into the states of its columns. Entries that must not count
// are -inf.
template <typename T>
void merge_tile_stats(const T* x, int64_t a0, int64_t ra, int64_t b0, int64_t rb, bool diagonal,
                      T* m, T* l) {
  for (int64_t i = 0; i < ra; ++i) {
    T mt, lt;
    row_stats(x + i * rb, rb, mt, lt);
    lse_merge(m[a0 + i], l[a0 + i], mt, lt);
  }
  if (!diagonal) {
    std::vector<T> cm(rb), cl(rb);
    col_stats(x, ra, rb, rb, cm.data(), cl.data());
    for (int64_t j = 0; j < rb; ++j) lse_merge(m[b0 + j], l[b0 + j], cm[j], cl[j]);
  }
}

// Applies coef(s, i, j) to every entry of a (ra x rb) tile in place, vectorized over j, where
// coef gets the entry and the tile-local row and column: the backward pass's map from logits
// to gradient coefficients.
template <typename T, typename VecFn, typename ScalarFn>
void map_tile(T* x, int64_t ra, int64_t rb, const VecFn& vfn, const ScalarFn& sfn) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t i = 0; i < ra; ++i) {
    T* r = x + i * rb;
    int64_t j = 0;
    for (; j + W <= rb; j += W) vfn(Vec<T>::loadu(r + j), i, j).store(r + j);
    for (; j < rb; ++j) r[j] = sfn(r[j], i, j);
  }
}

// dzn[a] += C zn[b], and dzn[b] += C^T zn[a] for an off-diagonal tile: the gradient products of
// one coefficient tile C (= dL/dS + its mirror) for both row blocks.
template <typename T>
void accumulate_tile_grad(at::Tensor& dzn, const GramTiles<T>& tiles, const at::Tensor& c,
                          int64_t a, int64_t b) {
  dzn.narrow(0, tiles.start(a), tiles.len(a)).addmm_(c, tiles.block(b));
  if (a != b) dzn.narrow(0, tiles.start(b), tiles.len(b)).addmm_(c.t(), tiles.block(a));
}

}  // namespace gram
}  // namespace sslk
