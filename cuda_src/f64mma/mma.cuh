// flashcupy f64mma family: the float64 MMA and copy helpers of its kernels.
//
//   * dmma / dmma_pair / dmma_rows   m8n8k4 f64 fragments; on sm_90 two that
//                                    share B issue as one m16n8k4
//   * mma_abt, mma_pb                the two products of every kernel: A B^T of
//                                    two row-major tiles (S = Q K^T, dP = dO V^T
//                                    and their transposes), and P B with P in
//                                    the accumulator layout (O += P V, dQ += dS K,
//                                    dV += P^T dO, dK += dS^T Q)
//   * cp_async_8, load_rows_async    8-byte cp.async into padded shared tiles
//                                    (any float64 stride is 8-byte aligned),
//                                    zero fill past the valid rows / columns
//
// Every shared tile is row-major with a pitch of its width + PAD doubles: the
// 32 lanes of a fragment load (8 rows x 4 columns, or 4 rows x 8 columns) then
// touch each bank exactly twice, 256 bytes in two wavefronts (the minimum).
#pragma once
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the f64mma family needs the double-precision tensor cores of sm_80 or newer"
#endif
#include "../common.cuh"

namespace f64mma {

constexpr int BLOCK_N = 32;  // keys (queries, in dK/dV) per tile: 4 n8 fragments
constexpr int PAD = 4;       // doubles of row padding (above)

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

// acc[nt][mt] += A B^T, reducing over K columns: A's rows 8 mt + g of sA (the
// warp's rows; pitch lda), B's rows 8 nt + g of sB (pitch ldb).  Step kk takes
// column kk + t of both.  acc holds C's layout: lane (g, t) has rows 8 mt + g,
// columns 8 nt + 2t + e.
template <int MT, int NT, int K>
__device__ __forceinline__ void mma_abt(double (&acc)[NT][MT][2], const double *sA, int lda,
                                        const double *sB, int ldb) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int kk = 0; kk < K; kk += 4) {
    double a[MT], b[NT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) a[mt] = sA[(mt * 8 + g) * lda + kk + t];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) b[nt] = sB[(nt * 8 + g) * ldb + kk + t];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) dmma_rows<MT>(acc[nt], a, b[nt]);
  }
}

// acc[dt][mt] += P B: P in mma_abt's accumulator layout, reducing over its
// columns; B's rows are those columns of sB (pitch ldb), its columns 8 dt + g.
// A wants column t of a k4 step and the lane holds columns 2t, 2t + 1 of each
// 8-column block: step e of block nt takes column 8 nt + 2t + e from both
// operands.  The sum does not depend on the order of its terms: no shuffles.
template <int MT, int NT, int DT>
__device__ __forceinline__ void mma_pb(double (&acc)[DT][MT][2], const double (&p)[NT][MT][2],
                                       const double *sB, int ldb) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const double *brow = sB + (nt * 8 + 2 * t + e) * ldb + g;
      double pa[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) pa[mt] = p[nt][mt][e];
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) dmma_rows<MT>(acc[dt], pa, brow[dt * 8]);
    }
}

template <int NT, int MT>
__device__ __forceinline__ void zero_frags(double (&x)[NT][MT][2]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) x[i][mt][0] = x[i][mt][1] = 0.0;
}

// Row 8 mt + g of an accumulator in mma_pb's layout (acc[dt][mt]: columns
// 8 dt + 2t + e of this lane), times mul, into dst_row[0, cols): the epilogues.
template <typename TO, int DT, int MT>
__device__ __forceinline__ void store_row(TO *dst_row, const double (&acc)[DT][MT][2], int mt,
                                          int cols, double mul) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = dt * 8 + 2 * t + e;
      if (col < cols) dst_row[col] = acc[dt][mt][e] * mul;
    }
}

}  // namespace f64mma
