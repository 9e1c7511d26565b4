// Schema of the ring-buffer queue op and its device-independent argument checks.
#include "queue.h"

#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

namespace sslk::queue {

void check_enqueue(const at::Tensor& buffer, const at::Tensor& ptr, const at::Tensor& fill,
                   const at::Tensor& keys) {
  TORCH_CHECK(buffer.dim() == 2, "queue_enqueue_: buffer must be 2-D (K, D), got ",
              buffer.sizes());
  TORCH_CHECK(buffer.size(0) > 0, "queue_enqueue_: buffer must hold at least one row");
  TORCH_CHECK(buffer.is_contiguous(), "queue_enqueue_: buffer must be contiguous");
  TORCH_CHECK(at::isFloatingType(buffer.scalar_type()),
              "queue_enqueue_: buffer must be floating point, got ", buffer.scalar_type());
  TORCH_CHECK(ptr.dim() == 0 && ptr.scalar_type() == at::kLong,
              "queue_enqueue_: ptr must be a 0-d int64 tensor");
  TORCH_CHECK(fill.dim() == 0 && fill.scalar_type() == at::kLong,
              "queue_enqueue_: fill must be a 0-d int64 tensor");
  TORCH_CHECK(keys.dim() == 2, "queue_enqueue_: keys must be 2-D (B, D), got ", keys.sizes());
  TORCH_CHECK(keys.size(1) == buffer.size(1), "queue_enqueue_: keys must have width D = ",
              buffer.size(1), ", got ", keys.size(1));
  TORCH_CHECK(at::isFloatingType(keys.scalar_type()),
              "queue_enqueue_: keys must be floating point, got ", keys.scalar_type());
  TORCH_CHECK(ptr.device() == buffer.device() && fill.device() == buffer.device() &&
                  keys.device() == buffer.device(),
              "queue_enqueue_: buffer, ptr, fill and keys must be on one device, got ",
              buffer.device(), ", ", ptr.device(), ", ", fill.device(), ", ", keys.device());
  // Rows are read and written in one pass: keys must not be rows of the buffer itself.
  at::assert_no_overlap(buffer, keys);
}

}  // namespace sslk::queue

TORCH_LIBRARY_FRAGMENT(sslkernels, m) {
  // Writes normalize(keys[i]) to row (ptr + i) mod K of buffer for the last min(B, K) keys,
  // then ptr <- (ptr + B) mod K and fill <- min(K, fill + B), all on the tensors' device: the
  // pointer is read by the kernel, never by the host. B = 0 is a no-op.
  m.def("queue_enqueue_(Tensor(a!) buffer, Tensor(b!) ptr, Tensor(c!) fill, Tensor keys,"
        " bool normalize) -> ()");
}
