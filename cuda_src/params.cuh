// flashcupy: the kernel argument ABI, shared by every kernel family.
//
// Every kernel takes ONE parameter struct: FwdParams for the forward, BwdParams
// for every kernel of the backward (each reads the fields it needs).  The
// layout is written once, here, and mirrored field by field on the Python side
// by flashcupy/_params.py (natural alignment, in order; the kernel check
// compiles static_asserts of every offset, so the two cannot drift).  A new
// tensor or scalar is one field in both places, not an edit of every signature.
//
// Every tensor travels as a TensorView: a pointer plus four element strides,
// three leading batch axes (b0, b1, b2) and the row axis.  The last axis is
// contiguous (the Python side copies any array whose last axis is not).  A
// stride of 0 is a broadcast axis: that is how MQA/GQA and numpy.matmul-style
// batch broadcasting reach the kernels without materializing anything.
//
// The Python side (flashcupy/_batch.py) coalesces the broadcast batch shape
// to at most three axes; kernels see a flat batch index in
// [0, nb0 * nb1 * nb2) spread over gridDim.y * gridDim.z, because gridDim.y
// alone stops at 65,535.
//
// All offsets are 64-bit (fc_index_t): a (B, H, S, D) array may exceed 2^31
// elements even when each index fits in an int.
#pragma once
#include "common.cuh"

// A kernel parameter read in place from the parameter space: taking the
// address of a plain by-value parameter (the bodies take `const P &`) would
// copy the struct to local memory first.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
#define FC_PARAMS(...) const __grid_constant__ __VA_ARGS__
#else
#define FC_PARAMS(...) const __VA_ARGS__
#endif

// A strided tensor view as the kernels use it (40 bytes).
template <typename T>
struct TensorView {
  T *__restrict__ ptr;
  fc_index_t sb0, sb1, sb2;  // batch strides (elements), 0 where broadcast
  fc_index_t sr;             // row stride (elements); the last axis is contiguous

  __device__ __forceinline__ T *batch(int b0, int b1, int b2) const {
    return ptr + b0 * sb0 + b1 * sb1 + b2 * sb2;
  }
};

// Decomposes the flat batch index of this CTA.  Returns false for the padding
// CTAs of the last grid.z slice (nbatch need not divide by gridDim.y).
//
// It also carries the CTA's sequence (seq.cuh, seq_init): its lengths sq, sk and
// the first rows q0 (of q, o, lse, dout, dq, delta), k0 (of k, v, dk, dv) and qa0
// (of the dQ workspace) in packed (variable-length) buffers.  init() sets the
// dense values (the problem's lengths, rows 0), which fold away in kernels not
// compiled for sequences.
struct BatchIndex {
  int b0, b1, b2;
  int sq, sk;
  int q0, k0, qa0;  // (int32 like cu_seqlens; widened where multiplied)
  // blockIdx.x is the tile, (z, y) the batch element: every batch element's
  // tiles launch together, heaviest first (the kernels reverse x), so the CTAs
  // that share a K / V slice run at the same time and read it from L2 once.
  // (Packed sequences too: launching tile x of every sequence before tile x + 1
  // of any balanced a simulated 2-CTA-per-SM schedule better, 99.8% against 94%
  // of ideal, but lost that sharing and ran at 0.68-0.90x the speed, NOTES.md
  // 13.4.)
  __device__ __forceinline__ bool init(int nb0, int nb1, int nb2) {
    long long b = (long long)blockIdx.z * gridDim.y + blockIdx.y;
    if (b >= (long long)nb0 * nb1 * nb2) return false;
    b2 = (int)(b % nb2);
    b /= nb2;
    b1 = (int)(b % nb1);
    b0 = (int)(b / nb1);
    q0 = k0 = qa0 = 0;
    return true;
  }
};

// Tensor bases of this CTA's batch element and sequence: q-side tensors start
// at row q0, k-side ones at row k0 (TensorView::batch plus the rows).
template <typename T>
__device__ __forceinline__ T *q_rows(const TensorView<T> &t, const BatchIndex &bi) {
  return t.batch(bi.b0, bi.b1, bi.b2) + (fc_index_t)bi.q0 * t.sr;
}
template <typename T>
__device__ __forceinline__ T *k_rows(const TensorView<T> &t, const BatchIndex &bi) {
  return t.batch(bi.b0, bi.b1, bi.b2) + (fc_index_t)bi.k0 * t.sr;
}

// Sequences (variable-length batches, KV caches, paged KV; seq.cuh): the
// kernel's batch axis b0 is then the sequence.  Null pointers mean "as dense".
struct SeqArgs {
  const int *cu_q;    // (B + 1) first query rows: sequence b owns rows cu_q[b] .. cu_q[b + 1]
  const int *cu_k;    // (B + 1) first key rows
  const int *cu_qa;   // (B + 1) first rows of the dQ workspace (cu_q plus per-sequence padding)
  const int *len_k;   // (B) keys per sequence (a KV cache), overrides cu_k's lengths
  const int *table;   // paged K/V: (B, table_stride) page indices, in order
  fc_index_t table_stride;
  fc_index_t k_page_stride, v_page_stride;  // elements between pages (k, v)
  unsigned long long page_magic;  // floor(2^64 / page_size) + 1 (rows.cuh PageGeometry)
  int page_size;                  // rows per page
};

