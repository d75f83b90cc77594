// flashcupy generic family: attention backward (FlashAttention-2's three kernels).
//
//   1. fc_generic_bwd_preprocess  delta_i = rowsum(dO_i * O_i)
//   2. fc_generic_bwd_dkdv        one CTA per key tile: dK, dV accumulated in
//                                 registers over every query tile (and over the
//                                 batch axes that k and v broadcast, "groups")
//   3. fc_generic_bwd_dq          one CTA per query tile: dQ over every key tile
// Both 2 and 3 recompute P = exp(S * scale - LSE) from the saved LSE, so nothing of size Sq x Sk exists.  No atomics: every gradient
// element has exactly one writer, so the results are deterministic.
//
// With dP = dO V^T and dS = P o (dP - delta):
//   dV = P^T dO,  dK = scale * dS^T Q,  dQ = scale * dS K.
#pragma once
#include "../variant.cuh"
#include "../softmax.cuh"
#include "tile.cuh"

// ---------------------------------------------------------------------------
// delta = rowsum(dO o O): one warp per query row.
// ---------------------------------------------------------------------------
template <typename T, typename Acc, int NWARPS>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_generic_bwd_preprocess(FC_PARAMS(BwdParams<T, Acc, T>) p) {
  BatchIndex bi;
  // (sequences by the null pointers of p.seq, at run time: this kernel has no VF)
  if (!seq_init<FC_VF_SEQ>(bi, p)) return;
  const int row = blockIdx.x * NWARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= bi.sq) return;
  const T *o_r = q_rows(p.o, bi) + row * p.o.sr;
  const T *do_r = q_rows(p.dout, bi) + row * p.dout.sr;
  Acc s = Acc(0);
  for (int c = lane; c < p.head_dim_v; c += 32) s = fma(to_acc<Acc>(o_r[c]), to_acc<Acc>(do_r[c]), s);
  s = warp_sum(s);
  if (lane == 0) q_rows(p.delta, bi)[row * p.delta.sr] = s;
}

namespace generic {

template <typename Acc, int HD, int HDV, int NWARPS, int ROWS>
struct DqSmem {
  static constexpr int BLOCK_M = NWARPS * ROWS;
  static constexpr int LDK = HD + TileGeom<Acc>::PAD;   // per-lane rows of K
  static constexpr int LDV = HDV + TileGeom<Acc>::PAD;  // per-lane rows of V
  // (BLOCK_M, HD) Q and (BLOCK_M, HDV) dO rows, broadcast reads;
  // (BLOCK_N, LDK) K and (BLOCK_N, LDV) V, per-lane reads
  static constexpr int Q_OFF = 0;
  static constexpr int DO_OFF = Q_OFF + BLOCK_M * HD;
  static constexpr int K_OFF = DO_OFF + BLOCK_M * HDV;
  static constexpr int V_OFF = K_OFF + BLOCK_N * LDK;
  static constexpr int SIZE = V_OFF + BLOCK_N * LDV;
};

template <typename Acc, int HD, int HDV, int NWARPS, int ROWS>
struct DkdvSmem {
  static constexpr int BLOCK_KEYS = NWARPS * ROWS;  // keys per CTA
  static constexpr int TILE_Q = 32;                 // queries per step, one per lane
  static constexpr int LDQ = HD + TileGeom<Acc>::PAD;
  static constexpr int LDO = HDV + TileGeom<Acc>::PAD;
  // (BLOCK_KEYS, HD) K and (BLOCK_KEYS, HDV) V, broadcast reads;
  // (TILE_Q, LDQ) Q and (TILE_Q, LDO) dO, per-lane reads;
  // (TILE_Q) LSE (natural log) and (TILE_Q) delta
  static constexpr int K_OFF = 0;
  static constexpr int V_OFF = K_OFF + BLOCK_KEYS * HD;
  static constexpr int Q_OFF = V_OFF + BLOCK_KEYS * HDV;
  static constexpr int DO_OFF = Q_OFF + TILE_Q * LDQ;
  static constexpr int LSE_OFF = DO_OFF + TILE_Q * LDO;
  static constexpr int DELTA_OFF = LSE_OFF + TILE_Q;
  static constexpr int SIZE = DELTA_OFF + TILE_Q;
};

}  // namespace generic

