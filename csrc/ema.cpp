// Schema of the in-place EMA op and the checks shared by its CPU and CUDA implementations.
#include "ema.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace sslk::ema {

namespace {

const char* kSupported =
    "supported (target, online) dtypes: (float32, float32|bfloat16|float16), (float64, float64), "
    "(bfloat16, bfloat16), (float16, float16)";

bool pair_kind(at::ScalarType t, at::ScalarType o, Kind& kind) {
  using at::ScalarType;
  switch (t) {
    case ScalarType::Float:
      if (o == ScalarType::Float) kind = Kind::kFloatFloat;
      else if (o == ScalarType::BFloat16) kind = Kind::kFloatBFloat16;
      else if (o == ScalarType::Half) kind = Kind::kFloatHalf;
      else return false;
      return true;
    case ScalarType::Double:
      kind = Kind::kDoubleDouble;
      return o == ScalarType::Double;
    case ScalarType::BFloat16:
      kind = Kind::kBFloat16BFloat16;
      return o == ScalarType::BFloat16;
    case ScalarType::Half:
      kind = Kind::kHalfHalf;
      return o == ScalarType::Half;
    default:
      return false;
  }
}

}  // namespace

// True when the byte ranges, taken in `order`, each start at or after the end of the previous
// one: then no two of them overlap, whichever order it is.
static bool disjoint_in_order(const std::vector<std::pair<uintptr_t, uintptr_t>>& ranges,
                              const std::vector<uint32_t>& order) {
  for (size_t k = 1; k < order.size(); ++k)
    if (ranges[order[k]].first < ranges[order[k - 1]].second) return false;
  return true;
}

Checked check_lists(at::TensorList target, at::TensorList online, double weight,
                    c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(target.size() == online.size(),
                    "target and online must hold the same number of tensors, got ",
                    target.size(), " and ", online.size());
  TORCH_CHECK_VALUE(std::isfinite(weight) && weight >= 0.0 && weight <= 1.0,
                    "weight (1 - momentum) must be in [0, 1], got ", weight);
  Checked out;
  if (target.empty()) return out;
  out.pairs.reserve(target.size());
  const at::Device device = target[0].device();
  out.device = device;
  TORCH_CHECK_VALUE(device.type() == device_type, "expected tensors on ", device_type, ", got ",
                    device);
  // Meta and other data-less tensors (tracing) get every check but the memory overlap one.
  const bool has_data =
      device_type == c10::DeviceType::CPU || device_type == c10::DeviceType::CUDA;
  // Targets that share memory would be written twice (or raced on): collect their byte ranges.
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  ranges.reserve(target.size());
  for (size_t i = 0; i < target.size(); ++i) {
    const at::Tensor& t = target[i];
    const at::Tensor& o = online[i];
    TORCH_CHECK_TYPE(t.defined(), "target[", i, "] is an undefined tensor");
    TORCH_CHECK_TYPE(o.defined(), "online[", i, "] is an undefined tensor");
    if (i + kPrefetchAhead < target.size()) {
      if (target[i + kPrefetchAhead].defined()) prefetch_impl(target[i + kPrefetchAhead]);
      if (online[i + kPrefetchAhead].defined()) prefetch_impl(online[i + kPrefetchAhead]);
    }
    if (i + kPrefetchAhead / 2 < target.size() && target[i + kPrefetchAhead / 2].defined())
      prefetch_autograd_meta(target[i + kPrefetchAhead / 2]);
    TORCH_CHECK_VALUE(t.device() == device && o.device() == device,
                      "target[", i, "] and online[", i, "] must be on ", device,
                      " like target[0], got ", t.device(), " and ", o.device());
    TORCH_CHECK_VALUE(t.sizes() == o.sizes(), "target[", i, "] and online[", i,
                      "] must have the same shape, got ", t.sizes(), " and ", o.sizes());
    Kind kind;
    TORCH_CHECK_TYPE(pair_kind(t.scalar_type(), o.scalar_type(), kind), "target[", i,
                     "] has dtype ", t.scalar_type(), " and online[", i, "] has dtype ",
                     o.scalar_type(), ", which cannot be combined; ", kSupported);
    TORCH_CHECK_VALUE(!t.requires_grad(), "target[", i,
                      "] requires grad, but the parameters of a target (EMA) network must have "
                      "requires_grad=False: call target.requires_grad_(False) once after "
                      "creating it");
    const int64_t n = t.numel();
    if (n == 0 || !has_data) continue;
    void* tp = t.data_ptr();
    const bool contiguous = t.is_contiguous();
    // Extent of the elements in memory (a strided view may have gaps).
    int64_t span = n;
    if (!contiguous) {
      span = 1;
      for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * std::abs(t.stride(d));
    }
    const auto begin = reinterpret_cast<uintptr_t>(tp);
    ranges.emplace_back(begin, begin + span * t.element_size());
    if (n == 1 || (contiguous && o.is_contiguous()) || flat_pair(t, o))
      out.pairs.push_back({tp, o.const_data_ptr(), n, kind});
    else
      out.strided.push_back(i);
  }
  if (ranges.size() > 1) {
    std::vector<uint32_t> by_start(ranges.size());
    for (uint32_t k = 0; k < by_start.size(); ++k) by_start[k] = k;
    std::sort(by_start.begin(), by_start.end(),
              [&](uint32_t a, uint32_t b) { return ranges[a] < ranges[b]; });
    TORCH_CHECK_VALUE(disjoint_in_order(ranges, by_start),
                      "target holds tensors that share memory (the same tensor twice or "
                      "overlapping views); each target element must be updated once");
  }
  return out;
}

namespace {

using EmaOp = void(at::TensorList, at::TensorList, double);

c10::TypedOperatorHandle<EmaOp>& ema_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sslkernels::ema_lerp_", "")
                       .typed<EmaOp>();
  return op;
}

// ADInplaceOrView: the op writes its targets in place, so bump their version counters (as
// ATen's in-place ops do) after the backend kernel ran; autograd then notices a target that was
// saved for backward and modified afterwards.
void ema_lerp_ad_inplace(c10::DispatchKeySet ks, at::TensorList target, at::TensorList online,
                         double weight) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    ema_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, target, online, weight);
  }
  for (const at::Tensor& t : target) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

}  // namespace sslk::ema

TORCH_LIBRARY_FRAGMENT(sslkernels, m) {
  // target[i] <- lerp(target[i], online[i], weight) for every i, i.e. the EMA
  // target <- m * target + (1 - m) * online with weight = 1 - m, bit-compatible with
  // torch._foreach_lerp_(target, online, weight). One call updates the whole list.
  m.def("ema_lerp_(Tensor(a!)[] target, Tensor[] online, float weight) -> ()");
}

TORCH_LIBRARY_IMPL(sslkernels, ADInplaceOrView, m) {
  m.impl("ema_lerp_", torch::dispatch(c10::DispatchKey::ADInplaceOrView,
                                      TORCH_FN(sslk::ema::ema_lerp_ad_inplace)));
}