// The runtime half of an attention variant (variant.cuh holds the logic; its
// compile-time half is the kernel's VF flags).  Fields of variants a kernel
// was not compiled for are ignored.
template <typename Acc>
struct VariantArgs {
  // Sliding window, bottom-right aligned: query i sees key j iff
  // i + (Sk - Sq) - window_left <= j <= i + (Sk - Sq) + window_right.  The host
  // clamps an unbounded side to Sk (left) or Sq (right), which already admits
  // every key, so the bounds never overflow an int.  Causal is window_right = 0.
  int window_left, window_right;
  Acc softcap_inv2;  // 2 * log2(e) * scale / softcap: tanh(x) from one exp2 (variant.cuh)
  Acc softcap_log2;  // softcap * log2(e): the capped score in log2 units
  // float32 per batch element (the row stride is unused); group strides are the
  // dK/dV kernels' loop over the query heads that share a KV head
  TensorView<const float> alibi, sink;
  fc_index_t alibi_sg, sink_sg;
  // Bias, mask and the bias's gradient: views over (batch, Sq, Sk) with a
  // column stride (0 where broadcast over keys; a row stride of 0 broadcasts
  // over queries).  The bias is stored as the kernel's T, or as Acc with
  // FC_VF_BIAS_ACC (variant.cuh); the mask holds one byte per element; dbias
  // is an Acc buffer of the bias's own shape that the dK/dV kernels add into.
  TensorView<const void> bias;
  fc_index_t bias_sc, bias_sg;
  TensorView<const unsigned char> mask;
  fc_index_t mask_sc, mask_sg;
  TensorView<Acc> dbias;
  fc_index_t dbias_sc, dbias_sg;
  // Dropout (flashcupy/_philox.py's bit layout): the Philox key (the seed) and
  // the counter's fourth word are written at every launch, not baked into a
  // plan (they change from call to call); dropout_index is no tensor: its
  // "pointer" plus the batch and group strides is the flat C-order index bh of
  // the query-side batch element (the host's batch coalescing and chunking
  // then apply to it as to any operand).  keep iff 16 bits >= threshold;
  // survivors are scaled by rp = 1 / (1 - p), and keep = 1 - p.
  unsigned long long dropout_seed, dropout_offset;
  TensorView<const unsigned char> dropout_index;
  fc_index_t dropout_index_sg;
  int dropout_threshold;
  Acc dropout_rp, dropout_keep;
};

template <typename T, typename Acc>
struct FwdParams {
  TensorView<const T> q, k, v;  // (Sq, D), (Sk, D), (Sk, Dv) per batch element
  TensorView<T> o;              // (Sq, Dv)
  TensorView<Acc> lse;          // (Sq), natural log (row stride = element stride)
  int nb0, nb1, nb2;            // batch sizes after coalescing
  int seqlen_q, seqlen_k, head_dim, head_dim_v;
  Acc scale;       // softmax scale
  Acc scale_log2;  // scale * log2(e); <= 0 for a non-positive user scale
  VariantArgs<Acc> var;
  SeqArgs seq;
  // Split-KV (split.cuh): float32 partial results of n_splits key ranges,
  // split s at o_part + s * o_part_ss and lse_part + s * lse_part_ss; read by
  // the combine kernel, which writes o and lse.  Unused when n_splits = 1.
  TensorView<float> o_part, lse_part;
  fc_index_t o_part_ss, lse_part_ss;
  int n_splits;
};

// Every backward kernel: preprocess (o, dout -> delta), dQ, dK/dV (+ atomic dQ
// into dq_accum), and the dq_accum conversion.  TG: the store type of dq, dk, dv
// (T, or Acc for the buffers of gradients summed over broadcast axes afterwards).
template <typename T, typename Acc, typename TG>
struct BwdParams {
  TensorView<const T> q, k, v, dout, o;
  TensorView<const Acc> lse;
  TensorView<Acc> delta;         // written by the preprocess kernel, read by the others
  TensorView<TG> dq, dk, dv;
  TensorView<float> dq_accum;    // atomic-dQ workspace (sm80/bwd.cuh's contract)
  int nb0, nb1, nb2;
  int n_group;                   // dK/dV: broadcast group summed in registers
  fc_index_t q_sg, dout_sg, lse_sg, delta_sg, dq_accum_sg;  // group strides
  int seqlen_q, seqlen_k, head_dim, head_dim_v;
  Acc scale, scale_log2;
  VariantArgs<Acc> var;
  SeqArgs seq;
};
