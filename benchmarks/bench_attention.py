#!/usr/bin/env python
"""Attention forward/backward throughput: flashcupy beside PyTorch SDPA and naive CuPy.

The FlashAttention papers' setup: batch * S = 16,384 tokens and H * D = 2048,
swept over S, head dim, causal, dtype and mode (fwd; bwd timed alone from a
saved forward).  Prints one long table (every provider and cell, with peak
extra memory), then the GPU and versions, then a compact summary -- last, so
it survives a tail-truncated log.  Writes JSON (after every cell, so an
interrupted run keeps what it measured) and a PNG plot.

    python benchmarks/bench_attention.py --quick
    python benchmarks/bench_attention.py                       # full sweep
    python benchmarks/bench_attention.py --mode fwd --dtype bf16 --d 128 --causal 0 --s 4096 16384
    python benchmarks/bench_attention.py --providers flashcupy sdpa-flash --generic

Providers:
  flashcupy          fc.attention / fc.attention_backward, kernel family "auto"
  flashcupy-generic  the same under fc.kernel_family("generic") (add with --generic)
  flashcupy-sm80     the same under fc.kernel_family("sm80") (opt-in via --providers)
  sdpa-flash, sdpa-cudnn, sdpa-efficient, sdpa-math
                     torch scaled_dot_product_attention with the backend forced by
                     torch.nn.attention.sdpa_kernel; bwd = autograd.grad(retain_graph=True)
  sdpa-default       SDPA with PyTorch's own dispatch (opt-in via --providers)
  naive-cupy-fp16    q @ k^T -> softmax -> @ v in CuPy, float16 even in bf16 rows
                     (CuPy has no bf16 batched matmul); bwd from the saved softmax matrix
sdpa-math and naive-cupy-fp16 are skipped when B*H*S*S*4 bytes exceeds --max-score-gib,
naive-cupy-fp16 also above --naive-max-s.

Variants (--variants window softcap alibi sink bias keypad dropout): extra rows,
non-causal (the window: window=(--window-left, 0)), softcap 30, ALiBi slopes
2^(-8 h / H) (BLOOM's), one float32 sink per head; beside them the same run's
plain and causal rows give the baselines.  SDPA has none of these four natively
(only through a materialized mask), so those rows are flashcupy's alone.  The
last three run beside SDPA's backends that accept them:
  bias      a full (B, H, S, S) additive bias in the dtype (SDPA: a float attn_mask);
            the bwd rows also compute its gradient (flashcupy bias_grad=True; SDPA
            with the mask requiring grad)
  keypad    a (B, 1, 1, S) bool key-padding mask, batch element b keeping its first
            S - (b % 4) * S / 16 keys (SDPA: a bool attn_mask)
  dropout   dropout_p = 0.1 on the probabilities

FLOPs: forward 4 * B * H * (visible (query, key) pairs) * D, backward 2.5 x that.
Visible pairs are Sq * Sk for full attention, Sq * Sk / 2 for causal (the
papers' convention), and for a window exactly the pairs inside it (query i of
window=(left, 0) sees min(i, left) + 1 keys), so window rows compare throughput
on the work that exists.  Bias, keypad and dropout rows count S * S pairs, as full
attention (every pair is computed; the keypad's removed keys included).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

DEFAULT_PROVIDERS = ["flashcupy", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math",
                     "naive-cupy-fp16"]
ALL_PROVIDERS = ["flashcupy", "flashcupy-generic", "flashcupy-sm80", "sdpa-flash", "sdpa-cudnn",
                 "sdpa-efficient", "sdpa-math", "sdpa-default", "naive-cupy-fp16"]
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH",
                 "sdpa-default": None}
FC_FAMILIES = {"flashcupy": "auto", "flashcupy-generic": "generic", "flashcupy-sm80": "sm80"}
# variant rows that SDPA's backends run too (as an attn_mask, or dropout_p)
SDPA_VARIANTS = ("bias", "keypad", "dropout")
DROPOUT_P = 0.1
SHORT = {"flashcupy": "fc", "flashcupy-generic": "fc-gen", "flashcupy-sm80": "fc-sm80",
         "sdpa-flash": "flash", "sdpa-cudnn": "cudnn", "sdpa-efficient": "effic",
         "sdpa-math": "math", "sdpa-default": "sdpa", "naive-cupy-fp16": "naive16"}

FULL_S = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_S = [1024, 4096, 16384]


@dataclass(frozen=True)
class Case:
    mode: str
    dtype: str  # "bf16" | "fp16" | "fp32" | "fp64"
    B: int
    H: int
    S: int
    D: int
    causal: bool
    variant: str = ""  # "" | "window" | "softcap" | "alibi" | "sink" | "bias" | "keypad" | "dropout"
    window_left: int = 1024

    @property
    def shape(self):
        return (self.B, self.H, self.S, self.D)

    def label(self):
        return (f"{self.mode} {self.dtype} D{self.D} S{self.S} "
                f"{'causal' if self.causal else 'full'}{self.variant_label()} B{self.B} H{self.H}")

    def variant_label(self):
        if self.variant == "window":
            return f" window({self.window_left},0)"
        return f" {self.variant}" if self.variant else ""

    def flops(self):
        if self.variant != "window":
            return T.attention_flops(self.B, self.H, self.S, self.S, self.D, self.causal,
                                     self.mode)
        pairs = sum(min(i, self.window_left) + 1 for i in range(self.S))  # Sq = Sk: keys i-left..i
        return 4.0 * self.B * self.H * pairs * self.D * (2.5 if self.mode == "bwd" else 1.0)

    def score_bytes_fp32(self):
        return self.B * self.H * self.S * self.S * 4


# --------------------------------------------------------------------------- providers
# Each maker returns (fn, ctx): fn() runs one timed call on the next input set,
# ctx is entered around timing and the memory measurement.


def keypad_mask(case: Case, xp):
    """The keypad row's (B, 1, 1, S) bool mask (see the module docstring)."""
    keep = [case.S - (b % 4) * case.S // 16 for b in range(case.B)]
    return xp.arange(case.S)[None, None, None, :] < xp.asarray(keep)[:, None, None, None]


def variant_kwargs(case: Case) -> dict:
    """flashcupy keywords of a variant row (see the module docstring)."""
    import cupy

    if case.variant == "bias":
        dt = T.dtype_from_name(case.dtype)
        return {"bias": T.randn((case.B, case.H, case.S, case.S), dt)}
    if case.variant == "keypad":
        return {"mask": keypad_mask(case, cupy)}
    if case.variant == "dropout":
        return {"dropout_p": DROPOUT_P, "seed": 1234}

    if case.variant == "window":
        return {"window": (case.window_left, 0)}
    if case.variant == "softcap":
        return {"softcap": 30.0}
    if case.variant == "alibi":
        h = cupy.arange(1, case.H + 1, dtype=cupy.float32)
        return {"alibi_slopes": cupy.exp2(-8.0 * h / case.H).astype(cupy.float32)}
    if case.variant == "sink":
        return {"sink": cupy.random.default_rng(0).standard_normal(case.H, dtype=cupy.float32)}
    return {}


def make_flashcupy(case: Case, fc, family: str, n_sets: int):
    import cupy

    dt = T.dtype_from_name(case.dtype)
    sets = []
    for _ in range(n_sets):
        q, k, v = (T.randn(case.shape, dt) for _ in range(3))
        sets.append((q, k, v))
    ctx = T.kernel_family(fc, family)
    kw = dict(variant_kwargs(case), causal=case.causal)
    if case.mode == "fwd":
        def body(q, k, v):
            return fc.attention(q, k, v, **kw)
        return T.Rotate(body, sets), ctx

    bwd_sets = []
    with T.kernel_family(fc, family):
        for q, k, v in sets:
            out, lse = fc.attention(q, k, v, return_lse=True, **kw)
            dout = T.randn(case.shape, dt)
            bwd_sets.append((dout, q, k, v, out, lse))
    cupy.cuda.get_current_stream().synchronize()

    bkw = dict(kw, bias_grad=True) if "bias" in kw else kw

    def body(dout, q, k, v, out, lse):
        return fc.attention_backward(dout, q, k, v, out, lse, **bkw)
    return T.Rotate(body, bwd_sets), ctx


def make_sdpa(case: Case, torch, backend_name, n_sets: int):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = T.torch_dtype_from_name(case.dtype)

    @contextlib.contextmanager
    def ctx():
        with contextlib.ExitStack() as s:
            s.enter_context(T.torch_on_cupy_stream())
            if backend_name is not None:
                s.enter_context(sdpa_kernel(getattr(SDPBackend, backend_name)))
            if case.mode == "fwd":
                s.enter_context(torch.no_grad())
            yield

    grad = case.mode == "bwd"
    kw = {"is_causal": case.causal}
    if case.variant == "bias":
        kw["attn_mask"] = torch.randn((case.B, case.H, case.S, case.S), device="cuda", dtype=dt,
                                      requires_grad=grad)
    elif case.variant == "keypad":
        kw["attn_mask"] = keypad_mask(case, torch).cuda()
    elif case.variant == "dropout":
        kw["dropout_p"] = DROPOUT_P
    wrt = ("attn_mask",) if case.variant == "bias" and grad else ()
    with ctx():
        sets = []
        for _ in range(n_sets):
            q, k, v = (torch.randn(case.shape, device="cuda", dtype=dt, requires_grad=grad)
                       for _ in range(3))
            if case.mode == "fwd":
                sets.append((q, k, v))
            else:
                out = F.scaled_dot_product_attention(q, k, v, **kw)
                dout = torch.randn_like(out)
                sets.append((q, k, v, out, dout))
        torch.cuda.synchronize()

    if case.mode == "fwd":
        def body(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    else:
        def body(q, k, v, out, dout):
            return torch.autograd.grad(out, (q, k, v) + tuple(kw[n] for n in wrt), dout,
                                       retain_graph=True)
    return T.Rotate(body, sets), ctx()


def make_naive_cupy(case: Case, n_sets: int):
    """Unfused attention in CuPy, float16 (CuPy has no bf16 batched matmul)."""
    import cupy
    import numpy as np

    dt = np.float16
    scale = dt(1.0 / math.sqrt(case.D))
    bias = None
    if case.causal:
        # (S, S) additive mask: 0 on and below the diagonal, -inf above.
        bias = cupy.triu(cupy.full((case.S, case.S), -cupy.inf, dtype=dt), k=1)

    def probs(q, k):
        s = cupy.matmul(q, k.swapaxes(-1, -2))          # (B, H, S, S) scores
        s *= scale
        if bias is not None:
            s += bias
        s -= s.max(axis=-1, keepdims=True)
        cupy.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return s                                          # (B, H, S, S) probabilities

    sets = [tuple(T.randn(case.shape, dt) for _ in range(3)) for _ in range(n_sets)]
    if case.mode == "fwd":
        def body(q, k, v):
            return cupy.matmul(probs(q, k), v)
        return T.Rotate(body, sets), contextlib.nullcontext()

    bwd_sets = []
    for q, k, v in sets:
        p = probs(q, k)
        out = cupy.matmul(p, v)
        bwd_sets.append((T.randn(case.shape, dt), q, k, v, out, p))

    def body(dout, q, k, v, out, p):
        dv = cupy.matmul(p.swapaxes(-1, -2), dout)
        dp = cupy.matmul(dout, v.swapaxes(-1, -2))       # (B, H, S, S)
        delta = (dout.astype(cupy.float32) * out).sum(axis=-1, keepdims=True)
        dp -= delta.astype(dt)
        dp *= p                                           # dS, in place
        dq = cupy.matmul(dp, k)
        dq *= scale
        dk = cupy.matmul(dp.swapaxes(-1, -2), q)
        dk *= scale
        return dq, dk, dv
    return T.Rotate(body, bwd_sets), contextlib.nullcontext()


# --------------------------------------------------------------------------- running


def run_one(provider, case, args, libs):
    """Returns a result dict; never raises (except KeyboardInterrupt)."""
    row = {"provider": provider, "mode": case.mode, "dtype": case.dtype, "B": case.B,
           "H": case.H, "S": case.S, "D": case.D, "causal": case.causal,
           "variant": case.variant_label().strip(), "ms": None,
           "tflops": None, "peak_extra_bytes": None, "status": "ok"}
    if case.variant and provider not in FC_FAMILIES and not (
            case.variant in SDPA_VARIANTS and provider in SDPA_BACKENDS):
        row["status"] = "n/a: flashcupy-only variant row"
        return row
    limit = args.max_score_gib * 2**30
    if provider in ("sdpa-math", "naive-cupy-fp16") and case.score_bytes_fp32() > limit:
        row["status"] = (f"skipped: B*H*S*S*4 = {case.score_bytes_fp32() / 2**30:.3g} GiB "
                         f"> {args.max_score_gib:g} GiB")
        return row
    naive_max_s = getattr(args, "naive_max_s", 0)
    if provider == "naive-cupy-fp16" and naive_max_s and case.S > naive_max_s:
        row["status"] = f"skipped: S > --naive-max-s {naive_max_s}"
        return row
    fn = ctx = None
    failed = False
    caught = []
    try:
        with _quiet(caught):
            if provider in FC_FAMILIES:
                fc, why = libs["flashcupy"]
                if fc is None:
                    row["status"] = f"unavailable: {why}"
                    return row
                fn, ctx = make_flashcupy(case, fc, FC_FAMILIES[provider], args.rotate)
            elif provider in SDPA_BACKENDS:
                torch, why = libs["torch"]
                if torch is None:
                    row["status"] = f"unavailable: {why}"
                    return row
                fn, ctx = make_sdpa(case, torch, SDPA_BACKENDS[provider], args.rotate)
            elif provider == "naive-cupy-fp16":
                fn, ctx = make_naive_cupy(case, args.rotate)
            else:
                raise ValueError(provider)
            with ctx:
                t = T.do_bench(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                               min_reps=args.min_reps, flush_l2=not args.no_flush_l2)
                row.update(ms=t.ms, min_ms=t.min_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                           reps=t.reps)
                row["tflops"] = T.tflops(case.flops(), t.ms)
                if not args.no_memory:
                    row["peak_extra_bytes"] = T.peak_extra_bytes(fn)
                if provider in FC_FAMILIES:
                    row["family"] = _resolved_family(libs["flashcupy"][0], case.dtype)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one provider failing must not end the sweep
        row["status"] = T.classify_error(e)
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        if caught:  # PyTorch says why a backend declined in warnings, not in the error
            row["warnings"] = sorted({str(w.message)[:300] for w in caught})[:8]
        failed = True
    finally:
        fn = ctx = None
        T.free_gpu_memory(collect=failed)
    return row


def _resolved_family(fc, dtype_name):
    """The kernel family flashcupy picks here (under the active kernel_family), or None."""
    try:
        import cupy

        cc = int(cupy.cuda.Device().compute_capability)
        return fc._config.choose_family(dtype_name, cc)
    except Exception:  # noqa: BLE001 - private API; informational only
        return None


@contextlib.contextmanager
def _quiet(caught):
    """Collect (not print) warnings, e.g. SDPA's 'backend not used because ...'."""
    import warnings

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            caught.extend(w[:50])


def add_ratios(cell_rows):
    """vs_best_sdpa = TFLOP/s / max over sdpa-* in the same cell; vs_sdpa_flash likewise."""
    sdpa = [r["tflops"] for r in cell_rows
            if r["provider"].startswith("sdpa-") and r["provider"] != "sdpa-default"
            and r["tflops"]]
    best = max(sdpa) if sdpa else None
    flash = next((r["tflops"] for r in cell_rows
                  if r["provider"] == "sdpa-flash" and r["tflops"]), None)
    for r in cell_rows:
        r["vs_best_sdpa"] = r["tflops"] / best if (best and r["tflops"]) else None
        r["vs_sdpa_flash"] = r["tflops"] / flash if (flash and r["tflops"]) else None


def build_cases(args):
    cases = []
    for mode in args.mode:
        for dtype in args.dtype:
            for D in args.d:
                for causal in args.causal:
                    for S in args.s:
                        B = max(1, args.tokens // S)
                        H = max(1, args.hidden // D)
                        cases.append(Case(mode, dtype, B, H, S, D, bool(causal)))
    for variant in args.variants:
        for mode in args.mode:
            for dtype in args.dtype:
                for D in args.d:
                    for S in args.variant_s or args.s:
                        B = max(1, args.tokens // S)
                        H = max(1, args.hidden // D)
                        cases.append(Case(mode, dtype, B, H, S, D, False, variant,
                                          args.window_left))
    return cases


# --------------------------------------------------------------------------- output


def long_table(rows):
    cols = ["provider", "mode", "dtype", "B", "H", "S", "D", "causal", "ms", "TFLOP/s",
            "x best sdpa", "x sdpa-flash", "peak MiB", "status / note"]
    body = []
    for r in rows:
        mem = r.get("peak_extra_bytes")
        body.append([r["provider"], r["mode"], r["dtype"], str(r["B"]), str(r["H"]),
                     str(r["S"]), str(r["D"]), str(int(r["causal"])), T.fmt(r["ms"], 3),
                     T.fmt(r["tflops"], 1), T.fmt(r.get("vs_best_sdpa"), 2),
                     T.fmt(r.get("vs_sdpa_flash"), 2),
                     T.fmt(mem / 2**20 if mem is not None else None, 0),
                     r["status"][:48] if r["status"] != "ok"
                     else (f"family {r['family']}" if r.get("family") else "")])
    return T.format_table(body, cols)


def _short_status(r):
    s = r["status"]
    if s == "ok":
        return T.fmt(r["tflops"], 1)
    for key, short in (("skipped", "skip"), ("unsupported", "unsup"), ("OOM", "OOM"),
                       ("unavailable", "n/a"), ("n/a", "-")):
        if s.startswith(key):
            return short
    return "err"


def summary_table(rows, providers):
    """TFLOP/s per provider, one line per S, a title line per (mode, dtype, D, causal).

    Kept narrow (about 10 kB for the full sweep) so it fits in a 12 kB log tail.
    """
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["dtype"], r["D"], r["causal"], r.get("variant", "")),
                          []).append(r)
    cols = ["S"] + [SHORT.get(p, p) for p in providers] + ["fc/best", "fc/flash"]
    body, titles = [], {}
    for (mode, dtype, D, causal, variant), grs in groups.items():
        titles[len(body)] = (f"-- {mode} {dtype} D={D} {'causal' if causal else 'non-causal'}"
                             f"{' ' + variant if variant else ''} H={grs[0]['H']}")
        by_s = {}
        for r in grs:
            by_s.setdefault(r["S"], {})[r["provider"]] = r
        for S, d in by_s.items():
            fc = d.get("flashcupy", {})
            body.append([str(S)] + [_short_status(d[p]) if p in d else "" for p in providers]
                        + [T.fmt(fc.get("vs_best_sdpa"), 2), T.fmt(fc.get("vs_sdpa_flash"), 2)])
    lines = T.format_table(body, cols, sep=" ").split("\n")
    out = ["TFLOP/s by provider (B = tokens / S); fc/best = flashcupy / best SDPA backend, "
           "fc/flash = flashcupy / sdpa-flash", lines[0]]
    for i, line in enumerate(lines[2:]):
        if i in titles:
            out.append(titles[i])
        out.append(line)
    return "\n".join(out)


def write_json(path, env, method, args, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"env": env, "timing_method": method, "args": vars(args), "rows": rows}, f,
                  indent=1, default=str)
    os.replace(tmp, path)


def plot(path, rows, providers):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        T.progress(f"plot skipped: matplotlib not importable ({type(e).__name__}: {e})")
        return None
    panels = sorted({(r["mode"], r["D"], r["causal"]) for r in rows},
                    key=lambda p: (p[0] != "fwd", p[2], p[1]))
    if not panels:
        return None
    Ds = sorted({p[1] for p in panels})
    mc = sorted({(p[0], p[2]) for p in panels}, key=lambda x: (x[0] != "fwd", x[1]))
    fig, axes = plt.subplots(len(mc), len(Ds), figsize=(4.2 * len(Ds), 3.2 * len(mc)),
                             squeeze=False, sharex=True)
    dtypes = sorted({r["dtype"] for r in rows})
    styles = ["-", "--", ":", "-."]  # one per dtype; one colour per provider
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    s_ticks = sorted({r["S"] for r in rows})
    for i, (mode, causal) in enumerate(mc):
        for j, D in enumerate(Ds):
            ax = axes[i][j]
            for p in providers:
                for k, dt in enumerate(dtypes):
                    pts = sorted((r["S"], r["tflops"]) for r in rows
                                 if r["provider"] == p and r["dtype"] == dt and r["mode"] == mode
                                 and r["D"] == D and r["causal"] == causal and r["tflops"])
                    if pts:
                        ax.plot([x for x, _ in pts], [y for _, y in pts], styles[k % 4],
                                color=colors[p], marker="o", ms=3,
                                lw=2.2 if p.startswith("flashcupy") else 1.2,
                                label=p if len(dtypes) == 1 else f"{p} {dt}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(s_ticks)
            ax.set_xticklabels([f"{x // 1024}k" if x >= 1024 else str(x) for x in s_ticks])
            ax.set_ylim(bottom=0)
            ax.set_title(f"{mode} D={D} {'causal' if causal else 'non-causal'}", fontsize=9)
            ax.set_xlabel("S")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(labels) / 6), 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Default sweep: mode fwd bwd, dtype bf16 fp16, D 64 128 256, causal 0 1, "
               "S 512..16384; --quick: D 64 128, S 1024 4096 16384, bf16.\n"
               "Exit status 2 when no GPU is available.")
    p.add_argument("--mode", nargs="+", choices=["fwd", "bwd"], default=None)
    p.add_argument("--dtype", nargs="+", choices=["bf16", "fp16"], default=None)
    p.add_argument("--d", nargs="+", type=int, default=None, help="head dims (default 64 128 256)")
    p.add_argument("--causal", nargs="+", type=int, choices=[0, 1], default=None)
    p.add_argument("--s", nargs="+", type=int, default=None, help="sequence lengths")
    p.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=None,
                   help=f"default: {' '.join(DEFAULT_PROVIDERS)}")
    p.add_argument("--generic", action="store_true", help="also time flashcupy-generic")
    p.add_argument("--quick", action="store_true",
                   help="D 64 128; S 1024 4096 16384; bf16 (explicit axis flags still win)")
    p.add_argument("--variants", nargs="+",
                   choices=["window", "softcap", "alibi", "sink", "bias", "keypad", "dropout"],
                   default=[], help="add flashcupy rows with these variants (see above)")
    p.add_argument("--window-left", type=int, default=1024, help="window=(LEFT, 0) rows")
    p.add_argument("--variant-s", nargs="+", type=int, default=None,
                   help="sequence lengths of the variant rows (default: --s)")
    p.add_argument("--tokens", type=int, default=16384, help="batch * S (default 16384)")
    p.add_argument("--hidden", type=int, default=2048, help="H * D (default 2048)")
    p.add_argument("--max-score-gib", type=float, default=8.0,
                   help="skip sdpa-math and naive-cupy-fp16 when B*H*S*S*4 bytes exceeds this")
    p.add_argument("--naive-max-s", type=int, default=4096,
                   help="skip naive-cupy-fp16 above this S (default 4096; it is the slowest "
                        "provider, about half the sweep's time if run to 16k); 0 = no limit")
    p.add_argument("--warmup-ms", type=float, default=T.WARMUP_MS)
    p.add_argument("--rep-ms", type=float, default=T.REP_MS)
    p.add_argument("--min-reps", type=int, default=T.MIN_REPS)
    p.add_argument("--rotate", type=int, default=2, help="input sets to rotate among (>= 2)")
    p.add_argument("--no-flush-l2", action="store_true", help="skip the L2-evicting memset")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds; cells not started by then are left out and listed, so a "
                        "run under a wall-clock limit still ends with its tables "
                        "(default 0: no limit)")
    p.add_argument("--out", default="bench_out/results.json", help="JSON path")
    p.add_argument("--plot", default="bench_out/attention.png", help="PNG path")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-long-table", action="store_true",
                   help="print only the summary table (the long one is still in the JSON)")
    args = p.parse_args(argv)
    q = args.quick
    args.mode = args.mode or ["fwd", "bwd"]
    args.dtype = args.dtype or (["bf16"] if q else ["bf16", "fp16"])
    args.d = args.d or ([64, 128] if q else [64, 128, 256])
    args.causal = args.causal if args.causal is not None else [0, 1]
    args.s = args.s or (QUICK_S if q else FULL_S)
    args.providers = list(args.providers or DEFAULT_PROVIDERS)
    if args.generic and "flashcupy-generic" not in args.providers:
        args.providers.insert(1, "flashcupy-generic")
    args.rotate = max(1, args.rotate)
    return args


