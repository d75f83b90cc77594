// flashcupy sm80 family: attention backward on tensor cores (FlashAttention-2).
//
//   0. fc_sm80_bwd_preprocess<T, HDV, NWARPS>   delta = rowsum(dO o O), vector loads
//   1. fc_sm80_bwd_dkdv    one CTA per key tile: dK, dV in registers over every query
//                          tile and broadcast group
//      fc_sm80_bwd_dkdvq   the same, and dQ accumulated with fp32 red.global.add into
//                          the workspace dq_accum ("fast" mode, non-deterministic)
//   2. fc_sm80_bwd_dq      one CTA per query tile: dQ over every key tile
//                          (deterministic mode)
//      fc_sm80_bwd_dq_convert   dq = dq_accum * softmax_scale, cast to T (fast mode)
// P is recomputed as exp2(S * scale_log2 - LSE * log2(e)); with dP = dO V^T and
// dS = P o (dP - delta):  dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K.
//
// Template parameters of 1 and 2:
//   <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, int VF>
//   VF: the variant flags (variant.cuh); every kernel takes BwdParams<T, float, T> (params.cuh)
//
// fc_sm80_bwd_dkdv    reads q, k, v, dout, lse, delta, n_group and the group strides;
//                     writes dk, dv
// fc_sm80_bwd_dkdvq   the same, and adds into dq_accum (group stride dq_accum_sg)
//   grid  = (ceil(Sk / BLOCK_N), batch of k/v over y*z);  block = NWARPS * 32
//   smem  = DkdvCfg::SMEM_BYTES
//         = 2 * BLOCK_N * (HD + HDV + 16)                                 K, V
//         + STAGES * (2 * BLOCK_M * (HD + HDV + 16) + 8 * BLOCK_M)       Q, dO, lse, delta
//         + (dkdvq only) 2 * BLOCK_N * (BLOCK_M + 8)                      dS^T
//   SPLIT2D = true (appended template parameter, default false; 8 warps, HD % 64 == 0):
//   smem  = Dkdv2dCfg::SMEM_BYTES, both kernels:
//         = 2 * BLOCK_N * (HD + HDV + 16) + STAGES * (2 * BLOCK_M * (HD + HDV) + 8 * BLOCK_M)
//         + 4 * BLOCK_M * (BLOCK_N + 8)                                    P, dS
//   (the streamed Q and dO tiles are swizzled, swz_off in mma.cuh: no pad)
//         + (BULK_DQ, appended after SPLIT2D) 4 * BLOCK_M * HD          dQ staging
//   (The sm90 family's dK/dV kernels, cuda_src/sm90/bwd.cuh, reuse DkdvRing, add_dq
//   and stage_dq below with every product on wgmma.)
//   dq_accum: float32 workspace, zero-initialized by the host; holds dS K without
//   the softmax scale.  Layout contract: its rows have pitch HD (the bucket, not
//   head_dim; dq_accum_sr is ignored) and the query axis holds Sq rounded up to a
//   multiple of BLOCK_M, so every atomic add is in bounds without a test.  Rows
//   past Sq and columns past head_dim receive exact zeros (their Q, dO and K are
//   zero-filled in shared memory).  Within each 16-column group the columns are
//   stored in the quad order of add_dq (16-byte vector reductions).  Batch
//   strides (multiples of 4 floats) and the group stride dq_accum_sg are free.
//   Then fc_sm80_bwd_dq_convert writes dq.
//
// fc_sm80_bwd_dq      reads q, k, v, dout, lse, delta; writes dq
//   grid  = (ceil(Sq / BLOCK_M), batch over y*z), reversed like the forward;  block = NWARPS*32
//   smem  = DqCfg::SMEM_BYTES = 2 * (BLOCK_M * (HD + HDV + 16) + STAGES * BLOCK_N * (HD + HDV + 16))
//
// fc_sm80_bwd_dq_convert<T, NWARPS>   reads dq_accum, writes dq (= dq_accum * scale)
//   grid = (ceil(Sq / (4 * NWARPS)), batch over y*z); block = NWARPS * 32; no smem.
//   One thread per 16-byte quad of the workspace (columns in add_dq's quad order).
//
// dK/dV work split: warp w owns keys [w*WN, (w+1)*WN) of the CTA's key tile (WN = 16
// or 32) and computes the transposed products S^T = K Q^T and dP^T = V dO^T for
// them, so P^T and dS^T land in registers exactly as the A operands of
// dV += P^T dO and dK += dS^T Q: no shared-memory round trip and no reduction
// across warps.  Q, dO (and LSE, delta) stream through a cp.async ring.
#pragma once
#include "../softmax.cuh"
#include "scores.cuh"


namespace sm80 {

template <int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, bool ATOMIC_DQ>
struct DkdvCfg {
  static constexpr int NTHREADS = NWARPS * 32;
  static constexpr int WN = BLOCK_N / NWARPS;  // keys per warp
  static constexpr int NT = WN / 16;           // m16 tiles (of keys) per warp
  static constexpr int LDK = HD + PAD, LDV = HDV + PAD, LDQ = HD + PAD, LDO = HDV + PAD;
  static constexpr int LDS = BLOCK_M + PAD;    // dS^T pitch
  static constexpr bool SWZ_QDO = false;       // Q / dO tiles padded (DkdvRing)
  static constexpr bool SWZ_KV = false;        // K / V tiles padded
  static constexpr bool WG_SDP = false;        // S, dP by mma.sync
  static constexpr bool K_IN_REGS = NT * (HD + HDV) <= 64;
  // (BLOCK_N, LDK) K | (BLOCK_N, LDV) V | STAGES x [(BLOCK_M, LDQ) Q | (BLOCK_M, LDO) dO]
  // | STAGES x (BLOCK_M) lse | STAGES x (BLOCK_M) delta | (BLOCK_N, LDS) dS^T
  static constexpr int K_OFF = 0;                              // bytes
  static constexpr int V_OFF = K_OFF + 2 * BLOCK_N * LDK;
  static constexpr int QDO_OFF = V_OFF + 2 * BLOCK_N * LDV;
  static constexpr int QDO_STAGE = 2 * BLOCK_M * (LDQ + LDO);
  static constexpr int LSE_OFF = QDO_OFF + STAGES * QDO_STAGE;
  static constexpr int DELTA_OFF = LSE_OFF + 4 * STAGES * BLOCK_M;
  static constexpr int DS_OFF = DELTA_OFF + 4 * STAGES * BLOCK_M;
  static constexpr int SMEM_BYTES = DS_OFF + (ATOMIC_DQ ? 2 * BLOCK_N * LDS : 0);
  // dQ = dS K over the CTA: warps tile (BLOCK_M / 16) m16 tiles x column groups of HD
  static constexpr int MT16 = BLOCK_M / 16;
  static constexpr int DQ_MT = MT16 >= NWARPS ? MT16 / NWARPS : 1;
  static constexpr int DQ_WM = MT16 / DQ_MT;        // warps along M
  static constexpr int DQ_WN = NWARPS / DQ_WM;      // warps along HD
  static constexpr int DQ_COLS = HD / DQ_WN;
  static_assert(WN % 16 == 0 && NT >= 1 && NT <= 2, "a warp owns 16 or 32 keys");
  static_assert(BLOCK_M % 16 == 0 && HD % 16 == 0 && HDV % 16 == 0, "multiples of 16");
  static_assert(DQ_WM * DQ_WN == NWARPS && DQ_COLS % 16 == 0, "dQ warp tiling");
  static_assert(STAGES >= 2, "at least double-buffered");
};

template <int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES>
struct DqCfg {
  static constexpr int NTHREADS = NWARPS * 32;
  static constexpr int WM = BLOCK_M / NWARPS;
  static constexpr int MT = WM / 16;
  static constexpr int LDQ = HD + PAD, LDO = HDV + PAD, LDK = HD + PAD, LDV = HDV + PAD;
  static constexpr bool Q_IN_REGS = MT * (HD + HDV) <= 128;  // Q and dO fragments
  // (BLOCK_M, LDQ) Q (later dQ staging) | (BLOCK_M, LDO) dO | STAGES x [(BLOCK_N, LDK) K | (BLOCK_N, LDV) V]
  static constexpr int Q_ELEMS = BLOCK_M * LDQ;
  static constexpr int DO_ELEMS = BLOCK_M * LDO;
  static constexpr int KV_ELEMS = BLOCK_N * (LDK + LDV);
  static constexpr int SMEM_BYTES = 2 * (Q_ELEMS + DO_ELEMS + STAGES * KV_ELEMS);
  static_assert(WM % 16 == 0 && MT >= 1 && MT <= 2, "a warp owns 16 or 32 query rows");
  static_assert(STAGES >= 2, "at least double-buffered");
};

// Position (broadcast group, query tile) of a step of the dK/dV loop, advanced
// by one per step: a running counter instead of t / n_mt and t % n_mt, whose
// integer division cost ~25 instructions per step in the loop.
struct StepIter {
  int grp, mi;
  __device__ __forceinline__ void next(int n_mt) {
    if (++mi == n_mt) {
      mi = 0;
      ++grp;
    }
  }
};

// What the two dK/dV bodies share, independent of their warp split (C is
// DkdvCfg or Dkdv2dCfg: the same shared-memory fields): the order of the steps
// (broadcast group g, query tile), the Q / dO / LSE / delta cp.async ring, and
// the resident K / V tiles.
template <typename T, class C, int HD, int HDV, int BLOCK_M, int BLOCK_N, int STAGES,
          bool ATOMIC_DQ>
struct DkdvRing {
  static constexpr int NTHREADS = C::NTHREADS;
  const T *q_b, *do_b;
  const float *lse_b, *delta_b;
  fc_index_t q_sr, do_sr, lse_sr, delta_sr, q_sg, do_sg, lse_sg, delta_sg;
  int seqlen_q, head_dim, head_dim_v, m_first, n_mt, n_steps, rot;
  StepIter pf, cur;  // the step being prefetched / computed

