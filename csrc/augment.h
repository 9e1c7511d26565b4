// Host-side pieces of the batched augmentation op shared by the CPU and CUDA implementations:
// argument checks and the output allocation.
#pragma once
#include <ATen/ATen.h>

#include "augment_math.h"

namespace sslk::augment {

// The Python API validates arguments with friendly messages; these checks keep a direct
// torch.ops call from reading out of bounds.
void check_args(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& params,
                int64_t size, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                int64_t blur_kernel_size, at::ScalarType dtype);

// (B, 3, size, size) in `dtype`, contiguous or channels-last.
at::Tensor empty_output(const at::Tensor& params, int64_t size, at::ScalarType dtype,
                        bool channels_last);

}  // namespace sslk::augment
