// flashcupy: the online-softmax state of one query row.
//
// Units: inside the kernels scores are in log2 units, s2 = (q . k) * scale * log2(e),
// so that exp2 (one MUFU op) replaces exp.  m_i is the running maximum of s2 and l_i
// the running sum of exp2(s2 - m_i).  The one boundary where units change is
// `lse_natural`: the LSE that reaches global memory is in natural-log units,
// lse = (m_i + log2(l_i)) * ln(2), and the backward pass multiplies it back by
// log2(e) when it recomputes P.
#pragma once
#include "common.cuh"

template <typename Acc>
struct OnlineSoftmax {
  Acc m_i;  // running row max of the log2-unit scores seen so far; -inf before any key
  Acc l_i;  // running sum of exp2(s2 - m_i) (may be a per-thread partial sum)

  __device__ __forceinline__ void init() {
    m_i = fc_neg_inf<Acc>::value();
    l_i = Acc(0);
  }

  // The max to subtract.  If every key so far was masked the max is -inf, and
  // (-inf) - (-inf) would be NaN: subtract 0 instead, so exp2(-inf - 0) = 0.
  static __device__ __forceinline__ Acc safe_max(Acc m) {
    return m == fc_neg_inf<Acc>::value() ? Acc(0) : m;
  }

  // Moves the state to the new max m_new >= m_i; returns the factor
  // alpha = exp2(m_i - m_new) by which the output accumulator must be scaled.
  __device__ __forceinline__ Acc rescale(Acc m_new) {
    Acc alpha = fc_exp2(m_i - safe_max(m_new));  // m_i = -inf gives alpha = 0
    m_i = m_new;
    l_i *= alpha;
    return alpha;
  }

  // 1 / l for the final normalization; 0 for a row that saw no key, so its
  // output is 0 rather than 0/0.
  static __device__ __forceinline__ Acc inv_sum(Acc l) { return l > Acc(0) ? Acc(1) / l : Acc(0); }

  // Row logsumexp in natural-log units; -inf for a row that saw no key.
  static __device__ __forceinline__ Acc lse_natural(Acc m, Acc l) {
    return l > Acc(0) ? (m + fc_log2(l)) * Acc(FC_LN2) : fc_neg_inf<Acc>::value();
  }

  // exp2(s2 - lse2) for the backward pass, with lse in natural-log units.  A row
  // with lse = -inf saw no key: its P is 0 everywhere (not exp2(-inf + inf) = NaN).
  static __device__ __forceinline__ Acc prob_from_lse(Acc s2, Acc lse_log2) {
    return lse_log2 == fc_neg_inf<Acc>::value() ? Acc(0) : fc_exp2(s2 - lse_log2);
  }
};
