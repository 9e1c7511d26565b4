// The prepared step behind sslkernels.EMA (Python: sslkernels._C.EmaPlan), and the check-only
// entry of its reference backend.
//
// An EMA object updates the same lists every step. The plan is built from them once: it runs
// every check of the op (check_lists) and records, for each tensor, the facts that those checks
// and the kernels' raw pointers depend on (exact type, data pointer, dtype, device, sizes,
// strides; for targets also requires_grad=False). A step re-reads these facts from the live
// Python tensors, and the identity of the values of a few containers (the modules'
// _parameters/_buffers/_modules dicts, a user's list), which is a few loads per tensor; when all
// match, it runs the kernel on the pairs recorded at build time, with no list conversion and no
// per-pair checks. When anything differs it writes nothing and returns false, and the Python
// object rebuilds the plan (which runs the checks again).
//
// The plan holds no reference to any tensor or container (the Python object passes them in),
// so the garbage collector sees every reference, and torch.utils.swap_tensors (module.to()
// under swap_module_params_on_conversion) still finds each tensor referenced once.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
#include <vector>

#include "balanced_for.h"
#include "ema.h"

namespace py = pybind11;

namespace sslk::ema {
namespace {

// What a tensor looked like when the plan was built.
struct Facts {
  const void* data;  // the address of its first element
  size_t shape;      // its sizes, then its strides, start at shapes_[shape]
  int64_t dim;
  caffe2::TypeMeta dtype;
  at::Device device;
  bool target;  // a target (averaged or copied): must still not require grad
};

// The address of a tensor's first element, read without the checks of data_ptr() (the plan
// takes plain tensors with storage only) and without touching copy-on-write state. `last`
// caches the data pointer of the previous tensor's storage: the tensors of a flat buffer share
// one, which is then read once.
const void* first_element(const c10::TensorImpl* impl,
                          std::pair<const c10::StorageImpl*, const void*>& last) {
  const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
  if (storage == nullptr) return nullptr;
  if (storage != last.first) last = {storage, storage->data()};
  return static_cast<const char*>(last.second) +
         impl->storage_offset() * static_cast<int64_t>(impl->dtype().itemsize());
}

bool same(const c10::TensorImpl* impl, const Facts& f, const int64_t* shape,
          std::pair<const c10::StorageImpl*, const void*>& last) {
  if (impl->dtype() != f.dtype || impl->device() != f.device || impl->dim() != f.dim)
    return false;
  const c10::IntArrayRef sizes = impl->sizes(), strides = impl->strides();
  for (int64_t d = 0; d < f.dim; ++d)
    if (sizes[d] != shape[d] || strides[d] != shape[f.dim + d]) return false;
  return first_element(impl, last) == f.data && !(f.target && impl->requires_grad());
}

// Pairs of the kernels that are adjacent in memory on both sides (the parameters of two modules
// flattened by flatten_parameters_) become one pair: one pass over each flat buffer.
std::vector<Pair> coalesce(const std::vector<Pair>& pairs) {
  std::vector<Pair> out;
  for (const Pair& p : pairs) {
    if (!out.empty()) {
      Pair& last = out.back();
      const char* t_end = static_cast<const char*>(last.t) + last.n * target_size(last.kind);
      const char* o_end = static_cast<const char*>(last.o) + last.n * online_size(last.kind);
      if (last.kind == p.kind && t_end == p.t && o_end == p.o) {
        last.n += p.n;
        continue;
      }
    }
    out.push_back(p);
  }
  return out;
}

// The tensors of a list or tuple of Python objects (TypeError naming `what`[i] if one is not).
std::vector<at::Tensor> unpack(const py::handle& seq, const char* what) {
  const py::object fast = py::reinterpret_steal<py::object>(
      PySequence_Fast(seq.ptr(), "EmaPlan: expected a list or tuple of tensors"));
  if (!fast) throw py::error_already_set();
  std::vector<at::Tensor> out;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast.ptr()); ++i) {
    PyObject* obj = PySequence_Fast_GET_ITEM(fast.ptr(), i);
    TORCH_CHECK_TYPE(THPVariable_Check(obj), what, "[", i, "] must be a torch.Tensor, got ",
                     Py_TYPE(obj)->tp_name);
    out.push_back(THPVariable_Unpack(obj));
  }
  return out;
}

