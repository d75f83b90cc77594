// flashcupy sm80 family: attention forward on tensor cores (FlashAttention-2).
//
// Kernel:
//   template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES,
//             int VF, bool Q_IN_REGS = true>
//   fc_sm80_fwd(FwdParams<T, float> p)     (params.cuh)
//   T        fc_half | fc_bf16;  lse is float32, natural-log units
//   HD, HDV  head-dim buckets (multiples of 16, e.g. 32/64/128/256); head_dim <= HD,
//            head_dim_v <= HDV at run time, any value >= 1
//   VF       the variant flags (variant.cuh): window/causal, softcap, ALiBi, sink
//   Q_IN_REGS  true: Q fragments in registers when they fit (MT * HD <= 128);
//            false: re-read from shared memory every K tile (frees MT * HD / 4 registers)
//   grid   = (ceil(Sq / BLOCK_M), batch spread over y*z as in BatchIndex)
//            blockIdx.x is reversed: the heaviest causal tiles start first
//   block  = NWARPS * 32
//   smem   = FwdCfg<...>::SMEM_BYTES
//          = 2 * (BLOCK_M * (max(HD, HDV) + 8) + STAGES * BLOCK_N * (HD + HDV + 16)) bytes
//
// Work split: warp w owns query rows [w*WM, (w+1)*WM) of the tile (WM = BLOCK_M /
// NWARPS = 16 or 32, i.e. MT = 1 or 2 m16 tiles); all warps share each K/V tile.
// Per K/V tile (BLOCK_N keys), entirely in registers:
//   S = Q K^T        Q fragments stay in registers for the whole loop (Q_IN_REGS) or
//                    are re-read by ldmatrix (large HD, to stay under 255 registers)
//   online softmax   row max over the quad (shfl_xor 1, 2), exp2 on MUFU, O rescaled
//   O += P V         P's C fragments are P V's A fragments: no shared-memory trip
// K/V tiles stream through a STAGES-deep cp.async ring; only the tiles that cross
// the sequence end or a window edge (causal: the diagonal) are masked element by element.
#pragma once
#include "../softmax.cuh"
#include "scores.cuh"
#include "../split.cuh"

namespace sm80 {

template <int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, bool Q_REGS = true>
struct FwdCfg {
  static constexpr int NTHREADS = NWARPS * 32;
  static constexpr int WM = BLOCK_M / NWARPS;  // query rows per warp
  static constexpr int MT = WM / 16;           // m16 tiles per warp
  static constexpr int LDQ = HD + PAD, LDK = HD + PAD, LDV = HDV + PAD, LDO = HDV + PAD;
  // Q fragments in registers (MT * HD / 4 registers) when asked for and they fit;
  // otherwise every S = Q K^T re-reads them from shared memory with ldmatrix.
  static constexpr bool Q_IN_REGS = Q_REGS && MT * HD <= 128;
  // Q from smem: k16 steps of S = Q K^T per unrolled body; beyond that the k loop
  // stays rolled, which bounds the fragments ptxas keeps in flight at the 255 cap.
  static constexpr int KU = HD / 16 < 4 ? HD / 16 : 4;
  // Skip O's rescale when no row max of the warp moved (see the loop).  Only the
  // 32-row warp tiles with HDV >= 128 do it: there the rescale is 128+ multiplies
  // per lane per tile, and this code shape also keeps 128x64x4w at D=128 free of
  // spills; for the 64-column tiles the extra branch measured slower (NOTES.md s. 6).
  static constexpr bool RESCALE_VOTE = MT == 2 && HDV >= 128;
  // (BLOCK_M, LDQ) Q; reused as the (BLOCK_M, LDO) O staging tile in the epilogue
  static constexpr int Q_ELEMS = BLOCK_M * (LDQ > LDO ? LDQ : LDO);
  // per stage: (BLOCK_N, LDK) K then (BLOCK_N, LDV) V
  static constexpr int KV_ELEMS = BLOCK_N * (LDK + LDV);
  static constexpr int SMEM_BYTES = 2 * (Q_ELEMS + STAGES * KV_ELEMS);
  static_assert(WM % 16 == 0 && MT >= 1 && MT <= 2, "a warp owns 16 or 32 query rows");
  static_assert(HD % 16 == 0 && HDV % 16 == 0 && BLOCK_N % 16 == 0, "tiles are multiples of 16");
  static_assert(STAGES >= 2, "at least double-buffered");
};

}  // namespace sm80

