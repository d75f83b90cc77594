// flashcupy f64mma family: float64 attention forward on the double-precision
// tensor cores (DMMA: mma.sync.m8n8k4 with f64 operands, sm_80 and newer).
//
// The FlashAttention-2 scheme of the other families with float64 throughout:
// scores, the online softmax (m, l) and O accumulate in double.  Grid:
// (ceil(Sq / BLOCK_M), batch).  Each of the NWARPS warps owns MT fragments of
// 8 query rows; a tile of BLOCK_N = 32 keys streams through shared memory.
//
// On sm_90 two m8 fragments that share B issue as one m16n8k4 (dmma_pair): the
// same per-lane elements, twice the flops per cycle of the DP tensor pipe.
// Fragments of m8n8k4 (PTX ISA, "Matrix Fragments for mma.m8n8k4" with .f64):
// lane = 4 g + t holds A[g][t] (8 x 4, row-major), B[t][g] (4 x 8, column-major)
// and C[g][2t], C[g][2t + 1] (8 x 8).  So:
//   S = Q K^T        A = Q[row g][k + t], B = K[key g][k + t] (both row-major
//                    tiles in shared memory); HD / 4 steps
//   online softmax   each row's 8 scores of a tile lie in the 4 lanes of one g:
//                    two xor-shuffles give the row max
//   O += P V         P leaves S's accumulator in C's layout (lane t holds keys
//                    2t, 2t + 1 of each 8-key block), and A wants key t.  The sum
//                    over keys does not care about their order, so step e of a
//                    block takes key 2t + e from both operands: A = P[g][2t + e]
//                    (the lane's own accumulator) and B = V[key 2t + e][col g].
//                    No shuffles.
//
// Shared memory: Q (BLOCK_M x HD), K (32 x HD), V (32 x HDV), padded rows
// (mma.cuh: two wavefronts per fragment load).  Loads are 8-byte cp.async.  One buffer each for K and V,
// refilled as soon as it is free: K(n + 1) lands during the softmax and P V of
// tile n, V(n + 1) during the Q K^T of tile n + 1.
#pragma once
#include "../variant.cuh"
#include "../softmax.cuh"
#include "../seq.cuh"
#include "mma.cuh"

namespace f64mma {

template <int HD, int HDV, int NWARPS, int MT>
struct FwdSmem {
  static constexpr int BLOCK_M = NWARPS * MT * 8;
  static constexpr int LDQ = HD + PAD, LDK = HD + PAD, LDV = HDV + PAD;
  static constexpr int Q_OFF = 0;
  static constexpr int K_OFF = Q_OFF + BLOCK_M * LDQ;
  static constexpr int V_OFF = K_OFF + BLOCK_N * LDK;
  static constexpr int SIZE = V_OFF + BLOCK_N * LDV;  // doubles
};

}  // namespace f64mma

