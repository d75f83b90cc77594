"""flashcupy.torch on the GPU: bias, mask and dropout, and the SDPA drop-in.

What is checked, and against what
---------------------------------
* ``scaled_dot_product_attention``: boolean and floating ``attn_mask`` of
  shapes (L, S), (B, 1, 1, S) (key padding) and (B, H, L, S), forward and
  backward (the floating mask's gradient included), float16 to float64;
  ``is_causal`` with L < S and L > S (PyTorch's top-left alignment);
  ``enable_gqa`` with a mask (its head axis split like the query's); against
  PyTorch's own math backend in float64 with the project's tolerance rule
  (``test_torch.assert_close``: at most 2x the error of the same attention
  written in PyTorch ops in the input dtype, plus a floor of a few ulps);
* ``attention(bias=..., mask=...)`` with the other variants, the bias's
  gradient in its own shape and dtype, ``gradcheck`` in float64 and
  ``opcheck`` of both operators with a bias and a mask;
* dropout: the pattern is flashcupy's keep mask (``flashcupy._philox``) of the
  seed and offset drawn from PyTorch's CUDA generator (forward and backward
  against a float64 reference that applies that exact mask), reproducible
  under ``torch.manual_seed`` (bit-identical outputs and gradients), new at
  every call, replayed plans included; ``gradcheck`` at a fixed seed; CUDA
  graph capture refused; ``torch.compile`` (a graph break);
* errors before any launch.

The GPU-free part (schemas, fake implementations, the SDPA mapping against
PyTorch's math backend through CPU kernels, bad arguments) is in
``test_torch.py``.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import flashcupy.torch as fct  # noqa: E402
from test_torch import (  # noqa: E402,F401  (spy and no_launch are fixtures)
    DT_IDS, DTYPES, _sdpa_math, assert_close, gpu, keep_mask, make_attn_mask, naive_attention,
    naive_in_dtype, no_launch, randn, reference, spy)

F = torch.nn.functional


def naive_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
               keep=None, dropout_p=0.0, dout=None):
    """PyTorch SDPA's semantics written in PyTorch ops, in the inputs' dtype
    (float64 inputs: a reference); top-left causal as the bottom-right window
    (None, L - S); GQA by repeating k/v heads.  Returns out, or with ``dout``
    (out, grads of q, k, v and, for a floating mask, of the mask)."""
    grad = dout is not None
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    m = attn_mask
    if m is not None and m.dtype != torch.bool:
        m = m.detach().clone().requires_grad_(grad)
    qq, kk, vv = leaves
    if enable_gqa and q.size(-3) != k.size(-3):
        g = q.size(-3) // k.size(-3)
        kk, vv = kk.repeat_interleave(g, -3), vv.repeat_interleave(g, -3)
    L, S = q.size(-2), k.size(-2)
    window = (None, L - S) if is_causal else None
    bias = m if m is not None and m.dtype != torch.bool else None
    mask = m if m is not None and m.dtype == torch.bool else None
    out, _ = naive_attention(qq, kk, vv, False, scale, window, None, None, None, bias, mask, keep,
                             dropout_p)
    if not grad:
        return out
    wrt = leaves + ([bias] if bias is not None else [])
    return out, torch.autograd.grad(out, wrt, dout)


def as_f64(*ts):
    return tuple(None if t is None else (t if t.dtype == torch.bool else t.detach().double())
                 for t in ts)


# ----------------------------------------------------------------------------
# scaled_dot_product_attention: attn_mask, top-left is_causal, GQA
# ----------------------------------------------------------------------------

MASK_SHAPES = {"LS": (70, 90), "keypad": (2, 1, 1, 90), "full": (2, 3, 70, 90)}
# "float": a floating mask in the query's dtype; "float32": float32 beside
# 16-bit (and float64: the core's conversion) queries
MASK_KINDS = ["bool", "float", "float32"]


def _sdpa_mask(kind, shape, dtype, seed, requires_grad=True):
    if kind == "bool":
        return make_attn_mask(("bool", shape), seed, device="cuda")
    mdtype = dtype if kind == "float" else torch.float32
    return make_attn_mask(("float", shape), seed, device="cuda", dtype=mdtype,
                          requires_grad=requires_grad)


def check_sdpa(q, k, v, m, kw, seed):
    """Forward and backward of the drop-in against PyTorch's math backend in
    float64, the naive same-dtype SDPA giving the rule's 2x term."""
    dtype = q.dtype
    out = fct.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = None if m is None else (m if m.dtype == torch.bool
                                  else m.detach().double().requires_grad_())
    ref = _sdpa_math(q64, k64, v64, attn_mask=m64, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    dout = randn(out.shape, dtype, seed + 7)
    wrt = (q, k, v) + ((m,) if m is not None and m.requires_grad else ())
    wrt64 = (q64, k64, v64) + ((m64,) if m is not None and m.requires_grad else ())
    grads = torch.autograd.grad(out, wrt, dout)
    ref_grads = torch.autograd.grad(ref, wrt64, dout.double())
    if dtype == torch.float64:
        n_out, n_grads = None, (None,) * len(wrt)
    else:
        n_out, n_grads = naive_sdpa(q, k, v, m, dout=dout, **kw)
    assert_close("out", out, ref, n_out)
    magnitude = max(r.abs().max().item() for r in ref_grads[:3])
    for name, g, r, n, t in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, n_grads, wrt):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close(name, g, r, n, grad=True, magnitude=magnitude)


