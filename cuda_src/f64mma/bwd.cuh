// flashcupy f64mma family: the float64 attention backward on the
// double-precision tensor cores (the generic family's two kernels, with every
// product on DMMA fragments; mma.cuh).
//
//   fc_f64mma_bwd_dq    one CTA per query tile; per 32-key tile
//                       S = Q K^T, dP = dO V^T, dS = P o (dP - delta), dQ += dS K
//   fc_f64mma_bwd_dkdv  one CTA per key tile; per 32-query tile (and over the
//                       broadcast groups the kernel sums, p.n_group)
//                       S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q
// P is recomputed from the saved LSE (the preprocess kernel's delta is the
// generic family's).  No atomics but dbias's: every gradient element has one
// writer, so the results are deterministic.  Loads are 8-byte cp.async, one
// tile at a time.
#pragma once
#include "../variant.cuh"
#include "../softmax.cuh"
#include "../seq.cuh"
#include "mma.cuh"

namespace f64mma {

template <int HD, int HDV, int NWARPS, int MT>
struct DqSmem {
  static constexpr int BLOCK_M = NWARPS * MT * 8;
  static constexpr int LDQ = HD + PAD, LDO = HDV + PAD, LDK = HD + PAD, LDV = HDV + PAD;
  static constexpr int Q_OFF = 0;
  static constexpr int DO_OFF = Q_OFF + BLOCK_M * LDQ;
  static constexpr int K_OFF = DO_OFF + BLOCK_M * LDO;
  static constexpr int V_OFF = K_OFF + BLOCK_N * LDK;
  static constexpr int SIZE = V_OFF + BLOCK_N * LDV;  // doubles
};

template <int HD, int HDV, int NWARPS, int MT>
struct DkdvSmem {
  static constexpr int BLOCK_KEYS = NWARPS * MT * 8;
  static constexpr int TILE_Q = BLOCK_N;
  static constexpr int LDK = HD + PAD, LDV = HDV + PAD, LDQ = HD + PAD, LDO = HDV + PAD;
  static constexpr int K_OFF = 0;
  static constexpr int V_OFF = K_OFF + BLOCK_KEYS * LDK;
  static constexpr int Q_OFF = V_OFF + BLOCK_KEYS * LDV;
  static constexpr int DO_OFF = Q_OFF + TILE_Q * LDQ;
  static constexpr int LSE_OFF = DO_OFF + TILE_Q * LDO;
  static constexpr int DELTA_OFF = LSE_OFF + TILE_Q;
  static constexpr int SIZE = DELTA_OFF + TILE_Q;  // doubles
};

}  // namespace f64mma

