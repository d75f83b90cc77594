// flashcupy sm80 family, Hopper extension: warpgroup matrix multiply (wgmma,
// sm_90a only) for the products whose operands both sit in shared memory.
//
// A warpgroup (4 consecutive warps, 128 threads) issues wgmma.mma_async: the
// tensor cores read A and B straight from shared memory through a 64-bit
// descriptor, so the warps issue no ldmatrix and one instruction per k16 step
// instead of one mma.sync per 16x8 tile (PTX ISA, "Asynchronous Warpgroup Level
// Matrix Multiply-Accumulate"; FlashAttention-3, Shah et al. 2024, section 3).
// The products run asynchronously: a warpgroup can issue two of them and work
// on the first result (softmax exponentials on the MUFU unit) while the second
// is still on the tensor cores.
//
// Operand layout, both A (M x K) and B (N x K): "K-major" with the 128-byte
// swizzle, i.e. panels of 64 columns with rows of 128 bytes, 16-byte chunk c of
// row r stored at chunk c ^ (r & 7) -- the swz_off layout of mma.cuh -- and
// every panel starting on a 1024-byte boundary (the swizzle is a function of
// the address bits, PTX ISA "Shared Memory Matrix Layout").  Consecutive 8-row
// groups are 1024 bytes apart (the stride byte offset); k16 step kk starts at
// panel kk / 4, 32 * (kk % 4) bytes into the rows.
//
// Accumulator layout of m64nNk16 (f32): warp w of the group holds rows
// 16 w .. 16 w + 15, and its registers d[j][0..3] for n8 tile j are exactly the
// mma.sync C fragment (rows g, g + 8; columns 8 j + 2 c, + 1), so the rest of
// the kernel reads them as one m16 tile of N columns.
#pragma once
#include "../sm80/mma.cuh"

namespace sm80 {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FC_HAS_WGMMA 1
#else
#define FC_HAS_WGMMA 0
#endif

// Descriptor of a K-major, 128-byte-swizzled tile at shared address `saddr`
// (1024-byte aligned for the tile; + 32 * kk for k16 step kk).
__device__ __forceinline__ unsigned long long wg_desc_sw128(u32 saddr) {
  unsigned long long d = (unsigned long long)((saddr & 0x3FFFF) >> 4);  // start address
  d |= 1ull << 16;                                // leading byte offset (unused: K-major, swizzled)
  d |= (unsigned long long)(1024 >> 4) << 32;     // stride byte offset: 8 rows x 128 B
  d |= 1ull << 62;                                // 128-byte swizzle
  return d;
}
// The descriptor of the same tile `bytes` further along (a 16-byte multiple
// that keeps the start address within 18 bits: no carry out of the field).
__device__ __forceinline__ unsigned long long wg_desc_add(unsigned long long d, u32 bytes) {
  return d + (bytes >> 4);
}

// Orders this thread's earlier register and shared-memory accesses before the
// warpgroup's next wgmma (required before the first one of a batch).
__device__ __forceinline__ void wg_fence() {
#if FC_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#if FC_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
// Until at most N committed groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wg_wait() {
#if FC_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}
// The accumulator registers are written by the asynchronous wgmma: this empty
// asm "redefines" them after wg_wait, so the compiler cannot move a read of
// them above the wait (nor a write below the issue).  wg_fence_regs on A
// fragments read from registers keeps them live until the wait likewise.
template <int NT>
__device__ __forceinline__ void wg_fence_regs(float (&d)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}
template <int NT>
__device__ __forceinline__ void wg_fence_regs(u32 (&a)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
}

template <typename T>
struct WgIsBf16 {
  static constexpr bool value = false;
};
template <>
struct WgIsBf16<fc_bf16> {
  static constexpr bool value = true;
};

// Operand lists of the accumulators (this thread's N / 2 floats) and their
// asm placeholders, per wgmma N.
#define FC_WG_D32 \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
#define FC_WG_R32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15 "
#define FC_WG_D64 \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define FC_WG_R64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
  "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31 "
#define FC_WG_D128 \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), \
  "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
  "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), \
  "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define FC_WG_R128 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
  "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, " \
  "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
  "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "
// One wgmma, A and B by descriptor (SS) or A from registers (RS), element type TY.
#define FC_WG_SS32(TY)                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {" FC_WG_R32      \
               "}, %16, %17, p, 1, 1, %19, %20;\n}\n"                            \
               : FC_WG_D32                                                               \
               : "l"(da), "l"(db), "r"((int)accumulate), "n"(TA), "n"(TB))
#define FC_WG_SS64(TY)                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" FC_WG_R64      \
               "}, %32, %33, p, 1, 1, %35, %36;\n}\n"                            \
               : FC_WG_D64                                                               \
               : "l"(da), "l"(db), "r"((int)accumulate), "n"(TA), "n"(TB))
#define FC_WG_SS128(TY)                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" FC_WG_R128      \
               "}, %64, %65, p, 1, 1, %67, %68;\n}\n"                            \
               : FC_WG_D128                                                               \
               : "l"(da), "l"(db), "r"((int)accumulate), "n"(TA), "n"(TB))
