// CPU kernel of the in-place EMA op: one call updates the whole tensor list.
//
// The elements of all (streamable) pairs are laid end to end in one index space and
// balanced_for splits that space into equal shares of fixed-size chunks, so the work is spread
// over the threads whatever the mix of tensor sizes (2000 tensors of 512 elements, or
// ResNet-50's 161 tensors of 64 to 2.4M elements), and a thread that falls behind has its last
// chunks taken over. Each chunk is walked tensor by tensor with an at::vec::Vectorized body and
// a scalar tail, both evaluating sslk::ema::lerp (ema_math.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>  // GRAIN_SIZE
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "balanced_for.h"
#include "ema.h"
#include "ema_math.h"

namespace sslk::ema {

using FVec = at::vec::Vectorized<float>;
using DVec = at::vec::Vectorized<double>;

// One fused multiply-add per lane. AVX2/AVX-512 builds have a hardware fmadd; a portable build
// rounds each lane with std::fma so it still matches ATen's fused result.
template <typename S>
struct Fma<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V fma(const V& a, const V& b, const V& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    return at::vec::fmadd(a, b, c);
#else
    alignas(64) S av[V::size()], bv[V::size()], cv[V::size()];
    a.store(av);
    b.store(bv);
    c.store(cv);
    for (int64_t k = 0; k < V::size(); ++k) av[k] = std::fma(av[k], bv[k], cv[k]);
    return V::loadu(av);
#endif
  }
};

namespace {

// Loads/stores of two float vectors' worth of elements (Vectorized<BFloat16/Half> holds twice
// as many lanes as Vectorized<float>), widened exactly and rounded once on the way back.
template <typename S>
struct FloatIO;

template <>
struct FloatIO<float> {
  static constexpr int64_t kStep = 2 * FVec::size();
  static void load(const float* p, FVec& a, FVec& b) {
    a = FVec::loadu(p);
    b = FVec::loadu(p + FVec::size());
  }
  static void store(float* p, const FVec& a, const FVec& b) {
    a.store(p);
    b.store(p + FVec::size());
  }
};

template <typename R>
struct ReducedIO {
  using RVec = at::vec::Vectorized<R>;
  static_assert(RVec::size() == 2 * FVec::size(), "reduced vectors hold two float vectors");
  static constexpr int64_t kStep = RVec::size();
  static void load(const R* p, FVec& a, FVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<R>(RVec::loadu(p));
  }
  static void store(R* p, const FVec& a, const FVec& b) {
    at::vec::convert_from_float<R>(a, b).store(p);
  }
};

template <>
struct FloatIO<c10::BFloat16> : ReducedIO<c10::BFloat16> {};
template <>
struct FloatIO<c10::Half> : ReducedIO<c10::Half> {};

struct Weights {
  LerpWeight<float> f;
  LerpWeight<FVec> fv;
  LerpWeight<double> d;
  LerpWeight<DVec> dv;
};

// The hardware prefetcher ramps up anew at every 4 KB page, which a tensor of a few pages
// never amortizes (the 16 KB weights of small Linear layers): such a pair also prefetches
// kAheadBytes ahead of each vector step, in both tensors. It may run past the range's end,
// into what the allocator placed next (often the next pair); a prefetch never faults. Longer
// tensors are left to the hardware, which the extra instructions only slow down.
constexpr int64_t kAheadBytes = 2048;
constexpr int64_t kPrefetchedPairBytes = 65536;

// Elements a thread claims at a time: enough that a big tensor streams in long runs, few
// enough (16 chunks for 2000 x 512 floats) that the threads can even out.
constexpr int64_t kChunk = 65536;

template <int kWrite>
void prefetch_ahead(const void* p) {
  // integer arithmetic: the address may lie past the tensor
  __builtin_prefetch(
      reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + uintptr_t{kAheadBytes}),
      kWrite);
}

// step(k) for k = 0, kStep, 2 kStep, ... while a whole step fits in [0, n); returns the first
// element left for the scalar tail.
template <int64_t kStep, typename TT, typename OT, typename Step>
int64_t vector_steps(TT* t, const OT* o, int64_t n, bool prefetch, const Step& step) {
  int64_t k = 0;
  if (prefetch) {
    for (; k + kStep <= n; k += kStep) {
      prefetch_ahead<1>(t + k);
      prefetch_ahead<0>(o + k);
      step(k);
    }
  }
  for (; k + kStep <= n; k += kStep) step(k);
  return k;
}

