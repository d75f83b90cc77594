// flashcupy: row sources, where row r of a tile starts in global memory.
//
// Every tile load (sm80/mma.cuh load_rows, generic/tile.cuh load_rows) copies
// rows 0 .. ROWS of a source, and the source alone knows where a row lives:
//   StridedRows  a row-major view, row r at g + r * sr (every dense operand);
//   KvPages      paged K / V (seq.cuh): row r of the tile is key n0 + r of the
//                sequence, in page table[(n0 + r) / page_size] at row
//                (n0 + r) % page_size (vLLM's block table).
//
// The async loads walk a thread's rows r0, r0 + STEP, .. through a source's
// cursor: at(it) for row r0 + it * STEP, then next(), for it = 0, 1, .. in
// order.  A strided cursor is a running pointer (p + it * step held for every
// it cost the sm80 dQ kernel 4 bytes of spill at 255 registers).  A paged
// cursor needs one block-table entry per 16-row run, not per row: a page holds
// whole runs (its size is a multiple of PAGE_RUN, checked on the host) and
// tiles start at multiples of 16 keys, so every run lies in one page and a
// thread's rows inside a run are STEP rows apart.  The entries are read a tile
// ahead (TileRuns, seq.cuh KvAhead).  Measured on paged decode (NOTES.md
// 13.4): with a table read per row the kernel issued 1.8x the contiguous
// kernel's instructions and ran at 0.33x its bandwidth, at every page size;
// per-run reads, a branch-free page division and 32-bit offsets: 0.8-0.88x.
#pragma once
#include "params.cuh"

template <typename T>
struct StridedRows {
  const T *g;
  fc_index_t sr;

  __device__ __forceinline__ const T *row(int r) const { return g + (fc_index_t)r * sr; }
  // any readable address (the source of a zero-filling copy, which reads nothing)
  __device__ __forceinline__ const T *any() const { return g; }
  // Whether 16-byte copies are legal for every row: the tile start and the row
  // pitch are 16-byte multiples and the valid columns fill whole 16-byte chunks.
  __device__ __forceinline__ bool vec16(int cols_valid) const {
    return ((reinterpret_cast<unsigned long long>(g) | (unsigned long long)(sr * sizeof(T))) & 15) ==
               0 &&
           (cols_valid * sizeof(T)) % 16 == 0;
  }

  template <int N, int STEP>
  struct Cursor {  // (a running pointer, as the loads before cursors: fewer live registers)
    const T *p;
    fc_index_t step;
    __device__ __forceinline__ const T *at(int) const { return p; }
    __device__ __forceinline__ void next() { p += step; }
  };
  // rows r0 + it * STEP (it < N), column c; rows >= rows_valid are not read
  template <int N, int STEP>
  __device__ __forceinline__ Cursor<N, STEP> cursor(int r0, int c, int /*rows_valid*/) const {
    return Cursor<N, STEP>{row(r0) + c, STEP * sr};
  }
};

// Where key t of a sequence lives in a pool of page_size rows (vLLM's block
// table): page pages[t / page_size], row t % page_size.  The division is a
// multiply-high by magic = floor(2^64 / page_size) + 1, exact for every
// t < 2^32 and every page size >= 2 (the host passes 0 for a cache of one row:
// page 0 for every key; the error magic * page_size - 2^64 is at most
// page_size, so t * error < 2^64 never carries into the quotient): no branch
// and no division instruction sequence for pages that are not powers of two,
// or for a contiguous cache seen as one page of S_max rows per sequence.
struct PageGeometry {
  unsigned long long magic;
  int page_size;
  __device__ __forceinline__ int page_of(int t) const {
    const unsigned u = (unsigned)t;
    return (int)(((unsigned long long)u * (unsigned)(magic >> 32) +
                  __umulhi(u, (unsigned)magic)) >> 32);
  }
  __device__ __forceinline__ int in_page(int t, int page) const { return t - page * page_size; }
};

constexpr int PAGE_RUN = 16;  // rows of a run inside one page (host: PAGE_MULTIPLE)

// The block-table entries of the 16-row runs of a key tile of ROWS rows from
// key n0 (a multiple of 16: every run lies in one page).  Read by fetch, used
// by a KvPages cursor: a kernel fetches the entries of its next tile a load
// ahead (seq.cuh KvAhead), so the table read's latency does not add to the
// copies' (a 2-stage pipeline waits for every copy once per tile).
template <int ROWS>
struct TileRuns {
  static constexpr int N = ROWS / PAGE_RUN > 0 ? ROWS / PAGE_RUN : 1;
  int page[N];  // run i's page (its table entry)
  int row[N];   // run i's first row inside that page
  int n0;
  __device__ __forceinline__ void fetch(const int *pages, PageGeometry pg, int n0_,
                                        int rows_valid) {
    n0 = n0_;
#pragma unroll
    for (int i = 0; i < N; ++i) {  // (runs past the sequence read no table entry)
      const int t = n0 + PAGE_RUN * i, at = pg.page_of(t);
      page[i] = PAGE_RUN * i < rows_valid ? __ldg(pages + at) : 0;
      row[i] = pg.in_page(t, at);
    }
  }
};