  // Query tiles [m_first, m_last) see a key of this CTA (variant.cuh's
  // query_begin / query_end: a window or causal mask skips the others).
  __device__ __forceinline__ void init(int m_first_, int m_last, int n_group) {
    m_first = m_first_;
    n_mt = fc_max(0, m_last - m_first);  // query tiles per group
    n_steps = n_group * n_mt;
    // Atomic dQ: CTA x visits its query tiles starting at tile x mod n_mt (then
    // wraps), so the CTAs in flight add into different dQ rows instead of all
    // sweeping the same rows in lockstep (same-address reductions serialize in L2).
    rot = ATOMIC_DQ && n_mt > 0 ? (int)(blockIdx.x % (unsigned)n_mt) : 0;
    pf = StepIter{0, 0};
    cur = StepIter{0, 0};
  }
  __device__ __forceinline__ int m0_of(StepIter it) const {
    const int mi = it.mi + rot >= n_mt ? it.mi + rot - n_mt : it.mi + rot;
    return (m_first + mi) * BLOCK_M;
  }
  __device__ __forceinline__ void load(StepIter it, int stage, unsigned char *smem) const {
    const int grp = it.grp, m0 = m0_of(it), mv = seqlen_q - m0;
    T *sQ = reinterpret_cast<T *>(smem + C::QDO_OFF + stage * C::QDO_STAGE);
    load_tile<T, BLOCK_M, HD, NTHREADS, C::SWZ_QDO>(sQ, q_b + grp * q_sg + m0 * q_sr, q_sr, mv,
                                                    head_dim);
    load_tile<T, BLOCK_M, HDV, NTHREADS, C::SWZ_QDO>(
        sQ + BLOCK_M * C::LDQ, do_b + grp * do_sg + m0 * do_sr, do_sr, mv, head_dim_v);
    const u32 smem0 = smem_u32(smem);
    for (int r = threadIdx.x; r < 2 * BLOCK_M; r += NTHREADS) {
      const bool is_lse = r < BLOCK_M;
      const int rr = is_lse ? r : r - BLOCK_M;
      const float *src = is_lse ? lse_b + grp * lse_sg + (fc_index_t)(m0 + rr) * lse_sr
                                : delta_b + grp * delta_sg + (fc_index_t)(m0 + rr) * delta_sr;
      const u32 dst =
          smem0 + (is_lse ? C::LSE_OFF : C::DELTA_OFF) + 4 * (stage * BLOCK_M + rr);
      const bool ok = rr < mv;
      cp_async_4(dst, ok ? src : lse_b, ok ? 4 : 0);  // rows past Sq: lse = delta = 0
    }
  }
  // The ring of key tile [n_start, n_start + n_rows) of batch element bi: its
  // views of the parameters, the query tiles that see a key of the tile
  // (variant.cuh's query range: a window or causal mask skips the others), and
  // the prologue.  One call for every dK/dV body.
  template <class V>
  __device__ __forceinline__ void start(const BwdParams<T, float, T> &p, const BatchIndex &bi,
                                        const V &var, int n_start, int n_rows,
                                        unsigned char *smem) {
    q_b = q_rows(p.q, bi);
    do_b = q_rows(p.dout, bi);
    lse_b = q_rows(p.lse, bi);
    delta_b = q_rows(p.delta, bi);
    q_sr = p.q.sr, do_sr = p.dout.sr, lse_sr = p.lse.sr, delta_sr = p.delta.sr;
    q_sg = p.q_sg, do_sg = p.dout_sg, lse_sg = p.lse_sg, delta_sg = p.delta_sg;
    seqlen_q = bi.sq, head_dim = p.head_dim, head_dim_v = p.head_dim_v;
    init(var.query_begin(n_start) / BLOCK_M, fc_ceil_div(var.query_end(n_start + BLOCK_N), BLOCK_M),
         p.n_group);
    prologue(smem, k_rows(p.k, bi) + n_start * p.k.sr, p.k.sr,
             k_rows(p.v, bi) + n_start * p.v.sr, p.v.sr, n_rows);
  }

