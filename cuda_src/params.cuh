// flashcupy: the kernel argument ABI, shared by every kernel family.
//
// Every tensor travels as a pointer plus four element strides: three leading
// batch axes (b0, b1, b2) and the row axis.  The last axis is contiguous
// (the Python side copies any array whose last axis is not).  A stride of 0 is
// a broadcast axis: that is how MQA/GQA and numpy.matmul-style batch
// broadcasting reach the kernels without materializing anything.
//
// The Python side (flashcupy/_launch.py) coalesces the broadcast batch shape
// to at most three axes; kernels see a flat batch index in
// [0, nb0 * nb1 * nb2) spread over gridDim.y * gridDim.z, because gridDim.y
// alone stops at 65,535.
//
// All offsets are 64-bit (fc_index_t): a (B, H, S, D) array may exceed 2^31
// elements even when each index fits in an int.
#pragma once
#include "common.cuh"

#define FC_TENSOR_ARG(TYPE, NAME)                                                   \
  TYPE *__restrict__ NAME, fc_index_t NAME##_sb0, fc_index_t NAME##_sb1,            \
      fc_index_t NAME##_sb2, fc_index_t NAME##_sr

// A strided tensor view as the kernels use it.
template <typename T>
struct TensorView {
  T *ptr;
  fc_index_t sb0, sb1, sb2;  // batch strides (elements), 0 where broadcast
  fc_index_t sr;             // row stride (elements); the last axis is contiguous

  __device__ __forceinline__ T *batch(int b0, int b1, int b2) const {
    return ptr + b0 * sb0 + b1 * sb1 + b2 * sb2;
  }
};

#define FC_VIEW(TYPE, NAME) \
  TensorView<TYPE> NAME##_v{NAME, NAME##_sb0, NAME##_sb1, NAME##_sb2, NAME##_sr}

// Decomposes the flat batch index of this CTA.  Returns false for the padding
// CTAs of the last grid.z slice (nbatch need not divide by gridDim.y).
struct BatchIndex {
  int b0, b1, b2;
  __device__ __forceinline__ bool init(int nb0, int nb1, int nb2) {
    long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;
    if (b >= (long long)nb0 * nb1 * nb2) return false;
    b2 = (int)(b % nb2);
    b /= nb2;
    b1 = (int)(b % nb1);
    b0 = (int)(b / nb1);
    return true;
  }
};
