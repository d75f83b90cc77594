// flashcupy sm80 family: tensor-core building blocks (sm_80+, inline PTX).
//
// Everything a kernel of this family composes:
//   * Mma<T>::mma      one mma.sync.m16n8k16.row.col, fp32 accumulators
//   * Mma<T>::pack     two fp32 -> one f16x2 / bf16x2 register (cvt.rn)
//   * ldsm_x4(_t)      ldmatrix x4 (and .trans) from shared memory
//   * cp_async_16      16-byte cp.async.cg with zero fill (src-size 0 past the end)
//   * load_rows        a (ROWS, COLS) tile of a row source (rows.cuh: strided or
//                      paged) -> padded shared tile, async when 16-byte aligned,
//                      element-wise otherwise (odd head_dim / strides); load_tile
//                      for a strided view
//   * store_tile       the reverse, for epilogues staged through shared memory
//
// Shared-memory layout of every 16-bit tile: row-major, row pitch COLS + PAD
// elements (PAD = 8, 16 bytes).  ldmatrix reads 8 rows x 16 bytes per matrix;
// with the 16-byte skew the 8 rows start in 8 different 16-byte bank groups,
// so every ldmatrix (plain or .trans) and every 16-byte cp.async store is
// bank-conflict free.  (An XOR swizzle gives the same with no padding; the pad
// costs 6% of shared memory and keeps addressing a single multiply-add.)
//
// Fragment layouts (PTX ISA, mma.m16n8k16, lane = 4 * g + c):
//   A (16x16, row):  a0 (g, 2c..2c+1)  a1 (g+8, 2c..)  a2 (g, 2c+8..)  a3 (g+8, 2c+8..)
//   B (16x8, col):   b0 (k 2c..2c+1, n g)  b1 (k 2c+8.., n g)
//   C (16x8):        c0,c1 (g, 2c..2c+1)  c2,c3 (g+8, 2c..2c+1)
// Hence the C fragments of two adjacent n8 tiles of one product are exactly the
// A fragment of the next product's k16 step (P -> P V, dS -> dS K): `pack_a`.
#pragma once
#include "../common.cuh"
#include "../params.cuh"
#include "../seq.cuh"

