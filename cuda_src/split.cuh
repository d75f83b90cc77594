// flashcupy: split-KV, the forward of one query tile spread over several CTAs
// by key range (FlashAttention's "flash-decoding"; flash-attn's num_splits,
// FlashInfer's split-k), and the combine kernel that merges their results.
//
// A decode step (a few query rows against a long cache) has one query tile per
// (batch, head): B x Hkv CTAs after GQA packing, far fewer than a GPU holds at
// once, and each of them walks the whole key range alone.  With FC_VF_SPLIT
// the grid's x axis holds n_splits CTAs per query tile; split s takes an equal
// share of the tile's key tiles and writes its own softmax result:
//   O_s   = sum_j p_j v_j / l_s    (float32, unnormalized by the other splits)
//   LSE_s = m_s + log(l_s)         (natural log; -inf where the split saw no key)
// into the partial buffers p.o_part and p.lse_part (split s at offsets
// s * o_part_ss and s * lse_part_ss).  fc_split_combine then forms the exact result,
//   LSE = log sum_s exp(LSE_s),   O = sum_s exp(LSE_s - LSE) O_s,
// which is flashcupy.merge_attention's formula (flashcupy/_merge.py).  Every
// variant composes: scores, masks and dropout bits are keyed by absolute (row,
// key) coordinates, and the sink's term enters the denominator once (split 0).
#pragma once
#include "params.cuh"

#define FC_VF_SPLIT 8192  // forward: this CTA covers one share of the key tiles

// Which query tile and which split this CTA is.  blockIdx.x = split * n_m + x,
// the query tiles reversed as without splits (heaviest causal tiles first).
struct KeySplit {
  int m_tile, split;
};

template <int VF, typename P>
__device__ __forceinline__ KeySplit key_split(const P &p) {
  if constexpr ((VF & FC_VF_SPLIT) != 0) {
    const int n_m = gridDim.x / p.n_splits;
    const int x = blockIdx.x % n_m;
    return {n_m - 1 - x, (int)blockIdx.x / n_m};
  } else {
    return {(int)(gridDim.x - 1 - blockIdx.x), 0};
  }
}

// The query tile of this CTA.  Without splits it is read from blockIdx at each
// use, as before splits existed: a special register the compiler can re-read
// instead of holding a value (the sm80 D = 128 forward with every variant sits
// at 255 registers and spilled 88 bytes when it held ks.m_tile).
// (Unsigned, as blockIdx: a signed tile index changes the code ptxas builds
// around it enough to bring that spill back.)
template <int VF>
__device__ __forceinline__ unsigned query_tile(const KeySplit &ks) {
  if constexpr ((VF & FC_VF_SPLIT) != 0) return (unsigned)ks.m_tile;
  else return gridDim.x - 1 - blockIdx.x;
}

// Narrows the key tiles [n_first, n_tiles) to split ks.split's share: equal
// runs of whole tiles, the last ones possibly empty (they then write
// LSE = -inf and O = 0, which the combine weighs by 0).
template <int VF, typename P>
__device__ __forceinline__ void split_keys(int &n_first, int &n_tiles, const KeySplit &ks,
                                           const P &p) {
  if constexpr ((VF & FC_VF_SPLIT) != 0) {
    const int per = fc_ceil_div(fc_max(n_tiles - n_first, 0), p.n_splits);
    const int a = n_first + ks.split * per;
    n_first = fc_min(a, n_tiles);
    n_tiles = fc_min(a + per, n_tiles);
  }
}

// Whether this CTA adds the sink's term to its denominator (once per row).
template <int VF>
__device__ __forceinline__ bool sink_here(const KeySplit &ks) {
  return (VF & FC_VF_SPLIT) == 0 || ks.split == 0;
}

// A split's epilogue: O * inv_l straight from the m16n8 accumulator fragments
// (rows g and g + 8 of each m16 tile; columns 2 c4, 2 c4 + 1 of each n8 tile)
// to the float32 partial rows, and no shared-memory staging: a decode tile
// has few valid rows, and partial rows are never re-read by this CTA.
template <int MT, int NO, typename P>
__device__ __forceinline__ void store_partial(const P &p, const BatchIndex &bi, const KeySplit &ks,
                                              int row0, int n_rows,
                                              const float (&acc)[MT][NO][4],
                                              const float (&inv_l)[MT][2], int lane) {
  float *o = q_rows(p.o_part, bi) + (fc_index_t)ks.split * p.o_part_ss;
  const int g = lane >> 2, c4 = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + 16 * mt + g + 8 * h;
      if (r >= n_rows) continue;
      float *o_r = o + (fc_index_t)r * p.o_part.sr;
#pragma unroll
      for (int nt = 0; nt < NO; ++nt) {
        const int c = 8 * nt + 2 * c4;
        const float x0 = acc[mt][nt][2 * h] * inv_l[mt][h], x1 = acc[mt][nt][2 * h + 1] * inv_l[mt][h];
        if (c + 1 < p.head_dim_v) {  // (rows of the partial buffer are 16-byte aligned)
          *reinterpret_cast<float2 *>(o_r + c) = make_float2(x0, x1);
        } else if (c < p.head_dim_v) {
          o_r[c] = x0;
        }
      }
    }
}

