// flashcupy generic family: attention forward (FlashAttention-2 scheme, plain FMA).
//
// Grid: (ceil(Sq / BLOCK_M), batch) -- one CTA per query tile and batch element.
// Each of the NWARPS warps owns ROWS query rows; a K/V tile of BLOCK_N = 32 keys
// streams through shared memory, lane j holding key j of the tile.  Per tile:
//   S = Q K^T           lane j computes s[r] = q_r . k_j for its ROWS rows
//   online softmax      warp max over the 32 keys; each lane keeps a partial
//                       row sum l_i, reduced across the warp once at the end
//   O += P V            lane owns output columns lane, lane+32, ...; p_rj
//                       reaches every lane by shuffle
// Only O and the row LSE are written; nothing of size Sq x Sk is stored.
#pragma once
#include "../variant.cuh"
#include "../softmax.cuh"
#include "tile.cuh"

namespace generic {

template <typename Acc, int HD, int HDV, int NWARPS, int ROWS>
struct FwdSmem {
  static constexpr int BLOCK_M = NWARPS * ROWS;
  static constexpr int LDK = HD + TileGeom<Acc>::PAD;  // per-lane rows of K
  // (BLOCK_M, HD) Q rows, broadcast reads   | (BLOCK_N, LDK) K, per-lane reads
  // (BLOCK_N, HDV) V, lane-contiguous columns
  static constexpr int Q_OFF = 0;
  static constexpr int K_OFF = Q_OFF + BLOCK_M * HD;
  static constexpr int V_OFF = K_OFF + BLOCK_N * LDK;
  static constexpr int SIZE = V_OFF + BLOCK_N * HDV;
};

}  // namespace generic

