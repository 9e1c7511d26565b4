// Host-side pieces of the batched augmentation op shared by the CPU and CUDA implementations:
// argument checks, the call's scalar arguments, the output allocation and the dtype dispatch.
#pragma once
#include <ATen/ATen.h>

#include "augment_math.h"

namespace sslk::augment {

// The Python API validates arguments with friendly messages; these checks keep a direct
// torch.ops call from reading out of bounds.
void check_args(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& params,
                int64_t size, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                int64_t blur_kernel_size, at::ScalarType dtype);

// The call's scalar arguments in the float precision the kernels use (passed by value to CUDA
// kernels, so plain data).
struct CallArgs {
  int64_t S;
  float mean[3], std[3];
  float threshold;
  int64_t ksize;
};

// check_args, then the scalars packed into CallArgs.
CallArgs call_args(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& params,
                   int64_t size, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                   double solarize_threshold, int64_t blur_kernel_size, at::ScalarType dtype);

// Calls f(out_t{}) with out_t the C++ type of the output dtype (float, BFloat16 or Half).
template <typename F>
void dispatch_out(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: f(c10::Half{}); break;
  }
}

// (B, 3, size, size) in `dtype`, contiguous or channels-last.
at::Tensor empty_output(const at::Tensor& params, int64_t size, at::ScalarType dtype,
                        bool channels_last);

}  // namespace sslk::augment