@gpu
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_sdpa_attn_mask(dtype, kind, shape, seed):
    if kind == "float32" and dtype == torch.float32:
        pytest.skip("the same as kind='float'")
    q = randn((2, 3, 70, 64), dtype, seed, requires_grad=True)
    k = randn((2, 3, 90, 64), dtype, seed + 1, requires_grad=True)
    v = randn((2, 3, 90, 64), dtype, seed + 2, requires_grad=True)
    m = _sdpa_mask(kind, MASK_SHAPES[shape], dtype, seed + 3)
    check_sdpa(q, k, v, m, {}, seed)


@gpu
@pytest.mark.parametrize("lens", [(70, 90), (90, 70), (1, 65), (65, 1), (128, 200)],
                         ids=["L<S", "L>S", "decode", "one-key", "L<S-tiles"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=DT_IDS.get)
def test_sdpa_causal_top_left(dtype, lens, seed):
    """is_causal=True with L != S: query i sees keys j <= i (PyTorch's mask)."""
    L, S = lens
    q = randn((2, 3, L, 64), dtype, seed, requires_grad=True)
    k = randn((2, 3, S, 64), dtype, seed + 1, requires_grad=True)
    v = randn((2, 3, S, 64), dtype, seed + 2, requires_grad=True)
    check_sdpa(q, k, v, None, dict(is_causal=True), seed)


GQA_MASKS = {"bool-full": ("bool", (2, 8, 70, 90)), "float-heads": ("float", (1, 8, 1, 90)),
             "float-b1ls": ("float", (2, 1, 70, 90)), "bool-LS": ("bool", (70, 90))}


@gpu
@pytest.mark.parametrize("mask", list(GQA_MASKS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=DT_IDS.get)
def test_sdpa_gqa_mask(dtype, mask, seed):
    q = randn((2, 8, 70, 64), dtype, seed, requires_grad=True)
    k = randn((2, 2, 90, 64), dtype, seed + 1, requires_grad=True)
    v = randn((2, 2, 90, 64), dtype, seed + 2, requires_grad=True)
    kind, shape = GQA_MASKS[mask]
    m = _sdpa_mask(kind, shape, dtype, seed + 3)
    check_sdpa(q, k, v, m, dict(enable_gqa=True, scale=0.2), seed)


@gpu
def test_sdpa_gqa_mask_is_a_view(spy, seed):
    """The mask's head axis is split like the query's, without a copy."""
    q = randn((2, 8, 64, 64), torch.float16, seed)
    k = randn((2, 2, 64, 64), torch.float16, seed + 1)
    m = make_attn_mask(("bool", (2, 8, 64, 64)), seed + 2, device="cuda")
    fct.scaled_dot_product_attention(q, k, k, attn_mask=m, enable_gqa=True)
    mk = spy[0]["kw"]["mask"]
    assert mk.data.ptr == m.data_ptr() and mk.shape == (2, 2, 4, 64, 64)


@gpu
def test_sdpa_fully_masked_row(seed):
    """A row whose keys are all False: out = 0 and zero gradients (documented)."""
    q = randn((1, 2, 16, 64), torch.float32, seed, requires_grad=True)
    k = randn((1, 2, 24, 64), torch.float32, seed + 1, requires_grad=True)
    v = randn((1, 2, 24, 64), torch.float32, seed + 2, requires_grad=True)
    m = torch.ones(16, 24, dtype=torch.bool, device="cuda")
    m[5] = False
    out = fct.scaled_dot_product_attention(q, k, v, attn_mask=m)
    dout = randn(out.shape, torch.float32, seed + 3)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.equal(out[..., 5, :], torch.zeros_like(out[..., 5, :]))
    assert torch.equal(dq[..., 5, :], torch.zeros_like(dq[..., 5, :]))
    rows = torch.arange(16, device="cuda") != 5  # the other rows: as PyTorch's math backend
    ref = _sdpa_math(*(t.detach().double() for t in (q, k, v)), attn_mask=m)
    assert_close("out", out[..., rows, :], ref[..., rows, :],
                 naive_sdpa(q, k, v, m)[..., rows, :])
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@gpu
def test_sdpa_autocast_float_mask(seed):
    """Under autocast a float32 mask stays float32 (the kernels add it in
    float32) and its gradient is float32, as for PyTorch's SDPA."""
    q, k, v = (randn((2, 3, 64, 64), torch.float32, seed + i, requires_grad=True)
               for i in range(3))
    m = make_attn_mask(("float", (64, 64)), seed + 3, device="cuda", dtype=torch.float32,
                       requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fct.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert out.dtype == torch.bfloat16
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    assert_close("out", out, reference(qb, kb, vb, bias=m)[0],
                 naive_in_dtype(qb, kb, vb, bias=m)[0])
    out.float().sum().backward()
    assert m.grad.dtype == torch.float32 and q.grad.dtype == torch.float32


@gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_sdpa_mask(backend, seed):
    """torch.compile(fullgraph=True) of the drop-in with a bool key-padding mask
    and a float mask that requires grad; gradients as in eager."""
    pad = make_attn_mask(("bool", (2, 1, 1, 90)), seed + 3, device="cuda")

    def loss_fn(q, k, v, bias):
        o = fct.scaled_dot_product_attention(q, k, v, attn_mask=pad, enable_gqa=True)
        o2 = fct.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
        return (o.float() + o2.float()).sum()

    q = randn((2, 4, 70, 64), torch.bfloat16, seed, requires_grad=True)
    k = randn((2, 2, 90, 64), torch.bfloat16, seed + 1, requires_grad=True)
    v = randn((2, 2, 90, 64), torch.bfloat16, seed + 2, requires_grad=True)
    bias = make_attn_mask(("float", (70, 90)), seed + 4, device="cuda", dtype=torch.float32,
                          requires_grad=True)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    for _ in range(2):
        grads_c = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    grads_e = torch.autograd.grad(loss_fn(q, k, v, bias), (q, k, v, bias))
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------
# attention(bias=..., mask=...)
# ----------------------------------------------------------------------------

# (bias shape, mask shape, other keywords); q (2, 3, 97, 64), k/v (2, 1, 120, 64)
BIAS_CASES = {
    "full": ((2, 3, 97, 120), None, {}),
    "heads": ((1, 3, 97, 120), (2, 1, 1, 120), {}),
    "LS-causal": ((97, 120), (97, 120), dict(causal=True)),
    "keypad-window-softcap": ((2, 1, 1, 120), (2, 3, 97, 120),
                              dict(window=(40, 8), softcap=5.0)),
    "mask-only-alibi-sink": (None, (2, 1, 97, 120), dict(alibi_slopes=True, sink=True)),
    "expanded": ("expanded", None, dict(causal=True)),
}


def bias_case(name, dtype, bias_dtype, seed):
    bshape, mshape, kw = BIAS_CASES[name]
    kw = dict(kw)
    if kw.get("alibi_slopes"):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        kw["alibi_slopes"] = torch.rand((3,), generator=gen, device="cuda") * 0.3 + 0.02
    if kw.get("sink"):
        kw["sink"] = (randn((2, 3), torch.float32, seed + 1) * 1.5).requires_grad_()
    leaf = None
    if bshape == "expanded":  # a (B, 1, 1, S) leaf seen as the full shape, stride 0
        leaf = randn((2, 1, 1, 120), bias_dtype, seed + 2, requires_grad=True)
        kw["bias"] = leaf.expand(2, 3, 97, 120)
    elif bshape is not None:
        leaf = randn(bshape, bias_dtype, seed + 2, requires_grad=True)
        kw["bias"] = leaf
    if mshape is not None:
        kw["mask"] = make_attn_mask(("bool", mshape), seed + 3, device="cuda")
    return kw, leaf


@gpu
@pytest.mark.parametrize("case", list(BIAS_CASES))
@pytest.mark.parametrize("bias_dtype", ["same", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_attention_bias_mask(dtype, bias_dtype, case, seed):
    """Forward and backward with a bias (its gradient in its own shape and
    dtype) and a mask, alone and with the other variants."""
    bdt = dtype if bias_dtype == "same" else torch.float32
    if bias_dtype == "fp32" and (dtype == torch.float32 or BIAS_CASES[case][0] is None):
        pytest.skip("the same as bias_dtype='same'")
    q = randn((2, 3, 97, 64), dtype, seed, requires_grad=True)
    k = randn((2, 1, 120, 64), dtype, seed + 1, requires_grad=True)
    v = randn((2, 1, 120, 64), dtype, seed + 2, requires_grad=True)
    kw, leaf = bias_case(case, dtype, bdt, seed + 10)
    out, lse = fct.attention(q, k, v, return_lse=True, **kw)
    dout = randn(out.shape, dtype, seed + 3)
    wrt = (q, k, v) + tuple(t for t in (kw.get("sink"), leaf) if t is not None)
    grads = torch.autograd.grad(out, wrt, dout)
    # the reference differentiates the bias as passed (the expanded view), then sums it
    ref_out, ref_lse, ref_grads = reference(q, k, v, dout=dout, **kw)
    n_out, n_lse, n_grads = (naive_in_dtype(q, k, v, dout=dout, **kw) if dtype != torch.float64
                             else (None, None, (None,) * len(wrt)))
    if case == "expanded":
        ref_grads = ref_grads[:3] + (ref_grads[3].sum((1, 2), keepdim=True),)
        if n_grads[0] is not None:
            n_grads = n_grads[:3] + (n_grads[3].sum((1, 2), keepdim=True),)
    assert_close("out", out, ref_out, n_out)
    assert_close("lse", lse, ref_lse, n_lse)
    names = ("dq", "dk", "dv") + tuple(n for n, t in (("dsink", kw.get("sink")), ("dbias", leaf))
                                       if t is not None)
    for name, g, r, n, t in zip(names, grads, ref_grads, n_grads, wrt):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close(name, g, r, n, grad=True)


@gpu
def test_attention_mask_all_false_row(seed):
    """A fully masked row: out = 0, lse = -inf, its dq row = 0."""
    q = randn((1, 2, 33, 64), torch.bfloat16, seed, requires_grad=True)
    k = randn((1, 2, 47, 64), torch.bfloat16, seed + 1, requires_grad=True)
    v = randn((1, 2, 47, 64), torch.bfloat16, seed + 2, requires_grad=True)
    mask = torch.ones(2, 33, 47, dtype=torch.bool, device="cuda")
    mask[1, 7] = False
    out, lse = fct.attention(q, k, v, mask=mask, return_lse=True)
    dq = torch.autograd.grad(out, q, randn(out.shape, torch.bfloat16, seed + 3))[0]
    assert torch.equal(out[0, 1, 7], torch.zeros_like(out[0, 1, 7]))
    assert torch.isneginf(lse[0, 1, 7]) and torch.isfinite(lse[0, 0]).all()
    assert torch.equal(dq[0, 1, 7], torch.zeros_like(dq[0, 1, 7]))


@gpu
@pytest.mark.parametrize("bias_shape", [(1, 2, 5, 7), (7,), (2, 1, 7)],
                         ids=["full", "keys", "heads-rows"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_bias_mask(causal, bias_shape, seed):
    """float64 gradcheck of q, k, v and the bias with a mask.  A broadcast
    bias's gradient is summed with atomics, so a second backward may differ
    in the last bits: nondet_tol covers that."""
    q = randn((1, 2, 5, 8), torch.float64, seed, requires_grad=True)
    k = randn((1, 2, 7, 8), torch.float64, seed + 1, requires_grad=True)
    v = randn((1, 2, 7, 8), torch.float64, seed + 2, requires_grad=True)
    bias = randn(bias_shape, torch.float64, seed + 3, requires_grad=True)
    mask = make_attn_mask(("bool", (2, 5, 7)), seed + 4, device="cuda")

    def f(q, k, v, bias):
        return fct.attention(q, k, v, causal=causal, bias=bias, mask=mask)

    full = bias_shape == (1, 2, 5, 7)
    assert torch.autograd.gradcheck(f, (q, k, v, bias), nondet_tol=0.0 if full else 1e-12)


@gpu
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS.get)
def test_opcheck_bias_mask(dtype, dropout, seed):
    q = randn((2, 3, 33, 32), dtype, seed, requires_grad=True)
    k = randn((2, 1, 47, 32), dtype, seed + 1, requires_grad=True)
    v = randn((1, 1, 47, 16), dtype, seed + 2, requires_grad=True)
    bias = randn((1, 3, 33, 47), dtype, seed + 3, requires_grad=True)
    mask = make_attn_mask(("bool", (2, 1, 1, 47)), seed + 4, device="cuda")
    drop = (0.2, fct._rng_tensor(2**64 - seed - 1, 5)) if dropout else (0.0, None)
    var = (9, 2, None, None, None, bias, mask, *drop)
    torch.library.opcheck(torch.ops.flashcupy.attention_fwd.default, (q, k, v, False, None, *var))
    with torch.no_grad():
        out, lse = torch.ops.flashcupy.attention_fwd(q, k, v, False, None, *var)
    dout = randn(out.shape, dtype, seed + 5)
    for bias_grad in (False, True):
        torch.library.opcheck(torch.ops.flashcupy.attention_bwd.default,
                              (dout, q.detach(), k.detach(), v.detach(), out, lse, False, None,
                               False, *var[:5], bias.detach(), *var[6:], bias_grad))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_plan_replay_bias_mask(spy, dtype, seed):
    """Repeated signatures with a float32 bias and a mask replay the first
    call's plans (forward, and the backward with dbias), each call reading its
    own bias and mask; a bias with a strided last axis (copied by the core)
    goes through the core every time and is still right."""
    q, k, v = (randn((2, 2, 128, 64), dtype, seed + i) for i in range(3))
    results = []
    for trial in range(3):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        bias = randn((2, 1, 128, 128), torch.float32, seed + 10 + trial, requires_grad=True)
        mask = make_attn_mask(("bool", (2, 1, 1, 128)), seed + 20 + trial, device="cuda")
        out = fct.attention(qg, kg, vg, causal=True, bias=bias, mask=mask)
        dout = randn(out.shape, dtype, seed + 30 + trial)
        grads = torch.autograd.grad(out, (qg, kg, vg, bias), dout)
        results.append((bias, mask, dout, out, grads))
    assert [c["kind"] for c in spy] == ["fwd", "bwd"]
    spy.clear()
    for trial in range(2):
        bt = randn((2, 1, 128, 128), torch.float32, seed + 40 + trial).transpose(-1, -2)
        with torch.no_grad():
            out = fct.attention(q, k, v, bias=bt)
        assert_close("out (strided bias)", out, reference(q, k, v, bias=bt)[0],
                     naive_in_dtype(q, k, v, bias=bt)[0])
    assert [c["kind"] for c in spy] == ["fwd", "fwd"]
    for bias, mask, dout, out, grads in results:
        kw = dict(causal=True, bias=bias, mask=mask)
        ref_out, _, ref_grads = reference(q, k, v, dout=dout, **kw)
        n_out, _, n_grads = naive_in_dtype(q, k, v, dout=dout, **kw)
        assert_close("out", out, ref_out, n_out)
        for name, g, r, n in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, n_grads):
            assert_close(name, g, r, n, grad=True)


@gpu
def test_deterministic_broadcast_bias_grad(spy, seed):
    """Under torch.use_deterministic_algorithms(True) the gradient of a broadcast
    bias runs the deterministic kernels (one backward per position of the bias's
    broadcast batch axes): bit-identical run to run, and equal within rounding to
    the default (atomic) backward."""
    q, k, v = (randn((2, 2, 64, 64), torch.float16, seed + i, requires_grad=True)
               for i in range(3))
    bias = randn((64, 64), torch.float32, seed + 3, requires_grad=True)
    out = fct.attention(q, k, v, bias=bias)
    loose = torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        spy.clear()
        runs = []
        for _ in range(2):
            out = fct.attention(q, k, v, bias=bias)
            runs.append(torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out)))
        bwd = [c for c in spy if c["kind"] == "bwd"]
        assert bwd and all(c["kw"]["deterministic"] is True for c in bwd)
        assert any(c["kw"]["bias_grad"] is True for c in bwd)
        for a, b in zip(*runs):
            assert torch.equal(a, b)
        for a, b in zip(runs[0], loose):
            assert a.shape == b.shape and a.dtype == b.dtype
            tol = 2e-2 * float(b.abs().max()) + 1e-3
            assert float((a.float() - b.float()).abs().max()) <= tol
    finally:
        torch.use_deterministic_algorithms(prev)


# ----------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------

def drawn(device, torch_seed):
    """The (seed, offset) the next dropout call after ``torch.manual_seed(torch_seed)``
    uses (re-seeds again, so the call itself draws the same)."""
    torch.manual_seed(torch_seed)
    pair = fct._draw_dropout_seed(torch.device(device))
    torch.manual_seed(torch_seed)
    return pair


@gpu
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=DT_IDS.get)
def test_dropout_matches_keep_mask(dtype, p, seed):
    """attention(dropout_p) forward and backward equal the reference that
    applies flashcupy's keep mask of the drawn seed and offset (mqa with a
    bias, a mask and causal: the batch is (B, H))."""
    q = randn((2, 3, 97, 64), dtype, seed, requires_grad=True)
    k = randn((2, 1, 120, 64), dtype, seed + 1, requires_grad=True)
    v = randn((2, 1, 120, 64), dtype, seed + 2, requires_grad=True)
    bias = randn((1, 3, 97, 120), dtype, seed + 3, requires_grad=True)
    mask = make_attn_mask(("bool", (2, 1, 1, 120)), seed + 4, device="cuda")
    s, off = drawn("cuda", seed)
    out, lse = fct.attention(q, k, v, causal=True, bias=bias, mask=mask, dropout_p=p,
                             return_lse=True)
    keep = keep_mask(s, off, (2, 3), 97, 120, p, device="cuda")
    dout = randn(out.shape, dtype, seed + 5)
    grads = torch.autograd.grad(out, (q, k, v, bias), dout)
    kw = dict(causal=True, bias=bias, mask=mask, keep=keep, dropout_p=p)
    ref_out, ref_lse, ref_grads = reference(q, k, v, dout=dout, **kw)
    n_out, n_lse, n_grads = (naive_in_dtype(q, k, v, dout=dout, **kw) if dtype != torch.float64
                             else (None, None, (None,) * 4))
    assert_close("out", out, ref_out, n_out)
    assert_close("lse", lse, ref_lse, n_lse)  # lse has no dropout
    for name, g, r, n in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, n_grads):
        assert_close(name, g, r, n, grad=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=DT_IDS.get)
def test_sdpa_dropout_matches_keep_mask(dtype, seed):
    """The drop-in with GQA: the keep mask's batch is (B, Hq) (the flat index of
    flashcupy's (B, Hkv, G) batch is the query head's)."""
    q = randn((2, 8, 70, 64), dtype, seed, requires_grad=True)
    k = randn((2, 2, 90, 64), dtype, seed + 1, requires_grad=True)
    v = randn((2, 2, 90, 64), dtype, seed + 2, requires_grad=True)
    m = make_attn_mask(("bool", (2, 1, 1, 90)), seed + 3, device="cuda")
    s, off = drawn("cuda", seed)
    kw = dict(attn_mask=m, enable_gqa=True, is_causal=False)
    out = fct.scaled_dot_product_attention(q, k, v, dropout_p=0.3, **kw)
    dout = randn(out.shape, dtype, seed + 4)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    keep = keep_mask(s, off, (2, 8), 70, 90, 0.3, device="cuda")
    ref_out, ref_grads = naive_sdpa(*as_f64(q, k, v), keep=keep, dropout_p=0.3,
                                    dout=dout.double(), **kw)
    n_out, n_grads = (naive_sdpa(q, k, v, keep=keep, dropout_p=0.3, dout=dout, **kw)
                      if dtype != torch.float64 else (None, (None,) * 3))
    assert_close("out", out, ref_out, n_out)
    for name, g, r, n in zip(("dq", "dk", "dv"), grads, ref_grads, n_grads):
        assert_close(name, g, r, n, grad=True)


@gpu
@pytest.mark.parametrize("fn", ["attention", "sdpa"])
def test_dropout_reproducible(fn, seed):
    """torch.manual_seed fixes the pattern: bit-identical outputs and gradients
    (deterministic kernels for the gradients); another seed, or the next call,
    draws another pattern; each call advances the generator's offset by 4."""
    q, k, v = (randn((2, 4, 128, 64), torch.bfloat16, seed + i, requires_grad=True)
               for i in range(3))
    dout = randn((2, 4, 128, 64), torch.bfloat16, seed + 3)

    def run(torch_seed):
        if torch_seed is not None:
            torch.manual_seed(torch_seed)
        if fn == "attention":
            out = fct.attention(q, k, v, causal=True, dropout_p=0.2)
        else:
            out = fct.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        a, b = run(seed), run(seed)
        gen = torch.cuda.default_generators[torch.cuda.current_device()]
        before = gen.get_offset()
        nxt = run(None)
        assert gen.get_offset() == before + 4
        other = run(seed + 1)
    finally:
        torch.use_deterministic_algorithms(prev)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], nxt[0]) and not torch.equal(a[0], other[0])
    plain = fct.attention(q, k, v, causal=True) if fn == "attention" else \
        fct.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.equal(a[0], plain)


