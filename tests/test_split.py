"""Split-KV (cuda_src/split.cuh, flashcupy/_split.py): a query tile's keys
over several CTAs, merged by the combine kernel.

CPU: the occupancy model's choices and the forcing hook's argument checks.
GPU: with split counts forced by ``flashcupy._config.split_kv`` (2, 3, 7 and
more splits than key tiles, so some splits are empty), ``fc.attention`` and
``attention_with_kvcache`` (contiguous and paged, ragged lengths with empty
and one-key sequences) against the float64 reference under the tolerance rule
of _assert.py, over dtypes, head dims 64 / 128 / 256, Sq in {1, 4, 16}, GQA
ratios 1, 4, 8 and 32 (packed and not), every variant, and Sk up to 128k.
Outputs come from a NaN-poisoned pool, so a row the combine misses fails.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashcupy import _config, _split


# ---------------------------------------------------------------------------- CPU
def test_model_fills_the_gpu():
    slots = 264  # 132 SMs x 2 CTAs (the sm90 D = 128 decode tile)
    # a full grid runs as is; one that fills 80 % too
    assert _split.count_for(264, 512, slots) == 1
    assert _split.count_for(212, 512, slots) == 1
    # B8 x Hkv8 = 64 CTAs: 4 splits make 256 CTAs (97 % of a wave)
    assert _split.count_for(64, 512, slots) == 4
    # B1 x Hkv8 = 8 CTAs: a wave's worth of splits, within 85 % of the best
    n = _split.count_for(8, 2048, slots)
    assert 28 <= n <= 33 and 8 * n / slots >= _split.NEAR * 1.0
    # short key ranges: at least MIN_TILES tiles a split, so none or few splits
    assert _split.count_for(8, _split.MIN_TILES, slots) == 1
    assert _split.count_for(8, 3 * _split.MIN_TILES, slots) == 3
    # never above the cap
    n = _split.count_for(1, 10 ** 6, 10 ** 5)
    assert _split.NEAR * _split.MAX_SPLITS <= n <= _split.MAX_SPLITS
    assert _split.count_for(0, 512, slots) == 1


def test_choose(monkeypatch):
    """The plan's choice: the model over the split kernel's own tile, the
    forcing hook capped by the key tiles and 128, no split for packed query
    rows, a family without a split kernel, or a grid that fills any occupancy
    (then the split kernel is not even built)."""
    import dataclasses

    from flashcupy._problem import Features, Problem
    from flashcupy._spec import VF_SPLIT, KernelSpec

    monkeypatch.setattr(_split, "_slots_at_most", lambda spec, dev: 132 * 16)
    monkeypatch.setattr(_split, "_slots", lambda spec, dev, cc: 264)
    spec = KernelSpec("sm90", "fwd", "bf16", 128, 128, nwarps=4, block_m=64, block_n=64,
                      stages=2, variant=VF_SPLIT)
    prob = Problem(bshape=(1, 8), seqlen_q=4, seqlen_k=131072, head_dim=128, head_dim_v=128,
                   scale=0.1, features=Features(), dtype=np.dtype(np.float16),
                   acc_dtype=np.dtype(np.float32), device_id=0, cc=90, family="sm90")
    assert _split.choose(prob, spec) == _split.count_for(8, 2048, 264) > 16
    assert _split.choose(dataclasses.replace(prob, bshape=(8, 8), seqlen_k=32768), spec) == 4
    assert _split.choose(dataclasses.replace(prob, bshape=(64, 32)), spec) == 1
    assert _split.choose(dataclasses.replace(prob, seq_words=("cu_q", "cu_k")), spec) == 1
    assert _split.choose(prob, dataclasses.replace(spec, family="generic")) == 1
    with _config.split_kv(500):
        assert _split.choose(prob, spec) == _split.MAX_SPLITS
        assert _split.choose(dataclasses.replace(prob, seqlen_k=200), spec) == 4
    monkeypatch.setattr(_split, "_slots", lambda *a: pytest.fail("built the split kernel"))
    assert _split.choose(dataclasses.replace(prob, bshape=(64, 64), seqlen_q=4096), spec) == 1


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "4", None])
def test_split_hook_refuses(bad):
    with pytest.raises(ValueError, match="split_kv"):
        with _config.split_kv(bad):
            pass


def test_split_hook_nests():
    assert _config.split_mode() == "auto"
    with _config.split_kv(3):
        assert _config.split_mode() == 3
        with _config.split_kv("auto"):
            assert _config.split_mode() == "auto"
        assert _config.split_mode() == 3
    assert _config.split_mode() == "auto"


# ---------------------------------------------------------------------------- GPU
def _gpu():
    cp = pytest.importorskip("cupy")
    import flashcupy as fc

    return cp, fc


def _split_launches(plan):
    """Per launch of a plan: "split" (a forward with FC_VF_SPLIT, its eighth
    template argument), "combine", or the kernel's name."""
    out = []
    for st in plan.steps:
        if st[0] != "launch":
            continue
        name = st[1].name
        args = name[name.index("<") + 1:-1].split(",")
        if name.startswith("fc_split_combine"):
            out.append("combine")
        elif "_fwd<" in name and int(args[7]) & 8192:
            out.append("split")
        else:
            out.append(name)
    return out