// t[k] <- lerp(t[k], o[k], w) for k in [0, n), computed in float.
template <typename TT, typename OT>
void lerp_float(TT* t, const OT* o, int64_t n, bool prefetch, const Weights& weights) {
  const Weights w = weights;  // a local copy: the stores below cannot alias it
  constexpr int64_t kStep = std::min(FloatIO<TT>::kStep, FloatIO<OT>::kStep);
  static_assert(FloatIO<TT>::kStep == kStep && FloatIO<OT>::kStep == kStep);
  int64_t k = vector_steps<kStep>(t, o, n, prefetch, [&](int64_t i) {
    FVec t0, t1, o0, o1;
    FloatIO<TT>::load(t + i, t0, t1);
    FloatIO<OT>::load(o + i, o0, o1);
    FloatIO<TT>::store(t + i, lerp(t0, o0, w.fv), lerp(t1, o1, w.fv));
  });
  for (; k < n; ++k)
    t[k] = static_cast<TT>(lerp(static_cast<float>(t[k]), static_cast<float>(o[k]), w.f));
}

void lerp_double(double* t, const double* o, int64_t n, bool prefetch,
                 const Weights& weights) {
  const Weights w = weights;
  int64_t k = vector_steps<DVec::size()>(t, o, n, prefetch, [&](int64_t i) {
    lerp(DVec::loadu(t + i), DVec::loadu(o + i), w.dv).store(t + i);
  });
  for (; k < n; ++k) t[k] = lerp(t[k], o[k], w.d);
}

// Elements [lo, hi) of one pair.
void run(const Pair& s, int64_t lo, int64_t hi, const Weights& w) {
  const int64_t n = hi - lo;
  const bool p = s.n * target_size(s.kind) <= kPrefetchedPairBytes;
  switch (s.kind) {
    case Kind::kFloatFloat:
      return lerp_float(static_cast<float*>(s.t) + lo, static_cast<const float*>(s.o) + lo, n, p,
                        w);
    case Kind::kFloatBFloat16:
      return lerp_float(static_cast<float*>(s.t) + lo,
                        static_cast<const c10::BFloat16*>(s.o) + lo, n, p, w);
    case Kind::kFloatHalf:
      return lerp_float(static_cast<float*>(s.t) + lo, static_cast<const c10::Half*>(s.o) + lo,
                        n, p, w);
    case Kind::kDoubleDouble:
      return lerp_double(static_cast<double*>(s.t) + lo, static_cast<const double*>(s.o) + lo,
                         n, p, w);
    case Kind::kBFloat16BFloat16:
      return lerp_float(static_cast<c10::BFloat16*>(s.t) + lo,
                        static_cast<const c10::BFloat16*>(s.o) + lo, n, p, w);
    case Kind::kHalfHalf:
      return lerp_float(static_cast<c10::Half*>(s.t) + lo, static_cast<const c10::Half*>(s.o) + lo,
                        n, p, w);
  }
}

// The hardware prefetcher follows the stream of one tensor but not the jump to the next
// allocation, so a list of small tensors pays a memory latency per pair: fetch the first lines
// of the next pair while this one streams (a whole small tensor, as far as the in-range
// prefetch runs ahead of a big one).
void prefetch_start(const Pair& p) {
  const char* t = static_cast<const char*>(p.t);
  const char* o = static_cast<const char*>(p.o);
  const int64_t tb = std::min(kAheadBytes, p.n * target_size(p.kind));
  const int64_t ob = std::min(kAheadBytes, p.n * online_size(p.kind));
  for (int64_t b = 0; b < tb; b += 64) __builtin_prefetch(t + b, 1);
  for (int64_t b = 0; b < ob; b += 64) __builtin_prefetch(o + b, 0);
}

}  // namespace

void lerp_cpu(at::TensorList target, at::TensorList online, double weight,
              const Checked& checked) {
  const float wf = static_cast<float>(weight);
  const Weights w{make_weight(wf), {FVec(wf), FVec(wf - 1.0f), make_weight(wf).small},
                  make_weight(weight), {DVec(weight), DVec(weight - 1.0), make_weight(weight).small}};
  const std::vector<Pair>& pairs = checked.pairs;
  // start[s] = index of pairs[s]'s first element in the joint index space
  std::vector<int64_t> start(pairs.size() + 1);
  int64_t total = 0;
  for (size_t s = 0; s < pairs.size(); ++s) {
    start[s] = total;
    total += pairs[s].n;
  }
  start[pairs.size()] = total;
  balanced_for(total, kChunk, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    size_t s = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t k = begin; k < end; ++s) {
      const int64_t hi = std::min(end, start[s + 1]);
      if (hi < end) prefetch_start(pairs[s + 1]);
      run(pairs[s], k - start[s], hi - start[s], w);
      k = hi;
    }
  });
  for (size_t i : checked.strided) lerp_fallback(target[i], online[i], weight);
}

namespace {

void ema_lerp_cpu(at::TensorList target, at::TensorList online, double weight) {
  const Checked checked = check_lists(target, online, weight, c10::DeviceType::CPU);
  // Nothing has been written yet; from here on nothing can fail.
  lerp_cpu(target, online, weight, checked);
}

}  // namespace
}  // namespace sslk::ema

TORCH_LIBRARY_IMPL(sslkernels, CPU, m) {
  m.impl("ema_lerp_", &sslk::ema::ema_lerp_cpu);
}
