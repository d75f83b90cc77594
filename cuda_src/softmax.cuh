// flashcupy: the online-softmax state of one query row.
//
// Units: inside the kernels scores are in log2 units, s2 = (q . k) * scale * log2(e),
// so that exp2 (one MUFU op) replaces exp.  m_i is the running maximum of s2 and l_i
// the running sum of exp2(s2 - m_i).  The one boundary where units change is
// `lse_natural`: the LSE that reaches global memory is in natural-log units,
// lse = (m_i + log2(l_i)) * ln(2); the backward pass recomputes P from it in
// natural units (prob_from_lse).
#pragma once
#include "common.cuh"

template <typename Acc>
struct OnlineSoftmax {
  Acc m_i;  // running row max of the log2-unit scores seen so far; -inf before any key
  Acc l_i;  // running sum of exp2(s2 - m_i) (may be a per-thread partial sum)

  // m0: -inf, or the sink logit (variant.cuh), which every row sees first
  __device__ __forceinline__ void init(Acc m0 = fc_neg_inf<Acc>::value()) {
    m_i = m0;
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

  // P = exp(s * scale - lse) for the backward pass, from the raw score s = q . k
  // and the natural-log LSE.  The argument is formed with one FMA in natural
  // units, so it is rounded once at its own (small, for the P that matter)
  // magnitude instead of at the magnitude of lse (a difference of two rounded
  // log2-unit values of size |lse| * log2(e) would carry their rounding into
  // every P).  A row with lse = -inf saw no key: its P is 0 everywhere (not
  // exp(-inf + inf) = NaN).
  static __device__ __forceinline__ Acc prob_from_lse(Acc s, Acc scale, Acc lse) {
    return lse == fc_neg_inf<Acc>::value() ? Acc(0)
                                           : fc_exp2(fma(s, scale, -lse) * Acc(FC_LOG2E));
  }
};
