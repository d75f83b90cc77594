// flashcupy sm90 family: the dK/dV (+ atomic dQ) backward with every product on
// warpgroup MMA (wgmma, sm_90a only; FlashAttention-3, Shah et al. 2024,
// section 3.3 for the backward's products).
//
// Kernels (parameters BwdParams<T, float, T>, as the sm80 dK/dV kernels):
//   fc_sm90_bwd_dkdv<T, HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, VF>
//   fc_sm90_bwd_dkdvq<..., VF, BULK_DQ = false>   (+ dQ into dq_accum, sm80/bwd.cuh's
//                                                  workspace contract)
// The rest of the backward (preprocess, deterministic dQ, dq_accum conversion)
// is the sm80 family's.  8 warps = 2 warpgroups, BLOCK_N = 128 keys per CTA,
// BLOCK_M = 64 or 128 queries per step, HD, HDV = 64 or 128.
//
// Per step (one query tile of one broadcast group), all operands in shared memory
// as 128-byte-swizzled 64-column panels (swz_off in mma.cuh):
//   S = Q K^T, dP = dO V^T   K-major A and B (as in bwd.cuh's WG flag); the
//                            exponentials run while dP is on the tensor cores
//   P, dS -> shared memory   16-bit, swizzled panels along the keys
//   dQ  = dS K               A = dS K-major, B = K N-major (imm-trans-b)
//   dV += P^T dO             A = P read M-major (imm-trans-a: P^T without a
//   dK += dS^T Q                 transposed copy), B = dO / Q N-major
// The three last products are issued together and waited for once; the
// warps issue no ldmatrix at all.  Warpgroup w owns keys 64 w .. 64 w + 63 of
// dK and dV (all head-dim columns) in registers for the whole loop.
//
// smem = DkdvWgCfg::SMEM_BYTES = 2 * BLOCK_N * (HD + HDV) + STAGES * (2 * BLOCK_M *
//        (HD + HDV) + 8 * BLOCK_M) [rounded up to 1024] + 4 * BLOCK_M * BLOCK_N
//        [+ 4 * BLOCK_M * HD with BULK: the dQ staging tile of bwd.cuh]
#pragma once
#include "../sm80/bwd.cuh"
#include "wgmma.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "cuda_src/sm90 needs the sm_90a target (wgmma): compile with -arch=sm_90a"
#endif

