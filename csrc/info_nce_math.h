// Per-element math of the fused InfoNCE kernels, shared by the CPU (scalar and vectorized) and
// CUDA paths so that the CPU tests also check the arithmetic the GPU runs.
//
// Notation: S_ij = <z_i, z_j> / tau for the (normalized) rows; lse_i = logsumexp_{j != i} S_ij;
// g_i = upstream gradient of row i's loss.
#pragma once
#include "common.h"

namespace sslk {

// Running log-sum-exp state (m, l) meaning lse = m + log(l). Merging never overflows because both
// sides are rescaled to the larger max; an empty side has m = -inf, l = 0.
template <typename T>
SSLK_HD void lse_merge(T& m, T& l, T m2, T l2) {
  if (l2 == T(0)) return;
  if (l == T(0)) {
    m = m2;
    l = l2;
    return;
  }
  if (m2 > m) {
    l = l * Math<T>::exp(m - m2) + l2;
    m = m2;
  } else {
    l = l + l2 * Math<T>::exp(m2 - m);
  }
}

// Softmax weight of one logit given its row's log-sum-exp.
template <typename T>
SSLK_HD T softmax_weight(T s, T lse) {
  return Math<T>::exp(s - lse);
}

// Coefficient of z_j in d loss / d z_i (before the 1/tau factor) for the symmetric two-view
// similarity matrix: S_ij feeds both row i's and row j's log-sum-exp, so
//   dL/dS_ij + dL/dS_ji = g_i * P_ij + g_j * P_ji,  P_ij = exp(S_ij - lse_i).
// The positive-pair term -(g_i + g_pos(i)) is added separately (it is one entry per row).
template <typename T>
SSLK_HD T pair_grad_coef(T s, T lse_i, T lse_j, T g_i, T g_j) {
  return g_i * Math<T>::exp(s - lse_i) + g_j * Math<T>::exp(s - lse_j);
}

// pair_grad_coef with each row's log-sum-exp given as hi + lo (a float64 value split into the
// nearest compute-type value and the rest): s - hi is exact for the logits near the top of the
// row, where the weight is large, so a float32 kernel keeps the weights to the precision of the
// logits themselves even when lse ~ 1/tau is too large for float32 to hold it to that precision.
template <typename T>
SSLK_HD T pair_grad_coef_split(T s, T hi_i, T lo_i, T hi_j, T lo_j, T g_i, T g_j) {
  return g_i * Math<T>::exp((s - hi_i) - lo_i) + g_j * Math<T>::exp((s - hi_j) - lo_j);
}

}  // namespace sslk
