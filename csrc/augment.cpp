// Schema of the batched augmentation op and the checks shared by its CPU and CUDA kernels.
#include "augment.h"

#include <torch/library.h>

namespace sslk::augment {

void check_args(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& params,
                int64_t size, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                int64_t blur_kernel_size, at::ScalarType dtype) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.dim() == 1 && data.is_contiguous(),
              "augment: data must be a contiguous 1-D uint8 tensor (the packed images)");
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.dim() == 2 && meta.size(1) == 3 &&
                  meta.is_contiguous(),
              "augment: meta must be a contiguous (B, 3) int64 tensor (offset, height, width)");
  TORCH_CHECK(params.scalar_type() == at::kFloat && params.dim() == 2 &&
                  params.size(1) == kNumParams && params.is_contiguous(),
              "augment: params must be a contiguous (B, ", int(kNumParams), ") float32 tensor");
  TORCH_CHECK(meta.size(0) == params.size(0), "augment: meta and params must have B rows");
  TORCH_CHECK(data.device() == meta.device() && data.device() == params.device(),
              "augment: data, meta and params must be on one device");
  TORCH_CHECK(size > 0, "augment: size must be > 0");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "augment: mean and std must have 3 values");
  for (double s : std) TORCH_CHECK(s != 0.0, "augment: std must be non-zero");
  TORCH_CHECK(blur_kernel_size >= 1 && blur_kernel_size % 2 == 1 &&
                  blur_kernel_size <= 2 * size - 1,
              "augment: blur_kernel_size must be odd, >= 1 and <= 2 * size - 1");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "augment: dtype must be float32, bfloat16 or float16");
}

CallArgs call_args(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& params,
                   int64_t size, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                   double solarize_threshold, int64_t blur_kernel_size, at::ScalarType dtype) {
  check_args(data, meta, params, size, mean, std, blur_kernel_size, dtype);
  CallArgs k;
  k.S = size;
  for (int c = 0; c < 3; ++c) {
    k.mean[c] = static_cast<float>(mean[c]);
    k.std[c] = static_cast<float>(std[c]);
  }
  k.threshold = static_cast<float>(solarize_threshold);
  k.ksize = blur_kernel_size;
  return k;
}

at::Tensor empty_output(const at::Tensor& params, int64_t size, at::ScalarType dtype,
                        bool channels_last) {
  return at::empty({params.size(0), 3, size, size},
                   params.options().dtype(dtype).memory_format(
                       channels_last ? at::MemoryFormat::ChannelsLast
                                     : at::MemoryFormat::Contiguous));
}

}  // namespace sslk::augment

TORCH_LIBRARY_FRAGMENT(sslkernels, m) {
  // data: packed uint8 images, each (3, H_i, W_i) contiguous at meta[i] = (offset, H_i, W_i);
  // params: (B, 18) float32 per-sample parameters (columns in csrc/augment_math.h). Returns the
  // (B, 3, size, size) views: crop + antialiased bilinear resize, flip, colour jitter in the
  // sample's order, grayscale, Gaussian blur, solarize, normalize.
  m.def("augment(Tensor data, Tensor meta, Tensor params, int size, float[] mean, float[] std,"
        " float solarize_threshold, int blur_kernel_size, ScalarType dtype, bool channels_last)"
        " -> Tensor");
}
