// flashcupy sm90 family: attention forward with warpgroup MMA
// (wgmma, sm_90a only; FlashAttention-3, Shah et al. 2024, sections 3.1-3.2).
//
// Kernel (parameters as fc_sm80_fwd's, so the launcher is shared):
//   template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES,
//             int VF>
//   fc_sm90_fwd(FwdParams<T, float> p)     VF: the variant flags (variant.cuh)
//   HD, HDV  multiples of 64 (swizzled 64-column panels); HDV = 64 or 128 (one wgmma N)
//   BLOCK_M = 64 * NWARPS / 4 (one warpgroup per 64 query rows); BLOCK_N = 64 or 128
//   STAGES  = 2 (K and V double-buffered, see below)
//   grid / block as fc_sm80_fwd (blockIdx.x reversed: heaviest causal tiles first)
//   smem   = FwdWgCfg::SMEM_BYTES = 2 * (BLOCK_M * HD + 2 * BLOCK_N * (HD + HDV))
//
// Per warpgroup (64 query rows) and key tile n:
//   S_n = Q K_n^T     wgmma, both operands in shared memory (K-major, swizzled)
//   O  += P_{n-1} V_{n-1}  wgmma issued right after S_n, P from registers (the
//                     C fragments of S packed to 16 bits are wgmma's register A
//                     layout), V from shared memory read as an N-major B
//   softmax of S_n    on the CUDA cores and MUFU while P_{n-1} V_{n-1} runs on
//                     the tensor cores (FA3's intra-warpgroup overlap)
//   O *= alpha_n      once the P V product is complete
// So V lags K by one tile: a step loads K_{n+1} and V_n, and the ring holds
// K_n, K_{n+1} and V_{n-1}, V_n: every buffer written at the top of step n was
// last read by a product that step n - 1 waited for.  Loads are cp.async by
// all threads (no TMA, no producer warp): each lands during one whole step.
#pragma once
#include "../softmax.cuh"
#include "../sm80/scores.cuh"
#include "wgmma.cuh"
#include "../split.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "cuda_src/sm90 needs the sm_90a target (wgmma): compile with -arch=sm_90a"
#endif

namespace sm80 {

template <int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int VF = 0>
struct FwdWgCfg {
  static constexpr int NTHREADS = NWARPS * 32;
  static constexpr int Q_BYTES = 2 * BLOCK_M * HD, K_BYTES = 2 * BLOCK_N * HD,
                       V_BYTES = 2 * BLOCK_N * HDV;
  // Q | K[2] | V[2], every tile on a 1024-byte boundary (the swizzle's period)
  static constexpr int K_OFF = Q_BYTES;
  static constexpr int V_OFF = K_OFF + 2 * K_BYTES;
  // then the bias / mask tiles (scores.cuh, OffsetStage: a float32 bias beside
  // 16-bit inputs takes 4 bytes an element)
  using OffCfg = OffsetStageCfg<VF, (VF & FC_VF_BIAS_ACC) ? 4 : 2, BLOCK_M, BLOCK_N>;
  static constexpr int OFF_OFF = V_OFF + 2 * V_BYTES;
  static constexpr int SMEM_BYTES = OFF_OFF + OffCfg::BYTES;
  static constexpr int PANEL_Q = BLOCK_M * 128, PANEL_K = BLOCK_N * 128;  // 64 columns
  static constexpr int LDO = HDV + PAD;  // O staging (padded) over the K/V ring
  // Two CTAs per SM where shared memory and registers allow (8 warps only with
  // small S and O tiles: <= 128 registers a thread): CTAs are not tied by
  // __syncthreads, so one runs its softmax while the other's products run on
  // the tensor cores (D = 64: +6-19 % over one 8-warp CTA, NOTES.md section 8).
  static constexpr int MIN_BLOCKS =
      2 * SMEM_BYTES <= 226 * 1024 && (NWARPS == 4 || BLOCK_N * HDV <= 64 * 64) ? 2 : 1;
  static_assert(BLOCK_M == 16 * NWARPS && NWARPS % 4 == 0, "one warpgroup per 64 rows");
  static_assert(BLOCK_N == 64 || BLOCK_N == 128, "wgmma N of S");
  static_assert(HDV == 64 || HDV == 128, "wgmma N of O");
  static_assert(HD % 64 == 0, "whole 64-column panels");
  static_assert(Q_BYTES % 1024 == 0 && K_BYTES % 1024 == 0 && V_BYTES % 1024 == 0,
                "tiles on 1024-byte boundaries");
  static_assert(2 * BLOCK_M * LDO <= 2 * (K_BYTES + V_BYTES), "O staging fits the ring");
};

}  // namespace sm80