constexpr size_t kAhead = 8;  // tensors between the prefetch stages of a step's checks
constexpr int64_t kCheckGrain = 512;  // objects below which a step checks on one thread
constexpr int64_t kCheckChunk = 256;  // objects a thread claims at a time (balanced_for)

class Plan {
 public:
  // target, online: the pairs the kernels average; copy_target, copy_online: the pairs the
  // step copies (buffers), which the caller has checked. Every tensor must be a plain CPU or
  // CUDA tensor (sslkernels/ema.py sends anything else through the op).
  Plan(const py::handle& target, const py::handle& online, const py::handle& copy_target,
       const py::handle& copy_online, const py::tuple& containers) {
    for (const py::handle& c : containers) {
      TORCH_CHECK_TYPE(PyDict_Check(c.ptr()) || PyList_Check(c.ptr()),
                       "EmaPlan: a container must be a dict or a list");
      sizes_.push_back(py::len(c));
      starts_.push_back(total_);
      total_ += sizes_.back();
    }
    const std::vector<at::Tensor> lt = unpack(target, "target");
    const std::vector<at::Tensor> lo = unpack(online, "online");
    const std::vector<at::Tensor> ct = unpack(copy_target, "buffer target");
    const std::vector<at::Tensor> co = unpack(copy_online, "buffer online");
    TORCH_CHECK_VALUE(ct.size() == co.size(), "target and online must hold the same number of "
                      "buffers, got ", ct.size(), " and ", co.size());
    if (!lt.empty() || !lo.empty()) {
      checked_ = check_lists(lt, lo, 0.0, (lt.empty() ? lo : lt)[0].device().type());
      checked_.pairs = coalesce(checked_.pairs);
    }
    n_lerp_ = lt.size();
    n_copy_ = ct.size();
    for (const auto* list : {&lt, &lo, &ct, &co}) {
      for (const at::Tensor& t : *list) {
        TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(),
                    "EmaPlan: tensors must be on CPU or CUDA, got ", t.device());
        std::pair<const c10::StorageImpl*, const void*> none{nullptr, nullptr};
        facts_.push_back({first_element(t.unsafeGetTensorImpl(), none), shapes_.size(), t.dim(),
                          t.dtype(), t.device(), list == &lt || list == &ct});
        shapes_.insert(shapes_.end(), t.sizes().begin(), t.sizes().end());
        shapes_.insert(shapes_.end(), t.strides().begin(), t.strides().end());
      }
    }
  }

  // One EMA step with weight 1 - momentum. `tensors` is the tuple target + online +
  // copy_target + copy_online of the tensors the plan was built from; `containers` are the
  // dicts and lists given at build time, which must still hold exactly the objects of
  // `expected` (their values then, end to end), in order. Returns false, having written
  // nothing (some targets' versions may have been bumped), when a container or a tensor's
  // facts changed.
  bool step(const py::tuple& tensors, const py::tuple& containers, const py::tuple& expected,
            double weight) {
    TORCH_CHECK_VALUE(std::isfinite(weight) && weight >= 0.0 && weight <= 1.0,
                      "weight (1 - momentum) must be in [0, 1], got ", weight);
    if (PyTuple_GET_SIZE(containers.ptr()) != static_cast<Py_ssize_t>(sizes_.size()) ||
        PyTuple_GET_SIZE(expected.ptr()) != total_ ||
        PyTuple_GET_SIZE(tensors.ptr()) != static_cast<Py_ssize_t>(facts_.size()))
      return false;
    PyObject* const* items = &PyTuple_GET_ITEM(tensors.ptr(), 0);
    at::NoGradGuard no_grad;  // the strided pairs and the copies go through ATen
    if (!unchanged(&PyTuple_GET_ITEM(containers.ptr(), 0), &PyTuple_GET_ITEM(expected.ptr(), 0),
                   items))
      return false;
    {
      py::gil_scoped_release no_gil;  // the objects stay alive: the caller holds `tensors`
      run(items, weight);
    }
    if (n_copy_) {
      std::vector<at::Tensor> ct, co;
      for (size_t i = 0; i < n_copy_; ++i) {
        ct.push_back(THPVariable_Unpack(items[2 * n_lerp_ + i]));
        co.push_back(THPVariable_Unpack(items[2 * n_lerp_ + n_copy_ + i]));
      }
      at::_foreach_copy_(ct, co);
    }
    return true;
  }

  size_t num_pairs() const { return checked_.pairs.size() + checked_.strided.size(); }

 private:
  // Containers [lo, hi): each still holds exactly the objects of `want`, from its start.
  bool containers_unchanged(PyObject* const* containers, PyObject* const* want, size_t lo,
                            size_t hi) const {
    if (lo >= hi) return true;
    want += starts_[lo];
    for (size_t k = lo; k < hi; ++k) {
      // as for the tensors: the container objects, then their tables, ahead of use
      if (k + 2 * kAhead < hi) __builtin_prefetch(containers[k + 2 * kAhead]);
      if (k + kAhead < hi && sizes_[k + kAhead] > 0) {
        PyObject* next = containers[k + kAhead];
        const char* table = PyDict_Check(next)
            ? reinterpret_cast<const char*>(reinterpret_cast<PyDictObject*>(next)->ma_keys)
            : reinterpret_cast<const char*>(reinterpret_cast<PyListObject*>(next)->ob_item);
        __builtin_prefetch(table);
        __builtin_prefetch(table + 64);
      }
      PyObject* c = containers[k];
      if (PyDict_Check(c)) {
        if (PyDict_GET_SIZE(c) != sizes_[k]) return false;
        // Most dicts of a module tree are empty (a leaf's submodules, a Linear's buffers): for
        // them the size is the whole check, and their tables are not read.
        if (sizes_[k] == 0) continue;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(c, &pos, &key, &value))
          if (value != *want++) return false;
      } else {
        if (!PyList_Check(c) || PyList_GET_SIZE(c) != sizes_[k]) return false;
        for (Py_ssize_t i = 0; i < sizes_[k]; ++i)
          if (PyList_GET_ITEM(c, i) != *want++) return false;
      }
    }
    return true;
  }

  // The facts of tensors [lo, hi), re-read from the live objects; each averaged target that
  // passes has its version bumped (as the op's ADInplaceOrView kernel does), here rather than
  // after the kernel because its metadata is in cache now. A step refused later has bumped
  // versions and written nothing, which autograd cannot tell from a write of the same values.
  bool tensors_unchanged(PyObject* const* items, size_t lo, size_t hi) const {
    std::pair<const c10::StorageImpl*, const void*> last{nullptr, nullptr};
    for (size_t i = lo; i < hi; ++i) {
      // The metadata of thousands of tensors is rarely in cache after a pass over their data:
      // fetch each level (Python object, TensorImpl, StorageImpl and autograd metadata) a few
      // tensors before it is read, which hides most of the misses.
      if (i + 3 * kAhead < hi) __builtin_prefetch(items[i + 3 * kAhead]);
      if (i + 2 * kAhead < hi && THPVariable_CheckExact(items[i + 2 * kAhead]))
        prefetch_impl(THPVariable_Unpack(items[i + 2 * kAhead]));
      if (i + kAhead < hi && THPVariable_CheckExact(items[i + kAhead])) {
        const c10::TensorImpl* impl = THPVariable_Unpack(items[i + kAhead]).unsafeGetTensorImpl();
        const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
        if (storage != last.first) __builtin_prefetch(storage);
        if (facts_[i + kAhead].target && impl->autograd_meta())
          __builtin_prefetch(impl->autograd_meta());
      }
      // swap_tensors swaps __class__ too
      if (!THPVariable_CheckExact(items[i])) return false;
      c10::TensorImpl* impl = THPVariable_Unpack(items[i]).unsafeGetTensorImpl();
      if (!same(impl, facts_[i], shapes_.data() + facts_[i].shape, last)) return false;
      if (i < n_lerp_) impl->bump_version();
    }
    return true;
  }

  // Every container and every tensor, in one pass split over the threads: each thread takes
  // the same share of the containers and of the tensors (contiguous blocks, as the CPU kernel
  // splits its elements), so the two kinds of check, which differ in cost, stay balanced, and
  // each thread meets the same objects every step, in its own cache; a thread that falls
  // behind has the end of its share taken over (balanced_for). The caller's thread
  // holds the GIL, so no Python thread changes them while they are read (the reads touch no
  // reference count).
  bool unchanged(PyObject* const* containers, PyObject* const* expected,
                 PyObject* const* items) const {
    const int64_t nc = sizes_.size(), nt = facts_.size(), n = std::max(nc, nt);
    std::atomic<bool> stale{false};
    balanced_for(n, kCheckChunk, kCheckGrain, [&](int64_t lo, int64_t hi) {
      if (stale.load(std::memory_order_relaxed)) return;
      const size_t c_lo = lo * nc / n, c_hi = hi * nc / n;
      const size_t t_lo = lo * nt / n, t_hi = hi * nt / n;
      if (!containers_unchanged(containers, expected, c_lo, c_hi) ||
          !tensors_unchanged(items, t_lo, t_hi))
        stale.store(true, std::memory_order_relaxed);
    });
    return !stale.load();
  }

  void run(PyObject* const* items, double weight) const {
    if (n_lerp_ == 0) return;
    std::vector<at::Tensor> vt, vo;  // only the strided pairs read the tensors (ATen's lerp)
    if (!checked_.strided.empty()) {
      for (size_t i = 0; i < n_lerp_; ++i) {
        vt.push_back(THPVariable_Unpack(items[i]));
        vo.push_back(THPVariable_Unpack(items[n_lerp_ + i]));
      }
    }
    if (checked_.device.is_cpu()) return lerp_cpu(vt, vo, weight, checked_);
#ifdef SSLK_WITH_CUDA
    if (checked_.device.is_cuda()) return lerp_cuda(vt, vo, weight, checked_);
#endif
    TORCH_CHECK(false, "EmaPlan: no kernel for ", checked_.device);
  }

  Checked checked_;  // the pairs (coalesced) and strided indices check_lists found
  std::vector<Facts> facts_;
  std::vector<int64_t> shapes_;
  std::vector<Py_ssize_t> sizes_;  // of each container at build time
  std::vector<Py_ssize_t> starts_;  // where each one's objects start in `expected`
  Py_ssize_t total_ = 0;           // their sum
  size_t n_lerp_ = 0, n_copy_ = 0;
};

}  // namespace

void bind_plan(py::module_& m) {
  py::class_<Plan>(m, "EmaPlan",
                   "The prepared step of sslkernels.EMA (see csrc/ema_plan.cpp).")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::tuple>(),
           py::arg("target"), py::arg("online"), py::arg("copy_target"), py::arg("copy_online"),
           py::arg("containers"))
      .def("step", &Plan::step, py::arg("tensors"), py::arg("containers"), py::arg("expected"),
           py::arg("weight"))
      .def_property_readonly("num_pairs", &Plan::num_pairs,
                             "Pairs the kernel streams (adjacent ones coalesced).");
  m.def(
      "ema_check_lists",
      [](const py::handle& target, const py::handle& online, double weight) {
        const std::vector<at::Tensor> lt = unpack(target, "target");
        const std::vector<at::Tensor> lo = unpack(online, "online");
        if (!lt.empty()) check_lists(lt, lo, weight, lt[0].device().type());
        else if (!lo.empty()) check_lists(lt, lo, weight, lo[0].device().type());
      },
      "Every check of torch.ops.sslkernels.ema_lerp_, writing nothing.", py::arg("target"),
      py::arg("online"), py::arg("weight"));
}

}  // namespace sslk::ema