// The LSE of this CTA's split: lse for a plain forward, the split's row of the
// partial LSE buffer with FC_VF_SPLIT (rows at split_lse_sr apart).
template <int VF, typename P>
__device__ __forceinline__ float *split_lse(const P &p, const BatchIndex &bi, const KeySplit &ks) {
  if constexpr ((VF & FC_VF_SPLIT) != 0)
    return q_rows(p.lse_part, bi) + (fc_index_t)ks.split * p.lse_part_ss;
  else
    return q_rows(p.lse, bi);
}
template <int VF, typename P>
__device__ __forceinline__ fc_index_t split_lse_sr(const P &p) {
  if constexpr ((VF & FC_VF_SPLIT) != 0) return p.lse_part.sr;
  else return p.lse.sr;
}

// The combine: one warp per query row, at most FC_SPLIT_MAX splits.
// Lane l holds the partial LSEs of splits l, l + 32, .. (one load each, all
// in flight together); their max and sum give the row's LSE and each split's
// weight w = exp(LSE_s - LSE).  Then every lane forms 4 columns of O (16-byte
// loads; partial rows are padded to 4 floats) over the splits, w broadcast by
// a shuffle, 16 splits' loads issued before any is used: a decode row's
// splits were otherwise a chain of dependent loads (29 splits of one row
// took 13 us in a loop, 7 us unrolled by 8; NOTES.md section 14).  A split
// whose LSE is -inf (it saw no key) has weight 0, and its row, which it never
// wrote, is not read.  A row no split saw gets O = 0 and LSE = -inf, as
// without splits.
// Launch: grid (ceil(Sq / NWARPS), batch as every kernel), NWARPS * 32 threads.
#define FC_SPLIT_MAX 128  // flashcupy/_split.py MAX_SPLITS
// (__launch_bounds__' minimum of 1 CTA: without it ptxas spills on sm_80)
template <typename T, int NWARPS>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_split_combine(FC_PARAMS(FwdParams<T, float>) p) {
  constexpr int G = FC_SPLIT_MAX / 32, BATCH = 16;
  BatchIndex bi;
  if (!bi.init(p.nb0, p.nb1, p.nb2)) return;
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * NWARPS + threadIdx.x / 32;
  if (row >= p.seqlen_q) return;
  const float *lse_p = q_rows(p.lse_part, bi) + (fc_index_t)row * p.lse_part.sr;
  const int ns = p.n_splits;
  const float ninf = fc_neg_inf<float>::value();
  float ls[G];
#pragma unroll
  for (int gi = 0; gi < G; ++gi) {
    const int s = 32 * gi + lane;
    ls[gi] = s < ns ? lse_p[(fc_index_t)s * p.lse_part_ss] : ninf;
  }
  float mx = ninf;
#pragma unroll
  for (int gi = 0; gi < G; ++gi) mx = fmaxf(mx, ls[gi]);
  mx = warp_max(mx);
  const float sub = mx == ninf ? 0.f : mx;  // no -inf - -inf
  float w[G], sum = 0.f;
#pragma unroll
  for (int gi = 0; gi < G; ++gi) {
    w[gi] = ls[gi] == ninf ? 0.f : exp2f((ls[gi] - sub) * (float)FC_LOG2E);
    sum += w[gi];
  }
  sum = warp_sum(sum);
  // LSE = sub + log(sum): -inf for a row with no key (sum = 0)
  if (lane == 0) q_rows(p.lse, bi)[(fc_index_t)row * p.lse.sr] = sum > 0.f ? sub + logf(sum) : ninf;
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int gi = 0; gi < G; ++gi) w[gi] *= inv;
  const float *o_p = q_rows(p.o_part, bi) + (fc_index_t)row * p.o_part.sr;
  T *o = q_rows(p.o, bi) + (fc_index_t)row * p.o.sr;
  // (the column loop runs warp-uniformly: its shuffles need all 32 lanes, and
  // at Dv < 128 some lanes own no column)
  for (int c0 = 0; c0 < p.head_dim_v; c0 += 128) {
    const int c = c0 + 4 * lane;
    const bool mine = c < p.head_dim_v;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int gi = 0; gi < G; ++gi) {
      if (32 * gi >= ns) break;
#pragma unroll
      for (int j0 = 0; j0 < 32; j0 += BATCH) {
        if (32 * gi + j0 >= ns) break;
        float wj[BATCH];
        float4 x[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          wj[u] = __shfl_sync(0xffffffffu, w[gi], j0 + u);  // 0 past the last split
          x[u] = make_float4(0.f, 0.f, 0.f, 0.f);
          if (mine && wj[u] != 0.f)
            x[u] = *reinterpret_cast<const float4 *>(
                o_p + (fc_index_t)(32 * gi + j0 + u) * p.o_part_ss + c);
        }
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          acc.x += wj[u] * x[u].x, acc.y += wj[u] * x[u].y;
          acc.z += wj[u] * x[u].z, acc.w += wj[u] * x[u].w;
        }
      }
    }
    if (mine) {
      o[c] = from_acc<T>(acc.x);
      if (c + 1 < p.head_dim_v) o[c + 1] = from_acc<T>(acc.y);
      if (c + 2 < p.head_dim_v) o[c + 2] = from_acc<T>(acc.z);
      if (c + 3 < p.head_dim_v) o[c + 3] = from_acc<T>(acc.w);
    }
  }
}