// Q_IN_REGS (appended, default true): keep Q's fragments in registers when they fit
// (MT * HD <= 128); false re-reads them from shared memory at every K tile, as
// flash-attn does, which frees MT * HD / 4 registers (e.g. HD 32, 128 x 128, 4 warps).
template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, int VF,
          bool Q_IN_REGS = true>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_sm80_fwd(FC_PARAMS(FwdParams<T, float>) p) {
  using namespace sm80;
  using C = FwdCfg<HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, Q_IN_REGS>;
  constexpr int NTHREADS = C::NTHREADS, MT = C::MT, WM = C::WM;
  constexpr int LDQ = C::LDQ, LDK = C::LDK, LDV = C::LDV, LDO = C::LDO;
  constexpr int NS = BLOCK_N / 8;  // n8 tiles of S
  constexpr int NO = HDV / 8;      // n8 tiles of O

  extern __shared__ __align__(16) unsigned char fc_sm80_smem[];
  T *sQ = reinterpret_cast<T *>(fc_sm80_smem);  // (BLOCK_M, LDQ), later O staging
  T *sKV = sQ + C::Q_ELEMS;                       // STAGES x [(BLOCK_N, LDK) K, (BLOCK_N, LDV) V]

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;
  const T *q_b = q_rows(p.q, bi);
  const T *k_b = k_rows(p.k, bi);
  const T *v_b = k_rows(p.v, bi);

  VariantFor<T, float, VF, true> var(p.var, seq_len_q<VF>(bi, p), seq_len_k<VF>(bi, p), p.scale_log2);
  var.bind(p.var, bi);
  // (split-KV: several CTAs share this query tile, each a run of its key
  // tiles; split.cuh)
  const KeySplit ks = key_split<VF>(p);
  const int m_start = query_tile<VF>(ks) * BLOCK_M;
  // (sequences: the grid covers the longest one; tiles past this one's end exit)
  if constexpr ((VF & FC_VF_SEQ) != 0)
    if (m_start >= seq_len_q<VF>(bi, p)) return;
  const int m_rows = fc_min(BLOCK_M, seq_len_q<VF>(bi, p) - m_start);
  // window / causal: key tiles [n_first, n_tiles) hold every key the tile sees
  int n_first = var.key_begin(m_start) / BLOCK_N;
  int n_tiles = fc_ceil_div(var.key_end(m_start + m_rows), BLOCK_N);
  split_keys<VF>(n_first, n_tiles, ks, p);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, c4 = lane & 3;
  const int wrow = warp * WM;  // first tile row of this warp

  // (paged K / V: rows through the block table, seq.cuh kv_rows; K_n and V_n
  // load together, so they share the table reads ahead)
  KvAhead<VF, BLOCK_N> ahead(bi, p.seq, n_first, seq_len_k<VF>(bi, p));
  auto load_kv = [&](int n, int stage) {
    T *sK = sKV + stage * C::KV_ELEMS;
    const int n0 = n * BLOCK_N, nv = seq_len_k<VF>(bi, p) - n0;
    const auto runs = ahead.take(n, n + 1, seq_len_k<VF>(bi, p));
    load_rows<T, BLOCK_N, HD, NTHREADS>(
        sK, kv_rows<VF>(k_b, p.k, bi, p.seq, p.seq.k_page_stride, n0, runs), nv, p.head_dim);
    load_rows<T, BLOCK_N, HDV, NTHREADS>(
        sK + BLOCK_N * LDK, kv_rows<VF>(v_b, p.v, bi, p.seq, p.seq.v_page_stride, n0, runs), nv,
        p.head_dim_v);
  };

  // load q: it stays in registers (or in shared memory) for the whole key loop
  load_tile<T, BLOCK_M, HD, NTHREADS>(sQ, q_b + m_start * p.q.sr, p.q.sr, m_rows, p.head_dim);
  cp_async_commit();
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (n_first + s < n_tiles) load_kv(n_first + s, s);
    cp_async_commit();
  }

  const u32 sQ_u = smem_u32(sQ) + 2 * (wrow * LDQ + lane_a<LDQ>(lane));
  AFrags<C::Q_IN_REGS, MT, HD / 16, LDQ> q_frag;
  cp_async_wait<STAGES - 1>();
  __syncthreads();
  q_frag.load(sQ_u);

  OnlineSoftmax<float> sm[MT][2];  // rows g and g+8 of each m16 tile; l_i per-thread partial
  float acc_o[MT][NO][4];          // (WM, HDV) output rows of this warp, fp32
  zero(acc_o);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) sm[mt][0].init(var.init_max()), sm[mt][1].init(var.init_max());