  // K and V (they stay resident), then the first STAGES - 1 steps.
  __device__ __forceinline__ void prologue(unsigned char *smem, const T *k_tile, fc_index_t k_sr,
                                           const T *v_tile, fc_index_t v_sr, int n_rows) {
    load_tile<T, BLOCK_N, HD, NTHREADS, C::SWZ_KV>(reinterpret_cast<T *>(smem + C::K_OFF), k_tile,
                                                  k_sr, n_rows, head_dim);
    load_tile<T, BLOCK_N, HDV, NTHREADS, C::SWZ_KV>(reinterpret_cast<T *>(smem + C::V_OFF), v_tile,
                                                   v_sr, n_rows, head_dim_v);
    cp_async_commit();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < n_steps) load(pf, s, smem);
      pf.next(n_mt);
      cp_async_commit();
    }
  }
  struct Step {
    int stage, grp, m0;
  };
  // Top of step t: its tiles have landed for every thread (and the buffers of
  // step t - 1 are free); prefetches step t + STAGES - 1.
  __device__ __forceinline__ Step begin(int t, unsigned char *smem) {
    cp_async_wait<STAGES - 2>();
    // wgmma reads shared memory through the async proxy: the cp.async (generic
    // proxy) writes this thread waited for are made visible to it first.
    if constexpr (C::WG_SDP) fence_proxy_async();
    __syncthreads();
    if (t + STAGES - 1 < n_steps) load(pf, (t + STAGES - 1) % STAGES, smem);
    pf.next(n_mt);
    cp_async_commit();
    const Step st{t % STAGES, cur.grp, m0_of(cur)};
    cur.next(n_mt);
    return st;
  }
};

// The dq_accum column order within each group of 16 columns (the "quad" order):
// lane c (= lane % 4) of an mma C fragment holds columns 2c, 2c+1 of n8 tile 2j
// and 2c, 2c+1 of tile 2j+1, i.e. 16j + {2c, 2c+1, 2c+8, 2c+9}; they are stored
// side by side at 16j + 4c + {0, 1, 2, 3}, so one 16-byte red.global.add.v4
// adds all four (half the reduction instructions of the natural order, whose
// pairs are 8-byte runs).  fc_sm80_bwd_dq_convert undoes the permutation.
//
// dq_accum += one warp's dQ tile (MT m16 tiles x COLS columns, COLS a multiple
// of 16) at dst = the workspace at (the warp's first row + g, its first column
// + 4c); the workspace contract (see the header) makes every address valid and
// 16-byte aligned, so there is no row or column test.
template <int MT, int COLS, int PITCH>
__device__ __forceinline__ void add_dq(float *dst, const float (&acc)[MT][COLS / 8][4]) {
  static_assert(COLS % 16 == 0, "dQ warp tiles span whole 16-column groups");
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < COLS / 16; ++j)
        red_add4(dst + (mt * 16 + 8 * h) * PITCH + 16 * j, acc[mt][2 * j][2 * h],
                 acc[mt][2 * j][2 * h + 1], acc[mt][2 * j + 1][2 * h],
                 acc[mt][2 * j + 1][2 * h + 1]);
}

// A warp's dQ tile (MT m16 tiles x COLS columns at tile row row0, column col0) into
// the float32 staging tile at shared address sdq, in the workspace's own layout
// (quad order, pitch HD), for one bulk reduction of the whole tile.
template <int MT, int COLS, int HD>
__device__ __forceinline__ void stage_dq(u32 sdq, int row0, int col0,
                                         const float (&acc)[MT][COLS / 8][4], int lane) {
  const int g = lane >> 2, c4 = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < COLS / 16; ++j) {
        const u32 a = sdq + 4 * ((row0 + mt * 16 + g + 8 * h) * HD + col0 + 16 * j + 4 * c4);
        asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(a),
                     "f"(acc[mt][2 * j][2 * h]), "f"(acc[mt][2 * j][2 * h + 1]),
                     "f"(acc[mt][2 * j + 1][2 * h]), "f"(acc[mt][2 * j + 1][2 * h + 1])
                     : "memory");
      }
}

template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES,
          int VF, bool ATOMIC_DQ>