def _kw(cp, nv, parts, heads, sq, sk, dtype, seed):
    rng = np.random.default_rng(seed ^ 0x5B17)
    kw = {}
    if "window" in parts:
        kw["window"] = (300, 2)
    if "softcap" in parts:
        kw["softcap"] = 3.0
    if "alibi" in parts:
        kw["alibi_slopes"] = cp.asarray(rng.uniform(0.01, 0.1, heads), np.float32)
    if "sink" in parts:
        kw["sink"] = cp.asarray(2.0 + rng.standard_normal(heads), np.float32)
    if "bias" in parts:
        kw["bias"] = nv.randn(cp, seed ^ 0xB1A5, heads + (sq, sk), dtype)
    if "mask" in parts:
        kw["mask"] = cp.asarray(rng.random((sq, sk)) > 0.3)
    if "dropout" in parts:
        kw.update(dropout_p=0.2, seed=seed % 1000)
    return "causal" in parts, kw


# (dtype, head dim, Sq, GQA ratio, variant, forced splits): the factors spread by
# rotation, every one of them at least twice
_DT = ("bf16", "fp16")
_D = (64, 128, 256)
_SQ = (1, 4, 16)
_G = (1, 4, 8, 32)
_VARIANTS = ("", "causal", "window", "softcap", "alibi", "sink", "bias", "mask", "dropout",
             "causal+softcap+alibi+sink")
_SPLITS = (2, 3, 7, 1000)