#pragma unroll 1
  for (int n = n_first; n < n_tiles; ++n) {
    const int t = n - n_first;    // ring position
    cp_async_wait<STAGES - 2>();  // tile n has landed
    __syncthreads();              // ... for every thread, and tile n-1's buffer is free
    if (n + STAGES - 1 < n_tiles) load_kv(n + STAGES - 1, (t + STAGES - 1) % STAGES);
    cp_async_commit();

    const T *sK = sKV + (t % STAGES) * C::KV_ELEMS;
    const u32 sK_u = smem_u32(sK), sV_u = smem_u32(sK + BLOCK_N * LDK);
    const int n0 = n * BLOCK_N;

    // S = Q K^T  (WM, BLOCK_N), fp32
    float s[MT][NS][4];
    zero(s);
    if constexpr (C::Q_IN_REGS)
      gemm_nt<T, MT, BLOCK_N, HD, LDK>(s, q_frag, sK_u, lane);
    else
      gemm_nt_ss<T, MT, BLOCK_N, HD, LDQ, LDK, C::KU>(s, sQ_u, sK_u, lane);

    // Variant: scores (softcap / ALiBi) and masking, only of tiles that cross the
    // key end or a window edge; then the online softmax, in registers.  A row is
    // spread over the 4 lanes of a quad; p = ex2(s * mul - m) (scores.cuh).
    const float mul = fwd_scores(
        var, s, m_start + wrow, n0,
        var.needs_mask(m_start, m_start + m_rows, n0, n0 + BLOCK_N), p.scale_log2, lane);
    float alpha[MT][2];  // O's rescale factor per row
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = fc_neg_inf<float>::value();
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        mx = fmaxf(mx, shfl_xor(mx, 1));
        mx = fmaxf(mx, shfl_xor(mx, 2));
        mx = fmaxf(sm[mt][h].m_i, mx * mul);  // -inf * mul = -inf (mul > 0)
        alpha[mt][h] = sm[mt][h].rescale(mx);
        // All keys so far masked: subtract 0, not -inf (no -inf - -inf = NaN).
        const float sub = OnlineSoftmax<float>::safe_max(mx);
        float lsum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = ex2(fmaf(s[mt][nt][2 * h + e], mul, -sub));
            s[mt][nt][2 * h + e] = pe;
            lsum += pe;
          }
        sm[mt][h].l_i += lsum;
      }
    static_assert(!decltype(var)::DROPOUT || BLOCK_N % 32 == 0, "dropout_frag: the keys of a fragment must start on a 32-key block");
    dropout_fwd(var, s, m_start + wrow, n0, lane);  // (after the row sums: l is dropout-free)
    // O *= alpha.  Once a row's running max settles (most tiles of a long row)
    // alpha = exp2(0) = 1 exactly; when that holds for every row of the warp, a
    // warp-uniform vote skips the MT * HDV / 2 multiplies per lane.  Scaling by
    // 1 is exact, so skipping it changes no bit of the result.
    bool rescale_o = !C::RESCALE_VOTE;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) rescale_o |= alpha[mt][0] != 1.f || alpha[mt][1] != 1.f;
    if (!C::RESCALE_VOTE || __any_sync(0xffffffffu, rescale_o)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NO; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_o[mt][nt][e] *= alpha[mt][e >> 1];
    }

    // O += P V
    gemm_pn<T, MT, HDV, BLOCK_N, LDV>(acc_o, s, sV_u, lane);
  }
  cp_async_wait<0>();

  // Epilogue: normalize by l, stage O through shared memory, write O and LSE.
  T *o_b = q_rows(p.o, bi);
  float *lse_b = split_lse<VF>(p, bi, ks);
  float inv_l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = sm[mt][h].l_i;
      l += shfl_xor(l, 1);
      l += shfl_xor(l, 2);
      if (sink_here<VF>(ks)) l += var.sink_term(sm[mt][h].m_i);  // (once per row)
      // 0 for a row that saw no key; dropout's 1 / (1 - p) joins here, once per row
      inv_l[mt][h] = OnlineSoftmax<float>::inv_sum(l) * (decltype(var)::DROPOUT ? var.drop_rp : 1.f);
      const int row = m_start + wrow + mt * 16 + g + 8 * h;
      if (c4 == 0 && row < seq_len_q<VF>(bi, p))
        lse_b[row * split_lse_sr<VF>(p)] = OnlineSoftmax<float>::lse_natural(sm[mt][h].m_i, l);
    }
  if constexpr ((VF & FC_VF_SPLIT) != 0) {  // float32 partial rows, no staging
    store_partial<MT, NO>(p, bi, ks, m_start + wrow, seq_len_q<VF>(bi, p), acc_o, inv_l, lane);
    return;
  }
  __syncthreads();  // every warp is done with sQ / the K-V ring
  frag_to_smem_rows<T, MT, NO, LDO>(sQ, wrow, acc_o, inv_l, lane);
  __syncthreads();
  store_tile<T, BLOCK_M, HDV, NTHREADS>(o_b + m_start * p.o.sr, p.o.sr, sQ, m_rows, p.head_dim_v);
}
