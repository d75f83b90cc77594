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

// Where fwd_scores finds a pair's offsets (bias / mask, in score units): a
// functor src(mt, h, nt) -> the offsets of keys 8 nt + 2 c + {0, 1} of the
// fragment's row (mt, h).  Two sources:
//   * OffsetDirect  reads global memory at the score (a dependent load in the
//                   softmax's critical path);
//   * OffsetStage   a shared-memory tile filled by cp.async a step ahead, beside
//                   K and V: 16-byte coalesced copies instead of one 1- or
//                   2-byte load per score, and no registers held across the step.
template <class V>
struct OffsetDirect {
  const V &var;
  int row0, col0, lane;
  __device__ __forceinline__ float2 operator()(int mt, int h, int nt) const {
    const int g = lane >> 2, c4 = lane & 3;
    const auto row = var.offset_row(row0 + mt * 16 + g + 8 * h);
    const int j = col0 + nt * 8 + 2 * c4;
    return make_float2(var.offset_u(row, j), var.offset_u(row, j + 1));
  }
};

// The shared-memory layout of OffsetStage for a kernel's variant flags: two
// buffers of (BLOCK_M, BLOCK_N) bias elements of BIAS_E bytes and two of mask
// bytes, rows padded by 16 bytes.  The pad makes the fragment reads
// conflict-free: a warp's 8 rows x 4 lanes read words 4 g + c (bias pairs,
// pitch 36 words) or 20 g + c / 2 (mask pairs, pitch 20 words).
template <int VF, int BIAS_E, int BLOCK_M, int BLOCK_N>
struct OffsetStageCfg {
  static constexpr bool BIAS = (VF & (FC_VF_BIAS | FC_VF_BIAS_ACC)) != 0;
  static constexpr bool MASK = (VF & FC_VF_MASK) != 0;
  static constexpr int BLD = BIAS_E * BLOCK_N + 16, MLD = BLOCK_N + 16;  // pitch, bytes
  static constexpr int BIAS_BYTES = BIAS ? BLOCK_M * BLD : 0;
  static constexpr int MASK_BYTES = MASK ? BLOCK_M * MLD : 0;
  static constexpr int BYTES = 2 * (BIAS_BYTES + MASK_BYTES);
  static_assert(BIAS_BYTES % 16 == 0 && MASK_BYTES % 16 == 0, "16-byte cp.async destinations");
};

template <class V, int BLOCK_M, int BLOCK_N, int NTHREADS>
struct OffsetStage {
  typedef typename V::bias_t TB;
  using Cfg = OffsetStageCfg<(V::BIAS ? FC_VF_BIAS : 0) | (V::MASK ? FC_VF_MASK : 0),
                             sizeof(TB), BLOCK_M, BLOCK_N>;
  unsigned char *smem;  // Cfg::BYTES: bias[2] | mask[2]
  bool on;              // this CTA stages (else the caller takes another source)
  bool bias_rows, mask_rows;  // a tile row per query (false: one row broadcast)

