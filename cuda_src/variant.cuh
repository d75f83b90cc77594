// flashcupy: attention variants, the one place that knows which (query, key)
// pairs exist and what their scores are.
//
// Every kernel body asks a Variant for
//   * its loop ranges: the keys a query tile can see (key_begin / key_end), the
//     queries a key tile is seen by (query_begin / query_end): causal and
//     sliding-window attention from one formula, so a window does work in
//     proportion to its width;
//   * whether a tile needs per-element masking (needs_mask) and the element test
//     (visible);
//   * the score of a pair in log2 units (score2: softcap, ALiBi) and the
//     derivative the backward multiplies dS by (softcap's 1 - tanh^2);
//   * the softmax's extra sink logit (init_max / sink_term);
//   * a pair's additive offset (offset_u / offset2: an arbitrary bias read from
//     memory, -inf where a boolean mask removes the pair) and where its
//     gradient goes (dbias_add);
//   * whether dropout keeps a pair (dropout_call / dropout_kept: Philox
//     bits that are a function of the pair's coordinates only).
// A new variant is a flag, fields of VariantArgs (params.cuh) and members here
// (and its statement in flashcupy/reference.py), not an edit of every body.
// Compare flash-attn's Mask<Is_causal, Is_local, Has_alibi> (csrc/flash_attn/src/
// mask.h) and FlashInfer's DefaultAttention variants (attention/variants.cuh).
//
// Semantics (bottom-right aligned, flash-attn's window_size):
//   visible(i, j)  iff  i + (Sk - Sq) - left <= j <= i + (Sk - Sq) + right, j < Sk
//                  (causal: right = 0; an unbounded side is clamped by the host)
//   score          s = scale q.k;  softcap c: s -> c tanh(s / c);
//                  ALiBi slope m: s -> s - m |i + Sk - Sq - j|
//   sink logit z   joins the softmax denominator: p_ij = e^s_ij / (e^z + sum_j e^s_ij)
//   bias b, mask m s -> s + b(i, j) after softcap and ALiBi; m(i, j) = 0 removes
//                  the pair (as a bias of -inf does); dbias = dS = P o (dP - delta)
//   dropout p      O = (P o Z / (1 - p)) V with Z the keep bits; the LSE is
//                  dropout-free; dV = (P o Z / (1 - p))^T dO,
//                  dS = P o (dP o Z / (1 - p) - delta) (FlashAttention-2's backward;
//                  delta = rowsum(dO o O) holds unchanged)
// Units: kernels work in log2 units (softmax.cuh), so score2 = score * log2(e).
#pragma once
#include "params.cuh"
#include "seq.cuh"
#include "softmax.cuh"

// The VF template parameter of the kernels: which variants are compiled in.
// The two window sides are separate flags so that causal attention (a right
// side only) compiles to exactly one bound per row: a lower bound computed and
// tested at run time cost causal D = 64 up to 10 % (H200).
#define FC_VF_RIGHT 1    // keys j <= i + hi (causal: hi = Sk - Sq)
#define FC_VF_SOFTCAP 2  // tanh softcapping
#define FC_VF_ALIBI 4    // ALiBi linear bias
#define FC_VF_SINK 8     // attention sink (forward only: the backward sees it through the LSE)
#define FC_VF_LEFT 16    // keys j >= i + lo (a sliding window's left side)
#define FC_VF_BIAS 32    // additive bias b(i, j), in the kernel's storage type T ...
#define FC_VF_BIAS_ACC 256  // ... or in the accumulator type (float32 / float64)
#define FC_VF_MASK 64    // boolean mask (one byte per element; 0 removes the pair)
#define FC_VF_DBIAS 128  // backward: dS added into the bias's gradient (atomics)
#define FC_VF_DROPOUT 512  // dropout on P (Philox4x32-10, flashcupy/_philox.py)
// (FC_VF_SEQ 2048 and FC_VF_PAGED 4096, where the sequences live: seq.cuh)
#define FC_VF_DBIAS_STORE 1024  // with FC_VF_DBIAS: dS stored into dbias (in the bias's
                                // storage type), not added: each pair has its own dbias
                                // element (a bias of the full shape), so no atomics

// Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as
// easy as 1, 2, 3", SC 2011), as flashcupy/_philox.py states it: ten rounds of
// two 32 x 32 -> 64-bit products and xors, the key bumped by the Weyl constants
// between rounds.  One call: 128 bits for 8 pairs of one query row.
__device__ __forceinline__ uint4 fc_philox(unsigned c0, unsigned c1, unsigned c2, unsigned c3,
                                           unsigned k0, unsigned k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const unsigned long long p0 = (unsigned long long)c0 * 0xD2511F53u;
    const unsigned long long p1 = (unsigned long long)c2 * 0xCD9E8D57u;
    c0 = (unsigned)(p1 >> 32) ^ c1 ^ k0;  // (uses the old c1)
    c1 = (unsigned)p1;
    c2 = (unsigned)(p0 >> 32) ^ c3 ^ k1;  // (uses the old c3)
    c3 = (unsigned)p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// The storage type of the bias a kernel with storage type T reads.
template <typename T, typename Acc, bool ACC> struct fc_bias_type { typedef T type; };
template <typename T, typename Acc> struct fc_bias_type<T, Acc, true> { typedef Acc type; };

// exp2 / log2 / reciprocal at the accumulator's precision: MUFU approximations
// (relative error ~2^-22) in float, exact-rounded library calls in double.
__device__ __forceinline__ float fc_fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double fc_fast_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float fc_fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double fc_fast_log2(double x) { return log2(x); }
__device__ __forceinline__ float fc_fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double fc_fast_rcp(double x) { return 1.0 / x; }

// FAST (the tensor-core families, 16-bit inputs): softcap's tanh by the one MUFU
// instruction tanh.approx.f32 (relative error ~2^-11, below the 16-bit rounding
// of the scores a same-dtype reference makes) instead of exp2 + reciprocal: the
// forward's MUFU work per score goes from 3 ops to 2.
template <typename Acc, int VF, bool FAST = false, typename TB = Acc>
struct Variant {
  static constexpr bool RIGHT = (VF & FC_VF_RIGHT) != 0;
  static constexpr bool LEFT = (VF & FC_VF_LEFT) != 0;
  static constexpr bool SOFTCAP = (VF & FC_VF_SOFTCAP) != 0;
  static constexpr bool ALIBI = (VF & FC_VF_ALIBI) != 0;
  static constexpr bool SINK = (VF & FC_VF_SINK) != 0;
  // Scores need an element-wise transform into log2 units (otherwise a body may
  // take the max over raw scores and fold the scale into one FMA per element).
  static constexpr bool TRANSFORM = SOFTCAP || ALIBI;
  static constexpr bool BIAS = (VF & (FC_VF_BIAS | FC_VF_BIAS_ACC)) != 0;
  static constexpr bool MASK = (VF & FC_VF_MASK) != 0;
  static constexpr bool DBIAS = (VF & FC_VF_DBIAS) != 0;
  static constexpr bool DROPOUT = (VF & FC_VF_DROPOUT) != 0;
  static constexpr bool DBIAS_STORE = DBIAS && (VF & FC_VF_DBIAS_STORE) != 0;
  // A per-pair offset read from memory (bias, mask).  It adds in whatever units
  // the body keeps scores in (offset_u), so it needs no transform of its own.
  static constexpr bool OFFSET = BIAS || MASK;
  // The generic family converts every score to log2 units one by one (score2).
  static constexpr bool ELEMENTWISE = TRANSFORM || OFFSET;

  int seqlen_q, seqlen_k;
  int lo, hi;    // key j is visible from query i iff lo <= j - i (LEFT) and j - i <= hi (RIGHT)
  int diag;      // Sk - Sq: ALiBi's distance is |i + diag - j|
  Acc scale_log2, cap_inv2, cap_inv, cap_log2, cap_log2_inv;
  Acc slope2;    // -slope * log2(e) of the bound batch element (bind)
  Acc umul;      // score units -> log2 units (see score_u)
  Acc slope_u;   // slope2 in score units
  Acc sink2;     // sink * log2(e) of the bound batch element
  Acc bias_umul; // log2(e) / umul: a bias in score units
  // Bias, mask and the bias's gradient of the bound batch element (and group):
  // row strides, column strides (0 where broadcast over keys), base pointers.
  fc_index_t bias_sr, bias_sc, mask_sr, mask_sc, dbias_sr, dbias_sc;
  const TB *bias_b;
  const unsigned char *mask_b;
  Acc *dbias_b;
  // Dropout: the Philox key and counter words of the bound batch element, the
  // 16-bit keep threshold, 1 / (1 - p) and 1 - p.
  unsigned drop_k0, drop_k1, drop_c3, drop_thr, drop_bh;
  Acc drop_rp, drop_keep;

  __device__ __forceinline__ Variant(const VariantArgs<Acc> &a, int sq, int sk, Acc scale_log2_)
      : seqlen_q(sq), seqlen_k(sk), diag(sk - sq), scale_log2(scale_log2_), slope2(0),
        slope_u(0), sink2(0) {
    lo = diag - a.window_left;
    hi = diag + a.window_right;
    cap_inv2 = a.softcap_inv2;
    cap_inv = a.softcap_inv2 * Acc(0.5 * FC_LN2);  // scale / softcap
    cap_log2 = a.softcap_log2;
    cap_log2_inv = SOFTCAP ? Acc(1) / a.softcap_log2 : Acc(0);
    umul = SOFTCAP ? cap_log2 : scale_log2;
    bias_umul = BIAS ? Acc(FC_LOG2E) / umul : Acc(0);  // (the host refuses a bias with scale 0)
    bias_sr = a.bias.sr, bias_sc = a.bias_sc;
    mask_sr = a.mask.sr, mask_sc = a.mask_sc;
    dbias_sr = a.dbias.sr, dbias_sc = a.dbias_sc;
    if constexpr (DROPOUT) {
      drop_k0 = (unsigned)a.dropout_seed;
      drop_k1 = (unsigned)(a.dropout_seed >> 32);
      drop_c3 = (unsigned)a.dropout_offset;
      drop_thr = (unsigned)a.dropout_threshold;
      drop_rp = a.dropout_rp;
      drop_keep = a.dropout_keep;
    }
  }

  // The per-(batch element, group) values: ALiBi slope and sink logit.
  __device__ __forceinline__ void bind(const VariantArgs<Acc> &a, const BatchIndex &bi,
                                       int grp = 0) {
    if constexpr (ALIBI) {
      slope2 = -Acc(a.alibi.batch(bi.b0, bi.b1, bi.b2)[grp * a.alibi_sg]) * Acc(FC_LOG2E);
      slope_u = slope2 / umul;  // (the host refuses ALiBi with scale 0)
    }
    if constexpr (SINK)
      sink2 = Acc(a.sink.batch(bi.b0, bi.b1, bi.b2)[grp * a.sink_sg]) * Acc(FC_LOG2E);
    // (packed sequences read the block of their rows and columns: q0, k0 are 0
    // for dense problems)
    if constexpr (BIAS)
      bias_b = static_cast<const TB *>(a.bias.ptr) + bi.b0 * a.bias.sb0 + bi.b1 * a.bias.sb1 +
               bi.b2 * a.bias.sb2 + grp * a.bias_sg + bi.q0 * a.bias.sr + bi.k0 * a.bias_sc;
    if constexpr (MASK)
      mask_b = a.mask.batch(bi.b0, bi.b1, bi.b2) + grp * a.mask_sg + bi.q0 * a.mask.sr +
               bi.k0 * a.mask_sc;
    if constexpr (DBIAS_STORE)  // (strides in elements of the bias's type)
      dbias_b = reinterpret_cast<Acc *>(reinterpret_cast<TB *>(a.dbias.ptr) + bi.b0 * a.dbias.sb0 +
                                        bi.b1 * a.dbias.sb1 + bi.b2 * a.dbias.sb2 +
                                        grp * a.dbias_sg + bi.q0 * a.dbias.sr +
                                        bi.k0 * a.dbias_sc);
    else if constexpr (DBIAS)
      dbias_b = a.dbias.batch(bi.b0, bi.b1, bi.b2) + grp * a.dbias_sg + bi.q0 * a.dbias.sr +
                bi.k0 * a.dbias_sc;
    if constexpr (DROPOUT)
      drop_bh = (unsigned)((fc_index_t) reinterpret_cast<unsigned long long>(a.dropout_index.ptr) +
                           bi.b0 * a.dropout_index.sb0 + bi.b1 * a.dropout_index.sb1 +
                           bi.b2 * a.dropout_index.sb2 + grp * a.dropout_index_sg);
  }

  // ---- loop ranges ---------------------------------------------------------
  // [key_begin(m0), key_end(m1)) holds every key that query rows [m0, m1) see.
  __device__ __forceinline__ int key_begin(int m0) const {
    return LEFT ? fc_min(seqlen_k, fc_max(0, m0 + lo)) : 0;
  }
  __device__ __forceinline__ int key_end(int m1) const {
    return RIGHT ? fc_max(0, fc_min(seqlen_k, m1 + hi)) : seqlen_k;
  }
  // [query_begin(n0), query_end(n1)) holds every query that sees keys [n0, n1).
  __device__ __forceinline__ int query_begin(int n0) const {
    return RIGHT ? fc_min(seqlen_q, fc_max(0, n0 - hi)) : 0;
  }
  __device__ __forceinline__ int query_end(int n1) const {
    return LEFT ? fc_max(0, fc_min(seqlen_q, n1 - lo)) : seqlen_q;
  }

  // ---- masking -------------------------------------------------------------
  // Whether the tile rows [m0, m1) x keys [n0, n1) (n1 may pass Sk) holds a pair
  // that is not visible; false means no element test is needed.  Rows past Sq
  // may be included in [m0, m1): that only makes the answer more cautious.
  __device__ __forceinline__ bool needs_mask(int m0, int m1, int n0, int n1) const {
    return n1 > seqlen_k || (RIGHT && n1 - 1 - m0 > hi) || (LEFT && n0 - (m1 - 1) < lo);
  }
  // The visible keys of query row i: [row_lo(i), row_hi(i)] (the per-row form of
  // visible, for fragments that walk a row), and the queries that see key j.
  __device__ __forceinline__ int row_lo(int i) const { return LEFT ? i + lo : -0x7fffffff; }
  __device__ __forceinline__ int row_hi(int i) const {
    return RIGHT ? fc_min(seqlen_k, i + hi + 1) - 1 : seqlen_k - 1;  // (this form: no spill in sm80 fwd D=128)
  }
  __device__ __forceinline__ int col_lo(int j) const {
    return j >= seqlen_k ? 0x7fffffff : RIGHT ? j - hi : -0x7fffffff;
  }
  __device__ __forceinline__ int col_hi(int j) const { return LEFT ? j - lo : 0x7fffffff; }
  __device__ __forceinline__ bool visible(int i, int j) const {
    return j < seqlen_k && (!RIGHT || j - i <= hi) && (!LEFT || j - i >= lo);
  }

  // ---- scores --------------------------------------------------------------
  // ALiBi's term in log2 units.
  __device__ __forceinline__ Acc alibi2(int i, int j) const {
    const int d = i + diag - j;
    return slope2 * Acc(d < 0 ? -d : d);
  }
  // tanh(raw * scale / c) as 1 - 2 / (2^(raw * cap_inv2) + 1): one exp2 and one
  // reciprocal; +-1 for large |x| (2^y = inf gives rcp 0), absolute error ~1e-7
  // in float near 0, where the score's own rounding is larger.
  __device__ __forceinline__ Acc tanh_of(Acc raw) const {
    if constexpr (FAST) {
      float t;
      asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(float(raw * cap_inv)));
      return Acc(t);
    }
    return Acc(1) - Acc(2) * fc_fast_rcp(fc_fast_exp2(raw * cap_inv2) + Acc(1));
  }
  // The score of (i, j) in log2 units from the raw dot product q.k (TRANSFORM).
  __device__ __forceinline__ Acc score2(Acc raw, int i, int j) const {
    Acc x = SOFTCAP ? cap_log2 * tanh_of(raw) : raw * scale_log2;
    if constexpr (ALIBI) x += alibi2(i, j);
    if constexpr (OFFSET) x += offset2(i, j);
    return x;
  }
  // The same for fragments that walk a row at compile-time offsets k from a
  // key j0: base = alibi_base(i, j0) once per row, then ALiBi costs one add and
  // one FMA per score (|base - k| is a free operand modifier) instead of integer
  // arithmetic and a conversion.
  //
  // Fragments keep a transformed score in "score units" u, whose log2 value is
  // u * umul: tanh(s / c) + ALiBi / cap_log2 with softcap (umul = cap_log2 > 0),
  // raw + ALiBi / scale_log2 with ALiBi alone (umul = scale_log2).  The bodies
  // then take the row max in u and fold umul into the one FMA of each
  // exponential, as they fold the scale for plain scores: one multiply per
  // score less than converting to log2 units first.
  __device__ __forceinline__ Acc alibi_base(int i, int j0) const { return Acc(i + diag - j0); }
  __device__ __forceinline__ Acc score_u(Acc raw, Acc base, Acc k) const {
    Acc x = SOFTCAP ? tanh_of(raw) : raw;
    if constexpr (ALIBI) x = fma(slope_u, fabs(base - k), x);
    return x;
  }
  __device__ __forceinline__ Acc alibi_u(Acc base, Acc k) const {
    return ALIBI ? slope_u * fabs(base - k) : Acc(0);
  }

  // d(capped score) / d(scaled score) = 1 - tanh^2, from the raw dot product.
  __device__ __forceinline__ Acc dcap_from_raw(Acc raw) const {
    if constexpr (!SOFTCAP) return Acc(1);
    const Acc t = tanh_of(raw);
    return Acc(1) - t * t;
  }
  // The same from P = 2^(score2 - lse2) when the raw score is gone (the
  // tensor-core backward overwrites it with P): tanh = (log2 P + lse2) /
  // cap_log2 - extra_u.  P = 0 (masked or underflowed) gives 0, never 0 * -inf.
  // (extra_u: the pair's ALiBi and offset terms in score units, alibi_u +
  // offset_u.)
  __device__ __forceinline__ Acc dcap_from_prob(Acc p, Acc lse2, Acc extra_u) const {
    if constexpr (!SOFTCAP) return Acc(1);
    if (!(p > Acc(0))) return Acc(0);
    const Acc t = (fc_fast_log2(p) + lse2) * cap_log2_inv - extra_u;
    return Acc(1) - t * t;
  }

  // P of a visible pair from its raw score and the row's natural-log LSE (the
  // generic backward; softmax.cuh's one-FMA form when there is no transform).
  __device__ __forceinline__ Acc prob_from_lse(Acc raw, Acc scale, Acc lse, int i, int j) const {
    if constexpr (!ELEMENTWISE) return OnlineSoftmax<Acc>::prob_from_lse(raw, scale, lse);
    return lse == fc_neg_inf<Acc>::value() ? Acc(0)
                                           : fc_exp2(score2(raw, i, j) - lse * Acc(FC_LOG2E));
  }

  // ---- bias and mask ------------------------------------------------------
  // The pair's additive offset in score units (offset_u; log2 units: offset2):
  // the bias, and -inf where the mask removes the pair.  A row's pointers are
  // formed once (offset_row) and a key adds a 32-bit column offset (the host
  // makes the column stride 1, or 0 for a broadcast over keys).  Rows past Sq
  // and keys past Sk (tile padding, whose results are discarded) read a valid
  // element.
  typedef TB bias_t;
  struct OffsetRow {
    const TB *bias;
    const unsigned char *mask;
  };
  __device__ __forceinline__ OffsetRow offset_row(int i) const {
    const fc_index_t ic = fc_min(i, seqlen_q - 1);
    OffsetRow r;
    if constexpr (BIAS) r.bias = bias_b + ic * bias_sr;
    if constexpr (MASK) r.mask = mask_b + ic * mask_sr;
    return r;
  }
  // A pair's elements as loaded (offset_load) and the offset they make
  // (offset_of).
  struct OffsetRaw {
    TB bias;
    unsigned char mask;
  };
  __device__ __forceinline__ OffsetRaw offset_load(const OffsetRow &r, int j) const {
    OffsetRaw o;
    const int jc = fc_min(j, seqlen_k - 1);
    if constexpr (BIAS) o.bias = r.bias[jc * int(bias_sc)];
    if constexpr (MASK) o.mask = r.mask[jc * int(mask_sc)];
    return o;
  }
  __device__ __forceinline__ Acc offset_of(const OffsetRaw &o, Acc mul) const {
    Acc x = Acc(0);
    if constexpr (BIAS) x = to_acc<Acc>(o.bias) * mul;
    if constexpr (MASK)
      if (!o.mask) x = fc_neg_inf<Acc>::value();
    return x;
  }
  __device__ __forceinline__ Acc offset_u(const OffsetRow &r, int j, Acc mul) const {
    return offset_of(offset_load(r, j), mul);
  }
  __device__ __forceinline__ Acc offset_u(const OffsetRow &r, int j) const {
    return offset_u(r, j, bias_umul);
  }
  __device__ __forceinline__ Acc offset_u(int i, int j) const {
    return offset_u(offset_row(i), j, bias_umul);
  }
  __device__ __forceinline__ Acc offset2(int i, int j) const {
    return offset_u(offset_row(i), j, Acc(FC_LOG2E));
  }
  // dbias(i, j) += dS(i, j) (natural units: the gradient of the logit the bias
  // joins).  Atomic: a bias broadcast over batch or group axes has several
  // writers.  A full bias has one per element: DBIAS_STORE stores dS in the
  // bias's own type (no float32 buffer, no atomics, no cast afterwards).
  __device__ __forceinline__ void dbias_add(int i, int j, Acc ds) const {
    if constexpr (DBIAS)
      if (i < seqlen_q && j < seqlen_k) {
        const fc_index_t off = (fc_index_t)i * dbias_sr + (fc_index_t)j * dbias_sc;
        if constexpr (DBIAS_STORE)
          reinterpret_cast<TB *>(dbias_b)[off] = from_acc<TB>(ds);
        else
          atomicAdd(dbias_b + off, ds);
      }
  }

  // ---- dropout -------------------------------------------------------------
  // The Philox call that holds the bits of pair (i, j): counter (4 (j / 32) +
  // (j / 2) % 4, i, bh, offset).  It serves the 8 keys j' of row i in the same
  // 32-key block with the same (j' / 2) % 4: in the C-fragment layout, the
  // keys one lane holds in that block (sm80/scores.cuh, dropout_frag).
  __device__ __forceinline__ uint4 dropout_call(int i, int j) const {
    return fc_philox(4u * ((unsigned)j >> 5) + (((unsigned)j >> 1) & 3u), (unsigned)i, drop_bh,
                     drop_c3, drop_k0, drop_k1);
  }
  // Whether the pair whose bits are word w (= (j / 8) % 4), half e (= j % 2)
  // of its call's output r survives.
  __device__ __forceinline__ bool dropout_kept(const uint4 &r, int w, int e) const {
    const unsigned x = w == 0 ? r.x : w == 1 ? r.y : w == 2 ? r.z : r.w;
    return (e ? x >> 16 : x & 0xFFFFu) >= drop_thr;
  }
  __device__ __forceinline__ bool dropout_keep(int i, int j) const {
    return dropout_kept(dropout_call(i, j), (j >> 3) & 3, j & 1);
  }
  // The backward's P of a pair in one register that also says whether dropout
  // kept it: P / (1 - p) (>= 0: what dV multiplies) if kept, -P if dropped.
  // dS = P o (dP o Z / (1 - p) - delta) from it (ds_dropout), and the true P
  // (softcap's derivative) from it (prob_dropout).  A P of 0 (masked) gives 0.
  __device__ __forceinline__ Acc encode_dropout(Acc p, bool kept) const {
    return kept ? p * drop_rp : -p;
  }
  __device__ __forceinline__ Acc ds_dropout(Acc pe, Acc dp, Acc delta) const {
    return pe >= Acc(0) ? pe * (dp - delta * drop_keep) : pe * delta;
  }
  __device__ __forceinline__ Acc prob_dropout(Acc pe) const {
    return pe >= Acc(0) ? pe * drop_keep : -pe;
  }

  // ---- sink ----------------------------------------------------------------
  // The sink is a key with score sink2 and no value: the running max starts at
  // it, and exp2(sink2 - m) joins the row sum once, after the partial sums are
  // reduced.  A row that sees no key then has out = 0 and lse = sink.
  __device__ __forceinline__ Acc init_max() const {
    return SINK ? sink2 : fc_neg_inf<Acc>::value();
  }
  __device__ __forceinline__ Acc sink_term(Acc m) const {
    return SINK ? fc_fast_exp2(sink2 - m) : Acc(0);
  }
};

// The Variant a kernel with storage type T and accumulator Acc instantiates.
template <typename T, typename Acc, int VF, bool FAST = false>
using VariantFor =
    Variant<Acc, VF, FAST, typename fc_bias_type<T, Acc, (VF & FC_VF_BIAS_ACC) != 0>::type>;