// ---------------------------------------------------------------------------
// dQ: the mirror of the forward kernel.  Warp w owns ROWS query rows, lane j
// key j of each 32-key tile; lane owns dQ columns lane, lane+32, ...
// ---------------------------------------------------------------------------
template <typename T, typename Acc, typename TG, int HD, int HDV, int NWARPS, int ROWS, int VF>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_generic_bwd_dq(FC_PARAMS(BwdParams<T, Acc, TG>) p) {
  using namespace generic;
  using L = DqSmem<Acc, HD, HDV, NWARPS, ROWS>;
  constexpr int NTHREADS = NWARPS * 32;
  constexpr int BLOCK_M = L::BLOCK_M;
  constexpr int CPL = HD / 32;  // dQ columns per lane

  extern __shared__ __align__(16) unsigned char fc_smem_raw[];
  Acc *sQ = reinterpret_cast<Acc *>(fc_smem_raw) + L::Q_OFF;
  Acc *sdO = reinterpret_cast<Acc *>(fc_smem_raw) + L::DO_OFF;
  Acc *sK = reinterpret_cast<Acc *>(fc_smem_raw) + L::K_OFF;
  Acc *sV = reinterpret_cast<Acc *>(fc_smem_raw) + L::V_OFF;

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;
  const T *k_b = k_rows(p.k, bi);
  const T *v_b = k_rows(p.v, bi);

  VariantFor<T, Acc, VF> var(p.var, seq_len_q<VF>(bi, p), seq_len_k<VF>(bi, p), p.scale_log2);
  var.bind(p.var, bi);
  const int m_start = blockIdx.x * BLOCK_M;
  if constexpr ((VF & FC_VF_SEQ) != 0)  // (past this sequence's end: the grid covers the longest)
    if (m_start >= seq_len_q<VF>(bi, p)) return;
  const int m_end = fc_min(m_start + BLOCK_M, seq_len_q<VF>(bi, p));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = m_start + warp * ROWS;

  load_tile<T, Acc, BLOCK_M, HD, HD, NTHREADS>(
      sQ, q_rows(p.q, bi) + m_start * p.q.sr, p.q.sr, m_end - m_start, p.head_dim);
  load_tile<T, Acc, BLOCK_M, HDV, HDV, NTHREADS>(
      sdO, q_rows(p.dout, bi) + m_start * p.dout.sr, p.dout.sr, m_end - m_start,
      p.head_dim_v);

  Acc lse_i[ROWS], dlt[ROWS], acc_dq[ROWS][CPL];
  const Acc *lse_b = q_rows(p.lse, bi);
  const Acc *delta_b = q_rows(p.delta, bi);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = row0 + r;
    // Rows past Sq: LSE -inf makes their P exactly 0.
    lse_i[r] = row < seq_len_q<VF>(bi, p) ? lse_b[row * p.lse.sr] : fc_neg_inf<Acc>::value();
    dlt[r] = row < seq_len_q<VF>(bi, p) ? delta_b[row * p.delta.sr] : Acc(0);
#pragma unroll
    for (int c = 0; c < CPL; ++c) acc_dq[r][c] = Acc(0);
  }

  const int n_end = var.key_end(m_end);
  for (int n_start = var.key_begin(m_start) / BLOCK_N * BLOCK_N; n_start < n_end;
       n_start += BLOCK_N) {
    __syncthreads();
    const int n_valid = fc_min(BLOCK_N, seq_len_k<VF>(bi, p) - n_start);
    load_tile<T, Acc, BLOCK_N, HD, L::LDK, NTHREADS>(sK, k_b + n_start * p.k.sr, p.k.sr, n_valid,
                                                     p.head_dim);
    load_tile<T, Acc, BLOCK_N, HDV, L::LDV, NTHREADS>(sV, v_b + n_start * p.v.sr, p.v.sr, n_valid,
                                                      p.head_dim_v);
    __syncthreads();

    Acc s[ROWS], dp[ROWS], ds[ROWS];
    dot_rows<Acc, HD, ROWS>(s, sQ + warp * ROWS * HD, HD, sK + lane * L::LDK);
    dot_rows<Acc, HDV, ROWS>(dp, sdO + warp * ROWS * HDV, HDV, sV + lane * L::LDV);
    const int j = n_start + lane;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int i = row0 + r;
      const Acc pr = var.visible(i, j) ? var.prob_from_lse(s[r], p.scale, lse_i[r], i, j) : Acc(0);
      Acc dpr = dp[r];  // dropout: dP o Z / (1 - p)
      if constexpr (decltype(var)::DROPOUT) dpr = var.dropout_keep(i, j) ? dpr * var.drop_rp : Acc(0);
      ds[r] = pr * (dpr - dlt[r]) * var.dcap_from_raw(s[r]);  // softcap: times 1 - tanh^2
    }
    // dQ += dS K.  The tile's 32 terms are summed into a partial first and the
    // partial is added to the running sum: two-level summation, so the rounding
    // error grows with Sk / 32 + 32 terms rather than with Sk (a 2048-key row
    // summed in one sequential float32 chain lost 10x more than cuBLAS).
    Acc part[ROWS][CPL];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int c = 0; c < CPL; ++c) part[r][c] = Acc(0);