template <typename T, typename Acc, int HD, int HDV, int NWARPS, int ROWS, int VF>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_generic_fwd(FC_PARAMS(FwdParams<T, Acc>) p) {
  using namespace generic;
  using L = FwdSmem<Acc, HD, HDV, NWARPS, ROWS>;
  constexpr int NTHREADS = NWARPS * 32;
  constexpr int BLOCK_M = L::BLOCK_M;
  constexpr int CPL = HDV / 32;  // output columns per lane
  static_assert(HD % 32 == 0 && HDV % 32 == 0, "head-dim buckets are multiples of 32");

  extern __shared__ __align__(16) unsigned char fc_smem_raw[];
  Acc *sQ = reinterpret_cast<Acc *>(fc_smem_raw) + L::Q_OFF;
  Acc *sK = reinterpret_cast<Acc *>(fc_smem_raw) + L::K_OFF;
  Acc *sV = reinterpret_cast<Acc *>(fc_smem_raw) + L::V_OFF;

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;
  const T *q_b = q_rows(p.q, bi);
  const T *k_b = k_rows(p.k, bi);
  const T *v_b = k_rows(p.v, bi);

  using V = VariantFor<T, Acc, VF>;
  V var(p.var, seq_len_q<VF>(bi, p), seq_len_k<VF>(bi, p), p.scale_log2);
  var.bind(p.var, bi);
  const int m_start = blockIdx.x * BLOCK_M;
  // (sequences: the grid covers the longest one; tiles past this one's end exit)
  if constexpr ((VF & FC_VF_SEQ) != 0)
    if (m_start >= seq_len_q<VF>(bi, p)) return;
  const int m_end = fc_min(m_start + BLOCK_M, seq_len_q<VF>(bi, p));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = m_start + warp * ROWS;  // first query row of this warp

  // load q: it stays in shared memory for the whole key loop
  load_tile<T, Acc, BLOCK_M, HD, HD, NTHREADS>(sQ, q_b + m_start * p.q.sr, p.q.sr, m_end - m_start,
                                               p.head_dim);

  OnlineSoftmax<Acc> sm[ROWS];  // m_i warp-uniform; l_i a per-lane partial sum
  Acc acc_o[ROWS][CPL];         // (ROWS, HDV) output rows, this lane's columns
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    sm[r].init(var.init_max());
#pragma unroll
    for (int c = 0; c < CPL; ++c) acc_o[r][c] = Acc(0);
  }

  // window / causal: only the key tiles some row of the tile sees
  const int n_end = var.key_end(m_end);
  for (int n_start = var.key_begin(m_start) / BLOCK_N * BLOCK_N; n_start < n_end;
       n_start += BLOCK_N) {
    __syncthreads();  // the previous tile is no longer read
    const int n_valid = fc_min(BLOCK_N, seq_len_k<VF>(bi, p) - n_start);
    // (paged K / V: rows through the block table, seq.cuh kv_rows)
    load_rows<T, Acc, BLOCK_N, HD, L::LDK, NTHREADS>(
        sK, kv_rows<VF>(k_b, p.k, bi, p.seq, p.seq.k_page_stride, n_start), n_valid, p.head_dim);
    load_rows<T, Acc, BLOCK_N, HDV, HDV, NTHREADS>(
        sV, kv_rows<VF>(v_b, p.v, bi, p.seq, p.seq.v_page_stride, n_start), n_valid, p.head_dim_v);
    __syncthreads();

    // S = Q K^T for this lane's key, in log2 units
    Acc s[ROWS];
    dot_rows<Acc, HD, ROWS>(s, sQ + warp * ROWS * HD, HD, sK + lane * L::LDK);
    const int j = n_start + lane;
    Acc pr[ROWS], alpha_r[ROWS];  // P of this lane's key; O's rescale
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const bool ok = var.visible(row0 + r, j);
      const Acc s2 = !ok ? fc_neg_inf<Acc>::value()
                         : V::ELEMENTWISE ? var.score2(s[r], row0 + r, j)
                                                       : s[r] * p.scale_log2;
      const Acc m_new = fmax(sm[r].m_i, warp_max(s2));
      const Acc alpha = sm[r].rescale(m_new);
      // One FMA forms s * scale * log2(e) - m, rounded once at the size of the
      // result (small for the P that matter) rather than at the size of s2:
      // for large scores the rounding of s2 itself would give every P a
      // different relative error, and O carries it (the backward's delta = dO . O
      // then amplifies it).  m only stabilizes, so any rounding of it is fine.
      // (a transformed score is already in log2 units: one subtraction)
      const Acc sub = OnlineSoftmax<Acc>::safe_max(m_new);
      pr[r] = !ok ? Acc(0)
                  : V::ELEMENTWISE ? fc_exp2(s2 - sub)
                                                : fc_exp2(fma(s[r], p.scale_log2, -sub));
      sm[r].l_i += pr[r];  // (dropout-free: the LSE has no dropout)
      if constexpr (V::DROPOUT)
        if (!var.dropout_keep(row0 + r, j)) pr[r] = Acc(0);
      alpha_r[r] = alpha;
    }

    // O = alpha * O + P V.  The tile's 32 terms are summed into a partial that is
    // then added to the rescaled running sum: two-level summation, so rounding
    // grows with Sk / 32 + 32 terms instead of Sk (one sequential float32 chain
    // over 2048 keys put 7e-6 into O, which the backward's delta = dO . O then
    // multiplied into dQ).
    Acc part[ROWS][CPL];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int c = 0; c < CPL; ++c) part[r][c] = Acc(0);
#pragma unroll 4
    for (int jj = 0; jj < BLOCK_N; ++jj) {
      Acc pj[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) pj[r] = __shfl_sync(0xffffffffu, pr[r], jj);
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const Acc vv = sV[jj * HDV + lane + 32 * c];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) part[r][c] = fma(pj[r], vv, part[r][c]);
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int c = 0; c < CPL; ++c) acc_o[r][c] = fma(acc_o[r][c], alpha_r[r], part[r][c]);
  }

  // Epilogue: normalize by l, write O and the natural-log LSE.
  T *o_b = q_rows(p.o, bi);
  Acc *lse_b = q_rows(p.lse, bi);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = row0 + r;
    const Acc l = warp_sum(sm[r].l_i) + var.sink_term(sm[r].m_i);
    if (row >= seq_len_q<VF>(bi, p)) continue;
    const Acc inv_l = OnlineSoftmax<Acc>::inv_sum(l) * (V::DROPOUT ? var.drop_rp : Acc(1));
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const int col = lane + 32 * c;
      if (col < p.head_dim_v) o_b[row * p.o.sr + col] = from_acc<T>(acc_o[r][c] * inv_l);
    }
    if (lane == 0) lse_b[row * p.lse.sr] = OnlineSoftmax<Acc>::lse_natural(sm[r].m_i, l);
  }
}