#define FC_WG_RS64(TY)                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" FC_WG_R64      \
               "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"              \
               : FC_WG_D64                                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"((int)accumulate))
#define FC_WG_RS128(TY)                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" FC_WG_R128      \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"              \
               : FC_WG_D128                                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"((int)accumulate))

// d (64 x N per warpgroup, this thread's share: N / 8 n8 tiles) =
// (accumulate ? d : 0) + A B^T over one k16 step; A (64 x 16) and B (N x 16)
// given by descriptors.  N = 32, 64 or 128.
// TA / TB: imm-trans-a / -b: 0 = K-major, 1 = M- / N-major (wg_desc_sw128_mn).
template <typename T, int N, int TA = 0, int TB = 0>
__device__ __forceinline__ void wg_mma(float (&d)[N / 8][4], unsigned long long da,
                                       unsigned long long db, bool accumulate) {
  static_assert(N == 32 || N == 64 || N == 128, "m64n32k16, m64n64k16 or m64n128k16");
#if FC_HAS_WGMMA
  constexpr bool BF16 = WgIsBf16<T>::value;
  if constexpr (N == 32) {
    if constexpr (BF16) FC_WG_SS32("bf16"); else FC_WG_SS32("f16");
  } else if constexpr (N == 64) {
    if constexpr (BF16) FC_WG_SS64("bf16"); else FC_WG_SS64("f16");
  } else {
    if constexpr (BF16) FC_WG_SS128("bf16"); else FC_WG_SS128("f16");
  }
#else
  __trap();  // wgmma needs sm_90a (the host never asks elsewhere)
#endif
}

// Descriptor of an MN-major (B stored K rows x N columns, N contiguous),
// 128-byte-swizzled tile: 64-column panels of 128-byte rows (swz_off), panels
// `panel_bytes` apart (the leading byte offset: the next 64 columns of N),
// 8-row groups 1024 bytes apart (the stride byte offset: the next 8 of K).
// Used with imm-trans-b = 1 (CUTLASS's canonical GMMA MN-major layout,
// ((8, n), (8, k)) : ((1, LBO), (8, SBO)) in 16-byte units).
__device__ __forceinline__ unsigned long long wg_desc_sw128_mn(u32 saddr, u32 panel_bytes) {
  unsigned long long d = (unsigned long long)((saddr & 0x3FFFF) >> 4);
  d |= (unsigned long long)((panel_bytes >> 4) & 0x3FFF) << 16;
  d |= (unsigned long long)(1024 >> 4) << 32;
  d |= 1ull << 62;
  return d;
}

// d (64 x N) += A B over one k16 step, A from registers (this thread's mma.sync
// A fragment of its warp's 16 rows: pack_a), B MN-major by descriptor
// (imm-trans-b = 1).  N = 64 or 128.
template <typename T, int N>
__device__ __forceinline__ void wg_mma_rs(float (&d)[N / 8][4], const u32 (&a)[4],
                                          unsigned long long db, bool accumulate) {
  static_assert(N == 64 || N == 128, "m64n64k16 or m64n128k16");
#if FC_HAS_WGMMA
  constexpr bool BF16 = WgIsBf16<T>::value;
  if constexpr (N == 64) {
    if constexpr (BF16) FC_WG_RS64("bf16"); else FC_WG_RS64("f16");
  } else {
    if constexpr (BF16) FC_WG_RS128("bf16"); else FC_WG_RS128("f16");
  }
#else
  __trap();
#endif
}

#undef FC_WG_D32
#undef FC_WG_R32
#undef FC_WG_SS32
#undef FC_WG_D64
#undef FC_WG_R64
#undef FC_WG_SS64
#undef FC_WG_D128
#undef FC_WG_R128
#undef FC_WG_SS128
#undef FC_WG_RS64
#undef FC_WG_RS128

// d = A B^T over K (a multiple of 16), A (64 x K) and B (N x K) swizzled tiles at
// shared addresses sa, sb (1024-byte aligned), stored as 64-column panels
// PANEL_A / PANEL_B bytes apart (swz_off in mma.cuh): k16 step kk reads panel
// kk / 4 at byte 32 * (kk % 4) of the rows.  Issued and committed as one group;
// the caller waits (wg_wait) and then wg_fence_regs(d).
template <typename T, int N, int K, int PANEL_A, int PANEL_B>
__device__ __forceinline__ void wg_gemm_nt(float (&d)[N / 8][4], u32 sa, u32 sb) {
  static_assert(K % 16 == 0, "k16 steps");
  const unsigned long long da = wg_desc_sw128(sa), db = wg_desc_sw128(sb);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk)
    wg_mma<T, N>(d, wg_desc_add(da, (kk / 4) * PANEL_A + 32 * (kk % 4)),
                 wg_desc_add(db, (kk / 4) * PANEL_B + 32 * (kk % 4)), kk > 0);
  wg_commit();
}

}  // namespace sm80