__device__ __forceinline__ void bwd_dkdv_body(const BwdParams<T, float, T> &p) {
  using C = DkdvCfg<HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, ATOMIC_DQ>;
  constexpr int NTHREADS = C::NTHREADS, NT = C::NT, WN = C::WN;
  constexpr int LDK = C::LDK, LDV = C::LDV, LDQ = C::LDQ, LDO = C::LDO, LDS = C::LDS;
  constexpr int NQ = BLOCK_M / 8;  // n8 tiles of S^T (queries)

  extern __shared__ __align__(16) unsigned char fc_sm80_smem[];
  T *sK = reinterpret_cast<T *>(fc_sm80_smem + C::K_OFF);  // (BLOCK_N, LDK)
  T *sV = reinterpret_cast<T *>(fc_sm80_smem + C::V_OFF);  // (BLOCK_N, LDV)
  const u32 smem0 = smem_u32(fc_sm80_smem);

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;

  using V = VariantFor<T, float, VF, true>;
  V var(p.var, seq_len_q<VF>(bi, p), seq_len_k<VF>(bi, p), p.scale_log2);
  const int n_start = blockIdx.x * BLOCK_N;
  if constexpr ((VF & FC_VF_SEQ) != 0)  // (past this sequence's end: the grid covers the longest)
    if (n_start >= seq_len_k<VF>(bi, p)) return;
  const int n_rows = fc_min(BLOCK_N, seq_len_k<VF>(bi, p) - n_start);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, c4 = lane & 3;
  const int wkey = warp * WN;  // first tile key of this warp

  DkdvRing<T, C, HD, HDV, BLOCK_M, BLOCK_N, STAGES, ATOMIC_DQ> ring;
  ring.start(p, bi, var, n_start, n_rows, fc_sm80_smem);

  const u32 sK_a = smem_u32(sK) + 2 * (wkey * LDK + lane_a<LDK>(lane));
  const u32 sV_a = smem_u32(sV) + 2 * (wkey * LDV + lane_a<LDV>(lane));
  AFrags<C::K_IN_REGS, NT, HD / 16, LDK> k_frag;
  AFrags<C::K_IN_REGS, NT, HDV / 16, LDV> v_frag;
  cp_async_wait<STAGES - 1>();
  __syncthreads();
  k_frag.load(sK_a);
  v_frag.load(sV_a);

  float acc_dk[NT][HD / 8][4];   // (WN, HD) this warp's dK rows, unscaled
  float acc_dv[NT][HDV / 8][4];  // (WN, HDV) this warp's dV rows
  zero(acc_dk);
  zero(acc_dv);

#pragma unroll 1
  for (int t = 0; t < ring.n_steps; ++t) {
    const auto step = ring.begin(t, fc_sm80_smem);
    const int stage = step.stage, grp = step.grp, m0 = step.m0;
    var.bind(p.var, bi, grp);  // ALiBi: the step's query head has its own slope
    const u32 sQ_u = smem0 + C::QDO_OFF + stage * C::QDO_STAGE;
    const u32 sdO_u = sQ_u + 2 * BLOCK_M * LDQ;
    const float *sLse =
        reinterpret_cast<const float *>(fc_sm80_smem + C::LSE_OFF) + stage * BLOCK_M;
    const float *sDelta =
        reinterpret_cast<const float *>(fc_sm80_smem + C::DELTA_OFF) + stage * BLOCK_M;

    // S^T = K Q^T and dP^T = V dO^T, (WN, BLOCK_M) each
    float st[NT][NQ][4], dpt[NT][NQ][4];
    zero(st);
    gemm_nt<T, NT, BLOCK_M, HD, LDQ>(st, k_frag, sQ_u, lane);
    zero(dpt);
    gemm_nt<T, NT, BLOCK_M, HDV, LDO>(dpt, v_frag, sdO_u, lane);

    // P^T = exp2(score2 - lse2[query]); dS^T = P^T o (dP^T - delta[query]) (times
    // softcap's 1 - tanh^2).  Transposed fragments: element (nt, mq, r) is key
    // n_start + wkey + 16 nt + g + 8 (r >> 1) and query m0 + 8 mq + 2 c4 + (r & 1).
    // Masked only where the tile crosses the key end or a window edge.  Query rows
    // past Sq are zero-filled (Q = dO = 0, lse = delta = 0): they add 0.
    const bool need_mask = var.needs_mask(m0, m0 + BLOCK_M, n_start, n_start + BLOCK_N);
    const int key0 = n_start + wkey + g;
    // ALiBi's distance i + diag - j = base + k, k a compile-time offset (variant.cuh)
    const float base = var.alibi_base(m0 + 2 * c4, key0);
#pragma unroll
    for (int mq = 0; mq < NQ; ++mq) {
      const float2 l2 = *reinterpret_cast<const float2 *>(sLse + mq * 8 + 2 * c4);
      const float2 d2 = *reinterpret_cast<const float2 *>(sDelta + mq * 8 + 2 * c4);
      const float lse2[2] = {lse_to_log2(l2.x), lse_to_log2(l2.y)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint4 drop[2];  // (dropout: the calls of the two queries)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int j = key0 + nt * 16 + 8 * (r >> 1), i = m0 + mq * 8 + 2 * c4 + (r & 1);
          const float k = float(nt * 16 + 8 * (r >> 1) - mq * 8 - (r & 1));
          const float off = V::OFFSET ? var.offset_u(i, j) : 0.f;  // bias / mask
          float pe;
          if constexpr (V::TRANSFORM) {
            const float u = var.score_u(st[nt][mq][r], base, k);
            pe = ex2(fmaf(V::OFFSET ? u + off : u, var.umul, -lse2[r & 1]));
          } else {
            const float u = st[nt][mq][r];
            pe = ex2((V::OFFSET ? u + off : u) * p.scale_log2 - lse2[r & 1]);
          }
          if (need_mask && (i < var.col_lo(j) || i > var.col_hi(j))) pe = 0.f;
          float dpe = dpt[nt][mq][r];
          if constexpr (V::DROPOUT) {
            // keys j and j + 8 of query i share a Philox call (variant.cuh): one per
            // (mq, nt, query), drawn at r = 0, 1 and used again at r = 2, 3
            if (r < 2) drop[r] = var.dropout_call(i, j);
            const bool kept = var.dropout_kept(drop[r & 1], (j >> 3) & 3, j & 1);
            st[nt][mq][r] = kept ? pe * var.drop_rp : 0.f;  // what dV multiplies
            dpe = kept ? dpe * var.drop_rp : 0.f;
          } else {
            st[nt][mq][r] = pe;
          }
          float ds = pe * (dpe - ((r & 1) ? d2.y : d2.x));
          var.dbias_add(i, j, ds);  // (with FC_VF_DBIAS; before softcap's factor)
          if constexpr (V::SOFTCAP)
            ds *= var.dcap_from_prob(pe, lse2[r & 1],
                                     V::OFFSET ? var.alibi_u(base, k) + off : var.alibi_u(base, k));
          dpt[nt][mq][r] = ds;
        }
      }
    }

    // dV += P^T dO,  dK += dS^T Q   (k = queries)
    gemm_pn<T, NT, HDV, BLOCK_M, LDO>(acc_dv, st, sdO_u, lane);
    gemm_pn<T, NT, HD, BLOCK_M, LDQ>(acc_dk, dpt, sQ_u, lane);

    if constexpr (ATOMIC_DQ) {
      // dQ (BLOCK_M, HD) += dS K: dS^T goes to shared memory (each warp its keys),
      // then warps tile dQ and add it into the fp32 workspace.
      T *sdS = reinterpret_cast<T *>(fc_sm80_smem + C::DS_OFF);  // (BLOCK_N, LDS) dS^T
      frag_to_smem<T, NT, NQ, LDS>(sdS, wkey, dpt, 1.f, lane);
      __syncthreads();
      constexpr int DQ_MT = C::DQ_MT, DQ_COLS = C::DQ_COLS;
      const int wm = warp % C::DQ_WM, wn = warp / C::DQ_WM;
      const int qrow0 = wm * DQ_MT * 16, col0 = wn * DQ_COLS;
      float acc_dq[DQ_MT][DQ_COLS / 8][4];
      zero(acc_dq);
      const u32 a_lane = smem_u32(sdS) + 2 * (lane_at<LDS>(lane) + qrow0);
      const u32 b_lane = smem_u32(sK) + 2 * (lane_bk<LDK>(lane) + col0);
      gemm_ab<T, DQ_MT, DQ_COLS, BLOCK_N, 2>(
          acc_dq, [&](int mt, int kk, u32(&a)[4]) { ldsm_x4_t(a, a_lane + 2 * (kk * 16 * LDS + mt * 16)); },
          [&](int n2, int kk, u32(&b)[4]) { ldsm_x4_t(b, b_lane + 2 * (kk * 16 * LDK + n2 * 16)); });
      add_dq<DQ_MT, DQ_COLS, HD>(p.dq_accum.batch(bi.b0, bi.b1, bi.b2) + seq_qa0<VF>(bi, p) * HD + grp * p.dq_accum_sg +
                                     (fc_index_t)(m0 + qrow0 + g) * HD + col0 + 4 * c4,
                                 acc_dq);
    }
  }
  cp_async_wait<0>();

  // Epilogue: stage dK (scaled) and dV through the K / V tiles, then store.
  __syncthreads();
  frag_to_smem<T, NT, HD / 8, LDK>(sK, wkey, acc_dk, p.scale, lane);
  frag_to_smem<T, NT, HDV / 8, LDV>(sV, wkey, acc_dv, 1.f, lane);
  __syncthreads();
  seq_reload<VF>(bi, p);
  const int n_out = fc_min(BLOCK_N, seq_len_k<VF>(bi, p) - n_start);  // (= n_rows, from the reloaded length)
  store_tile<T, BLOCK_N, HD, NTHREADS>(k_rows(p.dk, bi) + n_start * p.dk.sr, p.dk.sr,
                                       sK, n_out, p.head_dim);
  store_tile<T, BLOCK_N, HDV, NTHREADS>(k_rows(p.dv, bi) + n_start * p.dv.sr, p.dv.sr,
                                        sV, n_out, p.head_dim_v);
}


// ---------------------------------------------------------------------------
// dK/dV with a 2-D warp split (SPLIT2D = true; NWARPS = 8, HD, HDV multiples of 64).
//
// The 1-D split above gives each warp 16 keys: every Q / dO fragment it reads
// from shared memory feeds one m16 tile, so the loop is shared-memory bound
// (1.6 mma per ldmatrix at HD 128).  Here every product gets its own warp tiling
// and P, dS make one trip through shared memory (as T, as flash-attn 2 does):
//   S = Q K^T, dP = dO V^T   (BLOCK_M, BLOCK_N): 2 x (NWARPS/2) warps, 32 x 32 or so each
//   dV += P^T dO, dK += dS^T Q  (BLOCK_N, HD):   (NWARPS/2) x 2 warps, 32 keys x HD/2
//   dQ += dS K (atomic only)  (BLOCK_M, HD):     QWM x QWD warps, 32 rows each
// Each warp tile is >= 32 x 32, so each fragment read feeds >= 2 mma.
// ---------------------------------------------------------------------------
template <int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, bool ATOMIC_DQ,
          bool BULK>
