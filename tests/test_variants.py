"""GPU tests of the attention variants: sliding window, softcap, ALiBi, sinks.

The grid: every variant and every pairwise combination (with causal as a fifth
axis), and all of them together, x the four dtypes x every kernel family that
runs the dtype -- each cell one forward and one backward (dq, dk, dv and dsink)
checked with the tolerance rule of _assert.py against the float64 reference of
_naive.py.  The other factors are spread over the cells by rotation, not
multiplied in (a pairwise design): awkward lengths (1, 97, 200, 257; Sq < Sk and
Sq > Sk), head dims 64 and 128 (every variant reaches the sm90 wgmma kernels)
plus 72 and 40 (Dv = 64 != D), plain heads / GQA / MQA with per-head slopes and
sinks, deterministic=True and False.  Beside it: window edges (0, 1, >= S, one
side unbounded), window=(None, 0) == causal bit for bit, GQA with per-head
slopes and sinks, large scores under a softcap, determinism, empty axes.

As in test_forward / test_backward: inputs are seeded by the test id, outputs
come from a NaN-poisoned pool, and rows that see no key are checked exactly.
Bad-input errors (GPU-free) live in test_validation.py.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import _assert as A
import _naive as nv
from _grid import DTYPES, check_backward, check_forward, dtype_id, family

cp = pytest.importorskip("cupy")
import flashcupy as fc  # noqa: E402

pytestmark = pytest.mark.gpu

# (family, dtype): every family that can run the dtype somewhere; a test skips
# when this GPU lacks it (test_grid_covers_every_family keeps this list whole)
TENSOR_CORE_DTYPES = (nv.F16, nv.BF16)
FAMILY_DTYPES = [(fam, d) for d in DTYPES
                 for fam in (("generic", "sm80", "sm90") if d in TENSOR_CORE_DTYPES
                             else ("generic", "f64mma") if d == nv.F64 else ("generic",))]


def fd_id(fd):
    return f"{fd[0]}-{dtype_id(fd[1])}"


def case_grid(cases, seqlens):
    """pytest params (fd, case, seqlens, heads, deterministic) spreading ``cases``
    over every (family, dtype), with head dims, lengths and the deterministic
    flag rotated so that each case meets several of each (the bias/mask and
    dropout grids)."""
    out = []
    for ci, case in enumerate(cases):
        for fi, fd in enumerate(FAMILY_DTYPES):
            heads = (HEADS_SM90[(ci + fi) % len(HEADS_SM90)] if fd[0] == "sm90"
                     else HEADS[(ci + 2 * fi) % len(HEADS)])
            out.append(pytest.param(fd, case, seqlens[(ci + fi) % len(seqlens)], heads,
                                    (ci + fi) % 2 == 1, id=f"{fd_id(fd)}-{case[0]}"))
    return out


# ----------------------------------------------------------------------------
# the variants, their pairs, and the factors spread over the grid
# ----------------------------------------------------------------------------

VARIANTS = ("causal", "window", "softcap", "alibi", "sink")
COMBOS = (list(VARIANTS[1:]) + ["+".join(c) for c in itertools.combinations(VARIANTS, 2)]
          + ["+".join(VARIANTS)])   # causal alone is test_forward / test_backward's

SEQLENS = [(97, 200), (200, 97), (257, 257), (1, 257), (200, 1), (130, 257)]
HEADS = [(64, 64), (128, 128), (72, 72), (40, 64)]          # (D, Dv)
HEADS_SM90 = [(64, 64), (128, 128), (128, 64)]              # whole 64-column panels
WINDOWS = [(32, 8), (8, None), (None, 16), (100, 0)]        # edges: test_window_edges
# layout: (q batch dims, k/v batch dims, slopes shape, sink shape)
LAYOUTS = {
    "heads": ((1, 2), (1, 2), (2,), (1, 2)),
    "gqa": ((1, 2, 2), (1, 2, 1), (2, 2), (2, 2)),          # (B, Hkv, G): per query head
    "mqa": ((2, 3), (2, 1), (3,), (2, 3)),
}


def make_inputs(seed, dtype, layout, seqlens, heads):
    """q, k, v, dout (cupy, dtype) for a layout name."""
    qb, kb, _, _ = LAYOUTS[layout]
    (sq, sk), (d, dv) = seqlens, heads
    batch = tuple(np.broadcast_shapes(qb, kb))
    return nv.randn_many(cp, seed, [qb + (sq, d), kb + (sk, d), kb + (sk, dv),
                                    batch + (sq, dv)], dtype)


def variant_kwargs(combo, seed, layout, seqlen_k, window=(32, 8), softcap=1.5):
    """(causal, keywords of fc.attention) for a combination name.

    Slopes are uniform in [0.01, 0.2] (ALiBi's own are 2^-8h/H); the sink is
    log(Sk) + N(0, 1), so it takes a sizeable share of every row's softmax
    (a sink of ~0 next to 257 keys would hardly show).  Both float32 cupy."""
    _, _, slopes_shape, sink_shape = LAYOUTS[layout]
    parts = combo.split("+")
    rng = np.random.default_rng(seed ^ 0x5EED)
    kw = {}
    if "window" in parts:
        kw["window"] = window
    if "softcap" in parts:
        kw["softcap"] = softcap
    if "alibi" in parts:
        kw["alibi_slopes"] = cp.asarray(rng.uniform(0.01, 0.2, slopes_shape), np.float32)
    if "sink" in parts:
        kw["sink"] = cp.asarray(math.log(max(seqlen_k, 1)) + rng.standard_normal(sink_shape),
                                np.float32)
    return "causal" in parts, kw


def run_forward(q, k, v, causal, kw, poison_pool):
    with poison_pool():
        return fc.attention(q, k, v, causal=causal, return_lse=True, **kw)


def run_backward(dout, q, k, v, out, lse, causal, kw, poison_pool, deterministic=False):
    with poison_pool():
        return fc.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                     deterministic=deterministic, **kw)


def check_case(fam, dtype, combo, layout, seqlens, heads, det, window, seed, poison_pool):
    sq, sk = seqlens
    q, k, v, dout = make_inputs(seed, dtype, layout, seqlens, heads)
    causal, kw = variant_kwargs(combo, seed, layout, sk, window)
    with family(fam, dtype):
        out, lse = run_forward(q, k, v, causal, kw, poison_pool)
        check_forward(q, k, v, out, lse, causal, **kw)
        grads = run_backward(dout, q, k, v, out, lse, causal, kw, poison_pool, det)
    check_backward(dout, q, k, v, grads, causal, fwd=(out, lse), **kw)


def _grid_cases():
    """One case per (combination, family, dtype); the other factors rotate so that
    each (family, dtype) meets every length, layout and head dim, and each
    combination most of them."""
    cases = []
    for ci, combo in enumerate(COMBOS):
        for fi, fd in enumerate(FAMILY_DTYPES):
            heads = (HEADS_SM90[(ci + fi) % len(HEADS_SM90)] if fd[0] == "sm90"
                     else HEADS[(2 * ci + fi) % len(HEADS)])
            cases.append(pytest.param(
                fd, combo, list(LAYOUTS)[(ci + 2 * fi) % len(LAYOUTS)],
                SEQLENS[(ci + fi) % len(SEQLENS)], heads, (ci // 2 + fi) % 2 == 1,
                WINDOWS[(ci + 3 * fi) % len(WINDOWS)],
                id=f"{fd_id(fd)}-{combo}"))
    return cases


@pytest.mark.parametrize("fd, combo, layout, seqlens, heads, det, window", _grid_cases())
def test_variant_grid(fd, combo, layout, seqlens, heads, det, window, seed, poison_pool):
    fam, dtype = fd
    check_case(fam, dtype, combo, layout, seqlens, heads, det, window, seed, poison_pool)


def test_grid_covers_every_family():
    """Every family this GPU offers for a dtype is in FAMILY_DTYPES."""
    for dtype in DTYPES:
        for fam in fc.families_for(dtype):
            assert (fam, dtype) in FAMILY_DTYPES, (fam, dtype_id(dtype))


# ----------------------------------------------------------------------------
# window edges
# ----------------------------------------------------------------------------

EDGE_WINDOWS = [(0, 0), (0, 1), (1, 0), (1, 1), (0, None), (None, 1), (3, None), (300, 300),
                (300, 0), (0, 300)]


@pytest.mark.parametrize("window", EDGE_WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_window_edges(fd, window, seed, poison_pool):
    """Window sides 0, 1, >= S and unbounded, with and without causal, at
    lengths that are no multiple of a tile, Sq < Sk and Sq > Sk."""
    fam, dtype = fd
    wi, fi = EDGE_WINDOWS.index(window), FAMILY_DTYPES.index(fd)
    seqlens = [(97, 200), (200, 97), (257, 257)][(wi + fi) % 3]
    heads = [(64, 64), (128, 128)][(wi // 3 + fi) % 2]
    causal = (wi + fi) % 2 == 1
    combo = "window+causal" if causal else "window"
    check_case(fam, dtype, combo, "heads", seqlens, heads, (wi + fi) % 4 == 0, window, seed,
               poison_pool)


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_window_none_zero_is_causal_bit_for_bit(fd, seed, poison_pool):
    """window=(None, 0) is causal=True; causal with (None, 7) is causal; a window
    of (None, None) is no window: the same bits, forward and (deterministic)
    backward, also beside a sink and a softcap."""
    fam, dtype = fd
    q, k, v, dout = make_inputs(seed, dtype, "heads", (200, 257), (64, 64))
    sink = cp.asarray(np.full((1, 2), 3.0), np.float32)
    with family(fam, dtype):
        for extra in ({}, {"sink": sink, "softcap": 2.0}):
            for base, same in [((True, None), [(False, (None, 0)), (True, (None, 7)),
                                               (True, (None, None))]),
                               ((False, None), [(False, (None, None))])]:
                ref = fc.attention(q, k, v, causal=base[0], window=base[1], return_lse=True,
                                   **extra)
                ref_g = fc.attention_backward(dout, q, k, v, *ref, causal=base[0],
                                              window=base[1], deterministic=True, **extra)
                for causal, window in same:
                    with poison_pool():
                        got = fc.attention(q, k, v, causal=causal, window=window,
                                           return_lse=True, **extra)
                        got_g = fc.attention_backward(dout, q, k, v, *got, causal=causal,
                                                      window=window, deterministic=True,
                                                      **extra)
                    what = f"causal={causal}, window={window} vs causal={base[0]} {extra.keys()}"
                    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsink"),
                                          tuple(got) + tuple(got_g), tuple(ref) + tuple(ref_g)):
                        A.assert_no_nan(name, a)
                        assert bool((_bits(a) == _bits(b)).all()), f"{name}: {what}"
                check_forward(q, k, v, *ref, base[0], window=base[1], **extra)


def _bits(x):
    """The raw bits of an array (so -inf == -inf and a NaN never compares equal)."""
    return x.view({2: cp.uint16, 4: cp.uint32, 8: cp.uint64}[x.dtype.itemsize])


# ----------------------------------------------------------------------------
# broadcasting, large scores, determinism, empty axes
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("sink_shape", [(2, 3), (2, 2, 3), (3,)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_gqa_per_head_slopes_and_sinks(fd, sink_shape, seed, poison_pool):
    """q (B, Hkv, G, S, D) against k/v (B, Hkv, 1, S, D), slopes (Hkv, G), a sink
    per query head ((Hkv, G)), per batch and head, or per group position: dk,
    dv summed over G and dsink over every axis the sink was broadcast along."""
    fam, dtype = fd
    sq, sk, d = 130, 200, 64 if sink_shape != (3,) else 128
    q, k, v, dout = nv.randn_many(cp, seed, [(2, 2, 3, sq, d), (2, 2, 1, sk, d),
                                             (2, 2, 1, sk, d), (2, 2, 3, sq, d)], dtype)
    rng = np.random.default_rng(seed)
    kw = dict(window=(60, 10), softcap=2.0,
              alibi_slopes=cp.asarray(rng.uniform(0.01, 0.2, (2, 3)), np.float32),
              sink=cp.asarray(math.log(sk) + rng.standard_normal(sink_shape), np.float32))
    with family(fam, dtype):
        out, lse = run_forward(q, k, v, True, kw, poison_pool)
        check_forward(q, k, v, out, lse, True, **kw)
        for det in (False, True):
            grads = run_backward(dout, q, k, v, out, lse, True, kw, poison_pool, det)
            check_backward(dout, q, k, v, grads, True, fwd=(out, lse), **kw)
            assert grads[3].shape == sink_shape


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_softcap_large_scores(fd, seed, poison_pool):
    """Scores of magnitude ~30 under softcap 5: tanh saturates (its derivative
    -> 0), with ALiBi and a sink beside it; nothing overflows."""
    fam, dtype = fd
    q, k, v, dout = make_inputs(seed, dtype, "heads", (97, 257), (64, 64))
    q = nv.cast(nv.upcast(q, dtype) * 30, dtype)
    causal, kw = variant_kwargs("softcap+alibi+sink", seed, "heads", 257)
    kw["softcap"] = 5.0
    with family(fam, dtype):
        out, lse = run_forward(q, k, v, causal, kw, poison_pool)
        check_forward(q, k, v, out, lse, causal, **kw)
        grads = run_backward(dout, q, k, v, out, lse, causal, kw, poison_pool)
    check_backward(dout, q, k, v, grads, causal, fwd=(out, lse), **kw)


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_deterministic_with_variants(fd, seed, poison_pool):
    """deterministic=True with every variant on: the same bits on a second call
    (dsink too), across several query and key tiles and an MQA head sum."""
    fam, dtype = fd
    q, k, v, dout = make_inputs(seed, dtype, "mqa", (300, 333), (64, 64))
    causal, kw = variant_kwargs("+".join(VARIANTS), seed, "mqa", 333, window=(150, 20))
    with family(fam, dtype):
        out, lse = run_forward(q, k, v, causal, kw, poison_pool)
        first = run_backward(dout, q, k, v, out, lse, causal, kw, poison_pool, True)
        second = run_backward(dout, q, k, v, out, lse, causal, kw, poison_pool, True)
    for name, a, b in zip(("dq", "dk", "dv", "dsink"), first, second):
        A.assert_no_nan(name, a)
        assert bool((_bits(a) == _bits(b)).all()), (
            f"{name} ({fam}): deterministic=True gave different bits on a second call")
    check_backward(dout, q, k, v, first, causal, fwd=(out, lse), **kw)


@pytest.mark.parametrize("seqlens", [(0, 5), (5, 0)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_empty_axes_with_variants(dtype, seqlens, seed, poison_pool):
    """Sq = 0 or Sk = 0 with every variant: out = 0, lse = sink, zero
    gradients and dsink = 0, shaped right."""
    q, k, v, dout = make_inputs(seed, dtype, "gqa", seqlens, (64, 64))
    causal, kw = variant_kwargs("+".join(VARIANTS), seed, "gqa", seqlens[1])
    for fam in fc.families_for(dtype):
        with fc.kernel_family(fam):
            out, lse = run_forward(q, k, v, causal, kw, poison_pool)
            check_forward(q, k, v, out, lse, causal, **kw)
            grads = run_backward(dout, q, k, v, out, lse, causal, kw, poison_pool)
        check_backward(dout, q, k, v, grads, causal, fwd=(out, lse), **kw)
        if seqlens[1] == 0:
            want = cp.broadcast_to(kw["sink"][..., None], lse.shape).astype(lse.dtype)
            assert bool((lse == want).all()), "Sk = 0: lse must be the sink"
        for name, g in zip(("dq", "dk", "dv", "dsink"), grads):
            assert bool((nv.to_f64(g) == 0).all()), f"{name} must be 0 with an empty axis"