template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, int VF>
__global__ void __launch_bounds__(NWARPS * 32,
                                  (sm80::FwdWgCfg<HD, HDV, BLOCK_M, BLOCK_N, NWARPS, VF>::MIN_BLOCKS))
fc_sm90_fwd(FC_PARAMS(FwdParams<T, float>) p) {
  using namespace sm80;
  using C = FwdWgCfg<HD, HDV, BLOCK_M, BLOCK_N, NWARPS, VF>;
  static_assert(STAGES == 2, "K and V double-buffered (see the header)");
  constexpr int NTHREADS = C::NTHREADS;
  constexpr int NS = BLOCK_N / 8;  // n8 tiles of S
  constexpr int NO = HDV / 8;      // n8 tiles of O
  constexpr int KS = BLOCK_N / 16; // k16 steps of P V

  extern __shared__ __align__(1024) unsigned char fc_sm80_smem_wg[];
  // wgmma finds the swizzle from address bits: the window must start on 1024 bytes
  if (smem_u32(fc_sm80_smem_wg) & 1023) __trap();
  const u32 s0 = smem_u32(fc_sm80_smem_wg);

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
  const int wrow = warp * 16;  // this warp's 16 rows (warpgroup warp / 4: rows 64 (warp / 4) ..)

  auto tile = [&](int off) { return reinterpret_cast<T *>(fc_sm80_smem_wg + off); };
  // (paged K / V: rows through the block table, seq.cuh kv_rows; V_n loads a
  // step after K_n, with the entries K_n took: load_v(n) before load_k(n + 1))
  KvAhead<VF, BLOCK_N> ahead(bi, p.seq, n_first, seq_len_k<VF>(bi, p));
  auto load_k = [&](int n) {
    const int n0 = n * BLOCK_N;
    const auto runs = ahead.take(n, n + 1, seq_len_k<VF>(bi, p));
    load_rows<T, BLOCK_N, HD, NTHREADS, true>(
        tile(C::K_OFF + (n & 1) * C::K_BYTES),
        kv_rows<VF>(k_b, p.k, bi, p.seq, p.seq.k_page_stride, n0, runs),
        seq_len_k<VF>(bi, p) - n0, p.head_dim);
  };
  // Bias / mask of key tile n: staged in shared memory with K_n's copies
  // (OffsetStage) where the layout allows, else read at the scores
  // (OffsetDirect: only layouts that are not 16-byte aligned; registers loaded a
  // step ahead, OffsetTile, were 0.9x as fast as the stage and spilled beside
  // it, NOTES.md section 12).
  using Var = decltype(var);
  OffsetStage<Var, BLOCK_M, BLOCK_N, NTHREADS> stage;
  static_assert(decltype(stage)::Cfg::BYTES == C::OffCfg::BYTES, "the stage's layout");
  if constexpr (Var::OFFSET) stage.init(var, fc_sm80_smem_wg + C::OFF_OFF);
  auto load_kb = [&](int n) {
    load_k(n);
    if constexpr (Var::OFFSET)
      if (stage.on) stage.load(var, n, m_start, m_rows);
  };
  auto load_v = [&](int n) {
    const int n0 = n * BLOCK_N;
    const auto runs = ahead.again(n, seq_len_k<VF>(bi, p));
    load_rows<T, BLOCK_N, HDV, NTHREADS, true>(
        tile(C::V_OFF + (n & 1) * C::V_BYTES),
        kv_rows<VF>(v_b, p.v, bi, p.seq, p.seq.v_page_stride, n0, runs),
        seq_len_k<VF>(bi, p) - n0, p.head_dim_v);
  };
  // O += P V_n for this warpgroup: k16 step j reads keys 16 j .. 16 j + 15, i.e.
  // 8-row groups 2 j, 2 j + 1 of V's panels (2048 bytes per step).
  float acc_o[1][NO][4];  // (16, HDV) output rows of this warp, fp32
  u32 p_frag[KS][4];      // P of the previous tile as wgmma A fragments
  auto issue_pv = [&](int n) {
    const u32 sv = s0 + C::V_OFF + (n & 1) * C::V_BYTES;
#pragma unroll
    for (int j = 0; j < KS; ++j)
      wg_mma_rs<T, HDV>(acc_o[0], p_frag[j], wg_desc_sw128_mn(sv + 2048 * j, C::PANEL_K), true);
    wg_commit();
  };

  load_tile<T, BLOCK_M, HD, NTHREADS, true>(tile(0), q_b + m_start * p.q.sr, p.q.sr, m_rows,
                                            p.head_dim);
  if (n_first < n_tiles) load_kb(n_first);
  cp_async_commit();

  OnlineSoftmax<float> sm[2];  // rows g and g+8; l_i per-thread partial
  sm[0].init(var.init_max());
  sm[1].init(var.init_max());
  zero(acc_o);

  const u32 sQ_wg = s0 + (warp / 4) * 64 * 128;  // this warpgroup's 64 rows of each panel

  // Top of step n: K_n and V_{n-1} have landed (this thread's copies), are made
  // visible to wgmma (async proxy), and to every thread; then V_n and K_{n+1}
  // go into the buffers of V_{n-2} and K_{n-1}, whose products are complete.
  auto top = [&](int n) {
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    load_v(n);
    if (n + 1 < n_tiles) load_kb(n + 1);
    cp_async_commit();
  };
  auto issue_s = [&](float (&s)[1][NS][4], int n) {
    wg_fence();
    wg_gemm_nt<T, BLOCK_N, HD, C::PANEL_Q, C::PANEL_K>(s[0], sQ_wg,
                                                      s0 + C::K_OFF + (n & 1) * C::K_BYTES);
  };
  // The variant's scores and mask (scores.cuh), then the online softmax as in
  // fc_sm80_fwd (sm80/fwd.cuh): a row lives in the 4 lanes of a quad;
  // p = ex2(s * mul - m).  Leaves P in s and O's factor per row in alpha.
  auto softmax = [&](float (&s)[1][NS][4], int n, float (&alpha)[2]) {
    const int n0 = n * BLOCK_N;
    const bool need = var.needs_mask(m_start, m_start + m_rows, n0, n0 + BLOCK_N);
    float mul;
    if (!Var::OFFSET || stage.on) {
      // (a mask alone that keeps this warp's whole tile costs nothing a score)
      const bool offsets = Var::OFFSET && (Var::BIAS || !stage.all_kept(n, wrow, lane));
      mul = fwd_scores(var, s, m_start + wrow, n0, need, p.scale_log2, lane,
                       [&](int mt, int h, int nt) {
                         return stage.pair(var, n, wrow + 16 * mt + g + 8 * h, 8 * nt + 2 * c4);
                       }, offsets);
    } else {
      mul = fwd_scores(var, s, m_start + wrow, n0, need, p.scale_log2, lane);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = fc_neg_inf<float>::value();
#pragma unroll
      for (int nt = 0; nt < NS; ++nt) mx = fmaxf(mx, fmaxf(s[0][nt][2 * h], s[0][nt][2 * h + 1]));
      mx = fmaxf(mx, shfl_xor(mx, 1));
      mx = fmaxf(mx, shfl_xor(mx, 2));
      mx = fmaxf(sm[h].m_i, mx * mul);  // -inf * mul = -inf (mul > 0)
      alpha[h] = sm[h].rescale(mx);
      const float sub = OnlineSoftmax<float>::safe_max(mx);  // no -inf - -inf
      float lsum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NS; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pe = ex2(fmaf(s[0][nt][2 * h + e], mul, -sub));
          s[0][nt][2 * h + e] = pe;
          lsum += pe;
        }
      sm[h].l_i += lsum;
    }
    static_assert(!decltype(var)::DROPOUT || BLOCK_N % 32 == 0, "dropout_frag: the keys of a fragment must start on a 32-key block");
    dropout_fwd(var, s, m_start + wrow, n0, lane);  // (after the row sums: l is dropout-free)
  };
  auto pack_p = [&](const float (&s)[1][NS][4]) {
#pragma unroll
    for (int j = 0; j < KS; ++j) pack_a<T>(p_frag[j], s[0][2 * j], s[0][2 * j + 1]);
  };

  // Step 0 alone (no P V in flight yet; O is still 0, no rescale), then steps
  // 1.. with the same straight-line shape, so ptxas can keep the two products
  // of a step in flight together (a branch around the P V issue made it
  // serialize every wgmma).
  if (n_first < n_tiles) {
    top(n_first);
    float s[1][NS][4];
    float alpha[2];
    issue_s(s, n_first);
    wg_wait<0>();
    wg_fence_regs(s[0]);
    softmax(s, n_first, alpha);
    pack_p(s);
  }