struct Dkdv2dCfg {
  static constexpr int NTHREADS = NWARPS * 32;
  // K, V: padded (loaded once); the streamed Q, dO: swizzled (swz_off: 64-column
  // panels of 128-byte rows)
  static constexpr bool SWZ_QDO = true, SWZ_KV = false, WG_SDP = false;  // (DkdvRing)
  static constexpr int LDK = HD + PAD, LDV = HDV + PAD, LDQ = HD, LDO = HDV;
  static constexpr int LDP = BLOCK_N + PAD;  // P and dS pitch
  static constexpr int PANEL_Q = BLOCK_M * 128;  // bytes
  // S / dP tiling
  static constexpr int SWM = 2, SWN = NWARPS / 2;
  static constexpr int S_MT = BLOCK_M / SWM / 16, S_N = BLOCK_N / SWN;
  // dK / dV tiling
  // (HD = 256: 4 slices of 64 columns, so each warp's dK / dV slice stays
  // within one swizzle panel and its accumulators at 2 x 64 registers)
  static constexpr int KWD = (HD > 128 || HDV > 128) ? 4 : 2, KWN = NWARPS / KWD;
  static constexpr int K_MT = BLOCK_N / KWN / 16, KD = HD / KWD, KDV = HDV / KWD;
  // dQ tiling
  static constexpr int QWM = BLOCK_M / 32 < NWARPS ? BLOCK_M / 32 : NWARPS;
  static constexpr int QWD = NWARPS / QWM;
  static constexpr int Q_MT = BLOCK_M / QWM / 16, QD = HD / QWD;
  // (BLOCK_N, LDK) K | (BLOCK_N, LDV) V | STAGES x [(BLOCK_M, LDQ) Q | (BLOCK_M, LDO) dO]
  // | STAGES x (BLOCK_M) lse | STAGES x (BLOCK_M) delta | (BLOCK_M, LDP) P | (BLOCK_M, LDP) dS
  static constexpr int K_OFF = 0;  // bytes
  static constexpr int V_OFF = K_OFF + 2 * BLOCK_N * LDK;
  static constexpr int QDO_OFF = V_OFF + 2 * BLOCK_N * LDV;
  static constexpr int QDO_STAGE = 2 * BLOCK_M * (LDQ + LDO);
  static constexpr int LSE_OFF = QDO_OFF + STAGES * QDO_STAGE;
  static constexpr int DELTA_OFF = LSE_OFF + 4 * STAGES * BLOCK_M;
  static constexpr int P_OFF = DELTA_OFF + 4 * STAGES * BLOCK_M;
  static constexpr int DS_OFF = P_OFF + 2 * BLOCK_M * LDP;
  // BULK: the atomic kernel adds each step's dQ tile with one bulk (TMA-engine)
  // reduction from a float32 staging tile instead of red.global.add from
  // registers (sm_90+): no reduction instructions in the SM, no registers held
  // by in-flight reductions (NOTES.md section 7).
  static constexpr bool BULK_DQ = ATOMIC_DQ && BULK;
  static constexpr int DQS_OFF = DS_OFF + 2 * BLOCK_M * LDP;  // (BLOCK_M, HD) float32 staging
  static constexpr int SMEM_BYTES = DQS_OFF + (BULK_DQ ? 4 * BLOCK_M * HD : 0);
  static_assert(DQS_OFF % 16 == 0, "bulk copies need 16-byte alignment");
  static_assert(NWARPS == 8, "2-D split: 8 warps");
  static_assert(S_MT >= 1 && S_N % 16 == 0 && K_MT >= 1 && BLOCK_N % (KWN * 16) == 0,
                "S / dK tiling");
  static_assert(KD % 16 == 0 && KDV % 16 == 0 && QD % 16 == 0 && Q_MT >= 1 &&
                    QWM * QWD == NWARPS && BLOCK_M % (QWM * 16) == 0,
                "dK / dQ tiling");
  static_assert(STAGES >= 2, "at least double-buffered");
  static_assert(HD % 64 == 0 && HDV % 64 == 0 && KD <= 64 && KDV <= 64,
                "swizzled tiles: whole 64-column panels; a warp's slice within one");
};

template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES,
          int VF, bool ATOMIC_DQ, bool BULK>
