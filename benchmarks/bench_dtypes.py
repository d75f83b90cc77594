#!/usr/bin/env python
"""Forward and backward milliseconds per dtype at one shape: flashcupy beside torch SDPA.

B=1, H=16, S=4096, D=128 by default; fp16, bf16, fp32, fp64; causal off and on.
SDPA runs with PyTorch's own dispatch ("sdpa-default") and with each backend
forced that supports the dtype (flash and cuDNN: fp16/bf16; efficient: also
fp32; math: all, the only one with fp64).  Same timing helper as
bench_attention.py (benchmarks/_timing.py).

    python benchmarks/bench_dtypes.py
    python benchmarks/bench_dtypes.py --causal 0 --dtype fp32 fp64
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402
import bench_attention as BA  # noqa: E402

DTYPES = ["fp16", "bf16", "fp32", "fp64"]
# Which forced SDPA backends accept which dtype (others answer "No available kernel").
SDPA_DTYPES = {"sdpa-flash": {"fp16", "bf16"}, "sdpa-cudnn": {"fp16", "bf16"},
               "sdpa-efficient": {"fp16", "bf16", "fp32"},
               "sdpa-math": {"fp16", "bf16", "fp32", "fp64"},
               "sdpa-default": {"fp16", "bf16", "fp32", "fp64"}}
PROVIDERS = ["flashcupy", "sdpa-default", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient",
             "sdpa-math"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status 2 when no GPU is available.")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=DTYPES)
    p.add_argument("--causal", nargs="+", type=int, choices=[0, 1], default=[0, 1])
    p.add_argument("--mode", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"])
    p.add_argument("--providers", nargs="+", default=PROVIDERS,
                   choices=PROVIDERS + ["flashcupy-generic", "flashcupy-sm80"])
    p.add_argument("--generic", action="store_true", help="also time flashcupy-generic")
    p.add_argument("--all-backends", action="store_true",
                   help="also try SDPA backends on dtypes they are not listed for")
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--h", type=int, default=16)
    p.add_argument("--s", type=int, default=4096)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--max-score-gib", type=float, default=8.0,
                   help="skip sdpa-math when B*H*S*S*4 bytes exceeds this")
    p.add_argument("--warmup-ms", type=float, default=T.WARMUP_MS)
    p.add_argument("--rep-ms", type=float, default=T.REP_MS)
    p.add_argument("--min-reps", type=int, default=T.MIN_REPS)
    p.add_argument("--rotate", type=int, default=2)
    p.add_argument("--no-flush-l2", action="store_true")
    p.add_argument("--out", default="bench_out/dtypes.json", help="JSON path")
    args = p.parse_args(argv)
    args.providers = list(args.providers)
    if args.generic and "flashcupy-generic" not in args.providers:
        args.providers.insert(1, "flashcupy-generic")
    args.no_memory = True
    return args


def main(argv=None):
    args = parse_args(argv)
    T.require_gpu()
    libs = {"flashcupy": T.try_import_flashcupy()}
    if any(p.startswith("sdpa") for p in args.providers):
        libs["torch"] = T.try_import_torch()
    for name, (mod, why) in libs.items():
        if mod is None:
            T.progress(f"warning: {why}")
    method = T.timing_method(args.warmup_ms, args.rep_ms, args.min_reps, not args.no_flush_l2,
                             args.rotate)
    env = T.environment()
    runs = [(dt, c, p) for dt in args.dtype for c in args.causal for p in args.providers
            if args.all_backends or p not in SDPA_DTYPES or dt in SDPA_DTYPES[p]]
    n, k, t0 = len(runs) * len(args.mode), 0, time.time()
    rows = []
    try:
        for dt, c, prov in runs:
            for mode in args.mode:
                k += 1
                case = BA.Case(mode, dt, args.b, args.h, args.s, args.d, bool(c))
                print(f"[{k}/{n}] {case.label()} {prov} ...", end="", file=sys.stderr,
                      flush=True)
                r = BA.run_one(prov, case, args, libs)
                rows.append(r)
                print(f" {T.fmt(r['ms'], 3)} ms" if r["status"] == "ok" else f" {r['status']}",
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        T.progress("interrupted; reporting what was measured")
    T.release_flush_buffer()
    BA.write_json(args.out, env, method, args, rows)
    T.progress(f"wrote {args.out}; {time.time() - t0:.0f} s total")

    by = {}
    for r in rows:
        by.setdefault((r["dtype"], r["causal"], r["provider"]), {})[r["mode"]] = r
    body = []
    for (dt, c, prov), d in by.items():
        cells = []
        for mode in ("fwd", "bwd"):
            r = d.get(mode)
            if r is None:
                cells += ["", ""]
            elif r["status"] == "ok":
                cells += [T.fmt(r["ms"], 3), T.fmt(r["tflops"], 1)]
            else:
                cells += [r["status"][:40], ""]
        body.append([dt, str(int(c)), prov] + cells)
    print(T.format_environment(env, method))
    print(f"shape B={args.b} H={args.h} S={args.s} D={args.d}")
    print(T.format_table(body, ["dtype", "causal", "provider", "fwd ms", "fwd TFLOP/s",
                                "bwd ms", "bwd TFLOP/s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
