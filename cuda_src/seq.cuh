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
#include "rows.cuh"

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

// The row source of key tile rows n0 .. of K or V (rows.cuh): the dense
// view from the sequence's first key row kb, or its pages (FC_VF_PAGED; n0 a
// multiple of 16).  One place for the choice, so a kernel's tile loads read the
// same either way.  With runs (KvAhead): the entries a paged cursor uses.
template <int VF, typename T>
__device__ __forceinline__ auto kv_rows(const T *kb, const TensorView<const T> &t,
                                        const BatchIndex &bi, const SeqArgs &s,
                                        fc_index_t page_stride, int n0) {
  if constexpr ((VF & FC_VF_PAGED) != 0) return KvPages<T>(kb, t, bi, s, page_stride, n0);
  else return StridedRows<T>{kb + (fc_index_t)n0 * t.sr, t.sr};
}
template <int VF, typename T, int ROWS>
__device__ __forceinline__ auto kv_rows(const T *kb, const TensorView<const T> &t,
                                        const BatchIndex &bi, const SeqArgs &s,
                                        fc_index_t page_stride, int n0,
                                        const TileRuns<ROWS> &runs) {
  if constexpr ((VF & FC_VF_PAGED) != 0) {
    KvPages<T, ROWS> k(kb, t, bi, s, page_stride, n0);
    k.runs = runs;
    return k;
  } else {
    return StridedRows<T>{kb + (fc_index_t)n0 * t.sr, t.sr};
  }
}

// The block-table entries of a kernel's key tiles of ROWS rows, each read one
// load ahead of its copies: take(n, n_next) returns tile n's (read by the
// previous take, or by the constructor) and starts the read of tile n_next's,
// whose latency then hides under a whole pipeline step; again(n) returns the
// last tile taken once more (V_n after K_n when they load a step apart).  Out
// of order, either reads the table there and then.  Empty without FC_VF_PAGED.
template <int VF, int ROWS>
struct KvAhead {
  static constexpr bool PAGED = (VF & FC_VF_PAGED) != 0;
  using Runs = TileRuns<PAGED ? ROWS : 0>;
  Runs next, last;
  const int *pages;  // this sequence's table row, and the page geometry: kept, not
  PageGeometry pg;   // recomputed from the parameters at every fetch

  __device__ __forceinline__ void fetch(Runs &r, int n, int sk) {
    if constexpr (PAGED) r.fetch(pages, pg, n * ROWS, sk - n * ROWS);
  }
  __device__ __forceinline__ KvAhead(const BatchIndex &bi, const SeqArgs &s, int n, int sk) {
    if constexpr (PAGED) {
      pages = s.table + bi.b0 * s.table_stride;
      pg = PageGeometry{s.page_magic, s.page_size};
      last.n0 = -1;
    }
    fetch(next, n, sk);
  }
  __device__ __forceinline__ Runs take(int n, int n_next, int sk) {
    if constexpr (PAGED) {
      if (next.n0 != n * ROWS) fetch(next, n, sk);
      last = next;
      fetch(next, n_next, sk);
    }
    return last;
  }
  __device__ __forceinline__ Runs again(int n, int sk) {
    if constexpr (PAGED)
      if (last.n0 != n * ROWS) fetch(last, n, sk);
    return last;
  }
};
