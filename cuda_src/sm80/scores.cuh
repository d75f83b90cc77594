// flashcupy tensor-core families: the variant (variant.cuh) applied to score
// fragments.  Shared by the mma.sync bodies (sm80/) and the wgmma bodies (sm90/),
// whose accumulators have the same C-fragment layout: a warp holds MT m16 tiles
// x NT n8 tiles; element (mt, nt, 2 h + e) is row row0 + 16 mt + g + 8 h and
// column col0 + 8 nt + 2 c + e (lane = 4 g + c).  row0 / col0 are sequence
// positions (queries / keys).
#pragma once
#include "../variant.cuh"
#include "mma.cuh"

namespace sm80 {

// Forward: raw scores q.k -> what the online softmax takes, in place, and the
// multiplier `mul` such that p = ex2(s * mul - m).  The max is taken over the
// scores in their own units (raw, or the variant's score units with softcap /
// ALiBi, variant.cuh) and `mul` folded into that one FMA when it is positive
// (the default scale, and always with softcap); a non-positive user scale
// scales the scores first (mul = 1).  Invisible pairs become -inf, only where
// `need_mask` (tiles crossing the key end or a window edge).
template <class V, int MT, int NT>
__device__ __forceinline__ float fwd_scores(const V &var, float (&s)[MT][NT][4], int row0,
                                            int col0, bool need_mask, float scale_log2,
                                            int lane) {
  const int g = lane >> 2, c4 = lane & 3;
  if constexpr (V::TRANSFORM) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float base = var.alibi_base(row0 + mt * 16 + g + 8 * h, col0 + 2 * c4);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            s[mt][nt][2 * h + e] = var.score_u(s[mt][nt][2 * h + e], base, float(nt * 8 + e));
      }
  }
  if constexpr (V::OFFSET) {  // bias / mask: the same units as the scores (variant.cuh)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const auto row = var.offset_row(row0 + mt * 16 + g + 8 * h);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            s[mt][nt][2 * h + e] += var.offset_u(row, col0 + nt * 8 + 2 * c4 + e);
      }
  }
  if (need_mask) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = row0 + mt * 16 + g + 8 * h;
        const int jlo = var.row_lo(i), jhi = var.row_hi(i);  // visible keys of row i
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = col0 + nt * 8 + 2 * c4 + e;
            if (j < jlo || j > jhi) s[mt][nt][2 * h + e] = fc_neg_inf<float>::value();
          }
      }
  }
  const float mul = V::TRANSFORM ? var.umul : scale_log2;
  const bool fold = V::SOFTCAP || mul > 0.f;
  if (!fold) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[mt][nt][e] = s[mt][nt][e] == fc_neg_inf<float>::value() ? s[mt][nt][e]
                                                                     : s[mt][nt][e] * mul;
  }
  return fold ? mul : 1.f;
}

// Dropout of a fragment of probabilities in place: x -> f(x, kept).  Every
// Philox call is one lane's: its 8 pairs are row i's keys col0 + 32 q + 8 w +
// 2 c + e (w = 0..3, e = 0, 1), which this lane holds as n8 tiles 4 q + w
// (variant.cuh, dropout_call).  col0 must be a multiple of 32 (every key tile
// and warp offset of the tensor-core tables is).
template <class V, int MT, int NT, class F>
__device__ __forceinline__ void dropout_frag(const V &var, float (&s)[MT][NT][4], int row0,
                                             int col0, int lane, F f) {
  const int g = lane >> 2, c4 = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = row0 + mt * 16 + g + 8 * h;
#pragma unroll
      for (int q = 0; q < (NT + 3) / 4; ++q) {
        const uint4 r = var.dropout_call(i, col0 + 32 * q + 2 * c4);
#pragma unroll
        for (int w = 0; w < 4; ++w)
          if (4 * q + w < NT)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float &x = s[mt][4 * q + w][2 * h + e];
              x = f(x, var.dropout_kept(r, w, e));
            }
      }
    }
}

// The forward's dropout: P o Z (the 1 / (1 - p) goes into the epilogue's 1 / l).
template <class V, int MT, int NT>
__device__ __forceinline__ void dropout_fwd(const V &var, float (&s)[MT][NT][4], int row0,
                                            int col0, int lane) {
  if constexpr (V::DROPOUT)
    dropout_frag(var, s, row0, col0, lane, [](float x, bool kept) { return kept ? x : 0.f; });
}