namespace sm80 {

template <int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, bool ATOMIC_DQ,
          bool BULK>
struct DkdvWgCfg {
  static constexpr int NTHREADS = NWARPS * 32;
  // fields DkdvRing reads
  static constexpr bool SWZ_QDO = true, SWZ_KV = true, WG_SDP = true;
  static constexpr int LDQ = HD, LDO = HDV;
  static constexpr int K_OFF = 0;  // bytes
  static constexpr int V_OFF = K_OFF + 2 * BLOCK_N * HD;
  static constexpr int QDO_OFF = V_OFF + 2 * BLOCK_N * HDV;
  static constexpr int QDO_STAGE = 2 * BLOCK_M * (HD + HDV);
  static constexpr int LSE_OFF = QDO_OFF + STAGES * QDO_STAGE;
  static constexpr int DELTA_OFF = LSE_OFF + 4 * STAGES * BLOCK_M;
  static constexpr int P_OFF = (DELTA_OFF + 4 * STAGES * BLOCK_M + 1023) / 1024 * 1024;
  static constexpr int DS_OFF = P_OFF + 2 * BLOCK_M * BLOCK_N;
  static constexpr bool BULK_DQ = ATOMIC_DQ && BULK;
  static constexpr int DQS_OFF = DS_OFF + 2 * BLOCK_M * BLOCK_N;
  static constexpr int SMEM_BYTES = DQS_OFF + (BULK_DQ ? 4 * BLOCK_M * HD : 0);
  static constexpr int PANEL_Q = BLOCK_M * 128, PANEL_K = BLOCK_N * 128;  // 64 columns
  static constexpr int PANEL_P = BLOCK_M * 128;  // P, dS: 64 keys
  // S / dP: WG_M x WG_N blocks of 64 query rows x S_N keys, one per warpgroup
  static constexpr int WG_M = BLOCK_M / 64, WG_N = 2 / WG_M, S_N = BLOCK_N / WG_N;
  static constexpr int SWM = 4 * WG_M;  // warps along the query rows
  // S / dP of a warpgroup in SUBS passes of SUB_N keys (register pressure, see the body)
  static constexpr int SUBS = S_N == 128 && BLOCK_M == 128 ? 2 : 1, SUB_N = S_N / SUBS;
  // dQ: WQ_M x WQ_N blocks of 64 query rows x QN head-dim columns
  static constexpr int WQ_M = WG_M, WQ_N = WG_N, QN = HD / WQ_N;
  // dK / dV epilogue staging (padded) over the ring, free after the loop
  static constexpr int EK_OFF = QDO_OFF, EV_OFF = QDO_OFF + 2 * BLOCK_N * (HD + PAD);
  static_assert(NWARPS == 8 && BLOCK_N == 128 && (BLOCK_M == 64 || BLOCK_M == 128),
                "two warpgroups, 64 keys of dK / dV each");
  static_assert((HD == 64 || HD == 128) && (HDV == 64 || HDV == 128), "wgmma N <= 128");
  static_assert(S_N == 64 || S_N == 128, "wgmma N of S");
  static_assert(QN == 32 || QN == 64 || QN == 128, "wgmma N of dQ");
  static_assert(V_OFF % 1024 == 0 && QDO_OFF % 1024 == 0 && QDO_STAGE % 1024 == 0 &&
                    DS_OFF % 1024 == 0 && PANEL_Q % 1024 == 0,
                "wgmma operands start on 1024-byte boundaries");
  static_assert(EV_OFF + 2 * BLOCK_N * (HDV + PAD) <= DQS_OFF, "epilogue staging fits");
  static_assert(DQS_OFF % 16 == 0, "bulk copies need 16-byte alignment");
  static_assert(STAGES >= 2, "at least double-buffered");
};

// One warp's C fragments (16 rows x NT n8 tiles) as T into a swizzled panel tile
// (swz_off) of pitch-128-byte rows, panels `panel` bytes apart, at (row0, col0);
// row0 a multiple of 8, col0 of 64.  A warp's 32 stores of one n8 tile hit 8
// different 16-byte chunks (chunk ^ g): no bank conflict.
template <typename T, int NT, bool RELU = false>
__device__ __forceinline__ void frag_to_swz(u32 base, int panel, int row0, int col0,
                                            const float (&acc)[NT][4], int lane) {
  const int g = lane >> 2, c4 = lane & 3;
  const u32 b0 = base + (col0 / 64) * panel + 4 * c4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + g + 8 * h;
      st_shared_b32(b0 + (nt / 8) * panel + r * 128 + 16 * ((nt % 8) ^ (r & 7)),
                    RELU ? Mma<T>::pack_relu(acc[nt][2 * h], acc[nt][2 * h + 1])
                         : Mma<T>::pack(acc[nt][2 * h], acc[nt][2 * h + 1]));
    }
}

template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES,
          int VF, bool ATOMIC_DQ, bool BULK>
