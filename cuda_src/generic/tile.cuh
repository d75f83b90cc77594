// flashcupy generic family: shared-memory tile helpers.
//
// The generic family computes with plain FMA in the accumulator type Acc
// (float for 16/32-bit inputs, double for float64), so tiles are widened to
// Acc once, on their way into shared memory.  Two layouts are used:
//   * "broadcast" rows, read by all 32 lanes at the same address (no padding);
//   * "per-lane" rows, where lane j reads row j: padded by 16 bytes so that
//     16-byte reads of 8 consecutive lanes cover all 32 banks.
#pragma once
#include "../common.cuh"
#include "../params.cuh"
#include "../seq.cuh"

namespace generic {

constexpr int BLOCK_N = 32;  // keys per tile in the row-owning kernels: one key per lane

// 16 bytes of Acc: the unit of shared-memory reads in the dot products.
template <typename Acc>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(Acc);
  Acc v[N];
};

template <typename Acc>
struct TileGeom {
  static constexpr int VEC = 16 / sizeof(Acc);  // Acc per 16-byte read
  static constexpr int PAD = VEC;               // per-lane row padding (16 bytes)
};

// Copies rows [0, TILE_ROWS) of a row source (rows.cuh: a strided view or
// paged K / V) into a shared tile of TILE_ROWS x LD Acc, widening to Acc.
// Elements past `nrows_valid` or `cols_valid` are written as 0: padded
// head-dim columns then add nothing to a dot product, and padded key rows of V
// contribute 0 * 0 (never 0 * NaN from uninitialized memory).
template <typename T, typename Acc, int TILE_ROWS, int COLS, int LD, int NTHREADS, typename Rows>
__device__ __forceinline__ void load_rows(Acc *__restrict__ smem, const Rows &src, int nrows_valid,
                                          int cols_valid) {
#pragma unroll 4
  for (int idx = threadIdx.x; idx < TILE_ROWS * COLS; idx += NTHREADS) {
    const int r = idx / COLS;  // COLS is a power of two: a shift
    const int c = idx % COLS;
    Acc x = Acc(0);
    if (r < nrows_valid && c < cols_valid) x = to_acc<Acc>(src.row(r)[c]);
    smem[r * LD + c] = x;
  }
}

// load_rows of a row-major view (the dense operands).
template <typename T, typename Acc, int TILE_ROWS, int COLS, int LD, int NTHREADS>
__device__ __forceinline__ void load_tile(Acc *__restrict__ smem, const T *__restrict__ gmem,
                                          fc_index_t row_stride, int nrows_valid,
                                          int cols_valid) {
  load_rows<T, Acc, TILE_ROWS, COLS, LD, NTHREADS>(smem, StridedRows<T>{gmem, row_stride},
                                                   nrows_valid, cols_valid);
}

// Loads a vector of TILE_ROWS per-row scalars (LSE or delta), widening to Acc
// and scaling by `mul`.  Rows past `nvalid` get `fill`.
template <typename Acc, int TILE_ROWS, int NTHREADS>
__device__ __forceinline__ void load_rowvec(Acc *__restrict__ smem, const Acc *__restrict__ gmem,
                                            fc_index_t stride, int nvalid, Acc mul, Acc fill) {
  for (int r = threadIdx.x; r < TILE_ROWS; r += NTHREADS)
    smem[r] = r < nvalid ? gmem[r * stride] * mul : fill;
}

// Dot product of two shared rows of length HD (a multiple of the pack width).
template <typename Acc, int HD>
__device__ __forceinline__ Acc dot_row(const Acc *__restrict__ a, const Acc *__restrict__ b) {
  using P = Pack<Acc>;
  Acc s = Acc(0);
#pragma unroll
  for (int d = 0; d < HD; d += P::N) {
    const P x = *reinterpret_cast<const P *>(a + d);
    const P y = *reinterpret_cast<const P *>(b + d);
#pragma unroll
    for (int e = 0; e < P::N; ++e) s = fma(x.v[e], y.v[e], s);
  }
  return s;
}

// ROWS dot products sharing one operand: out[r] = a_r . b, where the a_r are
// broadcast rows (same address for the whole warp) and b is this lane's row.
// Reading b once per pack and reusing it ROWS times is what keeps the FMA
// kernels from being bound by shared-memory bandwidth.
template <typename Acc, int HD, int ROWS>
__device__ __forceinline__ void dot_rows(Acc (&out)[ROWS], const Acc *__restrict__ a, int lda,
                                         const Acc *__restrict__ b) {
  using P = Pack<Acc>;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) out[r] = Acc(0);
#pragma unroll
  for (int d = 0; d < HD; d += P::N) {
    const P y = *reinterpret_cast<const P *>(b + d);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const P x = *reinterpret_cast<const P *>(a + r * lda + d);
#pragma unroll
      for (int e = 0; e < P::N; ++e) out[r] = fma(x.v[e], y.v[e], out[r]);
    }
  }
}

}  // namespace generic