__device__ __forceinline__ void bwd_dkdv_body_2d(const BwdParams<T, float, T> &p) {
  using C = Dkdv2dCfg<HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, ATOMIC_DQ, BULK>;
#if __CUDA_ARCH__ < 900
  if constexpr (C::BULK_DQ) __trap();  // bulk reductions need sm_90 (the host never asks)
#endif
  constexpr int NTHREADS = C::NTHREADS;
  constexpr int LDK = C::LDK, LDV = C::LDV, LDQ = C::LDQ, LDP = C::LDP;
  constexpr int S_MT = C::S_MT, S_N = C::S_N, K_MT = C::K_MT, KD = C::KD, KDV = C::KDV;

  extern __shared__ __align__(16) unsigned char fc_sm80_smem[];
  T *sK = reinterpret_cast<T *>(fc_sm80_smem + C::K_OFF);   // (BLOCK_N, LDK)
  T *sV = reinterpret_cast<T *>(fc_sm80_smem + C::V_OFF);   // (BLOCK_N, LDV)
  T *sP = reinterpret_cast<T *>(fc_sm80_smem + C::P_OFF);   // (BLOCK_M, LDP) P, as T
  T *sdS = reinterpret_cast<T *>(fc_sm80_smem + C::DS_OFF); // (BLOCK_M, LDP) dS, as T
  const u32 smem0 = smem_u32(fc_sm80_smem);

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;

  using V = VariantFor<T, float, VF, true>;
  V var(p.var, seq_len_q<VF>(bi, p), seq_len_k<VF>(bi, p), p.scale_log2);
  const int n_start = blockIdx.x * BLOCK_N;
  if constexpr ((VF & FC_VF_SEQ) != 0)  // (past this sequence's end: the grid covers the longest)
    if (n_start >= seq_len_k<VF>(bi, p)) return;
  const int n_rows = fc_min(BLOCK_N, seq_len_k<VF>(bi, p) - n_start);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, c4 = lane & 3;
  // this warp's tiles
  const int s_m0 = (warp / C::SWN) * (S_MT * 16), s_n0 = (warp % C::SWN) * S_N;
  const int k_n0 = (warp % C::KWN) * (K_MT * 16), k_d = warp / C::KWN;
  const int q_m0 = (warp % C::QWM) * (C::Q_MT * 16), q_d0 = (warp / C::QWM) * C::QD;
  // Swizzled Q / dO (and K) reads: every ldmatrix row this lane addresses is = lane
  // (mod 8) (tiles start at multiples of 16 rows), so chunk c of a panel is at
  // c ^ y_a with the (lane / 16) half-chunk folded in:
  // (2 kk + lane / 16) ^ (lane & 7) = (2 kk) ^ y_a.
  const int y_a = (lane >> 4) ^ (lane & 7);

  DkdvRing<T, C, HD, HDV, BLOCK_M, BLOCK_N, STAGES, ATOMIC_DQ> ring;
  ring.start(p, bi, var, n_start, n_rows, fc_sm80_smem);

  // Per-lane ldmatrix bases.
  const u32 sK_u = smem_u32(sK), sV_u = smem_u32(sV);
  const u32 kS_b = sK_u + 2 * (s_n0 * LDK + lane_bn<LDK>(lane));  // K as B of S (n = keys)
  const u32 vS_b = sV_u + 2 * (s_n0 * LDV + lane_bn<LDV>(lane));  // V as B of dP
  const u32 pT_a = smem_u32(sP) + 2 * (lane_at<LDP>(lane) + k_n0);   // P^T as A of dV
  const u32 dsT_a = smem_u32(sdS) + 2 * (lane_at<LDP>(lane) + k_n0); // dS^T as A of dK
  const u32 ds_a = smem_u32(sdS) + 2 * (q_m0 * LDP + lane_a<LDP>(lane));  // dS as A of dQ
  const u32 kQ_b = sK_u + 2 * (lane_bk<LDK>(lane) + q_d0);           // K as B of dQ
  // Swizzled reads of a warp's column slice [c0, c0 + cols) of a Q / dO tile (cols
  // <= 64, within one panel: the slices are 16-aligned multiples that divide 64):
  // this lane's row r (= lane mod 8) at `base`, the slice's panel added, and its
  // first chunk within the panel folded into y (its bits never mix with
  // 2 n2 + lane / 16).
  const int bk_row = (lane & 7) + ((lane >> 3) & 1) * 8;  // lane_bk's row

  float acc_dk[K_MT][KD / 8][4];    // (32, HD/2) of dK, unscaled
  float acc_dv[K_MT][KDV / 8][4];   // (32, HDV/2) of dV
  zero(acc_dk);
  zero(acc_dv);

#pragma unroll 1
  for (int t = 0; t < ring.n_steps; ++t) {
    // (its barrier also orders the reads of P / dS of step t - 1 before this step's writes)
    const auto step = ring.begin(t, fc_sm80_smem);
    const int stage = step.stage, grp = step.grp, m0 = step.m0;
    var.bind(p.var, bi, grp);  // ALiBi: the step's query head has its own slope
    const u32 sQ_u = smem0 + C::QDO_OFF + stage * C::QDO_STAGE;
    const u32 sdO_u = sQ_u + 2 * BLOCK_M * LDQ;
    const float *sLse =
        reinterpret_cast<const float *>(fc_sm80_smem + C::LSE_OFF) + stage * BLOCK_M;
    const float *sDelta =
        reinterpret_cast<const float *>(fc_sm80_smem + C::DELTA_OFF) + stage * BLOCK_M;

    {
      // S = Q K^T, dP = dO V^T: this warp's (S_MT*16, S_N) block
      // (swizzled Q, dO: this lane's row, chunk 2 kk + lane / 16 -> (2 kk) ^ y_a)
      const u32 qS_a = sQ_u + (s_m0 + (lane & 15)) * 128;
      const u32 doS_a = sdO_u + (s_m0 + (lane & 15)) * 128;
      // k16 step kk: panel kk / 4, chunk (2 kk % 8) ^ y_a
      auto swz_k = [&](int kk) { return (kk / 4) * C::PANEL_Q + 16 * ((2 * kk % 8) ^ y_a); };
      float s[S_MT][S_N / 8][4];
      zero(s);
      gemm_ab<T, S_MT, S_N, HD>(
          s, [&](int mt, int kk, u32(&a)[4]) { ldsm_x4(a, qS_a + mt * 16 * 128 + swz_k(kk)); },
          [&](int n2, int kk, u32(&b)[4]) { ldsm_x4(b, kS_b + 2 * (n2 * 16 * LDK + kk * 16)); });
      // P, masked only where the tile crosses the key end or the causal diagonal.
      // P goes to shared memory before the dP product (flash-attn 2's order), so
      // its stores drain under the dP mma: +1-3 % over computing dP first
      // (benchmarks/dev/NOTES.md, section 7).
      const bool need_mask = var.needs_mask(m0, m0 + BLOCK_M, n_start, n_start + BLOCK_N);
      auto lse2 = [&](int mt, int h) { return lse_to_log2(sLse[s_m0 + mt * 16 + g + 8 * h]); };
      static_assert(!V::DROPOUT || (BLOCK_N % 32 == 0 && S_N % 32 == 0), "dropout_frag: the keys of a fragment must start on a 32-key block");
      probs_from_scores(var, s, lse2, m0 + s_m0, n_start + s_n0, need_mask, p.scale_log2, lane);
      frag_to_smem<T, S_MT, S_N / 8, LDP, V::DROPOUT>(sP + s_n0, s_m0, s, 1.f, lane);
      float dp[S_MT][S_N / 8][4];
      zero(dp);
      gemm_ab<T, S_MT, S_N, HDV>(
          dp, [&](int mt, int kk, u32(&a)[4]) { ldsm_x4(a, doS_a + mt * 16 * 128 + swz_k(kk)); },
          [&](int n2, int kk, u32(&b)[4]) { ldsm_x4(b, vS_b + 2 * (n2 * 16 * LDV + kk * 16)); });
      auto delta = [&](int mt, int h) { return sDelta[s_m0 + mt * 16 + g + 8 * h]; };
      ds_from_dp<V, true>(var, dp, s, delta, lse2, m0 + s_m0, n_start + s_n0, lane);  // dS = P o (dP - delta)
      frag_to_smem<T, S_MT, S_N / 8, LDP>(sdS + s_n0, s_m0, dp, 1.f, lane);
    }
    // (the bulk dQ reduction of step t - 1 has read its staging tile before anyone
    // writes it again, after this barrier)
    if constexpr (C::BULK_DQ) {
      if (tid == 0) bulk_wait_all<true>();
    }
    __syncthreads();  // P, dS complete

    if constexpr (ATOMIC_DQ) {
      // dQ (BLOCK_M, HD) += dS K (k = keys), added into the fp32 workspace.  Before
      // dV / dK: the reductions then drain while the tensor cores run dV and dK,
      // instead of piling up in front of the next step's barrier.
      constexpr int Q_MT = C::Q_MT, QD = C::QD;
      float acc_dq[Q_MT][QD / 8][4];
      zero(acc_dq);
      gemm_ab<T, Q_MT, QD, BLOCK_N>(
          acc_dq, [&](int mt, int kk, u32(&a)[4]) { ldsm_x4(a, ds_a + 2 * (mt * 16 * LDP + kk * 16)); },
          [&](int n2, int kk, u32(&b)[4]) { ldsm_x4_t(b, kQ_b + 2 * (kk * 16 * LDK + n2 * 16)); });
      if constexpr (C::BULK_DQ) {
        // the tile in the workspace's own layout (quad order, pitch HD): its BLOCK_M
        // rows are one contiguous run of the workspace
        const u32 sdq = smem0 + C::DQS_OFF;
        stage_dq<Q_MT, QD, HD>(sdq, q_m0, q_d0, acc_dq, lane);
        fence_proxy_async();
        __syncthreads();
        if (tid == 0)
          bulk_reduce_add_f32(p.dq_accum.batch(bi.b0, bi.b1, bi.b2) + seq_qa0<VF>(bi, p) * HD + grp * p.dq_accum_sg + (fc_index_t)m0 * HD,
                              sdq, 4 * BLOCK_M * HD);
      } else {
        add_dq<Q_MT, QD, HD>(p.dq_accum.batch(bi.b0, bi.b1, bi.b2) + seq_qa0<VF>(bi, p) * HD + grp * p.dq_accum_sg +
                                 (fc_index_t)(m0 + q_m0 + g) * HD + q_d0 + 4 * c4,
                             acc_dq);
      }
    }

    // dV += P^T dO,  dK += dS^T Q   (k = queries)
    {
      // (swizzled dO, Q: the warp's column slices [k_d KDV, + KDV), [k_d KD, + KD) read
      // as described at bk_row: chunk cb + 2 n2 + lane / 16 of row kk * 16 + bk_row)
      const int cb_o = k_d * KDV / 8, cb_q = k_d * KD / 8;  // first chunk of the slice
      const u32 dO_b = sdO_u + (cb_o / 8) * C::PANEL_Q + bk_row * 128;
      const int y_o = (cb_o % 8) ^ y_a, y_q = (cb_q % 8) ^ y_a;
      gemm_ab<T, K_MT, KDV, BLOCK_M>(
          acc_dv, [&](int mt, int kk, u32(&a)[4]) { ldsm_x4_t(a, pT_a + 2 * (kk * 16 * LDP + mt * 16)); },
          [&](int n2, int kk, u32(&b)[4]) { ldsm_x4_t(b, dO_b + kk * 16 * 128 + 16 * ((2 * n2) ^ y_o)); });
      const u32 q_b2 = sQ_u + (cb_q / 8) * C::PANEL_Q + bk_row * 128;
      gemm_ab<T, K_MT, KD, BLOCK_M>(
          acc_dk, [&](int mt, int kk, u32(&a)[4]) { ldsm_x4_t(a, dsT_a + 2 * (kk * 16 * LDP + mt * 16)); },
          [&](int n2, int kk, u32(&b)[4]) { ldsm_x4_t(b, q_b2 + kk * 16 * 128 + 16 * ((2 * n2) ^ y_q)); });
    }
  }
  cp_async_wait<0>();
  if constexpr (C::BULK_DQ) {
    if (tid == 0) bulk_wait_all<false>();  // the last dQ reduction is complete
  }

  // Epilogue: stage dK (scaled) and dV through the K / V tiles, then store.
  __syncthreads();
  frag_to_smem<T, K_MT, KD / 8, LDK>(sK + k_d * KD, k_n0, acc_dk, p.scale, lane);
  frag_to_smem<T, K_MT, KDV / 8, LDV>(sV + k_d * KDV, k_n0, acc_dv, 1.f, lane);
  __syncthreads();
  seq_reload<VF>(bi, p);
  const int n_out = fc_min(BLOCK_N, seq_len_k<VF>(bi, p) - n_start);  // (= n_rows, from the reloaded length)
  store_tile<T, BLOCK_N, HD, NTHREADS>(k_rows(p.dk, bi) + n_start * p.dk.sr, p.dk.sr,
                                       sK, n_out, p.head_dim);
  store_tile<T, BLOCK_N, HDV, NTHREADS>(k_rows(p.dv, bi) + n_start * p.dv.sr, p.dv.sr,
                                        sV, n_out, p.head_dim_v);
}

}  // namespace sm80