__device__ __forceinline__ void bwd_dkdv_body_wg(const BwdParams<T, float, T> &p) {
  using V = VariantFor<T, float, VF, true>;
  using C = DkdvWgCfg<HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, ATOMIC_DQ, BULK>;
  constexpr int NTHREADS = C::NTHREADS, S_N = C::S_N, QN = C::QN;

  extern __shared__ __align__(1024) unsigned char fc_sm80_smem_wga[];
  unsigned char *smem = fc_sm80_smem_wga;
  if (smem_u32(smem) & 1023) __trap();  // the swizzle is a function of address bits
  const u32 smem0 = smem_u32(smem);

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;

  V var(p.var, seq_len_q<VF>(bi, p), seq_len_k<VF>(bi, p), p.scale_log2);
  const int n_start = blockIdx.x * BLOCK_N;
  if constexpr ((VF & FC_VF_SEQ) != 0)  // (past this sequence's end: the grid covers the longest)
    if (n_start >= seq_len_k<VF>(bi, p)) return;
  const int n_rows = fc_min(BLOCK_N, seq_len_k<VF>(bi, p) - n_start);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, c4 = lane & 3;
  const int wg = warp / 4, wl = warp % 4;
  // S / dP: this warp's 16 rows and S_N keys (warps along the rows first)
  const int s_m0 = (warp % C::SWM) * 16, s_n0 = (warp / C::SWM) * S_N;
  // dQ: warpgroup wg holds rows 64 (wg % WQ_M) .., columns QN (wg / WQ_M) ..
  const int q_m0 = (wg % C::WQ_M) * 64 + wl * 16, q_d0 = (wg / C::WQ_M) * QN;
  const int k_n0 = wg * 64 + wl * 16;  // dK / dV: this warp's 16 keys

  DkdvRing<T, C, HD, HDV, BLOCK_M, BLOCK_N, STAGES, ATOMIC_DQ> ring;
  ring.start(p, bi, var, n_start, n_rows, smem);

  const u32 sK_u = smem0 + C::K_OFF, sV_u = smem0 + C::V_OFF;
  const u32 sP_u = smem0 + C::P_OFF, sdS_u = smem0 + C::DS_OFF;

  float acc_dk[1][HD / 8][4];   // (64 keys of this warpgroup, HD), unscaled
  float acc_dv[1][HDV / 8][4];  // (64 keys, HDV)
  zero(acc_dk);
  zero(acc_dv);

#pragma unroll 1
  for (int t = 0; t < ring.n_steps; ++t) {
    // (its barrier also orders the products of step t - 1, all waited for, before
    // this step's writes of P / dS and of the ring)
    const auto step = ring.begin(t, smem);
    const int stage = step.stage, grp = step.grp, m0 = step.m0;
    var.bind(p.var, bi, grp);  // ALiBi: the step's query head has its own slope
    const u32 sQ_u = smem0 + C::QDO_OFF + stage * C::QDO_STAGE;
    const u32 sdO_u = sQ_u + 2 * BLOCK_M * HD;
    const float *sLse = reinterpret_cast<const float *>(smem + C::LSE_OFF) + stage * BLOCK_M;
    const float *sDelta = reinterpret_cast<const float *>(smem + C::DELTA_OFF) + stage * BLOCK_M;

    // S_N keys in SUBS passes of SUB_N: at D = 64 with 128 x 128 tiles, two passes
    // of 64 keys keep S and dP at 64 accumulator registers instead of 128 (one pass
    // spills at the 255-register cap)
#pragma unroll
    for (int sub = 0; sub < C::SUBS; ++sub) {
      constexpr int SUB_N = C::SUB_N;
      const int n0 = s_n0 + sub * SUB_N;  // first key (of the tile) of this pass
      float s[1][SUB_N / 8][4], dp[1][SUB_N / 8][4];
      const u32 q_rows = (warp % C::SWM / 4) * 64 * 128, k_rows = n0 * 128;  // bytes
      wg_fence();
      wg_gemm_nt<T, SUB_N, HD, C::PANEL_Q, C::PANEL_K>(s[0], sQ_u + q_rows, sK_u + k_rows);
      wg_gemm_nt<T, SUB_N, HDV, C::PANEL_Q, C::PANEL_K>(dp[0], sdO_u + q_rows, sV_u + k_rows);
      wg_wait<1>();
      wg_fence_regs(s[0]);
      // P (as in bwd.cuh, probs_from_scores), masked only where the tile crosses
      // the key end or a window edge; its stores drain while dP runs
      const bool need_mask = var.needs_mask(m0, m0 + BLOCK_M, n_start, n_start + BLOCK_N);
      auto lse2 = [&](int mt, int h) { return lse_to_log2(sLse[s_m0 + mt * 16 + g + 8 * h]); };
      static_assert(!V::DROPOUT || (BLOCK_N % 32 == 0 && S_N % 32 == 0 && SUB_N % 32 == 0),
                    "dropout_frag: the keys of a fragment must start on a 32-key block");
      probs_from_scores(var, s, lse2, m0 + s_m0, n_start + n0, need_mask, p.scale_log2, lane);
      frag_to_swz<T, SUB_N / 8, V::DROPOUT>(sP_u, C::PANEL_P, s_m0, n0, s[0], lane);
      wg_wait<0>();
      wg_fence_regs(dp[0]);
      auto delta = [&](int mt, int h) { return sDelta[s_m0 + mt * 16 + g + 8 * h]; };
      ds_from_dp<V, true>(var, dp, s, delta, lse2, m0 + s_m0, n_start + n0, lane);  // dS = P o (dP - delta)
      frag_to_swz<T, SUB_N / 8>(sdS_u, C::PANEL_P, s_m0, n0, dp[0], lane);
    }
    fence_proxy_async();  // P, dS (generic stores) -> visible to wgmma
    if constexpr (C::BULK_DQ) {
      if (tid == 0) bulk_wait_all<true>();  // the last dQ reduction has read its staging tile
    }
    __syncthreads();  // P, dS complete

    // dQ = dS K, dV += P^T dO, dK += dS^T Q: issued together, waited for once
    float acc_dq[1][QN / 8][4];
    wg_fence();
    if constexpr (ATOMIC_DQ) {
      const u32 a0 = sdS_u + (wg % C::WQ_M) * 64 * 128;      // dS rows of this block
      // K columns q_d0 .. of this block: their panel, and 2 (q_d0 % 64) bytes into its
      // rows (the swizzle applies to the address, as for K-major k16 steps)
      const u32 b0 = sK_u + (q_d0 / 64) * C::PANEL_K + 2 * (q_d0 % 64);
#pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; ++kk)
        wg_mma<T, QN, 0, 1>(acc_dq[0],
                            wg_desc_sw128(a0 + (kk / 4) * C::PANEL_P + 32 * (kk % 4)),
                            wg_desc_sw128_mn(b0 + kk * 16 * 128, C::PANEL_K), kk > 0);
    }
    {
      const u32 p0 = sP_u + wg * C::PANEL_P, ds0 = sdS_u + wg * C::PANEL_P;  // keys 64 wg ..
#pragma unroll
      for (int kk = 0; kk < BLOCK_M / 16; ++kk) {  // k = 16 queries: 2 groups of 8 rows
        wg_mma<T, HDV, 1, 1>(acc_dv[0], wg_desc_sw128_mn(p0 + kk * 2048, C::PANEL_P),
                             wg_desc_sw128_mn(sdO_u + kk * 2048, C::PANEL_Q), true);
        wg_mma<T, HD, 1, 1>(acc_dk[0], wg_desc_sw128_mn(ds0 + kk * 2048, C::PANEL_P),
                            wg_desc_sw128_mn(sQ_u + kk * 2048, C::PANEL_Q), true);
      }
    }
    wg_commit();
    wg_wait<0>();
    wg_fence_regs(acc_dv[0]);
    wg_fence_regs(acc_dk[0]);
    if constexpr (ATOMIC_DQ) {
      wg_fence_regs(acc_dq[0]);
      float *dq_row = p.dq_accum.batch(bi.b0, bi.b1, bi.b2) + (fc_index_t)bi.qa0 * HD + grp * p.dq_accum_sg;
      if constexpr (C::BULK_DQ) {
        // the tile in the workspace's own layout (quad order, pitch HD), one bulk
        // reduction of its BLOCK_M contiguous rows (as in bwd.cuh)
        const u32 sdq = smem0 + C::DQS_OFF;
        stage_dq<1, QN, HD>(sdq, q_m0, q_d0, acc_dq, lane);
        fence_proxy_async();
        __syncthreads();
        if (tid == 0) bulk_reduce_add_f32(dq_row + (fc_index_t)m0 * HD, sdq, 4 * BLOCK_M * HD);
      } else {
        add_dq<1, QN, HD>(dq_row + (fc_index_t)(m0 + q_m0 + g) * HD + q_d0 + 4 * c4, acc_dq);
      }
    }
  }
  cp_async_wait<0>();
  if constexpr (C::BULK_DQ) {
    if (tid == 0) bulk_wait_all<false>();  // the last dQ reduction is complete
  }

  // Epilogue: stage dK (scaled) and dV (padded tiles over the ring), then store.
  __syncthreads();
  T *eK = reinterpret_cast<T *>(smem + C::EK_OFF);
  T *eV = reinterpret_cast<T *>(smem + C::EV_OFF);
  frag_to_smem<T, 1, HD / 8, HD + PAD>(eK, k_n0, acc_dk, p.scale, lane);
  frag_to_smem<T, 1, HDV / 8, HDV + PAD>(eV, k_n0, acc_dv, 1.f, lane);
  __syncthreads();
  store_tile<T, BLOCK_N, HD, NTHREADS>(k_rows(p.dk, bi) + n_start * p.dk.sr, p.dk.sr,
                                       eK, n_rows, p.head_dim);
  store_tile<T, BLOCK_N, HDV, NTHREADS>(k_rows(p.dv, bi) + n_start * p.dv.sr, p.dv.sr,
                                        eV, n_rows, p.head_dim_v);
}

}  // namespace sm80

template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, int VF>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_sm90_bwd_dkdv(FC_PARAMS(BwdParams<T, float, T>) p) {
  sm80::bwd_dkdv_body_wg<T, HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, VF, false, false>(p);
}

template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, int VF,
          bool BULK_DQ = false>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_sm90_bwd_dkdvq(FC_PARAMS(BwdParams<T, float, T>) p) {
  sm80::bwd_dkdv_body_wg<T, HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, VF, true, BULK_DQ>(p);
}
