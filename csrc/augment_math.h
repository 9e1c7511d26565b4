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

SSLK_HD float floor_f(float x) {
  const float t = static_cast<float>(static_cast<int64_t>(x));
  return t > x ? t - 1.f : t;
}

// Python-style remainder (sign of the divisor), as torch.remainder.
SSLK_HD float remainder1(float x) { return x - floor_f(x); }

// adjust_hue_image: torchvision's _rgb_to_hsv, h <- (h + f) mod 1, _hsv_to_rgb, step by step.
SSLK_HD void hue(float& r, float& g, float& b, float f) {
  const float maxc = r > g ? (r > b ? r : b) : (g > b ? g : b);
  const float minc = r < g ? (r < b ? r : b) : (g < b ? g : b);
  const bool eqc = maxc == minc;
  const float cr = maxc - minc;
  const float s = cr / (eqc ? 1.f : maxc);
  const float div = eqc ? 1.f : cr;
  const float rc = (maxc - r) / div, gc = (maxc - g) / div, bc = (maxc - b) / div;
  const bool max_neq_r = maxc != r, max_eq_g = maxc == g;
  const float hr = max_neq_r ? 0.f : (bc - gc);
  const float hg = (max_eq_g && max_neq_r) ? (rc + 2.f - bc) : 0.f;
  const float hb = (max_neq_r && !max_eq_g) ? (gc + 4.f - rc) : 0.f;
  float h = (hr + hg) + hb;
  h = h * (1.f / 6.f) + 1.f;
  h = h - floor_f(h);  // fmod(h, 1) for h >= 0
  h = remainder1(h + f);
  const float v = maxc;
  // _hsv_to_rgb
  const float h6 = h * 6.f;
  const float fi = floor_f(h6);
  const float fr = h6 - fi;
  int i = static_cast<int>(fi) % 6;
  if (i < 0) i += 6;
  const float sxf = s * fr;
  const float one_minus_s = 1.f - s;
  const float q = clamp01((1.f - sxf) * v);
  const float t = clamp01((sxf + one_minus_s) * v);
  const float p = clamp01(one_minus_s * v);
  switch (i) {
    case 0: r = v; g = t; b = p; break;
    case 1: r = q; g = v; b = p; break;
    case 2: r = p; g = v; b = t; break;
    case 3: r = p; g = q; b = v; break;
    case 4: r = t; g = p; b = v; break;
    default: r = v; g = p; b = q; break;
  }
}

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

SSLK_HD JitterPlan jitter_plan(const float* p) {
  JitterPlan plan;
  plan.n_ops = 0;
  plan.split = 0;
  if (p[kJitter] != 0.f) {
    for (int k = 0; k < 4; ++k) plan.ops[k] = static_cast<int>(p[kOrder + k]);
    plan.n_ops = 4;
  }
  plan.split = plan.n_ops;
  for (int k = 0; k < plan.n_ops; ++k)
    if (plan.ops[k] == kOpContrast) plan.split = k;
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
