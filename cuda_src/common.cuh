// flashcupy: dtype traits, conversions, constants and warp reductions shared by
// every kernel family.
//
// The sources are compiled by NVRTC with no include path of CUDA's own: this
// file declares the 16-bit storage types itself and converts them with PTX
// `cvt`, so a kernel needs neither cuda_fp16.h nor cuda_bf16.h.  (It also keeps
// the text handed to NVRTC self-contained, which is what CuPy's disk cache
// hashes.)
#pragma once

typedef long long fc_index_t;  // 64-bit element offsets: arrays may exceed 2^31 elements

// ---------------------------------------------------------------------------
// Storage types.  Bit-compatible with IEEE binary16 and bfloat16 (ml_dtypes).
// ---------------------------------------------------------------------------
struct __align__(2) fc_half { unsigned short bits; };
struct __align__(2) fc_bf16 { unsigned short bits; };

// Constants, named (no magic numbers in kernels).
#define FC_LOG2E 1.4426950408889634073599246810019
#define FC_LN2 0.69314718055994530941723212145818

template <typename T> struct fc_neg_inf;
template <> struct fc_neg_inf<float> {
  static __device__ __forceinline__ float value() { return __int_as_float(0xff800000u); }
};
template <> struct fc_neg_inf<double> {
  static __device__ __forceinline__ double value() {
    return __longlong_as_double(0xfff0000000000000ull);
  }
};

// ---------------------------------------------------------------------------
// Conversions: to_acc<Acc>(x) widens storage to the accumulator type;
// from_acc<T>(x) rounds to nearest even.
// ---------------------------------------------------------------------------
__device__ __forceinline__ float fc_half_to_float(fc_half h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
  return f;
}
__device__ __forceinline__ fc_half fc_float_to_half(float f) {
  fc_half h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
  return h;
}
// bfloat16 is the top half of a float32: widening is a shift.
__device__ __forceinline__ float fc_bf16_to_float(fc_bf16 b) {
  return __int_as_float(((unsigned int)b.bits) << 16);
}
__device__ __forceinline__ fc_bf16 fc_float_to_bf16(float f) {
  fc_bf16 b;
#if __CUDA_ARCH__ >= 800
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(f));
#else
  // Round to nearest even by hand; NaN stays a (quiet) NaN.
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = (unsigned short)((u >> 16) | 0x40u);
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = (unsigned short)(u >> 16);
  }
#endif
  return b;
}

template <typename Acc, typename T> struct fc_convert;
template <typename Acc> struct fc_convert<Acc, fc_half> {
  static __device__ __forceinline__ Acc to_acc(fc_half x) { return (Acc)fc_half_to_float(x); }
  static __device__ __forceinline__ fc_half from_acc(Acc x) { return fc_float_to_half((float)x); }
};
template <typename Acc> struct fc_convert<Acc, fc_bf16> {
  static __device__ __forceinline__ Acc to_acc(fc_bf16 x) { return (Acc)fc_bf16_to_float(x); }
  static __device__ __forceinline__ fc_bf16 from_acc(Acc x) { return fc_float_to_bf16((float)x); }
};
template <typename Acc> struct fc_convert<Acc, float> {
  static __device__ __forceinline__ Acc to_acc(float x) { return (Acc)x; }
  static __device__ __forceinline__ float from_acc(Acc x) { return (float)x; }
};
template <typename Acc> struct fc_convert<Acc, double> {
  static __device__ __forceinline__ Acc to_acc(double x) { return (Acc)x; }
  static __device__ __forceinline__ double from_acc(Acc x) { return (double)x; }
};

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T x) { return fc_convert<Acc, T>::to_acc(x); }
template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc x) { return fc_convert<Acc, T>::from_acc(x); }

// exp2 in the accumulator precision.  float uses the fast ex2.approx unit
// (relative error ~2^-22, well under fp32 rounding of the sums it feeds).
__device__ __forceinline__ float fc_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ double fc_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float fc_log2(float x) { return log2f(x); }
__device__ __forceinline__ double fc_log2(double x) { return log2(x); }

// ---------------------------------------------------------------------------
// Integer helpers and warp reductions.
// ---------------------------------------------------------------------------
__host__ __device__ constexpr int fc_ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int fc_min(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int fc_max(int a, int b) { return a > b ? a : b; }

template <typename Acc>
__device__ __forceinline__ Acc warp_max(Acc x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