  // Staging needs whole 16-byte chunks: column stride 1, the batch element's
  // base and the row pitch on 16 bytes, and Sk a multiple of 16 bytes (a chunk
  // is then all inside or all past the key end).  Uniform per CTA.
  __device__ __forceinline__ void init(const V &var, unsigned char *smem_) {
    smem = smem_;
    on = true;
    if constexpr (V::BIAS)
      on = on && var.bias_sc == 1 &&
           ((reinterpret_cast<unsigned long long>(var.bias_b) |
             (unsigned long long)(var.bias_sr * sizeof(TB)) |
             (unsigned long long)(var.seqlen_k * sizeof(TB))) & 15) == 0;
    if constexpr (V::MASK)
      on = on && var.mask_sc == 1 &&
           ((reinterpret_cast<unsigned long long>(var.mask_b) |
             (unsigned long long)var.mask_sr | (unsigned long long)var.seqlen_k) & 15) == 0;
    bias_rows = V::BIAS && var.bias_sr != 0;
    mask_rows = V::MASK && var.mask_sr != 0;
  }
  // One operand's tile: rows [m0, m0 + rows), keys [n0, n0 + BLOCK_N); rows
  // past Sq and chunks past Sk are zero-filled (their scores are discarded or
  // masked by the body).
  template <int E, int LD>
  __device__ __forceinline__ void issue(unsigned char *dst, const unsigned char *g,
                                        fc_index_t sr, int rows, int rows_valid,
                                        int cols_valid) const {
    constexpr int CPR = BLOCK_N * E / 16;  // chunks per row
    const u32 d0 = smem_u32(dst);
    for (int idx = threadIdx.x; idx < rows * CPR; idx += NTHREADS) {
      const int r = idx / CPR, c = idx % CPR;
      const bool ok = r < rows_valid && c * (16 / E) < cols_valid;
      cp_async_16(d0 + r * LD + 16 * c, ok ? g + r * sr + 16 * c : g, ok ? 16 : 0);
    }
  }
  // Copies of key tile n (the caller commits them with its K / V group).
  __device__ __forceinline__ void load(const V &var, int n, int m0, int m_rows) const {
    const int n0 = n * BLOCK_N, buf = n & 1;
    if constexpr (V::BIAS)
      issue<sizeof(TB), Cfg::BLD>(
          smem + buf * Cfg::BIAS_BYTES,
          reinterpret_cast<const unsigned char *>(var.bias_b + (bias_rows ? m0 * var.bias_sr : 0) + n0),
          var.bias_sr * sizeof(TB), bias_rows ? BLOCK_M : 1, bias_rows ? m_rows : 1,
          var.seqlen_k - n0);
    if constexpr (V::MASK)
      issue<1, Cfg::MLD>(smem + 2 * Cfg::BIAS_BYTES + buf * Cfg::MASK_BYTES,
                         var.mask_b + (mask_rows ? m0 * var.mask_sr : 0) + n0, var.mask_sr,
                         mask_rows ? BLOCK_M : 1, mask_rows ? m_rows : 1, var.seqlen_k - n0);
  }
  // Whether the mask keeps every pair of key tile n in tile rows [r0, r0 + 16)
  // (a warp's rows), for the whole warp: then a mask without a bias needs no
  // work per score in this tile.  Key-padding masks keep whole tiles but the
  // one at each sequence's end, so their cost goes from ~3 instructions a score
  // to ~3 a lane and tile.  Zero-filled rows and chunks (past Sq or Sk) read
  // as removed: those tiles take the per-score path.
  __device__ __forceinline__ bool all_kept(int n, int r0, int lane) const {
    if constexpr (!V::MASK) return true;
    bool ok = true;
    {
      constexpr int CH = BLOCK_N / 16;  // 16-byte chunks a row
      const unsigned char *t = smem + 2 * Cfg::BIAS_BYTES + (n & 1) * Cfg::MASK_BYTES;
      const int rows = mask_rows ? 16 : 1;
      for (int idx = lane; idx < rows * CH; idx += 32) {
        const uint4 w = *reinterpret_cast<const uint4 *>(
            t + ((mask_rows ? r0 : 0) + idx / CH) * Cfg::MLD + 16 * (idx % CH));
        // a zero byte anywhere in w (Mycroft's test: (x - 0x01..) & ~x & 0x80..)
        auto zero_byte = [](u32 x) { return (x - 0x01010101u) & ~x & 0x80808080u; };
        ok = ok && !(zero_byte(w.x) | zero_byte(w.y) | zero_byte(w.z) | zero_byte(w.w));
      }
    }
    return __all_sync(0xffffffffu, ok);
  }
  // The offsets of keys c, c + 1 (c even) of tile row r of key tile n.
  __device__ __forceinline__ float2 pair(const V &var, int n, int r, int c) const {
    float2 o = make_float2(0.f, 0.f);
    const int buf = n & 1;
    if constexpr (V::BIAS) {
      struct alignas(2 * sizeof(TB)) P2 { TB a, b; };
      const P2 b = *reinterpret_cast<const P2 *>(smem + buf * Cfg::BIAS_BYTES +
                                                 (bias_rows ? r : 0) * Cfg::BLD + c * sizeof(TB));
      o.x = to_acc<float>(b.a) * var.bias_umul;
      o.y = to_acc<float>(b.b) * var.bias_umul;
    }
    if constexpr (V::MASK) {  // (the mask's bytes are 0 or 1: a numpy / cupy bool)
      const uchar2 m = *reinterpret_cast<const uchar2 *>(
          smem + 2 * Cfg::BIAS_BYTES + buf * Cfg::MASK_BYTES + (mask_rows ? r : 0) * Cfg::MLD + c);
      if (!m.x) o.x = fc_neg_inf<float>::value();
      if (!m.y) o.y = fc_neg_inf<float>::value();
    }
    return o;
  }
};

// Forward: raw scores q.k -> what the online softmax takes, in place, and the
// multiplier `mul` such that p = ex2(s * mul - m).  The max is taken over the
// scores in their own units (raw, or the variant's score units with softcap /
// ALiBi, variant.cuh) and `mul` folded into that one FMA when it is positive
// (the default scale, and always with softcap); a non-positive user scale
// scales the scores first (mul = 1).  Invisible pairs become -inf, only where
// `need_mask` (tiles crossing the key end or a window edge).
// `offs`: where the bias / mask come from (OffsetDirect, OffsetStage);
// use_offsets = false: this tile has none (a mask that keeps every pair).
template <class V, int MT, int NT, class Offs>
__device__ __forceinline__ float fwd_scores(const V &var, float (&s)[MT][NT][4], int row0,
                                            int col0, bool need_mask, float scale_log2,
                                            int lane, const Offs &offs,
                                            bool use_offsets = true) {
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
  if (V::OFFSET && use_offsets) {  // bias / mask: the same units as the scores (variant.cuh)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float2 o = offs(mt, h, nt);
          s[mt][nt][2 * h] += o.x;
          s[mt][nt][2 * h + 1] += o.y;
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

template <class V, int MT, int NT>
__device__ __forceinline__ float fwd_scores(const V &var, float (&s)[MT][NT][4], int row0,
                                            int col0, bool need_mask, float scale_log2,
                                            int lane) {
  return fwd_scores(var, s, row0, col0, need_mask, scale_log2, lane,
                    OffsetDirect<V>{var, row0, col0, lane});
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
