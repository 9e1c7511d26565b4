// CPU kernel of the batched augmentation op.
//
// Each image goes through the whole chain in four passes over an S x S float buffer that stays in
// cache (the per-pixel formulas are the shared ones of augment_math.h):
//   1. crop + antialiased bilinear resize, separable: a horizontal pass over the crop's rows
//      (uint8 -> float, S columns), then a vertical pass that also applies the 1/255 scaling, the
//      flip and the jitter ops that come before contrast in the sample's order;
//   2. when contrast is applied: the mean of the grayscale of the image as it is at that point;
//   3. contrast, the remaining jitter ops and grayscale; without blur this pass also solarizes,
//      normalizes and writes the output (dtype, layout);
//   4. with blur: vertical pass into a second buffer, then horizontal pass (reflect padding)
//      fused with solarize, normalize and the output store.
// Work is spread with at::parallel_for over images when the batch has at least as many images as
// threads, otherwise over the rows of each pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "augment.h"
#include "augment_math.h"

namespace sslk::augment {

// The vector lanes of the shared hue formula (augment_math.h).
template <>
struct Lane<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  using Mask = V;
  static V lt(const V& a, const V& b) { return a < b; }
  static V ge(const V& a, const V& b) { return a >= b; }
  static V eq(const V& a, const V& b) { return a == b; }
  static V ne(const V& a, const V& b) { return a != b; }
  static V both(const V& a, const V& b) { return a & b; }
  static V select(const V& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static V floor(const V& x) { return x.floor(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
};

namespace {

using Vec = at::vec::Vectorized<float>;

void hue_row(float* r, float* g, float* b, int64_t n, float f) {
  int64_t x = 0;
  const Vec vf(f);
  for (; x + Vec::size() <= n; x += Vec::size()) {
    Vec vr = Vec::loadu(r + x), vg = Vec::loadu(g + x), vb = Vec::loadu(b + x);
    hue_t<Vec>(vr, vg, vb, vf);
    vr.store(r + x);
    vg.store(g + x);
    vb.store(b + x);
  }
  for (; x < n; ++x) hue(r[x], g[x], b[x], f);
}

// Antialiased-resize weights of one axis: output index i reads source [xmin[i], xmin[i]+xsize[i])
// with weights w[i * taps ...], normalized (then multiplied by `gain`).
struct AxisWeights {
  std::vector<int64_t> xmin, xsize;
  std::vector<float> w;
  int64_t taps = 0;

  void build(int64_t in, int64_t out, float gain) {
    const AAFilter f = aa_filter(in, out);
    taps = aa_max_taps(f, in);
    xmin.resize(out);
    xsize.resize(out);
    w.assign(out * taps, 0.f);
    for (int64_t i = 0; i < out; ++i) {
      const float center = aa_range(f, i, in, xmin[i], xsize[i]);
      TORCH_INTERNAL_ASSERT(xsize[i] <= taps);
      float* wi = w.data() + i * taps;
      float total = 0.f;
      for (int64_t j = 0; j < xsize[i]; ++j) {
        wi[j] = aa_weight(f, center, xmin[i] + j);
        total += wi[j];
      }
      if (total != 0.f)
        for (int64_t j = 0; j < xsize[i]; ++j) wi[j] = wi[j] / total * gain;
    }
  }
};

// Per-image working memory, reused across the images a thread processes.
struct Scratch {
  AxisWeights wx, wy;
  std::vector<float> hbuf;  // 3 x crop_h x S: after the horizontal resize pass
  std::vector<float> buf;   // 3 x S x S
  std::vector<float> buf2;  // 3 x S x S (blur)
  std::vector<double> rowsum;
};

template <typename out_t>
struct OutImage {
  out_t* base;
  int64_t sc, sh, sw;
};

// Runs f(begin, end) over [0, n): in parallel chunks, or in one call when `par` is false.
template <typename F>
void for_rows(bool par, int64_t n, const F& f) {
  if (par && n > 1) {
    at::parallel_for(0, n, 1, f);
  } else {
    f(0, n);
  }
}

template <typename out_t>
void store_row(const OutImage<out_t>& o, int64_t y, int64_t S, const float* r, const float* g,
               const float* b) {
  const float* ch[3] = {r, g, b};
  for (int c = 0; c < 3; ++c) {
    out_t* dst = o.base + c * o.sc + y * o.sh;
    const float* s = ch[c];
    if (o.sw == 1) {
      for (int64_t x = 0; x < S; ++x) dst[x] = static_cast<out_t>(s[x]);
    } else {
      for (int64_t x = 0; x < S; ++x) dst[x * o.sw] = static_cast<out_t>(s[x]);
    }
  }
}

// Solarize (when on) and normalize a row of three planes in place.
inline void finish_row(float* r, float* g, float* b, int64_t S, bool sol, const CallArgs& k) {
  float* ch[3] = {r, g, b};
  for (int c = 0; c < 3; ++c) {
    float* s = ch[c];
    const float m = k.mean[c], sd = k.std[c];
    if (sol) {
      for (int64_t x = 0; x < S; ++x) s[x] = normalize(solarize(s[x], k.threshold), m, sd);
    } else {
      for (int64_t x = 0; x < S; ++x) s[x] = normalize(s[x], m, sd);
    }
  }
}

// Applies jitter ops ops[lo, hi) to a row of pixels.
inline void jitter_row(const JitterPlan& plan, int lo, int hi, const float* p, float mean,
                       float* r, float* g, float* b, int64_t n) {
  for (int k = lo; k < hi; ++k) {
    const int op = plan.ops[k];
    switch (op) {
      case kOpBrightness: {
        const float f = p[kBrightness];
        for (int64_t x = 0; x < n; ++x) brightness(r[x], g[x], b[x], f);
        break;
      }
      case kOpContrast: {
        const float f = p[kContrast];
        for (int64_t x = 0; x < n; ++x) contrast(r[x], g[x], b[x], f, mean);
        break;
      }
      case kOpSaturation: {
        const float f = p[kSaturation];
        for (int64_t x = 0; x < n; ++x) saturation(r[x], g[x], b[x], f);
        break;
      }
      default: {
        const float f = p[kHue];
        if (f != 0.f) hue_row(r, g, b, n, f);
        break;
      }
    }
  }
}

template <typename out_t>
void augment_image(const uint8_t* src, int64_t H, int64_t W, const float* p, const CallArgs& k,
                   const OutImage<out_t>& out, Scratch& sc, bool par) {
  const int64_t S = k.S;
  const int64_t top = static_cast<int64_t>(p[kTop]), left = static_cast<int64_t>(p[kLeft]);
  const int64_t ch = static_cast<int64_t>(p[kHeight]), cw = static_cast<int64_t>(p[kWidth]);
  const bool flip = p[kFlip] != 0.f, gray_on = p[kGray] != 0.f;
  const bool blur_on = p[kBlur] != 0.f && k.ksize > 1, sol = p[kSolarize] != 0.f;
  const JitterPlan plan = jitter_plan(p);

  sc.wx.build(cw, S, 1.f);
  sc.wy.build(ch, S, 1.f / 255.f);
  sc.hbuf.resize(3 * ch * S);
  sc.buf.resize(3 * S * S);
  const int64_t plane = S * S;
  float* B0 = sc.buf.data();

  // Pass 1a: horizontal resize of every crop row of every channel.
  {
    const AxisWeights& wx = sc.wx;
    float* hb = sc.hbuf.data();
    for_rows(par, 3 * ch, [&](int64_t lo, int64_t hi) {
      std::vector<float> row(cw);
      for (int64_t cr = lo; cr < hi; ++cr) {
        const int64_t c = cr / ch, r = cr % ch;
        const uint8_t* s = src + c * H * W + (top + r) * W + left;
        for (int64_t j = 0; j < cw; ++j) row[j] = static_cast<float>(s[j]);
        float* dst = hb + cr * S;
        for (int64_t i = 0; i < S; ++i) {
          const float* wi = wx.w.data() + i * wx.taps;
          const float* si = row.data() + wx.xmin[i];
          float acc = 0.f;
          for (int64_t j = 0; j < wx.xsize[i]; ++j) acc += wi[j] * si[j];
          dst[i] = acc;
        }
      }
    });
  }
  // Pass 1b: vertical resize (+ 1/255), flip, jitter ops before contrast.
  {
    const AxisWeights& wy = sc.wy;
    const float* hb = sc.hbuf.data();
    for_rows(par, S, [&](int64_t lo, int64_t hi) {
      for (int64_t y = lo; y < hi; ++y) {
        const float* wi = wy.w.data() + y * wy.taps;
        for (int c = 0; c < 3; ++c) {
          float* dst = B0 + c * plane + y * S;
          std::fill(dst, dst + S, 0.f);
          const float* base = hb + (c * ch + wy.xmin[y]) * S;
          for (int64_t j = 0; j < wy.xsize[y]; ++j) {
            const float wj = wi[j];
            const float* s = base + j * S;
            for (int64_t x = 0; x < S; ++x) dst[x] += wj * s[x];
          }
          if (flip) std::reverse(dst, dst + S);
        }
        jitter_row(plan, 0, plan.split, p, 0.f, B0 + y * S, B0 + plane + y * S,
                   B0 + 2 * plane + y * S, S);
      }
    });
  }
  // Pass 2: grayscale mean for contrast, over the image as it is just before contrast.
  float mean = 0.f;
  if (plan.split < plan.n_ops) {
    sc.rowsum.assign(S, 0.0);
    for_rows(par, S, [&](int64_t lo, int64_t hi) {
      for (int64_t y = lo; y < hi; ++y) {
        const float* r = B0 + y * S;
        const float* g = r + plane;
        const float* b = g + plane;
        float acc = 0.f;
        for (int64_t x = 0; x < S; ++x) acc += gray(r[x], g[x], b[x]);
        sc.rowsum[y] = acc;
      }
    });
    double total = 0.0;
    for (int64_t y = 0; y < S; ++y) total += sc.rowsum[y];
    mean = static_cast<float>(total / static_cast<double>(plane));
  }
  // Pass 3: contrast and the ops after it, grayscale; without blur also the output.
  for_rows(par, S, [&](int64_t lo, int64_t hi) {
    for (int64_t y = lo; y < hi; ++y) {
      float* r = B0 + y * S;
      float* g = r + plane;
      float* b = g + plane;
      jitter_row(plan, plan.split, plan.n_ops, p, mean, r, g, b, S);
      if (gray_on)
        for (int64_t x = 0; x < S; ++x) to_gray3(r[x], g[x], b[x]);
      if (!blur_on) {
        finish_row(r, g, b, S, sol, k);
        store_row(out, y, S, r, g, b);
      }
    }
  });
  if (!blur_on) return;

  // Pass 4: separable Gaussian blur with reflect padding, then solarize, normalize, store.
  const int64_t K = k.ksize, pad = K / 2;
  float gk[512];
  {
    float total = 0.f;
    for (int64_t t = 0; t < K; ++t) total += (gk[t] = gauss_unnormalized(int(t - pad), p[kSigma]));
    for (int64_t t = 0; t < K; ++t) gk[t] /= total;
  }
  sc.buf2.resize(3 * plane);
  float* B1 = sc.buf2.data();
  for_rows(par, S, [&](int64_t lo, int64_t hi) {
    for (int64_t y = lo; y < hi; ++y)
      for (int c = 0; c < 3; ++c) {
        float* dst = B1 + c * plane + y * S;
        std::fill(dst, dst + S, 0.f);
        for (int64_t t = 0; t < K; ++t) {
          const float* s = B0 + c * plane + reflect(y + t - pad, S) * S;
          const float w = gk[t];
          for (int64_t x = 0; x < S; ++x) dst[x] += w * s[x];
        }
      }
  });
  for_rows(par, S, [&](int64_t lo, int64_t hi) {
    std::vector<float> padded(S + 2 * pad), res(3 * S);
    for (int64_t y = lo; y < hi; ++y) {
      for (int c = 0; c < 3; ++c) {
        const float* s = B1 + c * plane + y * S;
        for (int64_t x = -pad; x < S + pad; ++x) padded[x + pad] = s[reflect(x, S)];
        float* dst = res.data() + c * S;
        std::fill(dst, dst + S, 0.f);
        for (int64_t t = 0; t < K; ++t) {
          const float w = gk[t];
          const float* q = padded.data() + t;
          for (int64_t x = 0; x < S; ++x) dst[x] += w * q[x];
        }
      }
      float* r = res.data();
      finish_row(r, r + S, r + 2 * S, S, sol, k);
      store_row(out, y, S, r, r + S, r + 2 * S);
    }
  });
}

template <typename out_t>
void run(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& params,
         const CallArgs& k, at::Tensor& out) {
  const int64_t B = params.size(0);
  const uint8_t* d = data.data_ptr<uint8_t>();
  const int64_t* m = meta.data_ptr<int64_t>();
  const float* p = params.data_ptr<float>();
  out_t* o = reinterpret_cast<out_t*>(out.data_ptr());
  const int64_t s0 = out.stride(0);
  auto image = [&](int64_t i, Scratch& sc, bool par) {
    OutImage<out_t> oi{o + i * s0, out.stride(1), out.stride(2), out.stride(3)};
    augment_image<out_t>(d + m[3 * i], m[3 * i + 1], m[3 * i + 2], p + i * kNumParams, k, oi, sc,
                         par);
  };
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      Scratch sc;
      for (int64_t i = lo; i < hi; ++i) image(i, sc, false);
    });
  } else {
    Scratch sc;
    for (int64_t i = 0; i < B; ++i) image(i, sc, true);
  }
}

at::Tensor augment_cpu(const at::Tensor& data, const at::Tensor& meta, const at::Tensor& params,
                       int64_t size, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                       double solarize_threshold, int64_t blur_kernel_size, at::ScalarType dtype,
                       bool channels_last) {
  const CallArgs k = call_args(data, meta, params, size, mean, std, solarize_threshold,
                               blur_kernel_size, dtype);
  TORCH_CHECK(blur_kernel_size <= 511, "augment: blur_kernel_size must be <= 511 on CPU");
  const int64_t B = params.size(0);
  const int64_t* m = meta.data_ptr<int64_t>();
  const float* p = params.data_ptr<float>();
  const int64_t nbytes = data.numel();
  // Every crop box must lie inside its image, and every image inside the data.
  for (int64_t i = 0; i < B; ++i) {
    const int64_t off = m[3 * i], H = m[3 * i + 1], W = m[3 * i + 2];
    TORCH_CHECK(H > 0 && W > 0 && off >= 0 && off + 3 * H * W <= nbytes,
                "augment: image ", i, " (offset ", off, ", ", H, "x", W, ") is outside data");
    const float* q = p + i * kNumParams;
    const int64_t t = int64_t(q[kTop]), l = int64_t(q[kLeft]);
    const int64_t h = int64_t(q[kHeight]), w = int64_t(q[kWidth]);
    TORCH_CHECK(t >= 0 && l >= 0 && h >= 1 && w >= 1 && t + h <= H && l + w <= W,
                "augment: crop box of sample ", i, " (top ", t, ", left ", l, ", height ", h,
                ", width ", w, ") must lie inside its ", H, "x", W, " image");
    for (int j = 0; j < 4 && q[kJitter] != 0.f; ++j) {
      const float op = q[kOrder + j];
      TORCH_CHECK(op == 0.f || op == 1.f || op == 2.f || op == 3.f,
                  "augment: jitter order of sample ", i, " must hold op ids 0..3");
    }
  }
  at::Tensor out = empty_output(params, size, dtype, channels_last);
  if (B == 0) return out;
  dispatch_out(dtype, [&](auto t) { run<decltype(t)>(data, meta, params, k, out); });
  return out;
}

}  // namespace
}  // namespace sslk::augment

TORCH_LIBRARY_IMPL(sslkernels, CPU, m) {
  m.impl("augment", &sslk::augment::augment_cpu);
}