namespace sm80 {

typedef unsigned int u32;

constexpr int PAD = 8;  // shared-memory row skew, elements (16 bytes)

__device__ __forceinline__ u32 smem_u32(const void *p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

template <typename T>
struct Mma;
template <>
struct Mma<fc_half> {
  static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // lo goes to the low 16 bits (the lower column index)
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  // the same, negative values as 0 (dropout's encoded P, variant.cuh)
  static __device__ __forceinline__ u32 pack_relu(float lo, float hi) {
    u32 r;
    asm("cvt.rn.relu.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};
template <>
struct Mma<fc_bf16> {
  static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  // the same, negative values as 0 (dropout's encoded P, variant.cuh)
  static __device__ __forceinline__ u32 pack_relu(float lo, float hi) {
    u32 r;
    asm("cvt.rn.relu.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};

// The A fragment of k16 step j from the fp32 C fragments of n8 tiles 2j, 2j+1.
template <typename T>
__device__ __forceinline__ void pack_a(u32 (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = Mma<T>::pack(c0[0], c0[1]);
  a[1] = Mma<T>::pack(c0[2], c0[3]);
  a[2] = Mma<T>::pack(c1[0], c1[1]);
  a[3] = Mma<T>::pack(c1[2], c1[3]);
}

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Per-lane element offsets (row * LD + col) of the three ldmatrix.x4 patterns,
// relative to the top-left corner of a 16x16 block of a padded tile:
//   lane_a    A operand (rows = M, cols = K), plain:   matrices (r0-7,k0-7) (r8-15,k0-7) (r0-7,k8-15) (r8-15,k8-15)
//   lane_bn   B operand of two n8 tiles stored (n, k) [K^T-like], plain:
//             r0,r1 = b0,b1 of n-tile 0; r2,r3 = of n-tile 1
//   lane_bk   B operand of two n8 tiles stored (k, n) [V-like], .trans: same register order
//   lane_at   A operand stored transposed (k rows, m cols), .trans
template <int LD>
__device__ __forceinline__ int lane_a(int lane) { return (lane & 15) * LD + (lane >> 4) * 8; }
template <int LD>
__device__ __forceinline__ int lane_bn(int lane) {
  return ((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8;
}
template <int LD>
__device__ __forceinline__ int lane_bk(int lane) {
  return ((lane & 7) + (((lane >> 3) & 1) << 3)) * LD + (lane >> 4) * 8;
}
template <int LD>
__device__ __forceinline__ int lane_at(int lane) {
  return ((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8;
}

// exp2 on the MUFU unit; ex2(-inf) = +0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float shfl_xor(float x, int m) {
  return __shfl_xor_sync(0xffffffffu, x, m);
}

__device__ __forceinline__ void red_add(float *p, float v) {
  asm volatile("red.global.add.f32 [%0], %1;" ::"l"(p), "f"(v) : "memory");
}
// p[0] += a, p[1] += b (p 8-byte aligned): one vector reduction on sm_90+
// (PTX "red with vector types"), two scalar ones before.
__device__ __forceinline__ void red_add2(float *p, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  red_add(p, a);
  red_add(p + 1, b);
#endif
}

// p[0..3] += a, b, c, d (p 16-byte aligned): one vector reduction on sm_90+.
__device__ __forceinline__ void red_add4(float *p, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c),
               "f"(d)
               : "memory");
#else
  red_add(p, a);
  red_add(p + 1, b);
  red_add(p + 2, c);
  red_add(p + 3, d);
#endif
}

// Bulk (TMA-engine) reduction of `bytes` contiguous bytes of float32 from shared
// to global memory, sm_90+: global[i] += shared[i], asynchronous, no registers.
// The shared data must be made visible to the async proxy first
// (fence_proxy_async by every writing thread, then a barrier).
__device__ __forceinline__ void fence_proxy_async() {
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_reduce_add_f32(float *gdst, u32 ssrc, u32 bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
      "cp.async.bulk.commit_group;" ::"l"(gdst), "r"(ssrc), "r"(bytes)
      : "memory");
#endif
}
// Until every committed bulk operation has read its shared source (READ) or completed.
template <bool READ>
__device__ __forceinline__ void bulk_wait_all() {
#if __CUDA_ARCH__ >= 900
  if constexpr (READ) {
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  } else {
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
#endif
}

// ---------------------------------------------------------------------------
// cp.async
// ---------------------------------------------------------------------------
__device__ __forceinline__ void cp_async_16(u32 dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
// 4 bytes (per-row LSE / delta); src-size 0 zero-fills.
__device__ __forceinline__ void cp_async_4(u32 dst, const void *src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void st_shared_b32(u32 addr, u32 v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}

// The swizzled tile layout (the 2-D dK/dV loop): the tile is cut into panels
// of 64 columns (128 bytes per row, no pad), panel after panel; in each panel
// 16-byte chunk c of row r is stored at chunk c ^ (r & 7).  A row's 8 chunks of
// a panel stay in one 128-byte line, so a cp.async fill of 8 consecutive chunks
// writes one line (the padded layout straddles two for 7 rows in 8: 2.6x the
// ideal shared-memory wavefronts of LDGSTS, NOTES.md section 7), and the 8 rows
// an ldmatrix reads put one logical chunk in 8 different bank groups.  It is
// also exactly wgmma's K-major 128-byte-swizzled layout (wgmma.cuh), one
// panel per 64 columns of K.
__device__ __forceinline__ int swz_chunk(int c, int r) { return c ^ (r & 7); }
// Byte offset of 16-byte chunk c (of the whole row) of row r, tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ int swz_off(int r, int c) {
  return (c >> 3) * (ROWS * 128) + r * 128 + 16 * swz_chunk(c & 7, r);
}

// (ROWS, COLS) tile of a row source (rows.cuh: a strided view or paged K / V)
// -> shared tile of pitch COLS + PAD.  Rows >= rows_valid and columns >=
// cols_valid become 0 (src-size 0 zero fill), so padded key rows never bring
// 0 * NaN from stale shared memory.  The async path (16-byte aligned rows)
// issues cp.async only (the caller commits); the element-wise path (e.g.
// head_dim 59) stores synchronously (visible after the caller's __syncthreads).
//
// Async path: thread t owns the 16-byte column chunk t % CPR of rows
// t / CPR + i * RSTEP, so its whole share is one cursor: a 64-bit pointer
// advanced by constant steps for a strided view.  (Recomputing row, chunk and
// a 64-bit offset per chunk cost ~15 integer instructions per cp.async; in the
// dK/dV loop that was a third of all instructions issued.)  A full tile (the
// common case) skips the per-chunk predicates behind one uniform branch.
//
// SWZ = true: the swizzled layout instead (see swz_off): 64-column panels, no pad.
template <typename T, int ROWS, int COLS, int NTHREADS, bool SWZ = false, typename Rows>
__device__ __forceinline__ void load_rows(T *smem, const Rows &src, int rows_valid,
                                          int cols_valid) {
  constexpr int CPR = COLS / 8;  // 16-byte chunks per row
  constexpr int LD = SWZ ? COLS : COLS + PAD;
  constexpr int TOTAL = ROWS * CPR;
  constexpr int ITERS = (TOTAL + NTHREADS - 1) / NTHREADS;
  static_assert(NTHREADS % CPR == 0, "a thread keeps one column chunk");
  constexpr int RSTEP = NTHREADS / CPR;  // rows between a thread's chunks
  static_assert(!SWZ || (RSTEP % 8 == 0 && CPR % 8 == 0), "swizzle: a thread keeps row & 7");
  const u32 s0 = smem_u32(smem);
  if (src.vec16(cols_valid)) {
    const int r0 = threadIdx.x / CPR, c8 = (threadIdx.x % CPR) * 8;
    auto cur = src.template cursor<ITERS, RSTEP>(r0, c8, fc_min(rows_valid, ROWS));
    // (swizzled: a thread's rows step by RSTEP, a multiple of 8, so row & 7 and the
    // chunk's place stay fixed and its rows are RSTEP * 128 bytes apart)
    const u32 dst = s0 + (SWZ ? swz_off<ROWS>(r0, c8 / 8) : 2 * (r0 * LD + c8));
    constexpr int DST_STEP = SWZ ? RSTEP * 128 : 2 * RSTEP * LD;  // bytes
    if (rows_valid >= ROWS && cols_valid >= COLS) {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        if (TOTAL % NTHREADS == 0 || r0 + it * RSTEP < ROWS)
          cp_async_16(dst + it * DST_STEP, cur.at(it), 16);
        cur.next();
      }
    } else {
      const bool col_ok = c8 < cols_valid;
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int r = r0 + it * RSTEP;
        if (TOTAL % NTHREADS == 0 || r < ROWS) {
          const bool ok = col_ok && r < rows_valid;
          cp_async_16(dst + it * DST_STEP, ok ? cur.at(it) : src.any(), ok ? 16 : 0);
        }
        cur.next();
      }
    }
  } else {
#pragma unroll 1
    for (int it = 0; it < ITERS; ++it) {
      const int idx = threadIdx.x + it * NTHREADS;
      if (idx < TOTAL) {
        const int r = idx / CPR, c = idx % CPR;
        u32 w[4] = {0u, 0u, 0u, 0u};
        if (r < rows_valid) {
          const unsigned short *g16 = reinterpret_cast<const unsigned short *>(src.row(r));
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int col = c * 8 + e;
            if (col < cols_valid) w[e / 2] |= (u32)g16[col] << (16 * (e & 1));
          }
        }
        asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};"
                     ::"r"(s0 + (SWZ ? swz_off<ROWS>(r, c) : 2 * (r * LD + 8 * c))),
                     "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                     : "memory");
      }
    }
  }
}

// load_rows of a row-major view (the dense operands).
template <typename T, int ROWS, int COLS, int NTHREADS, bool SWZ = false>
__device__ __forceinline__ void load_tile(T *smem, const T *gmem, fc_index_t row_stride,
                                          int rows_valid, int cols_valid) {
  load_rows<T, ROWS, COLS, NTHREADS, SWZ>(smem, StridedRows<T>{gmem, row_stride}, rows_valid,
                                          cols_valid);
}

// Shared tile of pitch COLS + PAD -> rows [0, rows_valid), columns [0, cols_valid)
// of a row-major global view (16-byte stores when aligned, else element-wise).
template <typename T, int ROWS, int COLS, int NTHREADS>
__device__ __forceinline__ void store_tile(T *gmem, fc_index_t row_stride, const T *smem,
                                           int rows_valid, int cols_valid) {
  constexpr int CPR = COLS / 8;
  constexpr int LD = COLS + PAD;
  constexpr int TOTAL = ROWS * CPR;
  constexpr int ITERS = (TOTAL + NTHREADS - 1) / NTHREADS;
  const u32 s0 = smem_u32(smem);
  const bool vec = StridedRows<T>{gmem, row_stride}.vec16(cols_valid);
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int idx = threadIdx.x + it * NTHREADS;
    if (TOTAL % NTHREADS == 0 || idx < TOTAL) {
      const int r = idx / CPR, c = idx % CPR;
      if (r < rows_valid && c * 8 < cols_valid) {
        u32 w[4];
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                     : "r"(s0 + 2 * (r * LD + c * 8)));
        T *dst = gmem + r * row_stride + c * 8;
        if (vec) {
          asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(dst), "r"(w[0]), "r"(w[1]),
                       "r"(w[2]), "r"(w[3])
                       : "memory");
        } else {
          unsigned short *d16 = reinterpret_cast<unsigned short *>(dst);
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (c * 8 + e < cols_valid) d16[e] = (unsigned short)(w[e / 2] >> (16 * (e & 1)));
        }
      }
    }
  }
}

// Writes one warp's fp32 C fragments (MT m16 tiles x NT n8 tiles), times `mul`,
// as T into a shared tile of pitch LD at (row0, 0); RELU: negative values as 0.
template <typename T, int MT, int NT, int LD, bool RELU = false>
__device__ __forceinline__ void frag_to_smem(T *smem, int row0, const float (&acc)[MT][NT][4],
                                             float mul, int lane) {
  const u32 s0 = smem_u32(smem);
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row0 + mt * 16 + g + 8 * h;
        const float lo = acc[mt][nt][2 * h] * mul, hi = acc[mt][nt][2 * h + 1] * mul;
        st_shared_b32(s0 + 2 * (r * LD + nt * 8 + 2 * c),
                      RELU ? Mma<T>::pack_relu(lo, hi) : Mma<T>::pack(lo, hi));
      }
}

template <typename T, int MT, int NT, int LD>
__device__ __forceinline__ void frag_to_smem_rows(T *smem, int row0,
                                                  const float (&acc)[MT][NT][4],
                                                  const float (&mul)[MT][2], int lane) {
  const u32 s0 = smem_u32(smem);
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row0 + mt * 16 + g + 8 * h;
        st_shared_b32(s0 + 2 * (r * LD + nt * 8 + 2 * c),
                      Mma<T>::pack(acc[mt][nt][2 * h] * mul[mt][h],
                                   acc[mt][nt][2 * h + 1] * mul[mt][h]));
      }
}

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// ---------------------------------------------------------------------------
// Warp-level products.  acc is (MT*16, N) in C fragments.
// ---------------------------------------------------------------------------

// The A fragments of a warp's rows of a padded shared tile: MT m16 tiles x KS
// k16 steps, from this lane's ldmatrix address (lane_a layout, pitch LD).  With
// IN_REGS they are loaded once (load, after the tile has landed) and kept in
// registers; otherwise every use re-reads them with ldmatrix.  Callable as the
// `afrag` of gemm_ab: frags(mt, kk, a).
template <bool IN_REGS, int MT, int KS, int LD>
struct AFrags {
  u32 lane_addr;
  u32 r[IN_REGS ? MT : 1][IN_REGS ? KS : 1][4];

  __device__ __forceinline__ void load(u32 addr) {
    lane_addr = addr;
    if constexpr (IN_REGS) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) ldsm_x4(r[mt][kk], addr + 2 * (mt * 16 * LD + kk * 16));
    }
  }
  __device__ __forceinline__ void operator()(int mt, int kk, u32 (&a)[4]) const {
    if constexpr (IN_REGS) {
#pragma unroll
      for (int e = 0; e < 4; ++e) a[e] = r[mt][kk][e];
    } else {
      ldsm_x4(a, lane_addr + 2 * (mt * 16 * LD + kk * 16));
    }
  }
};

// The one product loop: acc += A B over K, the A fragment of m16 tile mt and
// k16 step kk from afrag(mt, kk, a), the B fragments of n8 tiles 2*n2, 2*n2 + 1
// (ldmatrix.x4 register order) from bfrag(n2, kk, b).  KU k16 steps per unrolled
// body: with KU < K/16 the k loop stays rolled, which bounds how many fragments
// ptxas keeps in flight (the 255-register tiles spill otherwise).
template <typename T, int MT, int N, int K, int KU = K / 16, typename AF, typename BF>
__device__ __forceinline__ void gemm_ab(float (&acc)[MT][N / 8][4], const AF &afrag,
                                        const BF &bfrag) {
  static_assert((K / 16) % KU == 0, "KU divides the k16 steps");
#pragma unroll 1
  for (int k0 = 0; k0 < K / 16; k0 += KU) {
#pragma unroll
    for (int ku = 0; ku < KU; ++ku) {
      const int kk = k0 + ku;
      u32 a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) afrag(mt, kk, a[mt]);
#pragma unroll
      for (int n2 = 0; n2 < N / 16; ++n2) {
        u32 b[4];
        bfrag(n2, kk, b);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::mma(acc[mt][2 * n2], a[mt], b[0], b[1]);
          Mma<T>::mma(acc[mt][2 * n2 + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
}

// acc += A B^T, B stored (N, K) row-major in smem at sB (pitch LDB) [K^T-like].
// A comes from `afrag(mt, kk, a)` (registers or ldmatrix).
template <typename T, int MT, int N, int K, int LDB, typename AFrag>
__device__ __forceinline__ void gemm_nt(float (&acc)[MT][N / 8][4], const AFrag &afrag, u32 sB,
                                        int lane) {
  const u32 b_lane = sB + 2 * lane_bn<LDB>(lane);
  gemm_ab<T, MT, N, K>(acc, afrag, [&](int n2, int kk, u32(&b)[4]) {
    ldsm_x4(b, b_lane + 2 * (n2 * 16 * LDB + kk * 16));
  });
}

// acc += P B, P the fp32 C fragments (MT*16, K) of a previous product (rounded
// to T here), B stored (K, N) row-major in smem at sB (pitch LDB) [V-like].
template <typename T, int MT, int N, int K, int LDB>
__device__ __forceinline__ void gemm_pn(float (&acc)[MT][N / 8][4], const float (&p)[MT][K / 8][4],
                                        u32 sB, int lane) {
  const u32 b_lane = sB + 2 * lane_bk<LDB>(lane);
  gemm_ab<T, MT, N, K>(
      acc, [&](int mt, int kk, u32(&a)[4]) { pack_a<T>(a, p[mt][2 * kk], p[mt][2 * kk + 1]); },
      [&](int n2, int kk, u32(&b)[4]) { ldsm_x4_t(b, b_lane + 2 * (kk * 16 * LDB + n2 * 16)); });
}

// acc += A B^T with both operands in smem: A (MT*16, K) at sA_lane (this lane's
// lane_a address), B (N, K) at sB (pitch LDB), KU k16 steps per unrolled body.
template <typename T, int MT, int N, int K, int LDA, int LDB, int KU>
__device__ __forceinline__ void gemm_nt_ss(float (&acc)[MT][N / 8][4], u32 sA_lane, u32 sB,
                                           int lane) {
  const u32 b_lane = sB + 2 * lane_bn<LDB>(lane);
  gemm_ab<T, MT, N, K, KU>(
      acc, [&](int mt, int kk, u32(&a)[4]) { ldsm_x4(a, sA_lane + 2 * (mt * 16 * LDA + kk * 16)); },
      [&](int n2, int kk, u32(&b)[4]) { ldsm_x4(b, b_lane + 2 * (n2 * 16 * LDB + kk * 16)); });
}

}  // namespace sm80