#pragma unroll 4
    for (int jj = 0; jj < BLOCK_N; ++jj) {
      Acc dsj[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) dsj[r] = __shfl_sync(0xffffffffu, ds[r], jj);
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const Acc kv = sK[jj * L::LDK + lane + 32 * c];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) part[r][c] = fma(dsj[r], kv, part[r][c]);
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int c = 0; c < CPL; ++c) acc_dq[r][c] += part[r][c];
  }

  TG *dq_b = q_rows(p.dq, bi);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = row0 + r;
    if (row >= seq_len_q<VF>(bi, p)) continue;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const int col = lane + 32 * c;
      if (col < p.head_dim) dq_b[row * p.dq.sr + col] = from_acc<TG>(acc_dq[r][c] * p.scale);
    }
  }
}

// ---------------------------------------------------------------------------
// dK, dV.  Warp w owns ROWS keys of the CTA's key tile; lane i is query i of
// each 32-query step; lane owns dK/dV columns lane, lane+32, ...
// The loop runs over p.n_group broadcast "groups" (e.g. the query heads that share
// one KV head in GQA) and, inside each, over the query tiles that can see the
// key tile, so dK and dV are complete sums when they are written.
// ---------------------------------------------------------------------------
template <typename T, typename Acc, typename TG, int HD, int HDV, int NWARPS, int ROWS, int VF>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_generic_bwd_dkdv(FC_PARAMS(BwdParams<T, Acc, TG>) p) {
  using namespace generic;
  using L = DkdvSmem<Acc, HD, HDV, NWARPS, ROWS>;
  constexpr int NTHREADS = NWARPS * 32;
  constexpr int BLOCK_KEYS = L::BLOCK_KEYS;
  constexpr int TILE_Q = L::TILE_Q;
  constexpr int CPLK = HD / 32, CPLV = HDV / 32;

  extern __shared__ __align__(16) unsigned char fc_smem_raw[];
  Acc *sK = reinterpret_cast<Acc *>(fc_smem_raw) + L::K_OFF;
  Acc *sV = reinterpret_cast<Acc *>(fc_smem_raw) + L::V_OFF;
  Acc *sQ = reinterpret_cast<Acc *>(fc_smem_raw) + L::Q_OFF;
  Acc *sdO = reinterpret_cast<Acc *>(fc_smem_raw) + L::DO_OFF;
  Acc *sLse = reinterpret_cast<Acc *>(fc_smem_raw) + L::LSE_OFF;
  Acc *sDelta = reinterpret_cast<Acc *>(fc_smem_raw) + L::DELTA_OFF;

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;

  VariantFor<T, Acc, VF> var(p.var, seq_len_q<VF>(bi, p), seq_len_k<VF>(bi, p), p.scale_log2);
  const int n_start = blockIdx.x * BLOCK_KEYS;
  if constexpr ((VF & FC_VF_SEQ) != 0)  // (past this sequence's end: the grid covers the longest)
    if (n_start >= seq_len_k<VF>(bi, p)) return;
  const int n_valid = fc_min(BLOCK_KEYS, seq_len_k<VF>(bi, p) - n_start);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key0 = n_start + warp * ROWS;  // first key of this warp

  // K and V rows stay in shared memory for the whole loop.
  load_tile<T, Acc, BLOCK_KEYS, HD, HD, NTHREADS>(
      sK, k_rows(p.k, bi) + n_start * p.k.sr, p.k.sr, n_valid, p.head_dim);
  load_tile<T, Acc, BLOCK_KEYS, HDV, HDV, NTHREADS>(
      sV, k_rows(p.v, bi) + n_start * p.v.sr, p.v.sr, n_valid, p.head_dim_v);

  Acc acc_dk[ROWS][CPLK], acc_dv[ROWS][CPLV];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int c = 0; c < CPLK; ++c) acc_dk[r][c] = Acc(0);