template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, int VF,
          bool SPLIT2D = false>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_sm80_bwd_dkdv(FC_PARAMS(BwdParams<T, float, T>) p) {
  if constexpr (SPLIT2D)
    sm80::bwd_dkdv_body_2d<T, HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, VF, false, false>(p);
  else
    sm80::bwd_dkdv_body<T, HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, VF, false>(p);
}

template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, int VF,
          bool SPLIT2D = false, bool BULK_DQ = false>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_sm80_bwd_dkdvq(FC_PARAMS(BwdParams<T, float, T>) p) {
  if constexpr (SPLIT2D)
    sm80::bwd_dkdv_body_2d<T, HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, VF, true, BULK_DQ>(p);
  else
    sm80::bwd_dkdv_body<T, HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, VF, true>(p);
}

// ---------------------------------------------------------------------------
// Deterministic dQ: the mirror of the forward.  Warp w owns WM query rows; Q and
// dO (fragments in registers when they fit), LSE and delta of its rows in
// registers; K/V tiles stream through the cp.async ring.
// ---------------------------------------------------------------------------
template <typename T, int HD, int HDV, int BLOCK_M, int BLOCK_N, int NWARPS, int STAGES, int VF>
__global__ void __launch_bounds__(NWARPS * 32, 1)
fc_sm80_bwd_dq(FC_PARAMS(BwdParams<T, float, T>) p) {
  using namespace sm80;
  using C = DqCfg<HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES>;
  constexpr int NTHREADS = C::NTHREADS, MT = C::MT, WM = C::WM;
  constexpr int LDQ = C::LDQ, LDO = C::LDO, LDK = C::LDK, LDV = C::LDV;
  constexpr int NS = BLOCK_N / 8;

  extern __shared__ __align__(16) unsigned char fc_sm80_smem[];
  T *sQ = reinterpret_cast<T *>(fc_sm80_smem);  // (BLOCK_M, LDQ), later dQ staging
  T *sdO = sQ + C::Q_ELEMS;                      // (BLOCK_M, LDO)
  T *sKV = sdO + C::DO_ELEMS;                    // STAGES x [(BLOCK_N, LDK) K | (BLOCK_N, LDV) V]

  BatchIndex bi;
  if (!seq_init<VF>(bi, p)) return;
  const T *k_b = k_rows(p.k, bi);
  const T *v_b = k_rows(p.v, bi);

  using V = VariantFor<T, float, VF, true>;
  V var(p.var, seq_len_q<VF>(bi, p), seq_len_k<VF>(bi, p), p.scale_log2);
  var.bind(p.var, bi);
  const int m_start = (gridDim.x - 1 - blockIdx.x) * BLOCK_M;
  if constexpr ((VF & FC_VF_SEQ) != 0)  // (past this sequence's end: the grid covers the longest)
    if (m_start >= seq_len_q<VF>(bi, p)) return;
  const int m_rows = fc_min(BLOCK_M, seq_len_q<VF>(bi, p) - m_start);
  // window / causal: key tiles [n_first, n_tiles) hold every key the tile sees
  const int n_first = var.key_begin(m_start) / BLOCK_N;
  const int n_tiles = fc_ceil_div(var.key_end(m_start + m_rows), BLOCK_N);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2;
  const int wrow = warp * WM;

  auto load_kv = [&](int n, int stage) {
    T *sK = sKV + stage * C::KV_ELEMS;
    const int n0 = n * BLOCK_N, nv = seq_len_k<VF>(bi, p) - n0;
    load_tile<T, BLOCK_N, HD, NTHREADS>(sK, k_b + n0 * p.k.sr, p.k.sr, nv, p.head_dim);
    load_tile<T, BLOCK_N, HDV, NTHREADS>(sK + BLOCK_N * LDK, v_b + n0 * p.v.sr, p.v.sr, nv,
                                         p.head_dim_v);
  };

  load_tile<T, BLOCK_M, HD, NTHREADS>(sQ, q_rows(p.q, bi) + m_start * p.q.sr, p.q.sr,
                                      m_rows, p.head_dim);
  load_tile<T, BLOCK_M, HDV, NTHREADS>(
      sdO, q_rows(p.dout, bi) + m_start * p.dout.sr, p.dout.sr, m_rows, p.head_dim_v);
  cp_async_commit();
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (n_first + s < n_tiles) load_kv(n_first + s, s);
    cp_async_commit();
  }

  // Per-row LSE (log2 units, +inf for rows with no key) and delta.
  const float *lse_b = q_rows(p.lse, bi);
  const float *delta_b = q_rows(p.delta, bi);
  float lse2[MT][2], dlt[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m_start + wrow + mt * 16 + g + 8 * h;
      lse2[mt][h] = row < seq_len_q<VF>(bi, p) ? lse_to_log2(lse_b[row * p.lse.sr]) : 0.f;
      dlt[mt][h] = row < seq_len_q<VF>(bi, p) ? delta_b[row * p.delta.sr] : 0.f;
    }

  const u32 sQ_a = smem_u32(sQ) + 2 * (wrow * LDQ + lane_a<LDQ>(lane));
  const u32 sdO_a = smem_u32(sdO) + 2 * (wrow * LDO + lane_a<LDO>(lane));
  AFrags<C::Q_IN_REGS, MT, HD / 16, LDQ> q_frag;
  AFrags<C::Q_IN_REGS, MT, HDV / 16, LDO> do_frag;
  cp_async_wait<STAGES - 1>();
  __syncthreads();
  q_frag.load(sQ_a);
  do_frag.load(sdO_a);

  float acc_dq[MT][HD / 8][4];  // (WM, HD) unscaled dQ rows of this warp
  zero(acc_dq);

