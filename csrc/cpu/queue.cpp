// CPU kernel of the ring-buffer queue enqueue: one parallel pass over the surviving keys, each
// row normalized and stored by the shared per-row code in queue_math.h. Cost O(B * D), whatever K.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "queue.h"
#include "queue_math.h"

namespace sslk::queue {
namespace {

// Elements per thread below which the enqueue stays on the calling thread. A MoCo batch
// (256 x 128, or 2048 x 128 all-gathered) takes 20-150 us on one core; splitting it saves little
// and, on a machine whose cores are shared, an OpenMP barrier can wait a whole scheduler time
// slice (measured: 8 ms per enqueue instead of 25 us). Only very large batches are split.
constexpr int64_t kGrainElems = 1 << 20;

// Rows ahead whose destination slots are prefetched for writing. The slot a key lands in was
// last touched K/B enqueues ago, so in a large queue it is out of cache and each store would
// wait for its line to be read first (write-allocate): the cost would grow with K. Prefetching
// the slots a few rows ahead overlaps those reads with the normalization of the current rows.
// (Non-temporal stores also remove the K dependence but were slower for every K here.)
constexpr int64_t kPrefetchRows = 4;

template <typename T>
inline void prefetch_for_write(const T* p, int64_t n) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < n * static_cast<int64_t>(sizeof(T)); o += 64)
    __builtin_prefetch(c + o, /*rw=*/1, /*locality=*/3);
#endif
}

template <typename acc_t, typename in_t, typename out_t>
void enqueue_rows(out_t* buf, const in_t* keys, int64_t start, int64_t B, int64_t K, int64_t D,
                  bool normalize) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(D, 1));
  at::parallel_for(first_kept(B, K), B, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < std::min(i1, i0 + kPrefetchRows); ++i)
      prefetch_for_write(buf + slot_of(start, i, K) * D, D);
    for (int64_t i = i0; i < i1; ++i) {
      if (i + kPrefetchRows < i1)
        prefetch_for_write(buf + slot_of(start, i + kPrefetchRows, K) * D, D);
      store_row<acc_t>(buf + slot_of(start, i, K) * D, keys + i * D, D, normalize);
    }
  });
}

void enqueue_cpu(at::Tensor& buffer, at::Tensor& ptr, at::Tensor& fill, const at::Tensor& keys_in,
                 bool normalize) {
  check_enqueue(buffer, ptr, fill, keys_in);
  const int64_t B = keys_in.size(0), K = buffer.size(0), D = buffer.size(1);
  if (B == 0) return;
  const at::Tensor keys = keys_in.contiguous();
  int64_t* p = ptr.data_ptr<int64_t>();
  int64_t* f = fill.data_ptr<int64_t>();
  const int64_t start = wrap_ptr(*p, K);
  const bool wide = wide_acc(buffer, keys);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "queue_enqueue_", [&] {
    using in_t = scalar_t;
    const in_t* src = keys.const_data_ptr<in_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "queue_enqueue_", [&] {
      using out_t = scalar_t;
      out_t* dst = buffer.mutable_data_ptr<out_t>();
      if (wide)
        enqueue_rows<double>(dst, src, start, B, K, D, normalize);
      else
        enqueue_rows<float>(dst, src, start, B, K, D, normalize);
    });
  });
  *p = next_ptr(start, B, K);
  *f = next_fill(*f, B, K);
}

}  // namespace
}  // namespace sslk::queue

TORCH_LIBRARY_IMPL(sslkernels, CPU, m) {
  m.impl("queue_enqueue_", &sslk::queue::enqueue_cpu);
}