#pragma unroll 1
  for (int n = n_first + 1; n < n_tiles; ++n) {
    top(n);
    float s[1][NS][4];
    float alpha[2];
    issue_s(s, n);
    issue_pv(n - 1);
    wg_wait<1>();  // S_n done; P_{n-1} V_{n-1} may still run
    wg_fence_regs(s[0]);
    softmax(s, n, alpha);
    wg_wait<0>();  // P_{n-1} V_{n-1} complete: O and the P registers are free
    wg_fence_regs(acc_o[0]);
    wg_fence_regs(p_frag);
#pragma unroll
    for (int nt = 0; nt < NO; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[0][nt][e] *= alpha[e >> 1];
    pack_p(s);
  }
  if (n_first < n_tiles) {  // the last tile's P V
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    wg_fence();
    issue_pv(n_tiles - 1);
    wg_wait<0>();
    wg_fence_regs(acc_o[0]);
  }

  // Epilogue: normalize by l, stage O through shared memory (over the K/V ring),
  // write O and LSE.
  T *o_b = q_rows(p.o, bi);
  float *lse_b = split_lse<VF>(p, bi, ks);
  float inv_l[1][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = sm[h].l_i;
    l += shfl_xor(l, 1);
    l += shfl_xor(l, 2);
    if (sink_here<VF>(ks)) l += var.sink_term(sm[h].m_i);  // (once per row)
    // 0 for a row that saw no key; dropout's 1 / (1 - p) joins here, once per row
    inv_l[0][h] = OnlineSoftmax<float>::inv_sum(l) * (decltype(var)::DROPOUT ? var.drop_rp : 1.f);
    const int row = m_start + wrow + g + 8 * h;
    if (c4 == 0 && row < seq_len_q<VF>(bi, p))
      lse_b[row * split_lse_sr<VF>(p)] = OnlineSoftmax<float>::lse_natural(sm[h].m_i, l);
  }
  if constexpr ((VF & FC_VF_SPLIT) != 0) {  // float32 partial rows, no staging
    cp_async_wait<0>();  // (an empty split never waited for its Q tile)
    store_partial<1, NO>(p, bi, ks, m_start + wrow, seq_len_q<VF>(bi, p), acc_o, inv_l, lane);
    return;
  }
  __syncthreads();  // every warpgroup is done with the ring
  T *sO = tile(C::K_OFF);
  frag_to_smem_rows<T, 1, NO, C::LDO>(sO, wrow, acc_o, inv_l, lane);
  __syncthreads();
  store_tile<T, BLOCK_M, HDV, NTHREADS>(o_b + m_start * p.o.sr, p.o.sr, sO, m_rows, p.head_dim_v);
}