template <typename T, typename Acc, int HD, int HDV, int NWARPS, int MT, int VF>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_f64mma_fwd(FC_PARAMS(FwdParams<T, Acc>) p) {
  using namespace f64mma;
  static_assert(sizeof(T) == 8 && sizeof(Acc) == 8, "float64 inputs and accumulators");
  static_assert(HD % 4 == 0 && HDV % 8 == 0, "whole k4 steps of Q K^T and n8 fragments of O");
  using L = FwdSmem<HD, HDV, NWARPS, MT>;
  constexpr int NTHREADS = NWARPS * 32;
  constexpr int BLOCK_M = L::BLOCK_M;
  constexpr int NT = BLOCK_N / 8;  // n8 fragments of S per key tile
  constexpr int DT = HDV / 8;      // n8 fragments of O per row block

  extern __shared__ __align__(16) unsigned char fc_smem_raw[];
  double *sQ = reinterpret_cast<double *>(fc_smem_raw) + L::Q_OFF;
  double *sK = reinterpret_cast<double *>(fc_smem_raw) + L::K_OFF;
  double *sV = reinterpret_cast<double *>(fc_smem_raw) + L::V_OFF;

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;
  const T *q_b = q_rows(p.q, bi);
  const T *k_b = k_rows(p.k, bi);
  const T *v_b = k_rows(p.v, bi);

  using V = VariantFor<T, Acc, VF>;
  V var(p.var, seq_len_q<VF>(bi, p), seq_len_k<VF>(bi, p), p.scale_log2);
  var.bind(p.var, bi);
  const int m_start = blockIdx.x * BLOCK_M;
  if constexpr ((VF & FC_VF_SEQ) != 0)
    if (m_start >= seq_len_q<VF>(bi, p)) return;
  const int len_q = seq_len_q<VF>(bi, p), len_k = seq_len_k<VF>(bi, p);
  const int m_end = fc_min(m_start + BLOCK_M, len_q);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wrow = warp * MT * 8;  // the warp's first row inside the tile

  // window / causal: only the key tiles some row of the tile sees
  const int n_begin = var.key_begin(m_start) / BLOCK_N * BLOCK_N;
  const int n_end = var.key_end(m_end);
  auto load_k = [&](int n0) {
    load_rows_async<BLOCK_N, HD, L::LDK, NTHREADS>(
        sK, kv_rows<VF>(k_b, p.k, bi, p.seq, p.seq.k_page_stride, n0), len_k - n0, p.head_dim);
  };
  auto load_v = [&](int n0) {
    load_rows_async<BLOCK_N, HDV, L::LDV, NTHREADS>(
        sV, kv_rows<VF>(v_b, p.v, bi, p.seq, p.seq.v_page_stride, n0), len_k - n0,
        p.head_dim_v);
  };
  // groups: [Q, K(n_begin)], [V(n_begin)]; then per tile [K(n + 1)], [V(n + 1)]
  load_rows_async<BLOCK_M, HD, L::LDQ, NTHREADS>(
      sQ, StridedRows<T>{q_b + (fc_index_t)m_start * p.q.sr, p.q.sr}, m_end - m_start, p.head_dim);
  if (n_begin < n_end) load_k(n_begin);
  cp_async_commit();
  if (n_begin < n_end) load_v(n_begin);
  cp_async_commit();

  OnlineSoftmax<Acc> sm[MT];  // row g of fragment mt: m_i shared by its 4 lanes, l_i partial
  double acc_o[DT][MT][2];  // (fragment-major: dmma_rows takes one n8 block's MT fragments)
  zero_frags(acc_o);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) sm[mt].init(var.init_max());

  for (int n_start = n_begin; n_start < n_end; n_start += BLOCK_N) {
    const bool more = n_start + BLOCK_N < n_end;
    cp_async_wait<1>();  // Q and K(n) have landed (V(n) may not have)
    __syncthreads();

    // S = Q K^T (raw scores)
    double s[NT][MT][2];
    zero_frags(s);
    mma_abt<MT, NT, HD>(s, sQ + wrow * L::LDQ, L::LDQ, sK, L::LDK);
    __syncthreads();  // every warp is done with K(n): refill it
    if (more) load_k(n_start + BLOCK_N);
    cp_async_commit();  // (empty without a next tile: the group count stays uniform)

    // online softmax: scores in log2 units, as the other families (softmax.cuh)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int row = m_start + wrow + mt * 8 + g;
      double mx = fc_neg_inf<double>::value();
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = n_start + nt * 8 + 2 * t + e;
          const bool ok = var.visible(row, j);
          // a transformed score is kept in log2 units; a plain one stays raw, so
          // that P is formed with one FMA (rounded once, as the generic family)
          double x;
          if constexpr (V::ELEMENTWISE) {
            x = ok ? var.score2(s[nt][mt][e], row, j) : fc_neg_inf<double>::value();
            s[nt][mt][e] = x;
          } else {
            x = ok ? s[nt][mt][e] * p.scale_log2 : fc_neg_inf<double>::value();
            if (!ok) s[nt][mt][e] = fc_neg_inf<double>::value();
          }
          mx = fmax(mx, x);
        }
      mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const double m_new = fmax(sm[mt].m_i, mx);
      const double alpha = sm[mt].rescale(m_new);
      const double sub = OnlineSoftmax<double>::safe_max(m_new);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const double x = s[nt][mt][e];
          double pr;
          if constexpr (V::ELEMENTWISE) pr = fc_exp2(x - sub);  // exp2(-inf) = 0 for masked
          else pr = x == fc_neg_inf<double>::value() ? 0.0 : fc_exp2(fma(x, p.scale_log2, -sub));
          sm[mt].l_i += pr;  // (before dropout: the LSE has none)
          if constexpr (V::DROPOUT)
            if (!var.dropout_keep(row, n_start + nt * 8 + 2 * t + e)) pr = 0.0;
          s[nt][mt][e] = pr;
        }
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        acc_o[dt][mt][0] *= alpha;
        acc_o[dt][mt][1] *= alpha;
      }
    }

    cp_async_wait<1>();  // V(n) has landed (K(n + 1) may not have)
    __syncthreads();
    // O += P V
    mma_pb<MT, NT, DT>(acc_o, s, sV, L::LDV);
    __syncthreads();  // every warp is done with V(n): refill it
    if (more) load_v(n_start + BLOCK_N);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // Epilogue: normalize by l, write O and the natural-log LSE.
  T *o_b = q_rows(p.o, bi);
  Acc *lse_b = q_rows(p.lse, bi);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = m_start + wrow + mt * 8 + g;
    double l = sm[mt].l_i;
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l += var.sink_term(sm[mt].m_i);
    if (row >= len_q) continue;
    const double inv_l = OnlineSoftmax<double>::inv_sum(l) * (V::DROPOUT ? var.drop_rp : 1.0);
    store_row(o_b + (fc_index_t)row * p.o.sr, acc_o, mt, p.head_dim_v, inv_l);
    if (t == 0) lse_b[(fc_index_t)row * p.lse.sr] = OnlineSoftmax<double>::lse_natural(sm[mt].m_i, l);
  }
}