#pragma unroll
    for (int c = 0; c < CPLV; ++c) acc_dv[r][c] = Acc(0);
  }

  // window / causal: only the query tiles that see a key of this tile
  const int m_begin = (var.query_begin(n_start) / TILE_Q) * TILE_Q;
  const int m_stop = var.query_end(n_start + BLOCK_KEYS);
  for (int g = 0; g < p.n_group; ++g) {
    var.bind(p.var, bi, g);  // ALiBi: the group's query head has its own slope
    const T *q_b = q_rows(p.q, bi) + g * p.q_sg;
    const T *do_b = q_rows(p.dout, bi) + g * p.dout_sg;
    const Acc *lse_b = q_rows(p.lse, bi) + g * p.lse_sg;
    const Acc *delta_b = q_rows(p.delta, bi) + g * p.delta_sg;
    for (int m_start = m_begin; m_start < m_stop; m_start += TILE_Q) {
      __syncthreads();
      const int m_valid = fc_min(TILE_Q, seq_len_q<VF>(bi, p) - m_start);
      load_tile<T, Acc, TILE_Q, HD, L::LDQ, NTHREADS>(sQ, q_b + m_start * p.q.sr, p.q.sr, m_valid,
                                                      p.head_dim);
      load_tile<T, Acc, TILE_Q, HDV, L::LDO, NTHREADS>(sdO, do_b + m_start * p.dout.sr, p.dout.sr,
                                                       m_valid, p.head_dim_v);
      load_rowvec<Acc, TILE_Q, NTHREADS>(sLse, lse_b + m_start * p.lse.sr, p.lse.sr, m_valid,
                                         Acc(1), fc_neg_inf<Acc>::value());
      load_rowvec<Acc, TILE_Q, NTHREADS>(sDelta, delta_b + m_start * p.delta.sr, p.delta.sr, m_valid,
                                         Acc(1), Acc(0));
      __syncthreads();

      const int i = m_start + lane;  // this lane's query
      Acc s[ROWS], dp[ROWS], pr[ROWS], ds[ROWS];
      dot_rows<Acc, HD, ROWS>(s, sK + warp * ROWS * HD, HD, sQ + lane * L::LDQ);
      dot_rows<Acc, HDV, ROWS>(dp, sV + warp * ROWS * HDV, HDV, sdO + lane * L::LDO);
      const Acc lse_i = sLse[lane], delta_i = sDelta[lane];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int j = key0 + r;
        pr[r] = (i < seq_len_q<VF>(bi, p) && var.visible(i, j)) ? var.prob_from_lse(s[r], p.scale, lse_i, i, j)
                                                     : Acc(0);
        Acc dpr = dp[r];
        if constexpr (decltype(var)::DROPOUT) {
          // dS = P o (dP o Z / (1 - p) - delta);  dV multiplies P o Z / (1 - p)
          const bool kept = var.dropout_keep(i, j);
          dpr = kept ? dpr * var.drop_rp : Acc(0);
          ds[r] = pr[r] * (dpr - delta_i);
          pr[r] = kept ? pr[r] * var.drop_rp : Acc(0);
        } else {
          ds[r] = pr[r] * (dpr - delta_i);
        }
        var.dbias_add(i, j, ds[r]);  // (with FC_VF_DBIAS: this kernel owns each pair once)
        ds[r] *= var.dcap_from_raw(s[r]);
      }
      // dV += P^T dO, dK += dS^T Q (scale applied once at the end), summed in
      // two levels like dQ: per 32-query step, then into the running sums.
      Acc part_dk[ROWS][CPLK], part_dv[ROWS][CPLV];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int c = 0; c < CPLK; ++c) part_dk[r][c] = Acc(0);
#pragma unroll
        for (int c = 0; c < CPLV; ++c) part_dv[r][c] = Acc(0);
      }
#pragma unroll 4
      for (int ii = 0; ii < TILE_Q; ++ii) {
        Acc pi[ROWS], dsi[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          pi[r] = __shfl_sync(0xffffffffu, pr[r], ii);
          dsi[r] = __shfl_sync(0xffffffffu, ds[r], ii);
        }
#pragma unroll
        for (int c = 0; c < CPLV; ++c) {
          const Acc x = sdO[ii * L::LDO + lane + 32 * c];
#pragma unroll
          for (int r = 0; r < ROWS; ++r) part_dv[r][c] = fma(pi[r], x, part_dv[r][c]);
        }
#pragma unroll
        for (int c = 0; c < CPLK; ++c) {
          const Acc x = sQ[ii * L::LDQ + lane + 32 * c];
#pragma unroll
          for (int r = 0; r < ROWS; ++r) part_dk[r][c] = fma(dsi[r], x, part_dk[r][c]);
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int c = 0; c < CPLK; ++c) acc_dk[r][c] += part_dk[r][c];
#pragma unroll
        for (int c = 0; c < CPLV; ++c) acc_dv[r][c] += part_dv[r][c];
      }
    }
  }

  TG *dk_b = k_rows(p.dk, bi);
  TG *dv_b = k_rows(p.dv, bi);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int key = key0 + r;
    if (key >= seq_len_k<VF>(bi, p)) continue;
#pragma unroll
    for (int c = 0; c < CPLK; ++c) {
      const int col = lane + 32 * c;
      if (col < p.head_dim) dk_b[key * p.dk.sr + col] = from_acc<TG>(acc_dk[r][c] * p.scale);
    }
#pragma unroll
    for (int c = 0; c < CPLV; ++c) {
      const int col = lane + 32 * c;
      if (col < p.head_dim_v) dv_b[key * p.dv.sr + col] = from_acc<TG>(acc_dv[r][c]);
    }
  }
}
