// Schemas of the fused InfoNCE ops and the device-independent parts of their implementations.
#include "info_nce.h"

#include <torch/library.h>

namespace sslk::info_nce {

// The Python API validates arguments with friendly messages, once; these checks keep a direct
// torch.ops call from reading out of bounds. An empty batch is not an error here: it gives empty
// outputs, as on every backend of these ops.
void check_pair(const at::Tensor& z0, const at::Tensor& z1) {
  TORCH_CHECK(z0.dim() == 2 && z1.dim() == 2, "z0 and z1 must be 2-D (N, D)");
  TORCH_CHECK(z0.sizes() == z1.sizes(), "z0 and z1 must have the same shape");
  TORCH_CHECK(at::isFloatingType(z0.scalar_type()) && at::isFloatingType(z1.scalar_type()),
              "z0 and z1 must be floating point");
  TORCH_CHECK(z0.device() == z1.device(), "z0 and z1 must be on the same device");
}

void check_negatives(const at::Tensor& q, const at::Tensor& k, const at::Tensor& negatives) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && negatives.dim() == 2,
              "q, k and negatives must be 2-D");
  TORCH_CHECK(q.sizes() == k.sizes(), "q and k must have the same shape");
  TORCH_CHECK(negatives.size(1) == q.size(1), "negatives must have the width of q");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()) && at::isFloatingType(k.scalar_type()) &&
                  at::isFloatingType(negatives.scalar_type()),
              "q, k and negatives must be floating point");
  TORCH_CHECK(q.device() == k.device() && q.device() == negatives.device(),
              "q, k and negatives must be on the same device");
}

std::tuple<at::Tensor, at::Tensor> negatives_bwd(const at::Tensor& grad_loss, const at::Tensor& q,
                                                 const at::Tensor& k, const at::Tensor& lse_neg,
                                                 const at::Tensor& wsum, double inv_t,
                                                 bool normalize) {
  return negatives_backward(grad_loss, q, k, lse_neg, wsum, inv_t, normalize);
}

}  // namespace sslk::info_nce

TORCH_LIBRARY_FRAGMENT(sslkernels, m) {
  // Every forward returns per-row losses and lse_neg, the log-sum-exp of each row's logits over
  // its negatives only (diagonal and positive excluded); the backward derives the rest.
  // Two views (SimCLR): rows are the 2N stacked views.
  m.def("info_nce_pair_fwd(Tensor z0, Tensor z1, float inv_temperature, bool normalize)"
        " -> (Tensor, Tensor)");
  m.def("info_nce_pair_bwd(Tensor grad_loss, Tensor z0, Tensor z1, Tensor lse_neg,"
        " float inv_temperature, bool normalize) -> (Tensor, Tensor)");
  // Query/key with external negatives (MoCo). With need_grad the forward also returns
  // wsum = P_neg @ negatives_n, which makes the backward free of any pass over the negatives.
  m.def("info_nce_neg_fwd(Tensor q, Tensor k, Tensor negatives, float inv_temperature,"
        " bool normalize, bool need_grad) -> (Tensor, Tensor, Tensor)");
  m.def("info_nce_neg_bwd(Tensor grad_loss, Tensor q, Tensor k, Tensor lse_neg, Tensor wsum,"
        " float inv_temperature, bool normalize) -> (Tensor, Tensor)");
}

// The backward of the MoCo loss is the same ATen code on every device.
TORCH_LIBRARY_IMPL(sslkernels, CompositeExplicitAutograd, m) {
  m.impl("info_nce_neg_bwd", &sslk::info_nce::negatives_bwd);
}
