// Host-side pieces of the ring-buffer queue op shared by its CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

namespace sslk::queue {

// Checks that keep a direct torch.ops call from writing out of bounds (the Python API validates
// first with friendly messages). Nothing is written when one fails.
void check_enqueue(const at::Tensor& buffer, const at::Tensor& ptr, const at::Tensor& fill,
                   const at::Tensor& keys);

// Accumulation type of the per-row normalization: double when either side is double.
inline bool wide_acc(const at::Tensor& buffer, const at::Tensor& keys) {
  return buffer.scalar_type() == at::kDouble || keys.scalar_type() == at::kDouble;
}

}  // namespace sslk::queue
