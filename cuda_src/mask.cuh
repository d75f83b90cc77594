// flashcupy: which (query, key) pairs may interact.
//
// Causal masking is bottom-right aligned (flash-attn >= 2.1): query i sees key
// j only when j <= i + (Sk - Sq).  With Sq > Sk the first Sq - Sk query rows see
// no key at all; softmax.cuh turns those rows into out = 0, lse = -inf.
//
// Sequence-end predicates live here too: tiles past Sq or Sk are predicated,
// never read.  Later masks (sliding window, ALiBi, ...) become more fields of
// this struct and more terms of `allowed`.
#pragma once
#include "common.cuh"

struct Mask {
  int seqlen_q, seqlen_k;
  bool causal;

  // Offset of the causal diagonal: key j is allowed for query i iff j <= i + diag.
  __device__ __forceinline__ int diag() const { return seqlen_k - seqlen_q; }

  __device__ __forceinline__ bool allowed(int i, int j) const {
    return j < seqlen_k && (!causal || j <= i + diag());
  }

  // One past the last key any query row in [m_start, m_end) may see.
  __device__ __forceinline__ int key_end(int m_start, int m_end) const {
    if (!causal) return seqlen_k;
    // Row m_end-1 is the one that sees furthest; clamp into [0, Sk].
    return fc_max(0, fc_min(seqlen_k, m_end + diag()));
  }

  // First query row that may see any key in [n_start, n_end): the backward
  // dK/dV pass skips query tiles above it.
  __device__ __forceinline__ int query_begin(int n_start) const {
    if (!causal) return 0;
    return fc_max(0, n_start - diag());
  }

  // True when every (i, j) of the tile is allowed: no per-element test needed.
  __device__ __forceinline__ bool tile_is_full(int m_start, int n_start, int n_end) const {
    return n_end <= seqlen_k && (!causal || n_end - 1 <= m_start + diag());
  }
};