template <typename T, typename Acc, typename TG, int HD, int HDV, int NWARPS, int MT, int VF>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_f64mma_bwd_dq(FC_PARAMS(BwdParams<T, Acc, TG>) p) {
  using namespace f64mma;
  static_assert(sizeof(T) == 8 && sizeof(Acc) == 8 && sizeof(TG) == 8, "float64 throughout");
  using L = DqSmem<HD, HDV, NWARPS, MT>;
  constexpr int NTHREADS = NWARPS * 32;
  constexpr int BLOCK_M = L::BLOCK_M;
  constexpr int NT = BLOCK_N / 8, DT = HD / 8;

  extern __shared__ __align__(16) unsigned char fc_smem_raw[];
  double *sQ = reinterpret_cast<double *>(fc_smem_raw) + L::Q_OFF;
  double *sdO = reinterpret_cast<double *>(fc_smem_raw) + L::DO_OFF;
  double *sK = reinterpret_cast<double *>(fc_smem_raw) + L::K_OFF;
  double *sV = reinterpret_cast<double *>(fc_smem_raw) + L::V_OFF;

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;
  const T *k_b = k_rows(p.k, bi);
  const T *v_b = k_rows(p.v, bi);
  const int len_q = seq_len_q<VF>(bi, p), len_k = seq_len_k<VF>(bi, p);
  VariantFor<T, Acc, VF> var(p.var, len_q, len_k, p.scale_log2);
  var.bind(p.var, bi);
  const int m_start = blockIdx.x * BLOCK_M;
  if constexpr ((VF & FC_VF_SEQ) != 0)  // (past this sequence's end: the grid covers the longest)
    if (m_start >= len_q) return;
  const int m_end = fc_min(m_start + BLOCK_M, len_q);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wrow = warp * MT * 8;

  load_rows_async<BLOCK_M, HD, L::LDQ, NTHREADS>(
      sQ, StridedRows<T>{q_rows(p.q, bi) + (fc_index_t)m_start * p.q.sr, p.q.sr}, m_end - m_start,
      p.head_dim);
  load_rows_async<BLOCK_M, HDV, L::LDO, NTHREADS>(
      sdO, StridedRows<T>{q_rows(p.dout, bi) + (fc_index_t)m_start * p.dout.sr, p.dout.sr},
      m_end - m_start, p.head_dim_v);
  cp_async_commit();

  double lse_i[MT], dlt[MT];
  const Acc *lse_b = q_rows(p.lse, bi);
  const Acc *delta_b = q_rows(p.delta, bi);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = m_start + wrow + mt * 8 + g;
    // rows past Sq: LSE -inf makes their P exactly 0
    lse_i[mt] = row < len_q ? lse_b[(fc_index_t)row * p.lse.sr] : fc_neg_inf<double>::value();
    dlt[mt] = row < len_q ? delta_b[(fc_index_t)row * p.delta.sr] : 0.0;
  }
  double acc_dq[DT][MT][2];
  zero_frags(acc_dq);

  const int n_end = var.key_end(m_end);
  for (int n_start = var.key_begin(m_start) / BLOCK_N * BLOCK_N; n_start < n_end;
       n_start += BLOCK_N) {
    __syncthreads();  // the previous tile is no longer read
    load_rows_async<BLOCK_N, HD, L::LDK, NTHREADS>(
        sK, StridedRows<T>{k_b + (fc_index_t)n_start * p.k.sr, p.k.sr}, len_k - n_start,
        p.head_dim);
    load_rows_async<BLOCK_N, HDV, L::LDV, NTHREADS>(
        sV, StridedRows<T>{v_b + (fc_index_t)n_start * p.v.sr, p.v.sr}, len_k - n_start,
        p.head_dim_v);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    double s[NT][MT][2], dp[NT][MT][2];
    zero_frags(s);
    zero_frags(dp);
    mma_abt<MT, NT, HD>(s, sQ + wrow * L::LDQ, L::LDQ, sK, L::LDK);
    mma_abt<MT, NT, HDV>(dp, sdO + wrow * L::LDO, L::LDO, sV, L::LDV);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = m_start + wrow + mt * 8 + g, j = n_start + nt * 8 + 2 * t + e;
          const double raw = s[nt][mt][e];
          const double pr = var.visible(i, j) ? var.prob_from_lse(raw, p.scale, lse_i[mt], i, j)
                                              : 0.0;
          double dpr = dp[nt][mt][e];  // dropout: dP o Z / (1 - p)
          if constexpr (decltype(var)::DROPOUT)
            dpr = var.dropout_keep(i, j) ? dpr * var.drop_rp : 0.0;
          s[nt][mt][e] = pr * (dpr - dlt[mt]) * var.dcap_from_raw(raw);  // dS (softcap: 1 - tanh^2)
        }
    mma_pb<MT, NT, DT>(acc_dq, s, sK, L::LDK);  // dQ += dS K (scale at the end)
  }
  cp_async_wait<0>();  // (a tile that sees no key still issued its Q, dO copies)

  TG *dq_b = q_rows(p.dq, bi);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = m_start + wrow + mt * 8 + g;
    if (row < len_q) store_row(dq_b + (fc_index_t)row * p.dq.sr, acc_dq, mt, p.head_dim, p.scale);
  }
}