def _grid():
    out = []
    for i, var in enumerate(_VARIANTS):
        for j in range(2):
            k = 2 * i + j
            case = (_DT[k % 2], _D[k % 3], _SQ[(k // 2) % 3], _G[k % 4], var, _SPLITS[(k + i) % 4])
            out.append(pytest.param(*case, id="-".join(map(str, case[:4])) + f"-{var or 'plain'}"
                                    f"-s{case[5]}"))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dt,d,sq,g,parts,splits", _grid())
def test_split_forward(dt, d, sq, g, parts, splits, seed, poison_pool):
    cp, fc = _gpu()
    import _naive as nv
    from _grid import check_forward

    from flashcupy import api

    dtype = {"bf16": nv.BF16, "fp16": nv.F16}[dt]
    hkv, sk = 2, 1337          # 21 key tiles of 64: the last one partial
    heads = (2, hkv, g)
    q = nv.randn(cp, seed, heads + (sq, d), dtype)
    k, v = nv.randn_many(cp, seed ^ 1, [(2, hkv, 1, sk, d)] * 2, dtype)
    causal, kw = _kw(cp, nv, parts, heads, sq, sk, dtype, seed)
    with _config.split_kv(splits), _config.gqa_packing("on"), poison_pool():
        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True, **kw)
        plan = api.cached_plan("fwd", (q, k, v), causal, None, kw.get("window"),
                               kw.get("softcap"), (kw.get("alibi_slopes"), kw.get("sink"),
                                                   kw.get("bias"), kw.get("mask")),
                               kw.get("dropout_p", 0.0))
        assert _split_launches(plan) == ["split", "combine"]
    check_forward(q, k, v, out, lse, causal, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_dropout_and_lse(splits, seed):
    """Forced counts with dropout (its bits keyed by absolute coordinates, so
    every split draws the same mask as one CTA would) pass the rule, and the
    LSE (dropout-free) matches the unsplit kernel's to float32 rounding of the
    merge."""
    cp, fc = _gpu()
    import _naive as nv
    from _grid import check_forward

    q = nv.randn(cp, seed, (3, 4, 2, 128), nv.BF16)
    k, v = nv.randn_many(cp, seed ^ 1, [(3, 4, 2000, 128)] * 2, nv.BF16)
    with _config.split_kv(1):
        _, l1 = fc.attention(q, k, v, return_lse=True, dropout_p=0.1, seed=7)
    with _config.split_kv(splits):
        o2, l2 = fc.attention(q, k, v, return_lse=True, dropout_p=0.1, seed=7)
    check_forward(q, k, v, o2, l2, False, dropout_p=0.1, seed=7)
    assert float(cp.abs(l1 - l2).max()) <= 1e-5 * float(cp.abs(l1).max() + 1)


@pytest.mark.gpu
def test_auto_split_on_decode():
    """The model splits a B1 GQA decode step (8 KV heads, 8k keys) and leaves
    a full grid alone."""
    cp, fc = _gpu()
    import _naive as nv

    from flashcupy import api

    q = nv.randn(cp, 1, (1, 8, 4, 1, 128), nv.BF16)
    k, v = nv.randn_many(cp, 2, [(1, 8, 1, 8192, 128)] * 2, nv.BF16)
    with _config.gqa_packing("on"):
        out = fc.attention(q, k, v)
        assert _split_launches(api.cached_plan("fwd", (q, k, v), False, None)) == [
            "split", "combine"]
    want, _ = nv.attention(q, k, v, dtype=np.float64)
    naive, _ = nv.attention(q, k, v)
    import _assert as A

    A.assert_close("out", out, want, naive)
    q = nv.randn(cp, 1, (8, 32, 512, 128), nv.BF16)
    k, v = nv.randn_many(cp, 2, [(8, 32, 512, 128)] * 2, nv.BF16)
    fc.attention(q, k, v)
    names = _split_launches(api.cached_plan("fwd", (q, k, v), False, None))
    assert len(names) == 1 and names[0] not in ("split", "combine"), names


@pytest.mark.gpu
@pytest.mark.parametrize("g", [4, 32])
def test_split_long_context(g, seed):
    """One sequence of 128k keys (Sk up to 128k), split by the model."""
    cp, fc = _gpu()
    import _naive as nv
    from _grid import check_forward

    q = nv.randn(cp, seed, (1, 1, g, 1, 128), nv.BF16)
    k, v = nv.randn_many(cp, seed ^ 1, [(1, 1, 1, 131072, 128)] * 2, nv.BF16)
    with _config.gqa_packing("on"):
        out, lse = fc.attention(q, k, v, causal=True, return_lse=True)
    check_forward(q, k, v, out, lse, True)


@pytest.mark.gpu
@pytest.mark.parametrize("fam,page,parts", [
    ("sm90", None, "causal"), ("sm90", 16, "causal"), ("sm90", 256, "softcap+alibi+sink"),
    ("sm80", 16, "causal+window"), ("sm80", None, "")])
@pytest.mark.parametrize("splits", [3, 64])
@pytest.mark.parametrize("sq", [1, 4])
def test_split_kvcache(fam, page, parts, splits, sq, seed, poison_pool):
    """The cache entry points with ragged lengths (empty and one-key
    sequences: every split of theirs is empty), appends included, GQA 2."""
    pytest.importorskip("cupy")
    import _naive as nv
    from test_varlen import run_cache

    layout = ("paged", page, False) if page else ("contiguous", None, False)
    with _config.split_kv(splits), _config.gqa_packing("on"):
        run_cache(fam, nv.BF16 if sq == 1 else nv.F16, "gqa", layout, sq, 1,
                  [0, 1, 700, 77, 2000], tuple(p for p in parts.split("+") if p), seed,
                  poison_pool)


@pytest.mark.gpu
def test_split_in_a_cupy_graph(seed):
    """A split call captured in a CUDA graph keeps its float32 partial buffers:
    arrays allocated after the capture do not take their memory, and a replay
    on new inputs (copied into the captured ones) gives the eager result."""
    cp, fc = _gpu()
    import _naive as nv

    q = nv.randn(cp, seed, (1, 2, 4, 1, 128), nv.BF16)
    k, v = nv.randn_many(cp, seed ^ 1, [(1, 2, 1, 4096, 128)] * 2, nv.BF16)
    with _config.split_kv(8):
        fc.attention(q, k, v)                       # the plan, outside the capture
        cp.cuda.Device().synchronize()
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            out = fc.attention(q, k, v)
            graph = stream.end_capture()
        # (arrays of the partial buffers' sizes: 8 splits x 8 rows x 128 floats, and
        # 8 x 8 LSEs; CuPy's pool would hand them freed blocks of those sizes)
        junk = [cp.full((n,), np.nan, np.float32) for n in (8192, 64) for _ in range(16)]
        q2 = nv.randn(cp, seed ^ 2, q.shape, nv.BF16)
        q[...] = q2
        cp.cuda.Device().synchronize()
        graph.launch(stream)
        stream.synchronize()
        want = fc.attention(q2, k, v)
    assert bool((out == want).all())
    assert all(bool(cp.isnan(j).all()) for j in junk)  # nothing wrote into them
