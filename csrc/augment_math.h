// Per-pixel math of the batched augmentation kernels, shared by the CPU (csrc/cpu/augment.cpp)
// and CUDA (csrc/cuda/augment.cu) paths, so that the CPU tests also check the arithmetic the GPU
// runs. Every function reproduces, in float32, the formula of the torchvision v2 tensor kernel
// named next to it (torchvision/transforms/v2/functional/_color.py, _geometry.py, _misc.py), on
// float images in [0, 1].
#pragma once
#include <cstdint>

#include "common.h"

namespace sslk::augment {

// Columns of the per-sample parameter tensor (B, kNumParams) float32. Keep in sync with
// sslkernels/augment.py (PARAM_COLUMNS).
enum Param : int {
  kTop = 0,         // crop box in source pixels (integers)
  kLeft = 1,
  kHeight = 2,
  kWidth = 3,
  kFlip = 4,        // 1: horizontal flip after the resize
  kJitter = 5,      // 1: colour jitter applied
  kBrightness = 6,  // brightness factor >= 0
  kContrast = 7,    // contrast factor >= 0
  kSaturation = 8,  // saturation factor >= 0
  kHue = 9,         // hue shift in [-0.5, 0.5]
  kOrder = 10,      // kOrder .. kOrder+3: the jitter ops in application order (0 b, 1 c, 2 s, 3 h)
  kGray = 14,       // 1: rgb_to_grayscale(num_output_channels=3)
  kBlur = 15,       // 1: gaussian blur with sigma kSigma
  kSigma = 16,
  kSolarize = 17,   // 1: solarize at the call's threshold
  kNumParams = 18,
};

enum JitterOp : int { kOpBrightness = 0, kOpContrast = 1, kOpSaturation = 2, kOpHue = 3 };

SSLK_HD float clamp01(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

// ---------------------------------------------------------------------------------------------
// Antialiased bilinear resize (ATen's _upsample_bilinear2d_aa, align_corners=False, which
// torchvision's resize(antialias=True) calls): output index i of a resize from `in` to `out`
// pixels reads the source range [xmin, xmin + xsize) with triangle-filter weights whose support
// is widened by the downscale factor; the weights are normalized to sum to one. For upscaling
// (scale < 1) the support is 1 and this is align_corners=False bilinear with edge clamping.
struct AAFilter {
  float scale;     // in / out
  float support;   // half-width of the filter in source pixels
  float invscale;  // 1 / scale when downscaling, else 1
};

SSLK_HD AAFilter aa_filter(int64_t in, int64_t out) {
  AAFilter f;
  f.scale = static_cast<float>(in) / static_cast<float>(out);
  f.support = f.scale >= 1.f ? f.scale : 1.f;
  f.invscale = f.scale >= 1.f ? 1.f / f.scale : 1.f;
  return f;
}

// Source range of output index i; returns the centre used by aa_weight.
SSLK_HD float aa_range(const AAFilter& f, int64_t i, int64_t in, int64_t& xmin, int64_t& xsize) {
  const float center = f.scale * (static_cast<float>(i) + 0.5f);
  int64_t lo = static_cast<int64_t>(center - f.support + 0.5f);  // truncation, as ATen
  int64_t hi = static_cast<int64_t>(center + f.support + 0.5f);
  lo = lo < 0 ? 0 : lo;
  hi = hi > in ? in : hi;
  xmin = lo;
  xsize = hi - lo;
  return center;
}

// Unnormalized weight of source pixel j for an output pixel with centre `center`.
SSLK_HD float aa_weight(const AAFilter& f, float center, int64_t j) {
  const float x = (static_cast<float>(j) - center + 0.5f) * f.invscale;
  const float ax = x < 0.f ? -x : x;
  return ax < 1.f ? 1.f - ax : 0.f;
}

// Upper bound of xsize over all output indices (for weight-table strides).
SSLK_HD int64_t aa_max_taps(const AAFilter& f, int64_t in) {
  const int64_t t = static_cast<int64_t>(f.support * 2.f) + 3;
  return t < in ? t : in;
}

// ---------------------------------------------------------------------------------------------
// Colour ops on one RGB pixel (planar float in [0, 1]).

// _rgb_to_grayscale_image: 0.2989 r + 0.587 g + 0.114 b (same evaluation order).
SSLK_HD float gray(float r, float g, float b) { return r * 0.2989f + g * 0.587f + b * 0.114f; }

// _blend(image1, image2, ratio) = clamp(image1 * ratio + image2 * (1 - ratio), 0, 1).
SSLK_HD float blend(float x, float y, float ratio) { return clamp01(x * ratio + y * (1.f - ratio)); }

// adjust_brightness_image: clamp(x * f, 0, 1).
SSLK_HD void brightness(float& r, float& g, float& b, float f) {
  r = clamp01(r * f);
  g = clamp01(g * f);
  b = clamp01(b * f);
}

// adjust_contrast_image: blend with the mean of the image's grayscale (computed by the caller
// on the image as it is just before this op).
SSLK_HD void contrast(float& r, float& g, float& b, float f, float mean) {
  r = blend(r, mean, f);
  g = blend(g, mean, f);
  b = blend(b, mean, f);
}

// adjust_saturation_image: blend with the pixel's own grayscale.
SSLK_HD void saturation(float& r, float& g, float& b, float f) {
  const float l = gray(r, g, b);
  r = blend(r, l, f);
  g = blend(g, l, f);
  b = blend(b, l, f);
}

// Lane<T>: the few operations the hue formula needs beyond + - * /, so that it is written once
// and instantiated for float (CPU tails, CUDA) and for at::vec::Vectorized<float> (CPU bodies;
// the specialization lives in csrc/cpu/augment.cpp). Masks select with `select(m, a, b)` =
// m ? a : b.
template <typename T>
struct Lane;

template <>
struct Lane<float> {
  using Mask = bool;
  static SSLK_HD bool lt(float a, float b) { return a < b; }
  static SSLK_HD bool ge(float a, float b) { return a >= b; }
  static SSLK_HD bool eq(float a, float b) { return a == b; }
  static SSLK_HD bool ne(float a, float b) { return a != b; }
  static SSLK_HD bool both(bool a, bool b) { return a && b; }
  static SSLK_HD float select(bool m, float a, float b) { return m ? a : b; }
  static SSLK_HD float floor(float x) { return floorf(x); }
  static SSLK_HD float max(float a, float b) { return a > b ? a : b; }
  static SSLK_HD float min(float a, float b) { return a < b ? a : b; }
};

template <typename T>
SSLK_HD T clamp01_t(const T& x) {
  using L = Lane<T>;
  return L::min(L::max(x, T(0.f)), T(1.f));
}

// adjust_hue_image: torchvision's _rgb_to_hsv, h <- (h + f) mod 1 (torch.remainder), then
// _hsv_to_rgb, step by step; the sector i = floor(6h) mod 6 is picked with compares.
template <typename T>
SSLK_HD void hue_t(T& r, T& g, T& b, const T& f) {
  using L = Lane<T>;
  const T one(1.f), zero(0.f);
  const T maxc = L::max(L::max(r, g), b);
  const T minc = L::min(L::min(r, g), b);
  const auto eqc = L::eq(maxc, minc);
  const T cr = maxc - minc;
  const T s = cr / L::select(eqc, one, maxc);
  const T div = L::select(eqc, one, cr);
  const T rc = (maxc - r) / div, gc = (maxc - g) / div, bc = (maxc - b) / div;
  const auto max_neq_r = L::ne(maxc, r);
  const auto max_eq_g = L::eq(maxc, g);
  const auto max_neq_g = L::ne(maxc, g);
  const T hr = L::select(max_neq_r, zero, bc - gc);
  const T hg = L::select(L::both(max_eq_g, max_neq_r), (rc + T(2.f)) - bc, zero);
  const T hb = L::select(L::both(max_neq_r, max_neq_g), (gc + T(4.f)) - rc, zero);
  T h = (hr + hg) + hb;
  h = h * T(1.f / 6.f) + one;
  h = h - L::floor(h);  // fmod(h, 1) for h >= 0
  h = h + f;
  h = h - L::floor(h);  // torch.remainder(h, 1)
  const T v = maxc;
  const T h6 = h * T(6.f);
  T fi = L::floor(h6);
  const T fr = h6 - fi;
  fi = L::select(L::ge(fi, T(6.f)), fi - T(6.f), fi);
  const T sxf = s * fr;
  const T one_minus_s = one - s;
  const T q = clamp01_t((one - sxf) * v);
  const T t = clamp01_t((sxf + one_minus_s) * v);
  const T p = clamp01_t(one_minus_s * v);
  // i:  0  1  2  3  4  5
  // r:  v  q  p  p  t  v
  // g:  t  v  v  q  p  p
  // b:  p  p  t  v  v  q
  const auto i1 = L::lt(fi, one), i2 = L::lt(fi, T(2.f)), i3 = L::lt(fi, T(3.f));
  const auto i4 = L::lt(fi, T(4.f)), i5 = L::lt(fi, T(5.f));
  r = L::select(i1, v, L::select(i2, q, L::select(i4, p, L::select(i5, t, v))));
  g = L::select(i1, t, L::select(i3, v, L::select(i4, q, p)));
  b = L::select(i2, p, L::select(i3, t, L::select(i5, v, q)));
}

SSLK_HD void hue(float& r, float& g, float& b, float f) { hue_t<float>(r, g, b, f); }

// One jitter op by id (ColorJitter's fn_idx). A hue factor of exactly 0 is skipped, as
// ColorJitter(hue=0) does (the HSV round trip is the identity up to rounding).
SSLK_HD void jitter_op(int op, float& r, float& g, float& b, const float* p, float mean) {
  switch (op) {
    case kOpBrightness: brightness(r, g, b, p[kBrightness]); break;
    case kOpContrast: contrast(r, g, b, p[kContrast], mean); break;
    case kOpSaturation: saturation(r, g, b, p[kSaturation]); break;
    default:
      if (p[kHue] != 0.f) hue(r, g, b, p[kHue]);
      break;
  }
}

// The jitter ops of one sample split at contrast: ops [0, split) run before the grayscale mean
// is needed, contrast (if present) at `split`, the rest after. n_ops is 0 without jitter.
struct JitterPlan {
  int ops[4];
  int n_ops;
  int split;  // index of contrast in ops, or n_ops when absent
};

// Loops run to the constant 4 (not n_ops) so that a GPU compiler unrolls them and keeps ops[]
// in registers: an index that is not a compile-time constant puts the array in local memory.
SSLK_HD JitterPlan jitter_plan(const float* p) {
  JitterPlan plan;
  const bool on = p[kJitter] != 0.f;
  plan.n_ops = on ? 4 : 0;
  plan.split = plan.n_ops;
  for (int k = 0; k < 4; ++k) {
    plan.ops[k] = on ? static_cast<int>(p[kOrder + k]) : 0;
    if (on && plan.ops[k] == kOpContrast) plan.split = k;
  }
  return plan;
}

// rgb_to_grayscale_image(num_output_channels=3).
SSLK_HD void to_gray3(float& r, float& g, float& b) {
  const float l = gray(r, g, b);
  r = l;
  g = l;
  b = l;
}

// solarize_image on floats: x >= threshold -> 1 - x.
SSLK_HD float solarize(float x, float threshold) { return x >= threshold ? 1.f - x : x; }

// normalize_image: (x - mean) / std.
SSLK_HD float normalize(float x, float mean, float std) { return (x - mean) / std; }

// ---------------------------------------------------------------------------------------------
// Gaussian blur (gaussian_blur_image): the 1-D kernel is softmax(-(x / sigma)^2) over
// x = linspace(-lim, lim, k), lim = (k - 1) / (2 sqrt 2), i.e. exp(-d^2 / (2 sigma^2)) at integer
// offsets d, normalized; applied separably with reflect padding of k / 2.
SSLK_HD float gauss_unnormalized(int d, float sigma) {
  const float x = static_cast<float>(d) * 0.70710678118654752f / sigma;
  return expf(-(x * x));
}

// Reflect index (torch's "reflect" padding, no edge repeat) into [0, n); needs |overhang| < n.
SSLK_HD int64_t reflect(int64_t i, int64_t n) {
  if (i < 0) return -i;
  if (i >= n) return 2 * (n - 1) - i;
  return i;
}

}  // namespace sslk::augment
