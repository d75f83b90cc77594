"""GQA packing (flashcupy/_pack.py): a query-head group folded into the rows.

CPU: ``fold`` on NumPy arrays gives views of the caller's memory, and the
float64 reference over the folded views equals the reference over the
originals wherever the fold applies (non-causal at any Sq, causal at Sq = 1);
every case the fold must refuse returns None.  GPU: with packing on,
``flashcupy.attention`` (a folded plan, built and then replayed on new arrays)
and the contiguous ``attention_with_kvcache`` on GQA decode shapes against the
reference.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flashcupy import _config, _pack
from flashcupy import reference as ref
from flashcupy._problem import Features, Problem


def _problem(bshape, sq, sk, d, feats=Features()):
    return Problem(bshape=bshape, seqlen_q=sq, seqlen_k=sk, head_dim=d, head_dim_v=d,
                   scale=d ** -0.5, features=feats, dtype=np.dtype(np.float32),
                   acc_dtype=np.dtype(np.float32), device_id=0, cc=90, family="sm90")


def _env(b, hkv, g, sq, sk, d, seed=0):
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, hkv, g, sq, d))
    k = r.standard_normal((b, hkv, 1, sk, d))
    v = r.standard_normal((b, hkv, 1, sk, d))
    return {"q": q, "k": k, "v": v, "o": np.empty((b, hkv, g, sq, d)),
            "lse": np.empty((b, hkv, g, sq))}


@pytest.mark.parametrize("sq, causal", [(1, False), (1, True), (3, False), (16, False)])
def test_fold_is_exact(sq, causal):
    b, hkv, g, sk, d = 2, 3, 4, 37, 8
    env = _env(b, hkv, g, sq, sk, d)
    feats = Features(window_right=0) if causal else Features()
    with _config.gqa_packing("on"):
        folded = _pack.fold(_problem((b, hkv, g), sq, sk, d, feats), env)
    assert folded is not None
    prob, fenv = folded
    assert prob.bshape == (b, hkv) and prob.seqlen_q == g * sq
    assert prob.features.window_right is None if sq == 1 else prob.features == feats
    assert fenv["q"].shape == (b, hkv, g * sq, d) and fenv["k"].shape == (b, hkv, sk, d)
    for name in ("q", "k", "v", "o", "lse"):   # views of the caller's memory
        assert np.shares_memory(fenv[name], env[name]), name
    want, want_lse = ref.attention_naive(env["q"], env["k"], env["v"], causal=causal)
    got, got_lse = ref.attention_naive(fenv["q"], fenv["k"], fenv["v"],
                                       window=(None, prob.features.window_right))
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(got_lse.reshape(want_lse.shape), want_lse, rtol=0, atol=1e-13)
    # the outputs' views land where the caller's arrays are
    fenv["o"][...] = got
    fenv["lse"][...] = got_lse
    np.testing.assert_allclose(env["o"], want, rtol=0, atol=1e-13)


def test_fold_single_row_any_group_stride():
    """Sq = 1: the group axis becomes the row axis whatever its stride (a
    decode query sliced out of a longer one, q[..., -1:, :])."""
    b, hkv, g, sk, d = 2, 3, 4, 29, 8
    env = _env(b, hkv, g, 6, sk, d)
    env = dict(env, q=env["q"][..., -1:, :], o=np.empty((b, hkv, g, 1, d)),
               lse=np.empty((b, hkv, g, 1)))
    with _config.gqa_packing("on"):
        prob, fenv = _pack.fold(_problem((b, hkv, g), 1, sk, d, Features(window_right=0)), env)
    assert np.shares_memory(fenv["q"], env["q"])
    want, _ = ref.attention_naive(env["q"], env["k"], env["v"], causal=True)
    got, _ = ref.attention_naive(fenv["q"], fenv["k"], fenv["v"])
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=0, atol=1e-13)


def _refused(prob, env):
    with _config.gqa_packing("on"):
        return _pack.fold(prob, env) is None


def test_fold_refuses_what_is_not_exact():
    b, hkv, g, sk, d = 2, 3, 4, 37, 8
    env = _env(b, hkv, g, 5, sk, d)
    p = _problem((b, hkv, g), 5, sk, d)
    assert not _refused(p, env)
    with _config.gqa_packing("off"):
        assert _pack.fold(p, env) is None
    assert _config.gqa_mode() == "auto"                          # the default: small Sq
    assert _pack.fold(p, env) is not None
    rows = _config.GQA_AUTO_MAX_ROWS + 1
    big = _problem((b, hkv, g), rows, sk, d)
    benv = _env(b, hkv, g, rows, sk, d)
    assert _pack.fold(big, benv) is None
    with _config.gqa_packing("on"):
        assert _pack.fold(big, benv) is not None
    # position-dependent masks
    assert _refused(_problem((b, hkv, g), 5, sk, d, Features(window_right=0)), env)
    assert _refused(_problem((b, hkv, g), 5, sk, d, Features(window_left=4)), env)
    one = _env(b, hkv, g, 1, sk, d)
    assert _refused(_problem((b, hkv, g), 1, sk, d, Features(window_right=-2)), one)
    assert _refused(_problem((b, hkv, g), 1, sk, d, Features(window_left=3)), one)
    # per-head or per-row terms
    for f in (Features(alibi=True), Features(sink=True), Features(bias="t"),
              Features(mask=True), Features(dropout=0.1)):
        assert _refused(_problem((b, hkv, g), 5, sk, d, f), env), f
    # packed variable-length batches (per-sequence rows)
    assert _refused(dataclasses.replace(p, seq_words=("cu_q", "cu_k")), env)
    # k, v not broadcast over the group
    full = dict(env, k=np.repeat(env["k"], g, axis=2), v=np.repeat(env["v"], g, axis=2))
    assert _refused(p, full)
    # q's group and row axes do not merge in memory (a (B, Sq, H, D) layout)
    t = np.ascontiguousarray(env["q"].transpose(0, 3, 1, 2, 4)).transpose(0, 2, 3, 1, 4)
    assert _refused(p, dict(env, q=t))
    # no group
    assert _refused(_problem((b, hkv, 1), 5, sk, d), _env(b, hkv, 1, 5, sk, d))
    # outputs that are not C-contiguous; k with fewer axes than q
    assert _refused(p, dict(env, o=np.empty((b, hkv, g, d, 5)).swapaxes(-1, -2)))
    assert _refused(p, dict(env, k=env["k"][0], v=env["v"][0]))
    # a sequence batch never folds its sequence axis
    seq = dataclasses.replace(_problem((b * hkv * g,), 5, sk, d),
                              features=Features(seq=True), seq_words=("len_k",))
    flat = {n: x.reshape((b * hkv * g,) + x.shape[3:]) if n in ("q", "o", "lse")
            else x[0, 0] for n, x in env.items()}   # k, v (1, Sk, D): foldable but for seq
    assert not _refused(dataclasses.replace(seq, features=Features()), flat)
    assert _refused(seq, flat)


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("sq, causal", [(1, True), (4, False)])
def test_packed_attention_on_gpu(sq, causal):
    cp = pytest.importorskip("cupy")
    import _assert as A
    import _naive as nv

    import flashcupy as fc

    q, k, v = nv.randn_many(cp, 3, [(2, 2, 4, sq, 128), (2, 2, 1, 700, 128),
                                    (2, 2, 1, 700, 128)], nv.BF16)
    naive, naive_lse = nv.attention(q, k, v, causal=causal)
    want, want_lse = ref.attention_naive(nv.to_f64(q).get(), nv.to_f64(k).get(),
                                         nv.to_f64(v).get(), causal=causal)
    from flashcupy import api

    with _config.gqa_packing("on"):
        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
        A.assert_close("packed out", out, cp.asarray(want), naive)
        A.assert_close("packed lse", lse, cp.asarray(want_lse), naive_lse)
        plan = api.cached_plan("fwd", (q, k, v), causal, None)
        assert plan.prob.bshape == (2, 2) and plan.call.bshape == (2, 2, 4)  # folded
        # the plan replays on new arrays of the same layout
        q2, k2, v2 = nv.randn_many(cp, 4, [q.shape, k.shape, v.shape], nv.BF16)
        out2 = fc.attention(q2, k2, v2, causal=causal)
        assert api.cached_plan("fwd", (q2, k2, v2), causal, None) is plan
        want2, _ = ref.attention_naive(nv.to_f64(q2).get(), nv.to_f64(k2).get(),
                                       nv.to_f64(v2).get(), causal=causal)
        A.assert_close("replayed out", out2, cp.asarray(want2), nv.attention(q2, k2, v2,
                                                                             causal=causal)[0])
        # the same call through the cache entry point (contiguous and paged)
        lens = cp.asarray([700, 650], np.int32)
        out_c = fc.attention_with_kvcache(q, k, v, lens, causal=causal)
        want_c = [ref.attention_naive(nv.to_f64(q[i]).get(), nv.to_f64(k[i, :, :, :L]).get(),
                                      nv.to_f64(v[i, :, :, :L]).get(), causal=causal)[0]
                  for i, L in enumerate((700, 650))]
        naive_c = [nv.attention(q[i], k[i, :, :, :L], v[i, :, :, :L], causal=causal)[0]
                   for i, L in enumerate((700, 650))]
        for i in range(2):
            A.assert_close(f"packed cache out {i}", out_c[i], cp.asarray(want_c[i]), naive_c[i])
