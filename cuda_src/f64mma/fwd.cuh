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
// Shared memory: Q (BLOCK_M x HD), K (32 x HD), V (32 x HDV), each row padded by
// PAD = 4 doubles (32 bytes).  With that pitch the 32 lanes of every fragment
// load (8 rows x 4 columns for Q and K; 4 rows x 8 columns for V) touch each
// bank exactly twice: 256 bytes in two wavefronts, the minimum.
//
// Loads are 8-byte cp.async (any stride of a float64 array is 8-byte aligned;
// zero fill past the valid rows and columns).  One buffer each for K and V,
// refilled as soon as it is free: K(n + 1) lands during the softmax and P V of
// tile n, V(n + 1) during the Q K^T of tile n + 1.
#pragma once
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the f64mma family needs the double-precision tensor cores of sm_80 or newer"
#endif
#include "../variant.cuh"
#include "../softmax.cuh"
#include "../seq.cuh"

namespace f64mma {

constexpr int BLOCK_N = 32;  // keys per tile: 4 n8 fragments of S
constexpr int PAD = 4;       // doubles of row padding (the bank analysis above)

template <int HD, int HDV, int NWARPS, int MT>
struct FwdSmem {
  static constexpr int BLOCK_M = NWARPS * MT * 8;
  static constexpr int LDQ = HD + PAD, LDK = HD + PAD, LDV = HDV + PAD;
  static constexpr int Q_OFF = 0;
  static constexpr int K_OFF = Q_OFF + BLOCK_M * LDQ;
  static constexpr int V_OFF = K_OFF + BLOCK_N * LDK;
  static constexpr int SIZE = V_OFF + BLOCK_N * LDV;  // doubles
};

// D += A B for one m8n8k4 fragment (A, B: this lane's one element each).
__device__ __forceinline__ void dmma(double (&d)[2], double a, double b) {
  asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};"
      : "+d"(d[0]), "+d"(d[1])
      : "d"(a), "d"(b));
}

// The same for two m8 fragments stacked on M (rows g and g + 8) that share B.
// sm_90 has it as one instruction, m16n8k4, whose fragments are exactly the
// two m8n8k4 ones (a0 = A[g][t], a1 = A[g + 8][t]; c0, c1 row g, c2, c3 row
// g + 8): it issues at twice the flops of m8n8k4 per cycle of the DP tensor
// pipe (m8n8k4 held that pipe 65 % busy at 21.8 TFLOP/s, NOTES.md 16.1, about
// half the H200's float64 tensor peak).
__device__ __forceinline__ void dmma_pair(double (&d0)[2], double (&d1)[2], double a0, double a1,
                                          double b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm("mma.sync.aligned.m16n8k4.row.col.f64.f64.f64.f64 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
      "{%0, %1, %2, %3};"
      : "+d"(d0[0]), "+d"(d0[1]), "+d"(d1[0]), "+d"(d1[1])
      : "d"(a0), "d"(a1), "d"(b));
#else
  dmma(d0, a0, b);
  dmma(d1, a1, b);
#endif
}

// D[mt] += A[mt] B for the MT fragments of a warp: pairs on m16n8k4.
template <int MT>
__device__ __forceinline__ void dmma_rows(double (&d)[MT][2], const double (&a)[MT], double b) {
#pragma unroll
  for (int mt = 0; mt + 1 < MT; mt += 2) dmma_pair(d[mt], d[mt + 1], a[mt], a[mt + 1], b);
  if constexpr (MT % 2 == 1) dmma(d[MT - 1], a[MT - 1], b);
}

__device__ __forceinline__ void cp_async_8(unsigned dst, const void *src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Rows [0, ROWS) x columns [0, COLS) of a row source (rows.cuh: strided or
// paged) into a shared tile of pitch LD; zeros past nrows_valid / cols_valid,
// so padded head-dim columns add nothing to a dot product and padded key rows
// of V contribute 0 * 0 (never 0 * NaN from uninitialized memory).
template <int ROWS, int COLS, int LD, int NTHREADS, typename Rows>
__device__ __forceinline__ void load_rows_async(double *smem, const Rows &src, int nrows_valid,
                                                int cols_valid) {
  const unsigned base = (unsigned)__cvta_generic_to_shared(smem);
#pragma unroll 4
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += NTHREADS) {
    const int r = idx / COLS, c = idx % COLS;  // COLS is a power of two: shifts
    const bool ok = r < nrows_valid && c < cols_valid;
    cp_async_8(base + 8u * (unsigned)(r * LD + c),
               ok ? static_cast<const void *>(src.row(r) + c) : static_cast<const void *>(src.any()),
               ok ? 8 : 0);
  }
}

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
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    sm[mt].init(var.init_max());
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) acc_o[dt][mt][0] = acc_o[dt][mt][1] = 0.0;
  }

  for (int n_start = n_begin; n_start < n_end; n_start += BLOCK_N) {
    const bool more = n_start + BLOCK_N < n_end;
    cp_async_wait<1>();  // Q and K(n) have landed (V(n) may not have)
    __syncthreads();

    // S = Q K^T (raw scores)
    double s[NT][MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[nt][mt][0] = s[nt][mt][1] = 0.0;
#pragma unroll
    for (int kk = 0; kk < HD; kk += 4) {
      double a[MT], b[NT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) a[mt] = sQ[(wrow + mt * 8 + g) * L::LDQ + kk + t];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) b[nt] = sK[(nt * 8 + g) * L::LDK + kk + t];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) dmma_rows<MT>(s[nt], a, b[nt]);
    }
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
    // O += P V, key 2t + e of each 8-key block from both operands
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const double *vrow = sV + (nt * 8 + 2 * t + e) * L::LDV + g;
        double pa[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) pa[mt] = s[nt][mt][e];
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) dmma_rows<MT>(acc_o[dt], pa, vrow[dt * 8]);
      }
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
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = dt * 8 + 2 * t + e;
        if (col < p.head_dim_v) o_b[(fc_index_t)row * p.o.sr + col] = acc_o[dt][mt][e] * inv_l;
      }
    if (t == 0) lse_b[(fc_index_t)row * p.lse.sr] = OnlineSoftmax<double>::lse_natural(sm[mt].m_i, l);
  }
}
