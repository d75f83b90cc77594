// flashcupy: sequences, the one place that knows where a CTA's queries and
// keys live when a batch is not a dense (B, ..., S, D) array.
//
//   variable-length ("varlen") batches  q, k, v packed along the row axis:
//       sequence b owns query rows cu_q[b] .. cu_q[b + 1] and key rows
//       cu_k[b] .. cu_k[b + 1] (flash-attn's cu_seqlens);
//   KV caches                            sequence b attends to its first
//       len_k[b] keys (cache_seqlens plus the appended ones);
//   paged K / V (FC_VF_PAGED)            key row t of sequence b lives in page
//       table[b][t / page_size], row t % page_size (vLLM's block table).
//
// The host (flashcupy/_varlen.py) makes the sequence the kernel's batch axis
// b0, with stride 0 in every packed operand: seq_init then moves each base by
// the sequence's first row and swaps the problem's lengths for the sequence's.
// Everything downstream (loop bounds, the variant's bottom-right alignment,
// bias / mask blocks, dropout coordinates) is per sequence with no other edit.
// Compare flash-attn's BlockInfo (csrc/flash_attn/src/block_info.h) and
// FlashInfer's paged_kv_t (include/flashinfer/page.cuh).
#pragma once
#include "params.cuh"

#define FC_VF_SEQ 2048    // per-sequence lengths and first rows (SeqArgs)
#define FC_VF_PAGED 4096  // forward: K / V rows through the block table

// One int of SeqArgs; RELOAD: by a volatile load (seq_reload).
template <bool RELOAD>
__device__ __forceinline__ int seq_load(const int *a) {
  if constexpr (RELOAD) return *reinterpret_cast<const volatile int *>(a);
  else return *a;
}

// This CTA's sequence from p.seq into bi (lengths, first rows).
template <int VF, bool RELOAD, typename P>
__device__ __forceinline__ void seq_fill(BatchIndex &bi, const P &p) {
  if constexpr ((VF & FC_VF_SEQ) != 0) {
    const SeqArgs &s = p.seq;
    const int b = bi.b0;
    if (s.cu_q) {
      const int a = seq_load<RELOAD>(s.cu_q + b);
      bi.q0 = a;
      bi.sq = seq_load<RELOAD>(s.cu_q + b + 1) - a;
    }
    if (s.cu_qa) bi.qa0 = seq_load<RELOAD>(s.cu_qa + b);
    if (s.cu_k) {
      const int a = seq_load<RELOAD>(s.cu_k + b);
      bi.k0 = a;
      bi.sk = seq_load<RELOAD>(s.cu_k + b + 1) - a;
    }
    if (s.len_k) bi.sk = seq_load<RELOAD>(s.len_k + b);
  }
}

// The CTA's sequence: lengths and first rows into bi.  Returns false for the
// padding CTAs of the grid (BatchIndex::init).  Without FC_VF_SEQ: the dense
// problem (init's rows 0, the problem's lengths).
template <int VF, typename P>
__device__ __forceinline__ bool seq_init(BatchIndex &bi, const P &p) {
  if (!bi.init(p.nb0, p.nb1, p.nb2)) return false;
  bi.sq = p.seqlen_q;
  bi.sk = p.seqlen_k;
  seq_fill<VF, false>(bi, p);
  return true;
}

// The lengths a kernel body uses.  Dense problems read them from the
// parameters at each use, as before sequences existed: a parameter load is
// issued again after each asm barrier instead of holding a register through
// the main loop, which keeps the kernels at the register limit (the sm80
// forward at D = 128 with every variant) spill-free.
template <int VF, typename P>
__device__ __forceinline__ int seq_len_q(const BatchIndex &bi, const P &p) {
  if constexpr ((VF & FC_VF_SEQ) != 0) return bi.sq;
  else return p.seqlen_q;
}
template <int VF, typename P>
__device__ __forceinline__ int seq_len_k(const BatchIndex &bi, const P &p) {
  if constexpr ((VF & FC_VF_SEQ) != 0) return bi.sk;
  else return p.seqlen_k;
}

// The same again for kernels at the register limit (the sm80 dK/dV bodies, at
// their epilogue): the values seq_init loaded would otherwise stay live through
// the main loop, where the dense problem's (zeros, the parameters) cost no
// register.  Volatile loads, so they are not merged with the first ones; each
// is an L1 hit.
template <int VF, typename P>
__device__ __forceinline__ void seq_reload(BatchIndex &bi, const P &p) {
  seq_fill<VF, true>(bi, p);
}
// This sequence's first dQ-workspace row, reloaded each time (as seq_reload).
template <int VF, typename P>
__device__ __forceinline__ fc_index_t seq_qa0(const BatchIndex &bi, const P &p) {
  if constexpr ((VF & FC_VF_SEQ) != 0)
    if (p.seq.cu_qa) return seq_load<true>(p.seq.cu_qa + bi.b0);
  return 0;
}

// Rows of a paged K or V: row t of this sequence.  base is the tensor's
// batch / head offset (its page axis has stride 0 in the view; pages are
// page_stride apart).
template <typename T>
struct KvPages {
  const T *base;
  const int *pages;
  fc_index_t sr, page_stride;
  int page_size, page_shift;

  __device__ __forceinline__ KvPages(const TensorView<const T> &t, const BatchIndex &bi,
                                     const SeqArgs &s, fc_index_t page_stride_)
      : base(t.batch(bi.b0, bi.b1, bi.b2)), pages(s.table + bi.b0 * s.table_stride), sr(t.sr),
        page_stride(page_stride_), page_size(s.page_size), page_shift(s.page_shift) {}

  __device__ __forceinline__ const T *row(int t) const {
    // (a power-of-two page, the common case, avoids the integer division)
    const int pg = page_shift >= 0 ? t >> page_shift : t / page_size;
    const int r = page_shift >= 0 ? t & (page_size - 1) : t - pg * page_size;
    return base + (fc_index_t)__ldg(pages + pg) * page_stride + r * sr;
  }
  // Whether 16-byte copies are legal for every row (as vec16_ok, sm80/mma.cuh).
  __device__ __forceinline__ bool vec16(int cols_valid) const {
    return ((reinterpret_cast<unsigned long long>(base) |
             (unsigned long long)(sr * sizeof(T)) |
             (unsigned long long)(page_stride * sizeof(T))) & 15) == 0 &&
           (cols_valid * sizeof(T)) % 16 == 0;
  }
};

