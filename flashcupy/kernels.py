"""GPU-free kernel check: ``python -m flashcupy.kernels check --arch sm_80 --arch sm_90a``.

Compiles every shipped specialization with NVRTC for the named architectures
(no GPU, no driver) and prints, per kernel: registers, static shared memory,
the dynamic shared memory the launcher will request, stack frame and spill
bytes.  Each build also compiles static_asserts that the launcher's
shared-memory size equals the kernel's own layout struct and that the
parameter struct has flashcupy/_params.py's layout.  Exits non-zero on a
compile error, on any spill, or on more than 255 registers.

Shipped variants: see BASE_VARIANTS and HEAVY_VARIANT below.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from . import _compile, _config, _dtypes, _params
from ._spec import (VF_ALIBI, VF_LOCAL, VF_PAGED, VF_RIGHT, VF_SEQ, VF_SINK, VF_SOFTCAP,
                    VF_SPLIT)

DTYPES = ("fp16", "bf16", "fp32", "fp64")


# Dense and causal (the window's right side alone) at every tile; every variant
# at once (two-sided window, softcap, ALiBi, sink) as the heaviest case at the
# 64 and 128 buckets of each family.  Other combinations compile on first use
# from the same bodies.
BASE_VARIANTS = (0, VF_RIGHT)
HEAVY_VARIANT = VF_LOCAL | VF_SOFTCAP | VF_ALIBI | VF_SINK
# Sequences (cuda_src/seq.cuh): causal packed batches, and the paged forward,
# at the 64 and 128 buckets.
SEQ_VARIANTS = (VF_SEQ | VF_RIGHT, VF_SEQ | VF_PAGED | VF_RIGHT)
# Split-KV forwards (cuda_src/split.cuh): dense, the KV cache and the paged
# cache, at every bucket (decode at D = 256 is a Gemma-class step).
SPLIT_VARIANTS = (VF_SPLIT, VF_SPLIT | VF_SEQ, VF_SPLIT | VF_SEQ | VF_PAGED)


def shipped_specs(families=None, kernels=None):
    """Every specialization flashcupy ships: the test grid reaches each one."""
    specs = []
    for fam in _config.FAMILIES:
        mod = _config.module(fam)
        specs.extend(mod.shipped_specs(BASE_VARIANTS))
        specs.extend(s for s in mod.shipped_specs((HEAVY_VARIANT,))
                     if s.variant and s.head_dim in (64, 128))
        specs.extend(s for s in mod.shipped_specs(SEQ_VARIANTS)
                     if s.variant and s.head_dim in (64, 128)
                     and (s.kernel == "fwd" or not s.variant & VF_PAGED))
        if fam != "generic":
            specs.extend(s for s in mod.shipped_specs(SPLIT_VARIANTS) if s.kernel == "fwd")
    if families:
        specs = [s for s in specs if s.family in families]
    if kernels:
        specs = [s for s in specs if s.kernel in kernels]
    return list(dict.fromkeys(specs))


def _asserts(specs) -> str:
    """static_asserts compiled with each group: smem and parameter layouts."""
    lines = []
    for s in specs:
        expr = _config.smem_expression(s)
        if expr is not None:
            lines.append(f"static_assert(({expr}) == {_config.smem_bytes(s)}, "
                         f"\"{s.key}: the launcher's shared memory differs from the kernel's\");")
    if _compile.has_builtin_offsetof():
        info = _dtypes.info(_dtypes.BY_NAME[specs[0].dtype])
        t, acc = info.storage, info.acc
        lines.append(_params.offset_asserts("fwd", f"FwdParams<{t}, {acc}>", specs[0].acc_bytes))
        lines.append(_params.offset_asserts("bwd", f"BwdParams<{t}, {acc}, {t}>",
                                            specs[0].acc_bytes))
    return "\n".join(lines)


def _check_group(source, arch, specs):
    names = [_config.name_expression(s) for s in specs]
    src = _compile.module_source(source) + "\n" + _asserts(specs) + "\n"
    ok, log, lowered = _compile.nvrtc_compile(src, arch, names)
    if not ok:
        return [(s, arch, None, log) for s in specs]
    info = _compile.parse_ptxas(log)
    return [(s, arch, info.get(lowered[n]), "") for s, n in zip(specs, names)]


def check(archs, families=None, kernels=None, jobs=2, out=sys.stdout) -> int:
    specs = shipped_specs(families, kernels)
    groups = defaultdict(list)
    for s in specs:
        for a in archs:
            # A tile that needs more shared memory than an arch has is never
            # launched there (the table's next candidate is).
            if not _config.runs_on(s, a):
                continue
            groups[(_config.source(s), s.dtype, a)].append(s)
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        results = [r for rs in ex.map(lambda kv: _check_group(kv[0][0], kv[0][2], kv[1]),
                                      groups.items()) for r in rs]
    order = {s: i for i, s in enumerate(specs)}
    results.sort(key=lambda r: (order[r[0]], r[1]))

    failures = 0
    hdr = f"{'kernel':<56} {'arch':<7} {'regs':>5} {'smem(static)':>12} {'smem(dyn)':>10} {'stack':>6} {'spill st/ld':>12}  status"
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for spec, arch, info, log in results:
        if info is None:
            failures += 1
            print(f"{spec.key:<56} {arch:<7} {'-':>5} {'-':>12} {'-':>10} {'-':>6} {'-':>12}  COMPILE ERROR", file=out)
            print(log[-3000:], file=out)
            continue
        spill = info["spill_stores"] + info["spill_loads"]
        bad = []
        if spill:
            bad.append("SPILL")
        if info["regs"] > 255:
            bad.append("REGS>255")
        limit = _config.SMEM_LIMIT_SM90 if arch.startswith("sm_9") else _config.SMEM_LIMIT_SM80
        smem = _config.smem_bytes(spec)
        if smem + info["smem"] > limit:
            bad.append("SMEM>LIMIT")
        failures += bool(bad)
        print(f"{spec.key:<56} {arch:<7} {info['regs']:>5} {info['smem']:>12} {smem:>10} "
              f"{info['stack']:>6} {info['spill_stores']:>5}/{info['spill_loads']:<6}  "
              f"{' '.join(bad) or 'ok'}", file=out)
    print(f"\n{len(results)} kernel builds, {failures} failing", file=out)
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashcupy.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="compile every shipped specialization with NVRTC, no GPU")
    c.add_argument("--arch", action="append", default=None,
                   help="target, e.g. sm_80 or sm_90a (repeatable; default: both)")
    c.add_argument("--family", action="append", choices=_config.FAMILIES, default=None)
    c.add_argument("--kernel", action="append", default=None,
                   help="fwd, bwd_preprocess, bwd_dq, bwd_dkdv, ... (repeatable)")
    c.add_argument("-j", "--jobs", type=int, default=2)
    args = p.parse_args(argv)
    return check(args.arch or ["sm_80", "sm_90a"], args.family, args.kernel, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