def main(argv=None):
    args = parse_args(argv)
    T.require_gpu()
    libs = {"flashcupy": T.try_import_flashcupy()}
    if any(p.startswith("sdpa") for p in args.providers):
        libs["torch"] = T.try_import_torch()
        if libs["torch"][0] is None:
            T.progress(f"warning: SDPA providers unavailable: {libs['torch'][1]}")
    if libs["flashcupy"][0] is None:
        T.progress(f"warning: {libs['flashcupy'][1]}")
    method = T.timing_method(args.warmup_ms, args.rep_ms, args.min_reps, not args.no_flush_l2,
                             args.rotate)
    if args.variants:
        method += ("; window rows count visible (query, key) pairs only: fwd 4*B*H*pairs*D, "
                   "query i of window=(left, 0) sees min(i, left) + 1 keys")
    env = T.environment()
    cases = build_cases(args)
    n = len(cases) * len(args.providers)
    T.progress(f"{len(cases)} cells x {len(args.providers)} providers = {n} runs on {env['gpu']}")
    rows, k, t0, left_out = [], 0, time.time(), []
    try:
        for case in cases:
            if args.time_limit and time.time() - t0 > args.time_limit:
                left_out = cases[cases.index(case):]
                T.progress(f"time limit {args.time_limit:g} s reached; {len(left_out)} cells "
                           f"left out")
                break
            cell = []
            for prov in args.providers:
                k += 1
                print(f"[{k}/{n}] {case.label()} {prov} ...", end="", file=sys.stderr, flush=True)
                r = run_one(prov, case, args, libs)
                cell.append(r)
                res = (f" {r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s" if r["status"] == "ok"
                       else f" {r['status']}")
                print(f"{res}  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
            add_ratios(cell)
            rows.extend(cell)
            write_json(args.out, env, method, args, rows)
    except KeyboardInterrupt:
        T.progress("interrupted; reporting what was measured")
    T.release_flush_buffer()
    write_json(args.out, env, method, args, rows)
    png = None if args.no_plot else plot(args.plot, rows, args.providers)
    long_text = (long_table(rows) + "\npeak MiB = extra GPU memory of one call: CuPy pool "
                 "allocations (memory hook) + torch.cuda.max_memory_allocated delta; outputs and "
                 "workspaces, not inputs.\n")
    tail = T.format_environment(env, method) + "\n" + summary_table(rows, args.providers)
    if left_out:
        tail += (f"\nNOT RUN (--time-limit {args.time_limit:g} s): {len(left_out)} cells, from "
                 f"{left_out[0].label()} to {left_out[-1].label()}")
    txt = os.path.splitext(args.out)[0] + ".txt"
    with open(txt, "w") as f:
        f.write(long_text + "\n" + tail + "\n")
    T.progress(f"wrote {args.out}, {txt}" + (f" and {png}" if png else "")
               + f"; {time.time() - t0:.0f} s total")
    sys.stderr.flush()
    if not args.no_long_table:
        print(long_text)
    print(tail)  # last: the end of a long log (or a truncated one) holds the summary
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