// Paged K or V rows n0 .. of this CTA's sequence.  base is the sequence's
// batch / head offset in the pool (the view's page axis has stride 0; pages
// are page_stride apart).  The cursor (async 16-byte loads) takes the table
// entries from runs; row (element-wise loads, odd layouts) reads the table.
// Offsets inside the pool are unsigned 32-bit products widened once (the host
// checks that a page stride and a page fit 2^32 elements, and the table
// entries are >= 0): a signed 64-bit product costs three multiplies.
template <typename T, int ROWS = 0>
struct KvPages {
  const T *base;
  const int *pages;
  fc_index_t sr, page_stride;
  PageGeometry pg;
  int n0;
  TileRuns<ROWS> runs;

  __device__ __forceinline__ KvPages(const T *base_, const TensorView<const T> &t,
                                     const BatchIndex &bi, const SeqArgs &s,
                                     fc_index_t page_stride_, int n0_)
      : base(base_), pages(s.table + bi.b0 * s.table_stride), sr(t.sr),
        page_stride(page_stride_), pg{s.page_magic, s.page_size}, n0(n0_) {}

  // row `row` of page `page`
  __device__ __forceinline__ const T *addr(int page, int row) const {
    return base + ((unsigned long long)(unsigned)page * (unsigned)page_stride +
                   (unsigned)row * (unsigned)sr);
  }
  __device__ __forceinline__ const T *row(int r) const {
    const int t = n0 + r, at = pg.page_of(t);
    return addr(__ldg(pages + at), pg.in_page(t, at));
  }
  __device__ __forceinline__ const T *any() const { return base; }
  __device__ __forceinline__ bool vec16(int cols_valid) const {
    return ((reinterpret_cast<unsigned long long>(base) |
             (unsigned long long)(sr * sizeof(T)) |
             (unsigned long long)(page_stride * sizeof(T))) & 15) == 0 &&
           (cols_valid * sizeof(T)) % 16 == 0;
  }

  template <int N, int STEP>
  struct Cursor {
    static_assert(STEP % PAGE_RUN == 0 || PAGE_RUN % STEP == 0, "a thread's rows tile the runs");
    static constexpr int PER = STEP >= PAGE_RUN ? 1 : PAGE_RUN / STEP;  // a thread's rows per run
    static constexpr int RUNS = (N + PER - 1) / PER;
    const T *run[RUNS];  // the thread's first row (and column) in each run
    fc_index_t step;     // STEP rows, in elements
    __device__ __forceinline__ const T *at(int it) const {
      return run[it / PER] + (it % PER) * step;
    }
    __device__ __forceinline__ void next() {}
  };
  // rows r0 + it * STEP of the tile (r0 < STEP when STEP < PAGE_RUN), column c
  template <int N, int STEP>
  __device__ __forceinline__ Cursor<N, STEP> cursor(int r0, int c, int rows_valid) const {
    static_assert(ROWS > 0, "a cursor takes the entries of a fetched tile");
    using C = Cursor<N, STEP>;
    constexpr int LAST = TileRuns<ROWS>::N - 1;  // (rows past the tile: never loaded)
    C k;
    k.step = STEP * sr;
    // (the run's own offset is the same for the whole warp, so it stays off the
    // thread's part: its row in the run and its column)
    const unsigned tc = (unsigned)(r0 % PAGE_RUN) * (unsigned)sr + (unsigned)c;
#pragma unroll
    for (int j = 0; j < C::RUNS; ++j) {
      // the thread's rows r0 + j * PER * STEP + (0 .. PER - 1) * STEP, all at
      // r0 % 16 inside their run; run r / 16: j when STEP < 16 (r0 < STEP), else r0 / 16 + j * STEP / 16,
      // picked without indexing the arrays at run time (they stay in registers)
      constexpr int S16 = STEP >= PAGE_RUN ? STEP / PAGE_RUN : 1;
      int e = runs.page[fc_min(j * S16, LAST)], w = runs.row[fc_min(j * S16, LAST)];
#pragma unroll
      for (int q = 1; q < S16; ++q)
        if (r0 / PAGE_RUN == q)
          e = runs.page[fc_min(j * S16 + q, LAST)], w = runs.row[fc_min(j * S16 + q, LAST)];
      // (a run past the sequence has entry 0: an address in the pool, never read)
      k.run[j] = base + ((unsigned long long)(unsigned)e * (unsigned)page_stride +
                         (unsigned)w * (unsigned)sr) + tc;
    }
    return k;
  }
};