#pragma unroll 1
  for (int n = n_first; n < n_tiles; ++n) {
    const int t = n - n_first;  // ring position
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (n + STAGES - 1 < n_tiles) load_kv(n + STAGES - 1, (t + STAGES - 1) % STAGES);
    cp_async_commit();

    const T *sK = sKV + (t % STAGES) * C::KV_ELEMS;
    const u32 sK_u = smem_u32(sK), sV_u = smem_u32(sK + BLOCK_N * LDK);
    const int n0 = n * BLOCK_N;

    float s[MT][NS][4], dp[MT][NS][4];
    zero(s);
    gemm_nt<T, MT, BLOCK_N, HD, LDK>(s, q_frag, sK_u, lane);
    zero(dp);
    gemm_nt<T, MT, BLOCK_N, HDV, LDV>(dp, do_frag, sV_u, lane);

    // P and dS (scores.cuh), masked only where the tile crosses the key end or
    // a window edge
    const bool need_mask = var.needs_mask(m_start, m_start + m_rows, n0, n0 + BLOCK_N);
    auto row_lse2 = [&](int mt, int h) { return lse2[mt][h]; };
    auto row_delta = [&](int mt, int h) { return dlt[mt][h]; };
    static_assert(!V::DROPOUT || BLOCK_N % 32 == 0, "dropout_frag: the keys of a fragment must start on a 32-key block");
    probs_from_scores(var, s, row_lse2, m_start + wrow, n0, need_mask, p.scale_log2, lane);
    ds_from_dp(var, dp, s, row_delta, row_lse2, m_start + wrow, n0, lane);

    // dQ += dS K   (k = keys; K stored (keys, HD) -> .trans)
    gemm_pn<T, MT, HD, BLOCK_N, LDK>(acc_dq, dp, sK_u, lane);
  }
  cp_async_wait<0>();

  __syncthreads();
  frag_to_smem<T, MT, HD / 8, LDQ>(sQ, wrow, acc_dq, p.scale, lane);
  __syncthreads();
  store_tile<T, BLOCK_M, HD, NTHREADS>(q_rows(p.dq, bi) + m_start * p.dq.sr, p.dq.sr,
                                       sQ, m_rows, p.head_dim);
}

// delta = rowsum(dO o O) (float32), a bandwidth kernel: L = HDV / 8 lanes share a
// row and each reads 16 bytes (8 elements) of O and of dO, so a warp covers 32 / L
// rows with vector loads (the generic family's one-warp-per-row kernel issues
// 2-byte loads and keeps too few bytes in flight to reach full bandwidth).
// Rows or lanes whose 16 bytes are not 16-byte aligned (odd strides, views)
// read element by element.
template <typename T, int HDV, int NWARPS>
__global__ void __launch_bounds__(NWARPS * 32)
fc_sm80_bwd_preprocess(FC_PARAMS(BwdParams<T, float, T>) p) {
  constexpr int L = HDV / 8 < 4 ? 4 : HDV / 8, RPW = 32 / L;  // lanes per row, rows per warp
  constexpr int ROWS = NWARPS * RPW;                           // per CTA (tile_rows)
  BatchIndex bi;
  if (!seq_init<FC_VF_SEQ>(bi, p)) return;  // (no VF: p.seq's null pointers decide)
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * ROWS + (threadIdx.x / 32) * RPW + lane / L;
  const int c = 8 * (lane % L);
  float s = 0.f;
  if (row < bi.sq && c < p.head_dim_v) {
    const T *po = q_rows(p.o, bi) + row * p.o.sr + c;
    const T *pd = q_rows(p.dout, bi) + row * p.dout.sr + c;
    if (c + 8 <= p.head_dim_v &&
        ((reinterpret_cast<unsigned long long>(po) | reinterpret_cast<unsigned long long>(pd)) &
         15) == 0) {
      const uint4 a = *reinterpret_cast<const uint4 *>(po);
      const uint4 b = *reinterpret_cast<const uint4 *>(pd);
      const T *ea = reinterpret_cast<const T *>(&a), *eb = reinterpret_cast<const T *>(&b);
#pragma unroll
      for (int e = 0; e < 8; ++e) s = fmaf(to_acc<float>(ea[e]), to_acc<float>(eb[e]), s);
    } else {
      for (int e = 0; e < 8 && c + e < p.head_dim_v; ++e)
        s = fmaf(to_acc<float>(po[e]), to_acc<float>(pd[e]), s);
    }
  }
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane % L == 0 && row < bi.sq) q_rows(p.delta, bi)[row * p.delta.sr] = s;
}

// dq = dq_accum * softmax_scale, cast to T, columns back in natural order (see
// add_dq).  A bandwidth kernel: each thread converts one 16-byte quad of the
// workspace, 4 * NWARPS rows per CTA; the workspace rows have a pitch of whole
// 16-column groups (dq_accum_sr = the head-dim bucket).
template <typename T, int NWARPS>
__global__ void __launch_bounds__(NWARPS * 32)
fc_sm80_bwd_dq_convert(FC_PARAMS(BwdParams<T, float, T>) p) {
  constexpr int NTHREADS = NWARPS * 32, ROWS = 4 * NWARPS;  // rows per CTA (tile_rows)
  BatchIndex bi;
  if (!seq_init<FC_VF_SEQ>(bi, p)) return;  // (no VF: p.seq's null pointers decide)
  const int quads = (int)(p.dq_accum.sr >> 2);  // per row
  const int row0 = blockIdx.x * ROWS;
  const float *src = p.dq_accum.batch(bi.b0, bi.b1, bi.b2) + (fc_index_t)bi.qa0 * p.dq_accum.sr;
  T *dst = q_rows(p.dq, bi);
  for (int i = threadIdx.x; i < ROWS * quads; i += NTHREADS) {
    const int r = i / quads, qd = i - r * quads, row = row0 + r;
    const int c = 16 * (qd >> 2) + 2 * (qd & 3);  // logical columns c, c+1, c+8, c+9
    if (row >= bi.sq || c >= p.head_dim) continue;
    const float4 a = *reinterpret_cast<const float4 *>(src + row * p.dq_accum.sr + 4 * qd);
    T *d = dst + row * p.dq.sr;
    d[c] = from_acc<T>(a.x * p.scale);
    if (c + 1 < p.head_dim) d[c + 1] = from_acc<T>(a.y * p.scale);
    if (c + 8 < p.head_dim) d[c + 8] = from_acc<T>(a.z * p.scale);
    if (c + 9 < p.head_dim) d[c + 9] = from_acc<T>(a.w * p.scale);
  }
}
