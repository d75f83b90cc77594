"""Decode: a few query rows per sequence against a long K/V history, in GB/s.

    python benchmarks/bench_decode.py                     # decode and cache tables
    python benchmarks/bench_decode.py --only decode --pack on off --splits auto 1
    python benchmarks/bench_decode.py --only cache

A decode call reads K and V once and does little arithmetic, so its figure of
merit is bytes per second: GB/s = (K + V bytes) / time, against the read
bandwidth of a large read-only kernel measured in the same run (``read``:
uint4 loads over 8 GiB, one store per block).

Table 1, decode (bf16, D = 128): q (B, Hkv, G, Sq, D) against k, v
(B, Hkv, 1, Sk, D) for flashcupy (GQA by broadcasting), and q (B, Hkv * G,
Sq, D) against k, v (B, Hkv, Sk, D) with ``enable_gqa`` for PyTorch SDPA's
flash and cuDNN backends, on the same memory (DLPack).  Rows: MHA B8 H32
Sk 32k; GQA 32/8 at B8 Sk 32k, B64 Sk 4k and B1 Sk 128k, with Sq = 1, and
Sq = 4 and 16 (non-causal: speculative rows that all see the cache) on the
B8 and B64 rows.  ``--pack`` / ``--splits`` add flashcupy columns with GQA
packing and the split count forced (flashcupy._config.gqa_packing /
split_kv); ``fc`` is the default choice.

Table 2, cache: the same GQA rows through ``attention_with_kvcache``: the
contiguous cache, page pools of 16 and 256 rows in a random page order (one
block table per sequence), and ragged ``cache_seqlens`` (uniform in
[Sk / 2, Sk]; GB/s of the keys actually held).  Timed as CUDA-graph replays
(a serving loop captures its step; an eager call adds its device-to-host
length check).

Timing: benchmarks/_timing.py (CUDA events, warm-up, median, L2 flush).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

D = 128
# (name, B, Hkv, G, Sk, query rows)
ROWS = [("MHA", 8, 32, 1, 32768, (1,)),
        ("GQA 32/8", 8, 8, 4, 32768, (1, 4, 16)),
        ("GQA 32/8", 64, 8, 4, 4096, (1, 4, 16)),
        ("GQA 32/8", 1, 8, 4, 131072, (1,))]

_READ_SRC = r"""
extern "C" __global__ void fc_read(const uint4 *__restrict__ x, unsigned long long n,
                                   unsigned int *out) {
  unsigned int acc = 0;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    const uint4 v = x[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // (keeps the loads; almost never stores)
}
"""


def read_bandwidth(args) -> float:
    """GB/s of a read-only kernel over 8 GiB (uint4 loads, grid-stride)."""
    import cupy as cp
    import numpy as np

    n_bytes = 8 << 30
    x = cp.random.randint(0, 2 ** 31, n_bytes // 4, dtype=np.int32)
    out = cp.zeros(1 << 16, np.uint32)
    k = cp.RawKernel(_READ_SRC, "fc_read")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    n16 = np.uint64(n_bytes // 16)
    ms = T.do_bench(lambda x=x: k((sms * 8,), (512,), (x, n16, out)), warmup_ms=args.warmup_ms,
                    rep_ms=args.rep_ms).ms
    del x
    T.free_gpu_memory()
    return n_bytes / ms / 1e6


def bench(fn, args):
    return T.do_bench(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms).ms


def graph_ms(call, sets, args):
    """CUDA-graph replay ms of call(*s) over the rotating sets."""
    return T.graph_ms(call, sets, lambda fn: bench(fn, args))


def fc_modes(fc, args):
    """[(column name, context factory)] of the flashcupy columns."""
    import contextlib

    from flashcupy import _config

    cols = [("fc", contextlib.nullcontext)]
    for pack in args.pack:
        for sp in args.splits:
            sp_v = sp if sp == "auto" else int(sp)
            cols.append((f"fc pack={pack} split={sp}", lambda pack=pack, sp_v=sp_v: _stack(
                _config.gqa_packing(pack), _config.split_kv(sp_v))))
    return cols


def _stack(*cms):
    import contextlib

    st = contextlib.ExitStack()
    for c in cms:
        st.enter_context(c)
    return st


def decode_table(fc, torch, args, read_gbs):
    dt = T.dtype_from_name("bf16")
    cols = fc_modes(fc, args)
    header = ["shape", "Sq"] + [c for c, _ in cols] + ["sdpa-flash", "sdpa-cudnn"]
    table = []
    for name, b, hkv, g, sk, sqs in ROWS:
        for sq in sqs:
            kv_bytes = 2 * b * hkv * sk * D * 2
            sets = []
            for _ in range(args.rotate):
                q = T.randn((b, hkv, g, sq, D), dt)
                k, v = (T.randn((b, hkv, 1, sk, D), dt) for _ in range(2))
                sets.append((q, k, v))
            row = [f"{name} B{b} Sk{sk // 1024}k", sq]
            for col, ctx in cols:
                def call(q, k, v, ctx=ctx):
                    with ctx():
                        return fc.attention(q, k, v)
                try:
                    ms = bench(T.Rotate(call, sets), args)
                    row.append(kv_bytes / ms / 1e6)
                except Exception as e:  # noqa: BLE001
                    T.progress(f"{col}: {T.classify_error(e)}")
                    row.append(None)
            for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
                row.append(_sdpa_gbs(torch, backend, sets, kv_bytes, args))
            table.append(row)
            T.progress(f"decode {row[0]} Sq={sq}: " + " ".join(T.fmt(x) for x in row[2:]))
            del sets
            T.free_gpu_memory()
    print(f"\ndecode: bf16, D={D}, non-causal, GB/s of K+V read; device read kernel "
          f"{read_gbs:.0f} GB/s")
    print(T.format_table([[r[0], str(r[1])] + [T.fmt(x, 0) for x in r[2:]] for r in table], header))
    return table


def _sdpa_gbs(torch, backend, sets, kv_bytes, args):
    if torch is None:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    tsets = []
    for q, k, v in sets:
        b, hkv, g, sq, d = q.shape
        tq = torch.from_dlpack(q).reshape(b, hkv * g, sq, d)
        tk = torch.from_dlpack(k).reshape(b, hkv, -1, d)
        tv = torch.from_dlpack(v).reshape(b, hkv, -1, d)
        tsets.append((tq, tk, tv))

    def call(q, k, v):
        with T.torch_on_cupy_stream(), sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    try:
        return kv_bytes / bench(T.Rotate(call, tsets), args) / 1e6
    except Exception as e:  # noqa: BLE001
        T.progress(f"sdpa {backend}: {T.classify_error(e)}")
        return None


def contiguous_gbs(fc, shape, lens_d, nbytes, args):
    """GB/s (``nbytes`` per call) of attention_with_kvcache on a contiguous
    cache of shape (B, Hkv, G, Sq, Sk) with lengths ``lens_d``, graph replays."""
    b, hkv, g, sq, sk = shape
    dt = T.dtype_from_name("bf16")
    sets = [(T.randn((b, hkv, g, sq, D), dt),) + tuple(
        T.randn((b, hkv, 1, sk, D), dt) for _ in range(2)) for _ in range(args.rotate)]
    ms = graph_ms(lambda q, k, v: fc.attention_with_kvcache(q, k, v, lens_d), sets, args)
    del sets
    T.free_gpu_memory()
    return nbytes / ms / 1e6


def cache_table(fc, args):
    import cupy as cp
    import numpy as np

    dt = T.dtype_from_name("bf16")
    rng = np.random.default_rng(args.seed)
    header = ["shape", "Sq", "contiguous", "page 16", "page 256", "ragged", "16 / contig",
              "256 / contig", "ragged / contig"]
    table = []
    for name, b, hkv, g, sk, sqs in ROWS:
        if g == 1:
            continue
        for sq in sqs:
            lens = np.full(b, sk, np.int32)
            lens_d = cp.asarray(lens)
            kv_bytes = 2 * b * hkv * sk * D * 2
            row = [f"{name} B{b} Sk{sk // 1024}k", sq]
            row.append(contiguous_gbs(fc, (b, hkv, g, sq, sk), lens_d, kv_bytes, args))
            for page in (16, 256):
                per = -(-sk // page)
                sets = []
                for _ in range(args.rotate):
                    tab = (rng.permutation(b * per) if args.page_order == "random" else
                           np.arange(b * per)).astype(np.int32).reshape(b, per)
                    q = T.randn((b, hkv, g, sq, D), dt)
                    kp, vp = (T.randn((b * per, hkv, 1, page, D), dt) for _ in range(2))
                    sets.append((q, kp, vp, cp.asarray(tab)))
                row.append(kv_bytes / graph_ms(lambda q, kp, vp, tab: fc.attention_with_kvcache(
                    q, kp, vp, lens_d, block_table=tab), sets, args) / 1e6)
                del sets
                T.free_gpu_memory()
            rl = rng.integers(sk // 2, sk + 1, b).astype(np.int32)
            rl_d = cp.asarray(rl)
            held = 2 * int(rl.sum()) * hkv * D * 2
            row.append(contiguous_gbs(fc, (b, hkv, g, sq, sk), rl_d, held, args))
            row += [row[3] / row[2], row[4] / row[2], row[5] / row[2]]
            table.append(row)
            T.progress(f"cache {row[0]} Sq={sq}: " + " ".join(T.fmt(x) for x in row[2:]))
    print(f"\ncache: attention_with_kvcache, bf16, D={D}, GQA 32/8, CUDA-graph replays, "
          f"GB/s of K+V held")
    print(T.format_table([[r[0], str(r[1])] + [T.fmt(x, 0) for x in r[2:6]] +
                          [T.fmt(x, 2) for x in r[6:]] for r in table], header))
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["decode", "cache"], default=None)
    p.add_argument("--pack", nargs="*", default=[], choices=["on", "off"],
                   help="extra flashcupy columns with GQA packing forced")
    p.add_argument("--splits", nargs="*", default=["auto"],
                   help="split counts of the extra columns (auto or ints)")
    p.add_argument("--page-order", choices=["random", "sorted"], default="random",
                   help="pages of the pools in a random order (default), or each "
                        "sequence's pages one after another in memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotate", type=int, default=2)
    p.add_argument("--warmup-ms", type=float, default=T.WARMUP_MS)
    p.add_argument("--rep-ms", type=float, default=T.REP_MS)
    args = p.parse_args(argv)
    T.require_gpu()
    fc, why = T.try_import_flashcupy()
    if fc is None:
        sys.exit(why)
    torch, why = T.try_import_torch()
    if torch is None:
        T.progress(f"no PyTorch columns: {why}")
    print(T.format_environment(T.environment(), T.timing_method(args.warmup_ms, args.rep_ms,
                                                                 rotate=args.rotate)))
    read_gbs = read_bandwidth(args)
    if args.only in (None, "decode"):
        decode_table(fc, torch, args, read_gbs)
    if args.only in (None, "cache"):
        cache_table(fc, args)


if __name__ == "__main__":
    main()