@gpu
def test_dropout_under_no_grad(seed):
    q, k, v = (randn((1, 2, 64, 64), torch.float32, seed + i) for i in range(3))
    s, off = drawn("cuda", seed)
    with torch.no_grad():
        out = fct.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    keep = keep_mask(s, off, (1, 2), 64, 64, 0.4, device="cuda")
    assert_close("out", out, reference(q, k, v, keep=keep, dropout_p=0.4)[0],
                 naive_in_dtype(q, k, v, keep=keep, dropout_p=0.4)[0])


@gpu
def test_dropout_plan_replay(spy, monkeypatch, seed):
    """Replayed plans take each call's seed and offset from the environment:
    the core sees the first call of the signature only, and every call's
    pattern is its own draw's."""
    draws = []
    real = fct._draw_dropout_seed

    def record(device):
        draws.append(real(device))
        return draws[-1]

    monkeypatch.setattr(fct, "_draw_dropout_seed", record)
    q, k, v = (randn((2, 2, 128, 64), torch.float16, seed + i) for i in range(3))
    results = []
    for trial in range(3):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = fct.attention(qg, kg, vg, dropout_p=0.25)
        dout = randn(out.shape, torch.float16, seed + 10 + trial)
        results.append((out, dout, torch.autograd.grad(out, (qg, kg, vg), dout)))
    assert [c["kind"] for c in spy] == ["fwd", "bwd"]
    assert len(set(draws)) == 3
    for (s, off), (out, dout, grads) in zip(draws, results):
        keep = keep_mask(s, off, (2, 2), 128, 128, 0.25, device="cuda")
        ref_out, _, ref_grads = reference(q, k, v, dout=dout, keep=keep, dropout_p=0.25)
        n_out, _, n_grads = naive_in_dtype(q, k, v, dout=dout, keep=keep, dropout_p=0.25)
        assert_close("out", out, ref_out, n_out)
        for name, g, r, n in zip(("dq", "dk", "dv"), grads, ref_grads, n_grads):
            assert_close(name, g, r, n, grad=True)