// LSE (natural log) -> log2 units for exp2(s2 - lse2).  A row that saw no key
// (lse = -inf) gets +inf, so exp2(s2 - lse2) = 0 without a test per element
// (and never exp2(-inf + inf) = NaN).
__device__ __forceinline__ float lse_to_log2(float lse) {
  return lse == fc_neg_inf<float>::value() ? -fc_neg_inf<float>::value()
                                           : lse * float(FC_LOG2E);
}

// Backward: P = exp2(score2 - lse2) in place, from raw scores (one FMA without a
// transform), 0 for invisible pairs where `need_mask`; with dropout, P in
// encode_dropout's form.  lse2(mt, h): the row's
// LSE in log2 units.  Query rows past Sq are zero-filled (Q = dO = 0, lse =
// delta = 0): P = 1 there but dO = 0 and dS = 0, so they add nothing.
template <class V, int MT, int NT, class Lse2>
__device__ __forceinline__ void probs_from_scores(const V &var, float (&s)[MT][NT][4],
                                                  const Lse2 &lse2, int row0, int col0,
                                                  bool need_mask, float scale_log2, int lane) {
  const int g = lane >> 2, c4 = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = row0 + mt * 16 + g + 8 * h;
      const float l2 = lse2(mt, h);
      const int jlo = var.row_lo(i), jhi = var.row_hi(i);
      const float base = var.alibi_base(i, col0 + 2 * c4);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = col0 + nt * 8 + 2 * c4 + e;
          float &x = s[mt][nt][2 * h + e];
          // (x + 0 is not x for x = -0: add the offset only where there is one)
          const float u = V::TRANSFORM ? var.score_u(x, base, float(nt * 8 + e)) : x;
          const float uo = V::OFFSET ? u + var.offset_u(i, j) : u;
          float p = ex2(fmaf(uo, V::TRANSFORM ? var.umul : scale_log2, -l2));
          if (need_mask && (j < jlo || j > jhi)) p = 0.f;
          x = p;
        }
    }
  // dropout: P encoded with its keep bit (variant.cuh, encode_dropout); the
  // tile's P for dV is then max(x, 0) (frag_to_smem<..., true>)
  if constexpr (V::DROPOUT)
    dropout_frag(var, s, row0, col0, lane,
                 [&](float x, bool kept) { return var.encode_dropout(x, kept); });
}

// dS = P o (dP - delta) in place in dp (times softcap's 1 - tanh^2, recovered
// from P and the LSE).  delta(mt, h), lse2(mt, h): the row's values.  DBIAS:
// the body that owns each pair once (dK/dV) also adds dS into the bias's
// gradient (before softcap's factor: the bias joins after the cap).
template <class V, bool DBIAS = false, int MT, int NT, class Delta, class Lse2>
__device__ __forceinline__ void ds_from_dp(const V &var, float (&dp)[MT][NT][4],
                                           const float (&p)[MT][NT][4], const Delta &delta,
                                           const Lse2 &lse2, int row0, int col0, int lane) {
  const int g = lane >> 2, c4 = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float dl = delta(mt, h);
      const float l2 = V::SOFTCAP ? lse2(mt, h) : 0.f;
      // (the ALiBi base again rather than kept live from probs_from_scores: two
      // registers that spilled in the wgmma dK/dV body at D = 128)
      const float base = var.alibi_base(row0 + mt * 16 + g + 8 * h, col0 + 2 * c4);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          // (with dropout, p holds encode_dropout's form and pe is the true P)
          const float pc = p[mt][nt][2 * h + e];
          const float pe = V::DROPOUT ? var.prob_dropout(pc) : pc;
          float d = V::DROPOUT ? var.ds_dropout(pc, dp[mt][nt][2 * h + e], dl)
                               : pe * (dp[mt][nt][2 * h + e] - dl);
          const int i = row0 + mt * 16 + g + 8 * h, j = col0 + nt * 8 + 2 * c4 + e;
          if constexpr (DBIAS && V::DBIAS) var.dbias_add(i, j, d);
          if constexpr (V::SOFTCAP)
            d *= var.dcap_from_prob(pe, l2,
                                    V::OFFSET ? var.alibi_u(base, float(nt * 8 + e)) +
                                                    var.offset_u(i, j)
                                              : var.alibi_u(base, float(nt * 8 + e)));
          dp[mt][nt][2 * h + e] = d;
        }
    }
}

}  // namespace sm80
