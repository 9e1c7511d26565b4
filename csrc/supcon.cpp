// Schemas of the multi-positive InfoNCE (SupCon) ops, and the bounds checks every backend shares.
//
// The op contract, the same for every backend that implements these names (CPU here; a Triton
// twin registers the same schema in its own namespace and must return the same values):
//
// supcon_fwd(z, labels, inv_temperature, normalize) -> (loss, lse)
//   z: (M, D) floating, any of fp16/bf16/fp32/fp64; labels: (M,) int64 on z's device.
//   With Zn = z / max(||z||, 1e-12) row-wise if normalize (else z), S = Zn Zn^T * inv_temperature,
//   P(i) = {j != i : labels[j] == labels[i]}, c_i = |P(i)|:
//     loss (M,)  l_i = lse_i - (1/c_i) sum_{p in P(i)} S_ip, and exactly 0 where c_i = 0;
//     lse  (M,)  lse_i = logsumexp_{j != i} S_ij, over every other row (-inf when M = 1).
//   loss is in the accumulation dtype (float64 for float64 z, else float32); lse is float64
//   for every dtype (see finish_rows in supcon.h for why). Rows keep z's order.
//
// supcon_bwd(grad_loss, z, labels, loss, lse, inv_temperature, normalize) -> dz
//   grad_loss (M,), loss and lse as supcon_fwd returned them (lse float64; a float32 kernel
//   computes exp((S_ij - hi_i) - lo_i) with lse = hi + lo). With g_i = grad_loss_i (0 where
//   c_i = 0), P_ij = exp(S_ij - lse_i) and G_ij = g_i (P_ij - [j in P(i)] / c_i) for j != i,
//     dZn_i = inv_temperature * sum_j (G_ij + G_ji) Zn_j,
//   then the backward of the normalization; dz has z's shape and dtype. For c_i = 1 the positive's
//   P_ip - 1 is expm1(-loss_i) (exact when P_ip rounds to 1).
//
// supcon_slice_fwd / supcon_slice_bwd: the same rows for the n rows keys[offset : offset + n]
// of a larger (M, D) batch `keys` with (M,) labels: row r's logits are against all M keys, its
// own column (offset + r) excluded (the distributed loss of one rank, csrc/supcon_slice.cpp).
#include "supcon.h"

#include <torch/library.h>

namespace sslk::supcon {

// The public function validates arguments with friendly messages; these checks only keep a
// direct torch.ops call from reading out of bounds.
void check_rows(const char* what, const at::Tensor& z, const at::Tensor& labels) {
  TORCH_CHECK(z.dim() == 2, what, " must be 2-D (M, D), got ", z.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), what, " must be floating point");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), "labels must have shape (",
              z.size(0), ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.device() == z.device(), "labels must be on ", what, "'s device");
}

}  // namespace sslk::supcon

TORCH_LIBRARY_FRAGMENT(sslkernels, m) {
  m.def("supcon_fwd(Tensor z, Tensor labels, float inv_temperature, bool normalize)"
        " -> (Tensor, Tensor)");
  m.def("supcon_bwd(Tensor grad_loss, Tensor z, Tensor labels, Tensor loss, Tensor lse,"
        " float inv_temperature, bool normalize) -> Tensor");
  m.def("supcon_slice_fwd(Tensor keys, Tensor labels, int offset, int n,"
        " float inv_temperature, bool normalize) -> (Tensor, Tensor)");
  m.def("supcon_slice_bwd(Tensor grad_loss, Tensor keys, Tensor labels, Tensor loss,"
        " Tensor lse, int offset, int n, float inv_temperature, bool normalize) -> Tensor");
}