@gpu
def test_gradcheck_dropout_fixed_seed(seed):
    """At a fixed seed and offset (the operator) dropout is a fixed linear mask
    of the probabilities: gradcheck in float64, bias and mask included."""
    q = randn((1, 2, 5, 8), torch.float64, seed, requires_grad=True)
    k = randn((1, 2, 7, 8), torch.float64, seed + 1, requires_grad=True)
    v = randn((1, 2, 7, 8), torch.float64, seed + 2, requires_grad=True)
    bias = randn((1, 2, 5, 7), torch.float64, seed + 3, requires_grad=True)
    mask = make_attn_mask(("bool", (5, 7)), seed + 4, device="cuda")

    def f(q, k, v, bias):
        return torch.ops.flashcupy.attention_fwd(q, k, v, True, None, None, None, None, None,
                                                 None, bias, mask, 0.3,
                                                 fct._rng_tensor(seed, 11))[0]

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


@gpu
def test_dropout_in_cuda_graph_capture_raises(seed):
    q = randn((1, 2, 64, 64), torch.float16, seed)
    fct.attention(q, q, q)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            fct.attention(q, q, q, dropout_p=0.1)


@gpu
def test_compile_dropout(seed):
    """Under torch.compile the draw is a graph break: the compiled function
    draws as eager does (same seed: the same pattern, bit-identical forward)."""
    def f(q, k, v):
        return fct.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True) * 2

    q, k, v = (randn((2, 4, 64, 64), torch.float32, seed + i) for i in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager")
    for trial in range(3):
        torch.manual_seed(seed + trial)
        out_c = compiled(q, k, v)
        torch.manual_seed(seed + trial)
        out_e = f(q, k, v)
        assert torch.equal(out_c, out_e)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="dropout seed and offset"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)


