"""Which kernel family runs a call, and the per-family dispatch of a spec.

The families' selection tables live in ``flashcupy/_families`` (one module
each, with the measured reason beside every row); this module only chooses
among them and forwards a :class:`~flashcupy._spec.KernelSpec` to its family
for the source file, name expression, shared memory and tile height.
Imports go one way: ``_config`` -> ``_families.*`` -> ``_spec``.
"""
from __future__ import annotations

import contextlib
import contextvars

from ._families import f64mma, generic, sm80, sm90
from ._spec import (HEAD_DIM_BUCKETS, MAX_HEAD_DIM, SMEM_LIMIT_SM80, SMEM_LIMIT_SM90,  # noqa: F401
                    KernelSpec, head_dim_bucket)

FAMILIES = ("generic", "sm80", "sm90", "f64mma")
_MODULES = {"generic": generic, "sm80": sm80, "sm90": sm90, "f64mma": f64mma}
# Families whose backward is the generic family's kernels (plan and all).
GENERIC_BACKWARD = ("generic", "f64mma")


def module(family: str):
    return _MODULES[family]


# -- per-spec dispatch ----------------------------------------------------------
def source(spec: KernelSpec) -> str:
    """The cuda_src file that defines the kernel of ``spec``."""
    return _MODULES[spec.family].source(spec)


def name_expression(spec: KernelSpec) -> str:
    return _MODULES[spec.family].name_expression(spec)


def smem_bytes(spec: KernelSpec) -> int:
    """Dynamic shared memory the launch requests."""
    return _MODULES[spec.family].smem_bytes(spec)


def smem_expression(spec: KernelSpec):
    return _MODULES[spec.family].smem_expression(spec)


def tile_rows(spec: KernelSpec) -> int:
    """Rows of the sequence axis one CTA owns (queries, or keys for dK/dV)."""
    return _MODULES[spec.family].tile_rows(spec)


def runs_on(spec: KernelSpec, arch: str) -> bool:
    return _MODULES[spec.family].runs_on(spec, arch)


def group_max(family: str) -> int:
    """GQA/MQA heads one dK/dV CTA sums.  The tensor-core kernels store dK/dV
    in the input dtype only (a split would need float32 partial buffers), and
    for float16/bfloat16 outputs the sequential float32 sum's error stays far
    below the output rounding: no cap."""
    return generic.GROUP_MAX if family in GENERIC_BACKWARD else 1 << 30


# -- family choice ----------------------------------------------------------------
_FORCED = contextvars.ContextVar("flashcupy_kernel_family", default="auto")


@contextlib.contextmanager
def kernel_family(name: str):
    """Force a kernel family inside a ``with`` block.

    ``"auto"`` (the default) picks the fastest family for the inputs:
    ``"sm90"`` (warpgroup MMA) for float16/bfloat16 on compute capability 9.0,
    ``"sm80"`` (mma.sync tensor cores) for float16/bfloat16 on 8.0 and newer,
    ``"f64mma"`` (the double-precision tensor cores; the forward, with the
    generic backward) for float64 on 8.0 and newer, ``"generic"`` (plain FMA)
    otherwise.  Forcing a family that cannot run the
    inputs raises ``ValueError`` at the call.
    """
    if name not in ("auto",) + FAMILIES:
        raise ValueError(f"kernel_family: expected one of {('auto',) + FAMILIES}, got {name!r}")
    with _setting(_FORCED, name):
        yield


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
    """``var`` set to ``value`` inside a ``with`` block (the forcing switches)."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def current_family() -> str:
    """The family forced by the innermost ``kernel_family`` block, or "auto"."""
    return _FORCED.get()


def family_supports(family: str, dtype: str, cc: int) -> bool:
    return family in _MODULES and _MODULES[family].supports(dtype, cc)


def families_for(dtype: str, cc: int) -> tuple:
    return tuple(f for f in FAMILIES if family_supports(f, dtype, cc))


def choose_family(dtype: str, cc: int) -> str:
    forced = _FORCED.get()
    if forced == "auto":
        for f in ("sm90", "sm80", "f64mma"):
            if family_supports(f, dtype, cc):
                return f
        return "generic"
    if not family_supports(forced, dtype, cc):
        raise ValueError(
            f"kernel family {forced!r} cannot run {dtype} inputs on a compute capability "
            f"{cc // 10}.{cc % 10} GPU; it runs on: {families_for(dtype, cc)}")
    return forced


# -- GQA packing (flashcupy/_pack.py) -----------------------------------------------
_GQA_PACK = contextvars.ContextVar("flashcupy_gqa_packing", default="auto")
# "auto" folds calls of at most this many query rows a head: the decode,
# speculative and chunked-prefill shapes it was measured on (GQA 32/8 decode
# 1.7 -> 4.2-4.3 TB/s at Sq = 1, 4 and 16 with split-KV, benchmarks/dev/NOTES.md
# section 14); prefill tiles are full without it.
GQA_AUTO_MAX_ROWS = 64


@contextlib.contextmanager
def gqa_packing(mode: str):
    """Fold a query-head group into the rows of one tile inside a ``with``
    block: ``"on"`` wherever the fold applies (flashcupy/_pack.py), ``"off"``
    never, ``"auto"`` (the default) for calls of at most
    ``GQA_AUTO_MAX_ROWS`` query rows.  Folded, the G query heads that share a
    K/V head read each K/V tile once instead of G times."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"gqa_packing: expected 'auto', 'on' or 'off', got {mode!r}")
    with _setting(_GQA_PACK, mode):
        yield


def gqa_mode() -> str:
    return _GQA_PACK.get()


# -- split-KV (flashcupy/_split.py) -------------------------------------------------
_SPLITS = contextvars.ContextVar("flashcupy_split_kv", default="auto")


@contextlib.contextmanager
def split_kv(n):
    """Force the forward's split-KV count inside a ``with`` block: an int >= 1
    (1: no split; larger counts are capped by the key tiles a query tile
    has and by 128), or ``"auto"`` (the default: the occupancy rule of
    flashcupy/_split.py).  A test and benchmark hook.  Results agree within
    the tolerance rule, not bit for bit: each split's probabilities are
    rounded to the input dtype against its own running max."""
    if n != "auto" and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"split_kv: expected 'auto' or an int >= 1, got {n!r}")
    with _setting(_SPLITS, n):
        yield


def split_mode():
    return _SPLITS.get()