template <typename T, typename Acc, typename TG, int HD, int HDV, int NWARPS, int MT, int VF>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_f64mma_bwd_dkdv(FC_PARAMS(BwdParams<T, Acc, TG>) p) {
  using namespace f64mma;
  static_assert(sizeof(T) == 8 && sizeof(Acc) == 8 && sizeof(TG) == 8, "float64 throughout");
  using L = DkdvSmem<HD, HDV, NWARPS, MT>;
  constexpr int NTHREADS = NWARPS * 32;
  constexpr int BLOCK_KEYS = L::BLOCK_KEYS, TILE_Q = L::TILE_Q;
  constexpr int NT = TILE_Q / 8, DTK = HD / 8, DTV = HDV / 8;

  extern __shared__ __align__(16) unsigned char fc_smem_raw[];
  double *sK = reinterpret_cast<double *>(fc_smem_raw) + L::K_OFF;
  double *sV = reinterpret_cast<double *>(fc_smem_raw) + L::V_OFF;
  double *sQ = reinterpret_cast<double *>(fc_smem_raw) + L::Q_OFF;
  double *sdO = reinterpret_cast<double *>(fc_smem_raw) + L::DO_OFF;
  double *sLse = reinterpret_cast<double *>(fc_smem_raw) + L::LSE_OFF;
  double *sDelta = reinterpret_cast<double *>(fc_smem_raw) + L::DELTA_OFF;

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;
  const int len_q = seq_len_q<VF>(bi, p), len_k = seq_len_k<VF>(bi, p);
  VariantFor<T, Acc, VF> var(p.var, len_q, len_k, p.scale_log2);
  const int n_start = blockIdx.x * BLOCK_KEYS;
  if constexpr ((VF & FC_VF_SEQ) != 0)  // (past this sequence's end: the grid covers the longest)
    if (n_start >= len_k) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wkey = warp * MT * 8;  // the warp's first key inside the tile

  // K and V stay in shared memory for the whole loop (A operands: rows = keys)
  load_rows_async<BLOCK_KEYS, HD, L::LDK, NTHREADS>(
      sK, StridedRows<T>{k_rows(p.k, bi) + (fc_index_t)n_start * p.k.sr, p.k.sr}, len_k - n_start,
      p.head_dim);
  load_rows_async<BLOCK_KEYS, HDV, L::LDV, NTHREADS>(
      sV, StridedRows<T>{k_rows(p.v, bi) + (fc_index_t)n_start * p.v.sr, p.v.sr}, len_k - n_start,
      p.head_dim_v);
  cp_async_commit();

  double acc_dk[DTK][MT][2], acc_dv[DTV][MT][2];
  zero_frags(acc_dk);
  zero_frags(acc_dv);

  // window / causal: only the query tiles that see a key of this tile
  const int m_begin = (var.query_begin(n_start) / TILE_Q) * TILE_Q;
  const int m_stop = var.query_end(n_start + BLOCK_KEYS);
  for (int gq = 0; gq < p.n_group; ++gq) {
    var.bind(p.var, bi, gq);  // ALiBi: the group's query head has its own slope
    const T *q_b = q_rows(p.q, bi) + gq * p.q_sg;
    const T *do_b = q_rows(p.dout, bi) + gq * p.dout_sg;
    const Acc *lse_b = q_rows(p.lse, bi) + gq * p.lse_sg;
    const Acc *delta_b = q_rows(p.delta, bi) + gq * p.delta_sg;
    for (int m_start = m_begin; m_start < m_stop; m_start += TILE_Q) {
      __syncthreads();  // the previous query tile is no longer read
      const int m_valid = fc_min(TILE_Q, len_q - m_start);
      load_rows_async<TILE_Q, HD, L::LDQ, NTHREADS>(
          sQ, StridedRows<T>{q_b + (fc_index_t)m_start * p.q.sr, p.q.sr}, m_valid, p.head_dim);
      load_rows_async<TILE_Q, HDV, L::LDO, NTHREADS>(
          sdO, StridedRows<T>{do_b + (fc_index_t)m_start * p.dout.sr, p.dout.sr}, m_valid,
          p.head_dim_v);
      cp_async_commit();
      for (int r = threadIdx.x; r < TILE_Q; r += NTHREADS) {
        sLse[r] = r < m_valid ? lse_b[(fc_index_t)(m_start + r) * p.lse.sr]
                              : fc_neg_inf<double>::value();
        sDelta[r] = r < m_valid ? delta_b[(fc_index_t)(m_start + r) * p.delta.sr] : 0.0;
      }
      cp_async_wait<0>();
      __syncthreads();

      // transposed scores: rows = this warp's keys, columns = the tile's queries
      double s[NT][MT][2], dp[NT][MT][2];
      zero_frags(s);
      zero_frags(dp);
      mma_abt<MT, NT, HD>(s, sK + wkey * L::LDK, L::LDK, sQ, L::LDQ);
      mma_abt<MT, NT, HDV>(dp, sV + wkey * L::LDV, L::LDV, sdO, L::LDO);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int qi = nt * 8 + 2 * t + e, i = m_start + qi;
          const double lse = sLse[qi], delta_i = sDelta[qi];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const int j = n_start + wkey + mt * 8 + g;
            const double raw = s[nt][mt][e];
            double pr = (i < len_q && var.visible(i, j)) ? var.prob_from_lse(raw, p.scale, lse, i, j)
                                                         : 0.0;
            double dpr = dp[nt][mt][e], ds;
            if constexpr (decltype(var)::DROPOUT) {
              // dS = P o (dP o Z / (1 - p) - delta);  dV multiplies P o Z / (1 - p)
              const bool kept = var.dropout_keep(i, j);
              dpr = kept ? dpr * var.drop_rp : 0.0;
              ds = pr * (dpr - delta_i);
              pr = kept ? pr * var.drop_rp : 0.0;
            } else {
              ds = pr * (dpr - delta_i);
            }
            var.dbias_add(i, j, ds);  // (with FC_VF_DBIAS: this kernel owns each pair once)
            s[nt][mt][e] = pr;
            dp[nt][mt][e] = ds * var.dcap_from_raw(raw);
          }
        }
      mma_pb<MT, NT, DTV>(acc_dv, s, sdO, L::LDO);  // dV += P^T dO
      mma_pb<MT, NT, DTK>(acc_dk, dp, sQ, L::LDQ);  // dK += dS^T Q (scale at the end)
    }
  }
  cp_async_wait<0>();  // (a tile that no query sees still issued its K, V copies)

  TG *dk_b = k_rows(p.dk, bi);
  TG *dv_b = k_rows(p.dv, bi);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int key = n_start + wkey + mt * 8 + g;
    if (key >= len_k) continue;
    store_row(dk_b + (fc_index_t)key * p.dk.sr, acc_dk, mt, p.head_dim, p.scale);
    store_row(dv_b + (fc_index_t)key * p.dv.sr, acc_dv, mt, p.head_dim_v, 1.0);
  }
}