# ----------------------------------------------------------------------------
# errors, all before any launch
# ----------------------------------------------------------------------------

def _cuda_qkv(dtype=torch.float32, shape=(1, 2, 16, 32)):
    return tuple(torch.randn(shape, device="cuda").to(dtype) for _ in range(3))


@gpu
@pytest.mark.parametrize("bad", ["bias-cpu", "mask-cpu", "bias-fp16", "bias-int", "mask-float",
                                 "bias-shape", "attn-mask-cpu", "attn-mask-int",
                                 "attn-mask-shape"])
def test_error_pair_tensors_on_gpu(bad, no_launch):
    q, k, v = _cuda_qkv()
    cases = {
        "bias-cpu": (dict(bias=torch.zeros(16, 16)), ValueError,
                     r"attention\(\): bias is on cpu but the inputs are on cuda:0"),
        "mask-cpu": (dict(mask=torch.ones(16, 16, dtype=torch.bool)), ValueError,
                     r"attention\(\): mask is on cpu but the inputs are on cuda:0"),
        "bias-fp16": (dict(bias=torch.zeros(16, 16, device="cuda").half()), TypeError,
                      r"attention\(\): bias has dtype float16"),
        "bias-int": (dict(bias=torch.zeros(16, 16, device="cuda").int()), TypeError,
                     r"attention\(\): bias has dtype int32"),
        "mask-float": (dict(mask=torch.zeros(16, 16, device="cuda")), TypeError,
                       r"attention\(\): mask has dtype float32"),
        "bias-shape": (dict(bias=torch.zeros(2, 2, 16, 16, device="cuda")), ValueError,
                       r"attention\(\): bias has shape \(2, 2, 16, 16\)"),
        "attn-mask-cpu": (dict(attn_mask=torch.ones(16, 16, dtype=torch.bool)), ValueError,
                          r"scaled_dot_product_attention\(\): attn_mask is on cpu"),
        "attn-mask-int": (dict(attn_mask=torch.ones(16, 16, device="cuda").long()), TypeError,
                          r"scaled_dot_product_attention\(\): attn_mask has dtype int64"),
        "attn-mask-shape": (dict(attn_mask=torch.ones(16, 15, device="cuda").bool()),
                            ValueError, r"attn_mask has shape \(16, 15\)"),
    }
    kw, exc, match = cases[bad]
    f = fct.scaled_dot_product_attention if "attn_mask" in kw else fct.attention
    with pytest.raises(exc, match=match):
        f(q, k, v, **kw)


@gpu
def test_error_dropout_and_mask_causal_on_gpu(no_launch):
    q, k, v = _cuda_qkv()
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        fct.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="cannot be combined"):
        fct.scaled_dot_product_attention(q, k, v, is_causal=True,
                                         attn_mask=torch.ones(16, 16, device="cuda").bool())
