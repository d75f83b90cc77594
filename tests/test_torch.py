"""flashcupy.torch: PyTorch interop (custom ops, autograd, DLPack, streams, graphs, compile).

What is checked, and against what
---------------------------------
* values: forward (out, lse) and gradients against a float64 PyTorch
  reference, with the project's tolerance rule (``_assert.py``): the error may
  be at most 2x the error of naive attention written in PyTorch ops in the same
  dtype, plus a floor of a few ulps at the output magnitude (float64: the
  floor alone);
* zero copies: the CuPy arrays the core receives share the tensors' pointers
  and strides (inputs, outputs, gradients), and the core's workspaces come
  from PyTorch's allocator;
* streams and devices: kernels run on ``torch.cuda.current_stream()`` (side
  streams too), on the tensors' device (a second GPU when present);
* CUDA graphs: capture of forward and backward, replay with new input contents;
* ``torch.library.opcheck``, ``torch.autograd.gradcheck`` (float64, causal and
  not, broadcast k/v), ``torch.compile(fullgraph=True)`` with backward;
* ``scaled_dot_product_attention`` as a drop-in for PyTorch's (is_causal,
  enable_gqa, scale, autocast), and every error path, raised before any launch;
* the variants (``window``, ``softcap``, ``alibi_slopes``, ``sink``): values
  against the float64 reference (the naive attention below implements them),
  ``dsink`` included; gradcheck, opcheck and ``torch.compile`` with window +
  softcap + sink (and ALiBi); plan keys that tell windows apart; GQA with a
  per-head sink; bad variant arguments.  GPU-free: the operators' schemas,
  fake implementations, autograd wiring and compile tracing, through CPU
  kernels that the tests register for the duration of a test
  (``cpu_kernels``: the float64 reference as the kernel);
* bias, mask and dropout, GPU-free: bad arguments (each names the argument),
  the fake shapes of dbias, the keywords the operators hand flashcupy.api
  (bound to its real signatures), and through the CPU kernels (which apply
  flashcupy's keep mask): opcheck, gradcheck of the bias, dbias only when the
  bias requires grad, the dropout seed and offset reaching both passes,
  deterministic mode with a broadcast bias, torch.compile (the dropout draw a
  graph break); ``scaled_dot_product_attention``'s mapping (attn_mask shapes,
  top-left is_causal, GQA mask views, fully masked rows, dropout) against
  PyTorch's own math backend.  The GPU tests of these are in
  ``test_torch_sdpa.py``.

Tests marked ``gpu`` skip without a CUDA GPU; the rest (import hygiene, fake
shapes on meta tensors, errors on CPU tensors) run anywhere PyTorch does.
"""
from __future__ import annotations

import contextlib
import math
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import cupy  # noqa: E402

import flashcupy.torch as fct  # noqa: E402
from flashcupy import _philox, _plan, api  # noqa: E402

F = torch.nn.functional
HAS_CUDA = torch.cuda.is_available()


def gpu(f):
    """Marks a test as needing a CUDA GPU (conftest's marker + torch's own view)."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU")(f))


two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA GPUs")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LOW = [torch.float16, torch.bfloat16, torch.float32]
DT_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
          torch.float64: "fp64"}


# ----------------------------------------------------------------------------
# helpers: inputs, naive attention in PyTorch ops, the tolerance rule
# ----------------------------------------------------------------------------

def randn(shape, dtype, seed, device="cuda", requires_grad=False):
    """Standard normal drawn in float32 (float64 for float64) and cast to dtype."""
    gen = torch.Generator(device=device).manual_seed(seed % 2**63)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(shape, generator=gen, device=device, dtype=draw).to(dtype)
    return x.requires_grad_(requires_grad)


def naive_attention(q, k, v, causal=False, scale=None, window=None, softcap=None,
                    alibi_slopes=None, sink=None, bias=None, mask=None, keep=None, dropout_p=0.0):
    """Attention written out in PyTorch ops, in the inputs' dtype; differentiable.

    Bottom-right causal like flashcupy; a row that sees no key gets out = 0 and
    lse = -inf (no NaN, forward or backward).  In float64 it is the reference;
    in float16/bfloat16/float32 it is the "naive implementation in the same
    dtype" of the tolerance rule (each op rounds its result to the dtype).

    The variants as in issue 11 / flashcupy.attention: the scaled score s
    becomes ``softcap * tanh(s / softcap)``, then ``-slope * |i + Sk - Sq - j|``
    is added (ALiBi), then keys outside the window ``i + Sk - Sq - left <= j <=
    i + Sk - Sq + right`` are masked (causal: right = 0); the sink is an extra
    logit in each row's softmax (in lse, no value).  ``alibi_slopes`` and
    ``sink`` broadcast to the batch dims and are cast to the inputs' dtype.
    ``bias`` (cast to the inputs' dtype) is added after ALiBi, pairs where the
    bool ``mask`` is False are removed; with dropout, ``keep`` is the bool keep
    mask (broadcast to batch + (Sq, Sk)) and the kept probabilities are scaled
    by 1 / (1 - dropout_p); lse stays the dropout-free one.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q * scale) @ k.transpose(-1, -2)
    sq, sk = q.shape[-2], k.shape[-2]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    rel = j - (i + (sk - sq))  # the key's offset from the query's diagonal
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(s.dtype)[..., None, None] * rel.abs().to(s.dtype)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if left is not None or right is not None:
        visible = torch.ones_like(rel, dtype=torch.bool)
        if left is not None:
            visible &= rel >= -left
        if right is not None:
            visible &= rel <= right
        s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    if sink is not None:
        sink_col = sink.to(s.dtype)[..., None, None]  # broadcasts over (*batch, Sq, 1)
        m = torch.maximum(m, sink_col.detach())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # avoid (-inf) - (-inf)
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        l = l + torch.exp(sink_col - m)
    seen = l > 0
    p = e / torch.where(seen, l, torch.ones_like(l))
    if keep is not None:
        p = torch.where(keep, p / (1.0 - dropout_p), torch.zeros_like(p))
    out = p @ v
    lse = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))),
                      torch.full_like(l, float("-inf")))
    return out, lse.squeeze(-1)


# floor of the rule in ulps at |ref| + 0.3, as in tests/_assert.py
FWD_ULPS = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 8, torch.float64: 2**16}
GRAD_ULPS = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 16, torch.float64: 2**18}


def assert_close(name, actual, ref, naive=None, *, grad=False, magnitude=0.0):
    """``max|actual - ref| <= 2 * max|naive - ref| + floor`` on the finite entries.

    ``ref`` is float64; ``naive`` is the same-dtype naive result (None for
    float64 inputs: the floor is the whole tolerance).  -inf entries (the LSE
    of rows that see no key) must sit exactly where the reference has them.
    """
    assert tuple(actual.shape) == tuple(ref.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}")
    a = actual.detach().double()
    r = ref.detach().double()
    assert not torch.isnan(a).any(), f"{name}: NaN in the result"
    ninf = torch.isneginf(r)
    assert torch.equal(torch.isneginf(a), ninf), f"{name}: -inf pattern differs from the reference"
    fin = ~ninf
    assert torch.isfinite(a[fin]).all(), f"{name}: non-finite values where the reference is finite"
    a, r = a[fin], r[fin]
    err = (a - r).abs().max().item() if a.numel() else 0.0
    naive_err = 0.0
    if naive is not None:
        n = naive.detach().double().expand(ref.shape)[fin]
        naive_err = (n - r).abs().max().item() if n.numel() else 0.0
    # (magnitude: the size of the problem's gradients, for a gradient whose own
    # reference is ~0 by cancellation, as tests/_assert.py takes it)
    ref_max = max(r.abs().max().item() if r.numel() else 0.0, magnitude)
    ulps = (GRAD_ULPS if grad else FWD_ULPS)[actual.dtype]
    floor = ulps * torch.finfo(actual.dtype).eps * (ref_max + 0.3)
    tol = 2.0 * naive_err + floor
    assert err <= tol, (f"{name} ({actual.dtype}): max error {err:.3e} > tolerance {tol:.3e} = "
                        f"2 x naive error {naive_err:.3e} + floor {floor:.3e}")


def reference(q, k, v, causal=False, scale=None, dout=None, *, window=None, softcap=None,
              alibi_slopes=None, sink=None, bias=None, mask=None, keep=None, dropout_p=0.0):
    """float64 (out, lse) and, with ``dout``, float64 (dq, dk, dv), plus dsink
    (float64, the sink's shape) when a sink is given and dbias (float64, the
    bias's shape) when a bias is given."""
    grad = dout is not None
    q64, k64, v64 = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    a64 = None if alibi_slopes is None else alibi_slopes.detach().double()
    s64 = None if sink is None else sink.detach().double().requires_grad_(grad)
    b64 = None if bias is None else bias.detach().double().requires_grad_(grad)
    out, lse = naive_attention(q64, k64, v64, causal, scale, window, softcap, a64, s64, b64,
                               mask, keep, dropout_p)
    if dout is None:
        return out, lse
    wrt = (q64, k64, v64) + tuple(t for t in (s64, b64) if t is not None)
    return out, lse, torch.autograd.grad(out, wrt, dout.double())


def naive_in_dtype(q, k, v, causal=False, scale=None, dout=None, *, window=None, softcap=None,
                   alibi_slopes=None, sink=None, bias=None, mask=None, keep=None, dropout_p=0.0):
    grad = dout is not None
    qd, kd, vd = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    sd = None if sink is None else sink.detach().clone().requires_grad_(grad)
    bd = None if bias is None else bias.detach().clone().requires_grad_(grad)
    al = None if alibi_slopes is None else alibi_slopes.detach()
    out, lse = naive_attention(qd, kd, vd, causal, scale, window, softcap, al, sd, bd, mask,
                               keep, dropout_p)
    if dout is None:
        return out, lse
    wrt = (qd, kd, vd) + tuple(t for t in (sd, bd) if t is not None)
    return out, lse, torch.autograd.grad(out, wrt, dout)


@pytest.fixture
def spy(monkeypatch):
    """Records what the core receives: array pointers/strides, stream, device, allocator."""
    calls = []
    real_fwd, real_bwd = api._forward, api._backward

    def describe(kind, arrays, kw):
        probe = cupy.empty(16, dtype=cupy.uint8)  # a workspace-sized CuPy allocation
        calls.append(dict(
            kind=kind, arrays=arrays, kw=kw,
            stream=cupy.cuda.get_current_stream().ptr,
            device=cupy.cuda.Device().id,
            torch_alloc=isinstance(probe.data.mem, cupy.cuda.UnownedMemory)))

    def fwd(q, k, v, **kw):
        describe("fwd", dict(q=q, k=k, v=v, out=kw["out"], lse=kw["lse"]), kw)
        return real_fwd(q, k, v, **kw)

    def bwd(dout, q, k, v, out, lse, **kw):
        describe("bwd", dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse,
                             dq=kw.get("dq"), dk=kw.get("dk"), dv=kw.get("dv")), kw)
        return real_bwd(dout, q, k, v, out, lse, **kw)

    monkeypatch.setattr(api, "_forward", fwd)
    monkeypatch.setattr(api, "_backward", bwd)
    # no remembered plans: each new signature goes through the core once (a
    # replay of a plan bypasses api._forward / _backward; see test_plan_replay)
    monkeypatch.setattr(fct, "_PLANS", _plan.PlanCache())
    return calls


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if the core is reached (errors must come before any launch)."""
    def boom(*args, **kwargs):
        raise AssertionError("the core was called: validation should have raised first")

    monkeypatch.setattr(api, "_forward", boom)
    monkeypatch.setattr(api, "_backward", boom)


def same_memory(arr, t):
    """The CuPy array is a view of the tensor's memory: same pointer, same strides."""
    assert arr.data.ptr == t.data_ptr(), "pointer differs: the tensor was copied"
    assert tuple(arr.shape) == tuple(t.shape)
    item = t.element_size()
    for n, sa, st in zip(t.shape, arr.strides, t.stride()):
        if n > 1:  # DLPack export may normalize the stride of a size-1 dim
            assert sa == st * item, f"strides differ: {arr.strides} vs {t.stride()} x {item}"


# (q, k, v) shapes; batch dims broadcast.  Awkward lengths, D in {32, 40, 64, 128}, Dv != D.
CASES = {
    "mha-97": ((2, 3, 97, 64), (2, 3, 97, 64), (2, 3, 97, 64)),
    "mqa-128x200-d40": ((1, 4, 128, 40), (1, 1, 200, 40), (1, 1, 200, 40)),
    "gqa-113x77-d128": ((2, 2, 3, 113, 128), (2, 2, 1, 77, 128), (2, 2, 1, 77, 128)),
    "decode-1x65-dv48": ((1, 2, 1, 32), (1, 2, 65, 32), (1, 2, 65, 48)),
}


def make_inputs(case, dtype, seed, requires_grad=False):
    qs, ks, vs = CASES[case]
    return (randn(qs, dtype, seed, requires_grad=requires_grad),
            randn(ks, dtype, seed + 1, requires_grad=requires_grad),
            randn(vs, dtype, seed + 2, requires_grad=requires_grad))


# ----------------------------------------------------------------------------
# no GPU needed
# ----------------------------------------------------------------------------

def test_import_flashcupy_does_not_import_torch():
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            "import flashcupy\n"
            "assert 'flashcupy.torch' not in sys.modules\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stderr


def test_module_binds_the_real_torch():
    assert fct.torch is torch and torch.__name__ == "torch"
    assert fct.__name__ == "flashcupy.torch"
    assert hasattr(torch.ops.flashcupy, "attention_fwd")
    assert hasattr(torch.ops.flashcupy, "attention_bwd")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_fake_shapes_on_meta(dtype):
    """The fake implementations (used by torch.compile) give the real output metadata."""
    q = torch.empty(2, 3, 5, 8, dtype=dtype, device="meta")
    k = torch.empty(2, 1, 7, 8, dtype=dtype, device="meta")
    v = torch.empty(1, 1, 7, 6, dtype=dtype, device="meta")
    out, lse = torch.ops.flashcupy.attention_fwd(q, k, v, True, None)
    assert out.shape == (2, 3, 5, 6) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (2, 3, 5)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    dq, dk, dv, dsink, dbias = torch.ops.flashcupy.attention_bwd(out, q, k, v, out, lse, True,
                                                                 None, False)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    assert dsink.shape == (0,) and dsink.dtype == torch.float32  # no sink: empty
    assert dbias.shape == (0,) and dbias.dtype == torch.float32  # no bias gradient: empty


def test_cpu_tensors_rejected(no_launch):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        fct.attention(q, q, q)
    with pytest.raises(ValueError, match="query must be a CUDA tensor"):
        fct.scaled_dot_product_attention(q, q, q)


def test_sdpa_mask_with_is_causal_rejected(no_launch):
    """As torch's SDPA (its math backend raises), before anything else."""
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"attn_mask and is_causal=True cannot be combined"):
        fct.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool),
                                         is_causal=True)


BAD_DROPOUT = {
    "one": (1.0, ValueError, r"dropout_p must be in \[0, 1\)"),
    "negative": (-0.1, ValueError, r"dropout_p must be in \[0, 1\)"),
    "nan": (float("nan"), ValueError, r"dropout_p must be in \[0, 1\)"),
    # the core's rule (flashcupy._philox.check_dropout), not a copy of it
    "above-max": (math.nextafter(_philox.MAX_DROPOUT_P, 1.0), ValueError,
                  r"dropout_p must be <= .*16 bits"),
    "str": ("0.1", TypeError, r"dropout_p must be a real number"),
    "bool": (True, TypeError, r"dropout_p must be a real number"),
    "tensor": (torch.tensor(0.1), TypeError, r"dropout_p must be a real number"),
}


@pytest.mark.parametrize("bad", list(BAD_DROPOUT))
@pytest.mark.parametrize("fn", ["attention", "scaled_dot_product_attention"])
def test_error_dropout_p(fn, bad, no_launch):
    """dropout_p is judged before the tensors (like window and softcap)."""
    p, exc, match = BAD_DROPOUT[bad]
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(exc, match=rf"{fn}\(\): " + match):
        getattr(fct, fn)(q, q, q, dropout_p=p)


def test_dropout_p_accepts_real_numbers(no_launch):
    """numpy floats and ints pass the check (then the CPU tensors are refused)."""
    import numpy as np

    q = torch.randn(1, 2, 4, 8)
    for p in (np.float32(0.25), 0, np.float64(0.0)):
        with pytest.raises(ValueError, match="q must be a CUDA tensor"):
            fct.attention(q, q, q, dropout_p=p)


def test_non_tensor_rejected(no_launch):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        fct.attention(q, q, q.numpy())


# ----------------------------------------------------------------------------
# variants, no GPU needed: schemas, fake shapes, plan keys, bad arguments, and
# the autograd / compile wiring through CPU kernels registered for the test
# ----------------------------------------------------------------------------

def exact_sink(shape, seed, device="cuda"):
    """A float32 sink of multiples of 2**-6 (|x| < 8 in practice): adding
    gradcheck's eps = 2**-12 to it is exact in float32, so the finite
    differences of a float32 input are as good as of a float64 one."""
    x = randn(shape, torch.float64, seed, device=device)
    return (torch.round(x * 64) / 64).clamp(-7.5, 7.5).float()


def rand_slopes(shape, seed, device="cuda"):
    """ALiBi slopes in [0.02, 0.32), float32."""
    gen = torch.Generator(device=device).manual_seed(seed % 2**63)
    return torch.rand(shape, generator=gen, device=device) * 0.3 + 0.02


def test_fake_shapes_with_variants_on_meta():
    """The variant arguments in the schemas; dsink has the sink's shape, float32."""
    q = torch.empty(2, 3, 5, 8, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 1, 7, 8, dtype=torch.bfloat16, device="meta")
    v = torch.empty(1, 1, 7, 6, dtype=torch.bfloat16, device="meta")
    alibi = torch.empty(2, 3, device="meta")
    sink = torch.empty(3, device="meta")
    out, lse = torch.ops.flashcupy.attention_fwd(q, k, v, False, None, 4, 0, 30.0, alibi, sink)
    assert out.shape == (2, 3, 5, 6) and lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    dq, dk, dv, dsink, dbias = torch.ops.flashcupy.attention_bwd(
        out, q, k, v, out, lse, False, None, False, 4, 0, 30.0, alibi, sink)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dsink.shape == (3,) and dsink.dtype == torch.float32 and dsink.is_contiguous()
    assert dbias.shape == (0,)
    schema = str(torch.ops.flashcupy.attention_fwd.default._schema)
    for arg in ("int? window_left=None", "int? window_right=None", "float? softcap=None",
                "Tensor? alibi=None", "Tensor? sink=None", "Tensor? bias=None",
                "Tensor? mask=None", "float dropout_p=0.", "Tensor? rng=None"):
        assert arg in schema
    assert "seed" not in schema and "offset" not in schema
    bwd_schema = str(torch.ops.flashcupy.attention_bwd.default._schema)
    assert "bool bias_grad=False" in bwd_schema
    assert bwd_schema.endswith("-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fake_shapes_with_bias_mask_dropout_on_meta(bias_dtype):
    """dbias has the bias's own shape and dtype (bias_grad=True), else it is empty."""
    q = torch.empty(2, 3, 5, 8, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 1, 7, 8, dtype=torch.bfloat16, device="meta")
    v = torch.empty(1, 1, 7, 6, dtype=torch.bfloat16, device="meta")
    bias = torch.empty(1, 3, 1, 7, dtype=bias_dtype, device="meta")
    mask = torch.empty(5, 7, dtype=torch.bool, device="meta")
    var = (None, None, None, None, None, bias, mask, 0.1, torch.tensor([-5, 7]))
    out, lse = torch.ops.flashcupy.attention_fwd(q, k, v, False, None, *var)
    assert out.shape == (2, 3, 5, 6) and lse.shape == (2, 3, 5)
    for bias_grad in (False, True):
        *_, dbias = torch.ops.flashcupy.attention_bwd(out, q, k, v, out, lse, False, None, False,
                                                      *var, bias_grad)
        if bias_grad:
            assert dbias.shape == bias.shape and dbias.dtype == bias_dtype
            assert dbias.is_contiguous()
        else:
            assert dbias.shape == (0,) and dbias.dtype == torch.float32


def test_seed_round_trip():
    """The operators take the 64-bit seed as a signed int64 (in their rng
    tensor) and give it back whole."""
    for seed in (0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x1234_5678_9ABC_DEF0):
        s64 = fct._seed_i64(seed)
        assert -2**63 <= s64 < 2**63 and fct._seed_u64(s64) == seed
        rng = fct._rng_tensor(seed, 2**32 - 1)
        assert rng.dtype == torch.int64 and rng.shape == (2,) and rng.device.type == "cpu"
        assert fct._dropout_kwargs(0.5, rng) == dict(dropout_p=0.5, seed=seed, offset=2**32 - 1)
    assert fct._dropout_kwargs(0.0, None) == dict(dropout_p=0.0, seed=None, offset=0)
    for bad in (None, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 2, 3])):
        with pytest.raises(ValueError, match="dropout_p > 0 needs rng"):
            fct._dropout_kwargs(0.5, bad)


def test_one_plan_cache():
    """flashcupy.torch and flashcupy.api share flashcupy._plan.CACHE."""
    assert fct._PLANS is _plan.CACHE and api._PLANS is _plan.CACHE


def test_plan_key_holds_the_variant():
    """Every variant argument is in the plan key (a different window never
    replays another window's plan); keys start with "torch"."""
    q = torch.empty(2, 3, 8, 16)
    a, s1, s2 = torch.empty(3), torch.empty(3), torch.empty(2, 3)

    def key(**kw):
        return fct._plan_key("fwd", (q, q, q), False, None, **kw)

    b1, b2 = torch.empty(8, 8), torch.empty(8, 8, dtype=torch.float16)
    m1 = torch.empty(8, 8, dtype=torch.bool)
    keys = [key(), key(window_left=8, window_right=0), key(window_left=16, window_right=0),
            key(window_left=8), key(window_right=0), key(window_left=0, window_right=8),
            key(window_right=-3), key(softcap=5.0), key(softcap=6.0), key(extras=(a, None)),
            key(extras=(None, s1)), key(extras=(a, s1)), key(extras=(None, s2)),
            key(extras=(None, s1.expand(2, 3))), key(extras=(None, None, b1)),
            key(extras=(None, None, b2)), key(extras=(None, None, b1.t())),
            key(extras=(None, None, None, m1)), key(extras=(None, None, b1, m1)),
            key(dropout_p=0.1), key(dropout_p=0.2),
            fct._plan_key("fwd", (q, q, q), True, None, window_left=8)]
    assert len(set(keys)) == len(keys)
    assert all(kk[0] == "torch" for kk in keys)
    assert key(window_left=8, window_right=0, softcap=5.0, extras=(a, s1)) == key(
        window_left=8, window_right=0, softcap=5.0, extras=(torch.empty(3), torch.empty(3)))
    # the extras pad with None; the dropout's seed and offset are not in the key
    assert key(extras=(a, None)) == key(extras=(a, None, None, None))
    # a scalar of a type the API would judge: no key, so no replay
    assert key(softcap=5) is None and key(window_left=True) is None
    assert key(dropout_p=1) is None


@pytest.mark.parametrize("window, exc, match", [
    ((1.5, 0), TypeError, r"window left side must be an int"),
    ((0, "4"), TypeError, r"window right side must be an int"),
    ((True, 0), TypeError, r"window left side must be an int"),
    ((4,), TypeError, r"window must be None or a pair"),
    ((1, 2, 3), TypeError, r"window must be None or a pair"),
    (8, TypeError, r"window must be None or a pair"),
], ids=["float", "str", "bool", "single", "triple", "int"])
def test_error_window(window, exc, match, no_launch):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(exc, match=r"attention\(\): " + match):
        fct.attention(q, q, q, window=window)


@pytest.mark.parametrize("window", [(-1, 3), (2, -1), (None, -4)])
def test_negative_window_sides_pass(window, no_launch):
    """A negative side is a window past the diagonal (SDPA's top-left causal
    mask is (None, L - S)): the check passes, then the CPU tensors are refused."""
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        fct.attention(q, q, q, window=window)


@pytest.mark.parametrize("softcap, exc", [
    (0.0, ValueError), (-2.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("5", TypeError), (True, TypeError)], ids=["zero", "neg", "nan", "inf", "str", "bool"])
def test_error_softcap(softcap, exc, no_launch):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(exc, match=r"attention\(\): softcap must be"):
        fct.attention(q, q, q, softcap=softcap)


@pytest.fixture
def cpu_device(monkeypatch):
    """flashcupy.torch's validation takes CPU tensors (as it takes CUDA ones)."""
    monkeypatch.setattr(fct, "_DEVICE_TYPE", "cpu")


# q, k, v of shape (1, 2, 16, 32): batch dims (1, 2)
BAD_VARIANT_TENSORS = {
    "sink-fp16": (dict(sink=lambda: torch.zeros(2, dtype=torch.float16)), TypeError,
                  r"sink has dtype float16; expected float32"),
    "alibi-fp64": (dict(alibi_slopes=lambda: torch.zeros(2, dtype=torch.float64)), TypeError,
                   r"alibi_slopes has dtype float64; expected float32"),
    "sink-shape": (dict(sink=lambda: torch.zeros(3)), ValueError,
                   r"sink has shape \(3,\), which does not broadcast to the batch dims \(1, 2\)"),
    "alibi-shape": (dict(alibi_slopes=lambda: torch.zeros(2, 1, 2)), ValueError,
                    r"alibi_slopes has shape \(2, 1, 2\), which does not broadcast"),
    "alibi-batch": (dict(alibi_slopes=lambda: torch.zeros(2, 2)), ValueError,
                    r"alibi_slopes has shape \(2, 2\)"),
    "sink-list": (dict(sink=lambda: [0.0, 0.0]), TypeError, r"sink must be a torch.Tensor"),
    "alibi-device": (dict(alibi_slopes=lambda: torch.zeros(2, device="meta")), ValueError,
                     r"alibi_slopes is on meta but q, k and v are on cpu"),
}


@pytest.mark.parametrize("bad", list(BAD_VARIANT_TENSORS))
def test_error_variant_tensors_cpu(bad, cpu_device, no_launch):
    kw, exc, match = BAD_VARIANT_TENSORS[bad]
    q = torch.randn(1, 2, 16, 32)
    with pytest.raises(exc, match=r"attention\(\): " + match):
        fct.attention(q, q, q, **{n: make() for n, make in kw.items()})


def _sum_to(x, shape):
    """``x`` summed over the axes it was broadcast along to reach ``shape``."""
    shape = tuple(shape)
    if x.dim() > len(shape):
        x = x.sum(dim=tuple(range(x.dim() - len(shape))))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return (x.sum(dim=dims, keepdim=True) if dims else x).reshape(shape)


def keep_mask(seed, offset, batch, sq, sk, dropout_p, device="cpu"):
    """flashcupy's dropout keep mask (``flashcupy._philox``, the kernels' bit
    contract) as a bool tensor of shape batch + (Sq, Sk)."""
    from flashcupy import _philox

    keep = _philox.keep_mask(seed, offset, tuple(batch), sq, sk, dropout_p)
    return torch.from_numpy(keep).to(device)


def _cpu_keep(q, k, v, dropout_p, rng):
    """The keep mask of an operator call (rng: [seed as a signed int64, offset]), or None."""
    if dropout_p == 0.0:
        return None
    seed, offset = rng.tolist()
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return keep_mask(fct._seed_u64(seed), offset, batch, q.shape[-2], k.shape[-2], dropout_p)


def _cpu_fwd(q, k, v, causal, scale, window_left=None, window_right=None, softcap=None,
             alibi=None, sink=None, bias=None, mask=None, dropout_p=0.0, rng=None):
    """The forward operator as a CPU kernel: the float64 reference."""
    window = None if window_left is None and window_right is None else (window_left, window_right)
    out, lse = reference(q, k, v, causal, scale, window=window, softcap=softcap,
                         alibi_slopes=alibi, sink=sink, bias=bias, mask=mask,
                         keep=_cpu_keep(q, k, v, dropout_p, rng), dropout_p=dropout_p)
    return out.to(q.dtype).contiguous(), lse.to(fct._lse_dtype(q.dtype)).contiguous()


def _cpu_bwd(dout, q, k, v, out, lse, causal, scale, deterministic, window_left=None,
             window_right=None, softcap=None, alibi=None, sink=None, bias=None, mask=None,
             dropout_p=0.0, rng=None, bias_grad=False):
    """The backward operator as a CPU kernel, written out (a kernel runs below
    autograd): P = exp(s - lse), dropout's Z = keep / (1 - p) (1 without),
    dV = (P Z)^T dO, dS = P (Z dO V^T - delta), dbias = dS, times 1 - tanh^2
    under a softcap, dQ = scale dS K, dK = scale dS^T Q,
    dsink = -sum_i exp(sink - lse_i) delta_i; broadcast axes summed."""
    q64, k64, v64, do, o = (t.double() for t in (q, k, v, dout, out))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = scale * q64 @ k64.transpose(-1, -2)
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = softcap * t
    sq, sk = q.shape[-2], k.shape[-2]
    rel = torch.arange(sk)[None, :] - (torch.arange(sq)[:, None] + sk - sq)
    if alibi is not None:
        s = s - alibi.double()[..., None, None] * rel.abs()
    if bias is not None:
        s = s + bias.double()
    right = 0 if causal else window_right
    visible = torch.ones_like(rel, dtype=torch.bool)
    if window_left is not None:
        visible &= rel >= -window_left
    if right is not None:
        visible &= rel <= right
    if mask is not None:
        visible = visible & mask
    l = lse.double()[..., None]
    seen = torch.isfinite(l)
    p = torch.where(visible & seen, torch.exp(s - torch.where(seen, l, 0)), 0)
    keep = _cpu_keep(q, k, v, dropout_p, rng)
    z = 1.0 if keep is None else keep.double() / (1.0 - dropout_p)
    delta = (do * o).sum(-1)
    ds = p * (z * (do @ v64.transpose(-1, -2)) - delta[..., None])
    if bias_grad:
        dbias = _sum_to(ds, bias.shape).to(bias.dtype)
    else:
        dbias = torch.empty((0,), dtype=torch.float32)
    if softcap is not None:
        ds = ds * (1 - t * t)
    dq = _sum_to(scale * ds @ k64, q.shape).to(q.dtype)
    dk = _sum_to(scale * ds.transpose(-1, -2) @ q64, k.shape).to(k.dtype)
    dv = _sum_to((p * z).transpose(-1, -2) @ do, v.shape).to(v.dtype)
    if sink is None:
        return dq, dk, dv, torch.empty((0,), dtype=torch.float32), dbias
    p_sink = torch.exp(sink.double()[..., None] - lse.double())
    return dq, dk, dv, _sum_to(-(p_sink * delta).sum(-1), sink.shape).float(), dbias


@pytest.fixture
def cpu_kernels(monkeypatch, cpu_device):
    """CPU kernels for both operators for the duration of the test (the float64
    reference), and the eager path routed through the operators: what is tested
    is the wiring around the kernels (schemas, fake implementations,
    register_autograd and the eager autograd.Function, which gradient goes
    where, torch.compile tracing of the validation), not the kernels."""
    scoped = getattr(torch.library, "_scoped_library", None)
    if scoped is None:
        pytest.skip("torch.library._scoped_library is not available")
    # (the eager path's keywords, its plan keys, do not reach the operators)
    monkeypatch.setattr(fct, "_fwd_impl",
                        lambda *a, **kw: torch.ops.flashcupy.attention_fwd(*a))
    monkeypatch.setattr(fct, "_bwd_impl",
                        lambda *a, **kw: torch.ops.flashcupy.attention_bwd(*a))
    with scoped("flashcupy", "IMPL") as lib:
        lib.impl("attention_fwd", _cpu_fwd, "CPU")
        lib.impl("attention_bwd", _cpu_bwd, "CPU")
        yield


def _cpu_inputs(seed, kv_batch=(2, 1), lens=(6, 9)):
    """Small float64 CPU inputs (gradcheck evaluates the op twice per element)."""
    sq, sk = lens
    q = randn((2, 3, sq, 8), torch.float64, seed, device="cpu", requires_grad=True)
    k = randn((*kv_batch, sk, 8), torch.float64, seed + 1, device="cpu", requires_grad=True)
    v = randn((*kv_batch, sk, 4), torch.float64, seed + 2, device="cpu", requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
def test_wiring_opcheck_variants(alibi, cpu_kernels, seed):
    q, k, v = _cpu_inputs(seed)
    sink = exact_sink((3,), seed + 3, device="cpu").requires_grad_()
    slopes = rand_slopes((2, 3), seed + 4, device="cpu") if alibi else None
    args = (q, k, v, False, None, 2, 1, 1.5, slopes, sink)
    torch.library.opcheck(torch.ops.flashcupy.attention_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.flashcupy.attention_fwd(*args)
    dout = randn(out.shape, torch.float64, seed + 5, device="cpu")
    torch.library.opcheck(torch.ops.flashcupy.attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, False, None, False,
                           2, 1, 1.5, slopes, sink.detach()))


@pytest.mark.filterwarnings("ignore:Input #3 requires gradient and is not a double")
@pytest.mark.parametrize("path", ["eager", "op"])
def test_wiring_gradcheck_variants(path, cpu_kernels, seed):
    """The sink's gradient reaches the sink (summed over the batch axis it
    broadcasts along), on the eager autograd.Function and on the operator's
    register_autograd; the window, softcap and slopes reach the backward."""
    q, k, v = _cpu_inputs(seed)
    sink = exact_sink((3,), seed + 3, device="cpu").requires_grad_()
    slopes = rand_slopes((2, 3), seed + 4, device="cpu")
    if path == "eager":
        def f(q, k, v, sink):
            return fct.attention(q, k, v, causal=True, window=(2, None), softcap=1.5,
                                 alibi_slopes=slopes, sink=sink)
    else:
        def f(q, k, v, sink):
            return torch.ops.flashcupy.attention_fwd(q, k, v, False, 0.3, 2, 1, 1.5, slopes,
                                                     sink)[0]
    # fast mode (random projections of the Jacobian): the wiring, not the kernels
    assert torch.autograd.gradcheck(f, (q, k, v, sink), eps=2**-12, fast_mode=True)


def test_wiring_alibi_not_differentiable(cpu_kernels, seed):
    q, k, v = _cpu_inputs(seed)
    slopes = rand_slopes((3,), seed + 4, device="cpu").requires_grad_()
    sink = exact_sink((2, 3), seed + 3, device="cpu").requires_grad_()
    fct.attention(q, k, v, alibi_slopes=slopes, sink=sink).sum().backward()
    assert slopes.grad is None
    assert sink.grad.shape == sink.shape and sink.grad.dtype == torch.float32
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_wiring_compile_fullgraph_variants(cpu_kernels, seed):
    """torch.compile(fullgraph=True) traces the validation (window, softcap and
    the variant tensors) and the operators, sink's gradient included."""
    def loss_fn(q, k, v, sink):
        return fct.attention(q, k, v, causal=True, window=(3, None), softcap=2.0,
                             sink=sink).sum()

    q, k, v = _cpu_inputs(seed)
    sink = exact_sink((3,), seed + 3, device="cpu").requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        loss_c = compiled(q, k, v, sink)
        grads_c = torch.autograd.grad(loss_c, (q, k, v, sink))
    loss_e = loss_fn(q, k, v, sink)
    grads_e = torch.autograd.grad(loss_e, (q, k, v, sink))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


# ----------------------------------------------------------------------------
# bias, mask, dropout, no GPU needed: bad arguments, and the wiring through
# the CPU kernels (the float64 reference with flashcupy's keep mask)
# ----------------------------------------------------------------------------

# q, k, v of shape (1, 2, 16, 32) float32: target (1, 2, 16, 16)
BAD_PAIR_TENSORS = {
    "bias-int": (dict(bias=lambda: torch.zeros(16, 16, dtype=torch.int32)), TypeError,
                 r"bias has dtype int32 and shape \(16, 16\); expected a floating tensor of "
                 r"q's dtype \(float32\) or float32"),
    "bias-complex": (dict(bias=lambda: torch.zeros(16, 16, dtype=torch.complex64)), TypeError,
                     r"bias has dtype complex64"),
    "bias-bool": (dict(bias=lambda: torch.ones(16, 16, dtype=torch.bool)), TypeError,
                  r"bias has dtype bool .*; a boolean mask goes in mask"),
    "bias-fp16": (dict(bias=lambda: torch.zeros(16, 16, dtype=torch.float16)), TypeError,
                  r"bias has dtype float16"),
    "bias-fp64": (dict(bias=lambda: torch.zeros(16, 16, dtype=torch.float64)), TypeError,
                  r"bias has dtype float64"),
    "bias-shape": (dict(bias=lambda: torch.zeros(3, 16)), ValueError,
                   r"bias has shape \(3, 16\) \(dtype float32\), which does not broadcast to "
                   r"\(1, 2, 16, 16\)"),
    "bias-batch": (dict(bias=lambda: torch.zeros(3, 16, 16)), ValueError,
                   r"bias has shape \(3, 16, 16\)"),
    "bias-ndim": (dict(bias=lambda: torch.zeros(1, 1, 2, 16, 16)), ValueError,
                  r"bias has shape \(1, 1, 2, 16, 16\)"),
    "bias-list": (dict(bias=lambda: [[0.0] * 16] * 16), TypeError,
                  r"bias must be a torch.Tensor"),
    "bias-device": (dict(bias=lambda: torch.zeros(16, 16, device="meta")), ValueError,
                    r"bias is on meta but the inputs are on cpu"),
    "mask-float": (dict(mask=lambda: torch.ones(16, 16)), TypeError,
                   r"mask has dtype float32 and shape \(16, 16\); expected a bool tensor"),
    "mask-int": (dict(mask=lambda: torch.ones(16, 16, dtype=torch.uint8)), TypeError,
                 r"mask has dtype uint8"),
    "mask-shape": (dict(mask=lambda: torch.ones(2, 1, 16, 16, dtype=torch.bool)), ValueError,
                   r"mask has shape \(2, 1, 16, 16\) \(dtype bool\), which does not broadcast"),
    "mask-device": (dict(mask=lambda: torch.ones(16, 16, dtype=torch.bool, device="meta")),
                    ValueError, r"mask is on meta but the inputs are on cpu"),
}


@pytest.mark.parametrize("bad", list(BAD_PAIR_TENSORS))
def test_error_bias_mask_cpu(bad, cpu_device, no_launch):
    kw, exc, match = BAD_PAIR_TENSORS[bad]
    q = torch.randn(1, 2, 16, 32)
    with pytest.raises(exc, match=r"attention\(\): " + match):
        fct.attention(q, q, q, **{n: make() for n, make in kw.items()})


# query (2, 4, 8, 32) against key/value (2, 4 or 2, 12, 32): target (2, 4, 8, 12)
BAD_ATTN_MASKS = {
    "int": (lambda: torch.ones(8, 12, dtype=torch.int64), {}, TypeError,
            r"attn_mask has dtype int64 and shape \(8, 12\); expected bool \(True = take part "
            r"in attention\) or a floating tensor of the query's dtype \(float32\) or float32"),
    "fp16": (lambda: torch.zeros(8, 12, dtype=torch.float16), {}, TypeError,
             r"attn_mask has dtype float16"),
    "shape": (lambda: torch.ones(8, 8, dtype=torch.bool), {}, ValueError,
              r"attn_mask has shape \(8, 8\) \(dtype bool\), which does not broadcast to "
              r"\(2, 4, 8, 12\)"),
    "heads": (lambda: torch.ones(2, 3, 8, 12, dtype=torch.bool), {}, ValueError,
              r"attn_mask has shape \(2, 3, 8, 12\)"),
    # with enable_gqa the target has the query's 4 heads, not the key's 2
    "gqa-kv-heads": (lambda: torch.zeros(2, 2, 8, 12), dict(enable_gqa=True), ValueError,
                     r"attn_mask has shape \(2, 2, 8, 12\) \(dtype float32\), which does not "
                     r"broadcast to \(2, 4, 8, 12\)"),
    "device": (lambda: torch.ones(8, 12, dtype=torch.bool, device="meta"), {}, ValueError,
               r"attn_mask is on meta but the inputs are on cpu"),
}


@pytest.mark.parametrize("bad", list(BAD_ATTN_MASKS))
def test_error_sdpa_attn_mask_cpu(bad, cpu_device, no_launch):
    make, kw, exc, match = BAD_ATTN_MASKS[bad]
    q = torch.randn(2, 4, 8, 32)
    kv = torch.randn(2, 2 if kw.get("enable_gqa") else 4, 12, 32)
    with pytest.raises(exc, match=r"scaled_dot_product_attention\(\): " + match):
        fct.scaled_dot_product_attention(q, kv, kv, attn_mask=make(), **kw)


def _bias_mask_inputs(seed, bias_shape=(1, 3, 6, 9), mask_shape=(2, 1, 1, 9)):
    """A float64 bias (requires grad) and a bool mask (one masked key per batch
    element, never a whole row) for _cpu_inputs' (2, 3, 6, 9) problem."""
    bias = randn(bias_shape, torch.float64, seed + 6, device="cpu", requires_grad=True)
    gen = torch.Generator().manual_seed(seed + 7)
    mask = torch.rand(mask_shape, generator=gen) > 0.25
    mask[..., 0] = True  # every row keeps a key
    return bias, mask


def test_wiring_opcheck_bias_mask_dropout(cpu_kernels, seed):
    q, k, v = _cpu_inputs(seed)
    bias, mask = _bias_mask_inputs(seed)
    var = (None, None, None, None, None, bias, mask, 0.25, fct._rng_tensor(2**63 + seed, 3))
    args = (q, k, v, False, None, *var)
    torch.library.opcheck(torch.ops.flashcupy.attention_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.flashcupy.attention_fwd(*args)
    dout = randn(out.shape, torch.float64, seed + 5, device="cpu")
    for bias_grad in (False, True):
        torch.library.opcheck(torch.ops.flashcupy.attention_bwd.default,
                              (dout, q.detach(), k.detach(), v.detach(), out, lse, False, None,
                               False, *var[:5], bias.detach(), *var[6:], bias_grad))


@pytest.mark.parametrize("path", ["eager", "op"])
def test_wiring_gradcheck_bias_mask(path, cpu_kernels, seed):
    """The bias's gradient reaches the bias (its own shape, summed over the
    axes it broadcasts along) with a mask, on the eager autograd.Function and
    on the operator's register_autograd; with dropout (the operator, at a
    fixed seed and offset) the backward regenerates the forward's pattern."""
    q, k, v = _cpu_inputs(seed)
    bias, mask = _bias_mask_inputs(seed)
    if path == "eager":
        def f(q, k, v, bias):
            return fct.attention(q, k, v, causal=True, window=(4, None), softcap=2.0, bias=bias,
                                 mask=mask)
    else:
        def f(q, k, v, bias):
            return torch.ops.flashcupy.attention_fwd(q, k, v, False, 0.3, None, None, None, None,
                                                     None, bias, mask, 0.3,
                                                     torch.tensor([-12345, 9]))[0]
    assert torch.autograd.gradcheck(f, (q, k, v, bias), fast_mode=True)


@pytest.fixture
def record_bwd(monkeypatch, cpu_kernels):
    """Records the arguments the backward operator receives."""
    calls = []
    inner = fct._bwd_impl

    def bwd(*args, **kw):
        calls.append(args)
        return inner(*args, **kw)

    monkeypatch.setattr(fct, "_bwd_impl", bwd)
    return calls


def test_wiring_bias_grad_only_when_required(record_bwd, seed):
    """bias_grad=True reaches the kernels only when the bias requires grad;
    a bool mask and a bias that does not require grad get None."""
    q, k, v = _cpu_inputs(seed)
    bias, mask = _bias_mask_inputs(seed)
    for requires in (False, True):
        b = bias.detach().requires_grad_(requires)
        fct.attention(q, k, v, bias=b, mask=mask).sum().backward()
        assert record_bwd[-1][-1] is requires  # bias_grad, the last argument
        assert (b.grad is not None) == requires
        if requires:
            assert b.grad.shape == b.shape and b.grad.dtype == b.dtype
    assert mask.grad is None


def test_wiring_float32_bias_beside_float64(cpu_kernels, seed):
    """A float32 bias with float64 inputs is allowed; its gradient is float32."""
    q, k, v = _cpu_inputs(seed)
    bias = randn((6, 9), torch.float32, seed + 6, device="cpu", requires_grad=True)
    fct.attention(q, k, v, bias=bias).sum().backward()
    assert bias.grad.dtype == torch.float32 and bias.grad.shape == (6, 9)


class _FakeGenerator:
    """Stands in for PyTorch's CUDA generator in CPU tests: seed, offset steps."""

    def __init__(self, seed):
        self.seed, self.step, self.draws = seed, 0, []

    def draw(self, device):
        out = (self.seed, self.step % 2**32)
        self.step += 1
        self.draws.append(out)
        return out


@pytest.fixture
def fake_generator(monkeypatch):
    gen = _FakeGenerator(2**64 - 7)  # a seed past 2**63: the operators' signed int64
    monkeypatch.setattr(fct, "_draw_dropout_seed", gen.draw)
    return gen


def test_wiring_dropout_seed_reaches_both_passes(record_bwd, fake_generator, seed):
    """attention(dropout_p=...) draws one (seed, offset) per call, the forward
    uses it and the backward gets the same; values match the reference with
    flashcupy's keep mask of that seed and offset."""
    q, k, v = _cpu_inputs(seed)
    bias, mask = _bias_mask_inputs(seed)
    p = 0.3
    outs = []
    for call in range(2):
        out = fct.attention(q, k, v, bias=bias, mask=mask, dropout_p=p)
        dout = randn(out.shape, torch.float64, seed + 10 + call, device="cpu")
        grads = torch.autograd.grad(out, (q, k, v, bias), dout)
        s, off = fake_generator.draws[call]
        args = record_bwd[-1]
        assert args[-3] == p and args[-2].tolist() == [fct._seed_i64(s), off]  # p, rng
        keep = keep_mask(s, off, (2, 3), 6, 9, p)
        ref_out, _, ref_grads = reference(q, k, v, dout=dout, bias=bias, mask=mask, keep=keep,
                                          dropout_p=p)
        assert_close("out", out, ref_out)
        for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
            assert_close(name, g, r, grad=True)
        outs.append(out)
    assert fake_generator.draws[0][1] != fake_generator.draws[1][1]  # a new offset per call
    assert not torch.equal(outs[0], outs[1])


@pytest.fixture
def core_calls(monkeypatch, cpu_device):
    """Runs the operators' implementations on CPU tensors with the core
    replaced by a recorder that binds every call to flashcupy.api's real
    signature (so a keyword the core does not take fails here) and zero-fills
    the outputs; CuPy views are the tensors themselves."""
    import contextlib
    import inspect

    calls = []

    def recorder(name, real, fill):
        sig = inspect.signature(real)

        def call(*args, **kw):
            sig.bind(*args, **kw)
            calls.append((name, args, kw))
            for out in fill:
                if kw.get(out) is not None:
                    kw[out].zero_()

        return call

    monkeypatch.setattr(fct, "_as_cupy", lambda t: t)
    monkeypatch.setattr(fct, "_cupy_on_torch", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(fct, "_PLANS", _plan.PlanCache())
    monkeypatch.setattr(api, "_forward", recorder("fwd", api._forward, ("out", "lse")))
    monkeypatch.setattr(api, "_backward", recorder(
        "bwd", api._backward, ("dq", "dk", "dv", "dsink", "dbias")))
    monkeypatch.setattr(api, "cached_plan", recorder("plan", api.cached_plan, ()))
    return calls


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_impl_hands_the_core_its_keywords(dropout, core_calls, fake_generator, seed):
    """What the operators pass flashcupy.api: bias, mask, bias_grad, a
    preallocated dbias of the bias's shape and dtype, the dropout's
    probability, unsigned seed and offset (the same in both passes), and the
    cached_plan lookups with the bias and mask and dropout_p."""
    q, k, v = _cpu_inputs(seed)
    bias, mask = _bias_mask_inputs(seed)
    p = 0.2 if dropout else 0.0
    out = fct.attention(q, k, v, bias=bias, mask=mask, dropout_p=p)
    out.sum().backward()
    (f, _, fkw), (pf, pfa, pfkw), (b, _, bkw), (pb, pba, pbkw) = core_calls
    assert (f, pf, b, pb) == ("fwd", "plan", "bwd", "plan")
    assert pfa[0] == "fwd" and pba[0] == "bwd-dbias"
    assert pfa[-1][2:] == (bias, mask) and pba[-1][2:] == (bias, mask)  # extras: ..., bias, mask
    seed_u64, offset = fake_generator.draws[0] if dropout else (None, 0)
    for kw in (fkw, bkw):
        assert kw["bias"] is bias and kw["mask"] is mask
        assert (kw["dropout_p"], kw["seed"], kw["offset"]) == (p, seed_u64, offset)
    assert bkw["bias_grad"] is True
    assert bkw["dbias"].shape == bias.shape and bkw["dbias"].dtype == bias.dtype
    assert bias.grad.shape == bias.shape
    for kw in (pfkw, pbkw):
        assert kw["dropout_p"] == p


def test_wiring_dropout_under_no_grad(cpu_kernels, fake_generator, seed):
    """Dropout applies whenever dropout_p > 0 (no_grad, eval): the caller's choice."""
    q, k, v = _cpu_inputs(seed)
    with torch.no_grad():
        out = fct.attention(q, k, v, dropout_p=0.5)
        plain = fct.attention(q, k, v)
    assert len(fake_generator.draws) == 1
    assert not torch.equal(out, plain)


def test_wiring_deterministic_broadcast_bias(record_bwd, fake_generator, seed):
    """Under torch.use_deterministic_algorithms(True) the gradient of a
    broadcast bias runs the deterministic path; with dropout too it raises
    (torch's message), and warn_only warns and runs the nondeterministic
    kernels; a bias expanded to the full shape is fine with dropout."""
    q, k, v = _cpu_inputs(seed)
    bias, _ = _bias_mask_inputs(seed)
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        fct.attention(q, k, v, bias=bias).sum().backward()
        assert record_bwd[-1][8] is True  # deterministic
        bias.grad = None
        out = fct.attention(q, k, v, bias=bias, dropout_p=0.1)
        with pytest.raises(RuntimeError, match=r"does not have a deterministic implementation, "
                                               r"but you set 'torch.use_deterministic_algorithms"):
            out.sum().backward()
        fct.attention(q, k, v, bias=bias.expand(2, 3, 6, 9), dropout_p=0.1).sum().backward()
        assert record_bwd[-1][8] is True
        bias.grad = None
        torch.use_deterministic_algorithms(True, warn_only=True)
        out = fct.attention(q, k, v, bias=bias, dropout_p=0.1)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            out.sum().backward()
        assert record_bwd[-1][8] is False and bias.grad.shape == bias.shape
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def test_wiring_compile_fullgraph_bias_mask(cpu_kernels, seed):
    """torch.compile(fullgraph=True) traces the bias / mask checks and the
    operators, the bias's gradient included."""
    mask = _bias_mask_inputs(seed)[1]

    def loss_fn(q, k, v, bias):
        return fct.attention(q, k, v, causal=True, bias=bias, mask=mask).sum()

    q, k, v = _cpu_inputs(seed)
    bias = _bias_mask_inputs(seed)[0]
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        grads_c = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    grads_e = torch.autograd.grad(loss_fn(q, k, v, bias), (q, k, v, bias))
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def test_wiring_compile_dropout(cpu_kernels, fake_generator, seed):
    """Under torch.compile the generator draw is a graph break (each call draws
    anew, the backward gets the forward's seed and offset); with
    fullgraph=True an error that names it."""
    def loss_fn(q, k, v):
        return fct.attention(q, k, v, dropout_p=0.25).sum()

    q, k, v = _cpu_inputs(seed)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager")
    for call in range(3):
        loss_c = compiled(q, k, v)
        grads_c = torch.autograd.grad(loss_c, (q, k, v))
        s, off = fake_generator.draws[-1]
        keep = keep_mask(s, off, (2, 3), 6, 9, 0.25)
        ref_out, _, ref_grads = reference(q, k, v, dout=torch.ones(2, 3, 6, 4, dtype=torch.float64),
                                          keep=keep, dropout_p=0.25)
        torch.testing.assert_close(loss_c, ref_out.sum())
        for gc, r in zip(grads_c, ref_grads):
            torch.testing.assert_close(gc, r)
    assert len({d[1] for d in fake_generator.draws}) == len(fake_generator.draws) == 3
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="dropout seed and offset"):
        torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(q, k, v)


def test_wiring_compile_dropout_no_recompile(cpu_kernels, fake_generator, seed):
    """The dropout's seed and offset reach the operator in a tensor, not as
    Python ints that dynamo would guard on: twelve dropout calls (each its own
    draw) stay one compiled graph, with no recompilation."""
    from torch._dynamo.testing import CompileCounter

    def f(q, k, v):
        return fct.attention(q, k, v, dropout_p=0.1)

    q, k, v = (t.detach() for t in _cpu_inputs(seed))
    torch._dynamo.reset()
    counter = CompileCounter()  # counts the frames dynamo compiles a graph for
    compiled = torch.compile(f, backend=counter)
    outs = [compiled(q, k, v) for _ in range(12)]
    assert len({d[1] for d in fake_generator.draws}) == len(fake_generator.draws) == 12
    # one graph (after the draw's break), compiled once: no recompilation per draw
    assert counter.frame_count == 1, f"{counter.frame_count} compiled frames"
    for out, (s, off) in zip(outs, fake_generator.draws):
        keep = keep_mask(s, off, (2, 3), 6, 9, 0.1)
        torch.testing.assert_close(out, reference(q, k, v, keep=keep, dropout_p=0.1)[0])
    torch._dynamo.reset()


# ----------------------------------------------------------------------------
# scaled_dot_product_attention's mapping (attn_mask, top-left is_causal, GQA
# views, dropout) against PyTorch's own math backend, through the CPU kernels
# ----------------------------------------------------------------------------

def _sdpa_math(*args, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kw)


# (query, key/value shapes, attn_mask: None, ("bool" | "float", shape), keywords)
SDPA_MAP_CASES = {
    "bool-LS": ((2, 3, 6, 8), (2, 3, 9, 8), ("bool", (6, 9)), {}),
    "bool-keypad": ((2, 3, 6, 8), (2, 3, 9, 8), ("bool", (2, 1, 1, 9)), {}),
    "bool-full": ((2, 3, 6, 8), (2, 3, 9, 8), ("bool", (2, 3, 6, 9)), {}),
    "float-LS": ((2, 3, 6, 8), (2, 3, 9, 8), ("float", (6, 9)), {}),
    "float-keypad": ((2, 3, 6, 8), (2, 3, 9, 8), ("float", (2, 1, 1, 9)), {}),
    "float-full": ((2, 3, 6, 8), (2, 3, 9, 8), ("float", (2, 3, 6, 9)), dict(scale=0.4)),
    "causal-L<S": ((2, 3, 6, 8), (2, 3, 9, 8), None, dict(is_causal=True)),
    "causal-L>S": ((2, 3, 9, 8), (2, 3, 6, 8), None, dict(is_causal=True)),
    "causal-square": ((2, 3, 7, 8), (2, 3, 7, 8), None, dict(is_causal=True)),
    "gqa-bool-full": ((2, 4, 6, 8), (2, 2, 9, 8), ("bool", (2, 4, 6, 9)), dict(enable_gqa=True)),
    "gqa-float-heads": ((2, 4, 6, 8), (2, 2, 9, 8), ("float", (4, 6, 9)), dict(enable_gqa=True)),
    "gqa-float-keypad": ((2, 4, 6, 8), (2, 2, 9, 8), ("float", (2, 1, 1, 9)),
                         dict(enable_gqa=True)),
    "gqa-causal-L<S": ((2, 4, 6, 8), (2, 2, 9, 8), None, dict(enable_gqa=True, is_causal=True)),
    "3d-bool": ((3, 6, 8), (3, 9, 8), ("bool", (3, 6, 9)), {}),
}


def make_attn_mask(spec, seed, device="cpu", dtype=torch.float64, requires_grad=False):
    """A bool mask (True = attend; every row keeps its first key) or a float
    mask (a normal draw with a few -inf), of ``spec`` = (kind, shape)."""
    kind, shape = spec
    gen = torch.Generator(device=device).manual_seed(seed % 2**63)
    keep = torch.rand(shape, generator=gen, device=device) > 0.3
    keep[..., 0] = True
    if kind == "bool":
        return keep
    x = randn(shape, dtype, seed + 1, device=device)
    return x.masked_fill(~keep, float("-inf")).requires_grad_(requires_grad)


@pytest.mark.parametrize("case", list(SDPA_MAP_CASES))
def test_wiring_sdpa_matches_torch_math(case, cpu_kernels, seed):
    qs, kvs, spec, kw = SDPA_MAP_CASES[case]
    q = randn(qs, torch.float64, seed, device="cpu", requires_grad=True)
    k = randn(kvs, torch.float64, seed + 1, device="cpu", requires_grad=True)
    v = randn(kvs, torch.float64, seed + 2, device="cpu", requires_grad=True)
    m = None if spec is None else make_attn_mask(spec, seed + 3, requires_grad=True)
    wrt = (q, k, v) + ((m,) if m is not None and m.requires_grad else ())
    out = fct.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)
    ref = _sdpa_math(q, k, v, attn_mask=m, **kw)
    assert out.shape == ref.shape
    assert_close("out", out, ref)
    dout = randn(out.shape, torch.float64, seed + 4, device="cpu")
    for name, g, r in zip(("dq", "dk", "dv", "dmask"), torch.autograd.grad(out, wrt, dout),
                          torch.autograd.grad(ref, wrt, dout)):
        assert g.shape == r.shape, name
        assert_close(name, g, r, grad=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_wiring_sdpa_fully_masked_row(kind, cpu_kernels, seed):
    """A row with every key masked: out = 0 and zero gradients, as PyTorch's
    math backend gives (the flashcupy convention, documented in the docstring)."""
    q = randn((1, 2, 5, 8), torch.float64, seed, device="cpu", requires_grad=True)
    k = randn((1, 2, 7, 8), torch.float64, seed + 1, device="cpu", requires_grad=True)
    v = randn((1, 2, 7, 8), torch.float64, seed + 2, device="cpu", requires_grad=True)
    keep = torch.ones(5, 7, dtype=torch.bool)
    keep[2] = False
    m = keep if kind == "bool" else torch.zeros(5, 7, dtype=torch.float64).masked_fill(
        ~keep, float("-inf"))
    out = fct.scaled_dot_product_attention(q, k, v, attn_mask=m)
    ref = _sdpa_math(q, k, v, attn_mask=m)
    assert torch.equal(out[..., 2, :], torch.zeros_like(out[..., 2, :]))
    assert torch.equal(ref[..., 2, :], torch.zeros_like(ref[..., 2, :]))
    assert_close("out", out, ref)
    dout = randn(out.shape, torch.float64, seed + 3, device="cpu")
    dq = torch.autograd.grad(out, q, dout)[0]
    assert torch.equal(dq[..., 2, :], torch.zeros_like(dq[..., 2, :]))
    assert_close("dq", dq, torch.autograd.grad(ref, q, dout)[0], grad=True)


def test_wiring_sdpa_dropout(record_bwd, fake_generator, seed):
    """SDPA's dropout_p: one draw per call, the backward gets the forward's
    seed and offset; with GQA the keep mask's batch is (B, Hq) (the flat
    index of (B, Hkv, G) is the query head's)."""
    q = randn((2, 4, 6, 8), torch.float64, seed, device="cpu", requires_grad=True)
    k = randn((2, 2, 9, 8), torch.float64, seed + 1, device="cpu", requires_grad=True)
    v = randn((2, 2, 9, 8), torch.float64, seed + 2, device="cpu", requires_grad=True)
    m = make_attn_mask(("bool", (2, 1, 1, 9)), seed + 3)
    out = fct.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.2, enable_gqa=True)
    dout = randn(out.shape, torch.float64, seed + 4, device="cpu")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    (s, off), = fake_generator.draws
    p, rng = record_bwd[-1][-3:-1]  # dropout_p, rng
    assert p == 0.2 and rng.tolist() == [fct._seed_i64(s), off]
    keep = keep_mask(s, off, (2, 4), 6, 9, 0.2)
    rk, rv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    ref_out, _, ref_grads = reference(q, rk, rv, dout=dout, mask=m, keep=keep, dropout_p=0.2)
    assert_close("out", out, ref_out)
    rdk, rdv = (g.unflatten(1, (2, 2)).sum(2) for g in ref_grads[1:3])
    for name, g, r in zip(("dq", "dk", "dv"), grads, (ref_grads[0], rdk, rdv)):
        assert_close(name, g, r, grad=True)


# ----------------------------------------------------------------------------
# the fast path of a repeated plain call (flashcupy/torch.py _fast_attention)
# ----------------------------------------------------------------------------

@gpu
def test_fast_path_repeats_exactly_and_keeps_the_checks(seed):
    """A repeated plain call replays its remembered plan: fresh outputs with the
    first call's values, gradients through autograd, and every check the
    checked route makes (a bool dropout_p, forward-mode AD) still applies."""
    q, k, v = (randn((2, 3, 77, 64), torch.bfloat16, seed + i) for i in range(3))
    with torch.no_grad():
        a = fct.attention(q, k, v, causal=True)   # checked, remembered
        b = fct.attention(q, k, v, causal=True)   # the fast entry
    assert fct._fast_key(q, k, v, True, None) in fct._FAST
    assert b.data_ptr() != a.data_ptr() and torch.equal(a, b)
    qg = q.clone().requires_grad_(True)
    out = fct.attention(qg, k, v, causal=True)
    assert out.grad_fn is not None and torch.equal(out.detach(), a)
    (g,) = torch.autograd.grad(out, (qg,), torch.ones_like(out))
    assert g.shape == q.shape and bool(torch.isfinite(g).all())
    with pytest.raises(TypeError, match="dropout_p"):
        fct.attention(q, k, v, causal=True, dropout_p=False)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(q, torch.randn_like(q))
        with pytest.raises((NotImplementedError, RuntimeError)):
            fct.attention(dual, k, v, causal=True)


@gpu
def test_fast_path_lse_scratch_sdpa_and_autocast(seed):
    """The fast entry's other users and buffers: a call without return_lse
    (no grad) writes a shared LSE scratch, one with return_lse gets its own,
    correct LSE; the SDPA drop-in's plain calls (is_causal with L == S) take
    the same entry, its L != S causal calls and masked ones keep their own
    semantics; under bf16 autocast bf16 inputs take it and float32 ones are
    cast (the checked route); a backward built on the forward's key (the eager
    path) gives the gradients of the checked route."""
    q, k, v = (randn((2, 3, 96, 64), torch.bfloat16, seed + i) for i in range(3))
    with torch.no_grad():
        ref_out, ref_lse = fct.attention(q, k, v, causal=True, return_lse=True)  # remembered
        o1 = fct.attention(q, k, v, causal=True)
        o2, l2 = fct.attention(q, k, v, causal=True, return_lse=True)
        o3, l3 = fct.attention(q, k, v, causal=True, return_lse=True)
        assert torch.equal(o1, ref_out) and torch.equal(o2, ref_out)
        assert torch.equal(l2, ref_lse) and torch.equal(l3, ref_lse)
        assert l2.data_ptr() != l3.data_ptr()           # the caller's own LSEs
        # the SDPA drop-in: the same entry, the same values
        s1 = fct.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert torch.equal(s1, ref_out)
        # L != S: top-left causal is not attention's (bottom-right) causal, whose
        # entry exists for these tensors
        qs = q[:, :, :40]
        fct.attention(qs, k, v, causal=True)
        bottom_right = fct.attention(qs, k, v, causal=True)
        top_left = torch.ones(40, 96, dtype=torch.bool, device="cuda").tril()

        def top_left_math(dt):  # SDPA's math: P rounded to bf16, then P V
            sc = (qs.to(dt) @ k.to(dt).transpose(-1, -2)) / 8.0
            p_ = torch.softmax(sc.masked_fill(~top_left, float("-inf")), -1)
            return p_.to(torch.bfloat16).to(dt) @ v.to(dt)
        want = top_left_math(torch.float64)
        naive = top_left_math(torch.float32).to(torch.bfloat16)
        for _ in range(2):
            got = fct.scaled_dot_product_attention(qs, k, v, is_causal=True)
            assert_close("out", got, want, naive)
            assert not torch.equal(got, bottom_right)
        # autocast: bf16 inputs keep the entry, float32 ones are cast first
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a1 = fct.attention(q, k, v, causal=True)
            a2 = fct.attention(q.float(), k.float(), v.float(), causal=True)
            a3 = fct.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        assert a1.dtype == a2.dtype == a3.dtype == torch.bfloat16
        assert torch.equal(a1, ref_out) and torch.equal(a2, ref_out) and torch.equal(a3, ref_out)
    # backward: a call keyed on its forward (eager) against the checked route's
    g_ref = None
    for trial in range(3):
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = fct.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        dout = randn(out.shape, torch.bfloat16, seed + 7)
        grads = torch.autograd.grad(out, (qg, kg, vg), dout)
        if g_ref is None:
            g_ref = grads
            ref, _, ref_grads = reference(q, k, v, True, dout=dout)
            _, _, naive_grads = naive_in_dtype(q, k, v, True, dout=dout)
            for name, g, r, n in zip(("dq", "dk", "dv"), grads, ref_grads, naive_grads):
                assert_close(name, g, r, n, grad=True)
        else:
            assert all(torch.equal(a, b) for a, b in zip(grads, g_ref))


# ----------------------------------------------------------------------------
# values: forward and backward vs float64
# ----------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_forward(dtype, case, causal, seed):
    q, k, v = make_inputs(case, dtype, seed)
    out, lse = fct.attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal)
    naive = naive_in_dtype(q, k, v, causal) if dtype != torch.float64 else (None, None)
    assert out.dtype == dtype and out.device == q.device and out.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("out", out, ref_out, naive[0])
    assert_close("lse", lse, ref_lse, naive[1])


@gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_backward(dtype, case, causal, seed):
    q, k, v = make_inputs(case, dtype, seed, requires_grad=True)
    out = fct.attention(q, k, v, causal=causal)
    dout = randn(out.shape, dtype, seed + 3)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, _, ref_grads = reference(q, k, v, causal, dout=dout)
    naive_grads = (naive_in_dtype(q, k, v, causal, dout=dout)[2] if dtype != torch.float64
                   else (None, None, None))
    for name, g, r, n, t in zip(("dq", "dk", "dv"), grads, ref_grads, naive_grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == dtype
        assert_close(name, g, r, n, grad=True)


@gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_explicit_scale(causal, seed):
    q, k, v = make_inputs("mha-97", torch.float64, seed)
    out, lse = fct.attention(q, k, v, causal=causal, scale=0.37, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal, scale=0.37)
    assert_close("out", out, ref_out)
    assert_close("lse", lse, ref_lse)


@gpu
def test_lse_is_not_differentiable(seed):
    q, k, v = make_inputs("mha-97", torch.float32, seed, requires_grad=True)
    out, lse = fct.attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


@gpu
@pytest.mark.parametrize("which", ["q", "k", "v", "kv", "qv"])
def test_any_subset_requires_grad(which, seed):
    q, k, v = make_inputs("mqa-128x200-d40", torch.float64, seed)
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(name in which)
    out = fct.attention(q, k, v, causal=True)
    dout = randn(out.shape, torch.float64, seed + 3)
    out.backward(dout)
    _, _, ref_grads = reference(q, k, v, True, dout=dout)
    for name, t, r in zip("qkv", (q, k, v), ref_grads):
        if name in which:
            assert_close("d" + name, t.grad, r, grad=True)
        else:
            assert t.grad is None


@gpu
def test_no_grad_and_inference_mode(seed):
    q, k, v = make_inputs("mha-97", torch.float64, seed, requires_grad=True)
    ref_out, _ = reference(q, k, v, True)
    with torch.no_grad():
        out = fct.attention(q, k, v, causal=True)
    assert not out.requires_grad
    assert_close("out", out, ref_out)
    with torch.inference_mode():
        out = fct.attention(q.detach(), k.detach(), v.detach(), causal=True)
    assert_close("out", out, ref_out)


@gpu
@pytest.mark.parametrize("kind", ["expanded", "transposed", "sliced"])
def test_incoming_gradient_layouts(kind, seed):
    """dout as autograd hands it over: stride-0 expanded, transposed, or sliced views."""
    q, k, v = make_inputs("mha-97", torch.float64, seed, requires_grad=True)
    out = fct.attention(q, k, v, causal=True)
    shape = out.shape
    if kind == "expanded":  # the gradient of out.sum() * c is a fully expanded tensor
        dout = randn((shape[-1],), torch.float64, seed + 3).expand(shape)
    elif kind == "transposed":
        dout = randn((shape[0], shape[2], shape[1], shape[3]), torch.float64,
                     seed + 3).transpose(1, 2)
    else:
        dout = randn((*shape[:-1], 2 * shape[-1]), torch.float64, seed + 3)[..., ::2]
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _, _, ref_grads = reference(q, k, v, True, dout=dout)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r, grad=True)


@gpu
def test_expanded_and_transposed_inputs(seed):
    """(B, S, H, D) storage seen as (B, H, S, D); k/v heads expanded with stride 0."""
    B, S, H, D = 2, 80, 4, 64
    q = randn((B, S, H, D), torch.float64, seed).transpose(1, 2).requires_grad_()
    k1 = randn((B, S, 1, D), torch.float64, seed + 1).transpose(1, 2).requires_grad_()
    v1 = randn((B, S, 1, D), torch.float64, seed + 2).transpose(1, 2).requires_grad_()
    k, v = k1.expand(B, H, S, D), v1.expand(B, H, S, D)
    out = fct.attention(q, k, v, causal=True)
    dout = randn(out.shape, torch.float64, seed + 3)
    out.backward(dout)
    ref_out, _, (rq, rk, rv) = reference(q, k1, v1, True, dout=dout)
    assert_close("out", out, ref_out)
    assert_close("dq", q.grad, rq, grad=True)
    assert_close("dk", k1.grad, rk, grad=True)
    assert_close("dv", v1.grad, rv, grad=True)


# ----------------------------------------------------------------------------
# zero copies, allocator, streams, devices
# ----------------------------------------------------------------------------

@gpu
def test_zero_copy_forward(spy, seed):
    B, S, H, D = 2, 64, 4, 64
    x = randn((B, S, 3, H, D), torch.float16, seed)          # a fused qkv projection
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # strided views, no copies
    k = k[:, :1].expand(B, H, S, D)                           # stride-0 head axis
    out, lse = fct.attention(q, k, v, return_lse=True)
    (call,) = spy
    a = call["arrays"]
    for name, t in dict(q=q, k=k, v=v, out=out, lse=lse).items():
        same_memory(a[name], t)
    assert a["k"].strides[1] == 0
    assert call["torch_alloc"], "CuPy allocations inside the op must come from torch"


@gpu
def test_zero_copy_backward(spy, seed):
    q, k, v = make_inputs("mqa-128x200-d40", torch.bfloat16, seed)
    out, lse = torch.ops.flashcupy.attention_fwd(q, k, v, False, None)
    dout = randn(out.shape, torch.bfloat16, seed + 3)
    dq, dk, dv, _, _ = torch.ops.flashcupy.attention_bwd(dout, q, k, v, out, lse, False, None,
                                                         False)
    call = spy[-1]
    assert call["kind"] == "bwd"
    a = call["arrays"]
    for name, t in dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse, dq=dq, dk=dk, dv=dv).items():
        same_memory(a[name], t)
    assert call["torch_alloc"]


@gpu
def test_workspaces_do_not_touch_cupy_pool(seed):
    pool = cupy.get_default_memory_pool()
    q, k, v = make_inputs("mha-97", torch.float32, seed, requires_grad=True)
    fct.attention(q, k, v, causal=True).sum().backward()  # warm-up: compile kernels
    torch.cuda.synchronize()
    used, total = pool.used_bytes(), pool.total_bytes()
    for _ in range(2):
        fct.attention(q, k, v, causal=True).sum().backward()
        assert pool.used_bytes() == used and pool.total_bytes() == total
    torch.cuda.synchronize()


@gpu
def test_deterministic_flag_follows_torch(spy, seed):
    q, k, v = make_inputs("mha-97", torch.float32, seed, requires_grad=True)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        fct.attention(q, k, v).backward(torch.ones(q.shape, device=q.device))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert spy[-1]["kind"] == "bwd" and spy[-1]["kw"]["deterministic"] is True


@gpu
def test_side_stream(spy, seed):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # inputs made on the side stream by a long chain: reading them on any other
        # stream without a sync would race
        base = randn((2048, 2048), torch.float32, seed)
        for _ in range(4):
            base = base @ base / 45.0
        q = base[:32].reshape(2, 4, 128, 64).requires_grad_()
        k = base[32:64].reshape(2, 4, 128, 64).requires_grad_()
        v = randn((2, 4, 128, 64), torch.float32, seed + 1, requires_grad=True)
        out = fct.attention(q, k, v, causal=True)
        dout = randn(out.shape, torch.float32, seed + 3)
        out.backward(dout)
    torch.cuda.current_stream().wait_stream(side)
    assert [c["stream"] for c in spy] == [side.cuda_stream, side.cuda_stream]
    ref_out, _, ref_grads = reference(q, k, v, True, dout=dout)
    _, _, naive_grads = naive_in_dtype(q, k, v, True, dout=dout)
    naive_out, _ = naive_in_dtype(q, k, v, True)
    assert_close("out", out, ref_out, naive_out)
    for name, t, r, n in zip(("dq", "dk", "dv"), (q, k, v), ref_grads, naive_grads):
        assert_close(name, t.grad, r, n, grad=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_plan_replay(spy, dtype, seed):
    """Repeated signatures replay the first call's plan on raw pointers (no CuPy
    views): new inputs, new outputs, workspaces from PyTorch, PyTorch's current
    stream (a side stream here, with inputs still being produced on it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    results = []
    with torch.cuda.stream(side):
        for trial in range(3):
            base = randn((1024, 1024), torch.float32, seed + trial)
            for _ in range(4):  # a long producer chain on the side stream
                base = base @ base / 32.0
            q = base[:32].reshape(2, 2, 128, 64).to(dtype).requires_grad_()
            k = base[32:64].reshape(2, 2, 128, 64).to(dtype).requires_grad_()
            v = randn((2, 2, 128, 64), dtype, seed + trial + 100, requires_grad=True)
            out = fct.attention(q, k, v, causal=True)
            dout = randn(out.shape, dtype, seed + trial + 200)
            out.backward(dout)
            results.append((q, k, v, dout, out))
    torch.cuda.current_stream().wait_stream(side)
    # the core saw only the first call of each signature; the rest were replays
    assert [c["kind"] for c in spy] == ["fwd", "bwd"]
    assert len(fct._PLANS) == 2
    for q, k, v, dout, out in results:
        ref_out, _, ref_grads = reference(q, k, v, True, dout=dout)
        _, _, naive_grads = naive_in_dtype(q, k, v, True, dout=dout)
        naive_out, _ = naive_in_dtype(q, k, v, True)
        assert_close("out", out, ref_out, naive_out)
        for name, t, r, n in zip(("dq", "dk", "dv"), (q, k, v), ref_grads, naive_grads):
            assert_close(name, t.grad, r, n, grad=True)


@gpu
def test_default_stream_used(spy, seed):
    q, k, v = make_inputs("mha-97", torch.float32, seed)
    fct.attention(q, k, v)
    assert spy[0]["stream"] == torch.cuda.current_stream().cuda_stream


def _graph_inputs(dtype, seed, trial):
    s = seed + 10 * trial
    return (randn((2, 4, 128, 64), dtype, s), randn((2, 1, 160, 64), dtype, s + 1),
            randn((2, 1, 160, 64), dtype, s + 2), randn((2, 4, 128, 64), dtype, s + 3))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=DT_IDS.get)
def test_cuda_graph_capture_and_replay(dtype, seed):
    q0, k0, v0, dout0 = _graph_inputs(dtype, seed, 0)
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    dout = dout0.clone()

    def step():
        out, lse = fct.attention(q, k, v, causal=True, return_lse=True)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    # warm up on a side stream (compiles the kernels; PyTorch's documented recipe)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    pool = cupy.get_default_memory_pool()
    used, total = pool.used_bytes(), pool.total_bytes()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    assert pool.used_bytes() == used and pool.total_bytes() == total, (
        "CuPy's pool was used during capture")

    for trial in range(1, 4):  # new contents in the static inputs, then replay
        new = _graph_inputs(dtype, seed, trial)
        with torch.no_grad():
            for dst, src in zip((q, k, v, dout), new):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        qe, ke, ve = (t.clone().requires_grad_() for t in new[:3])
        oute, lsee = fct.attention(qe, ke, ve, causal=True, return_lse=True)
        eager = (oute, lsee, *torch.autograd.grad(oute, (qe, ke, ve), new[3]))
        # the forward is deterministic: bit-identical to eager
        torch.testing.assert_close(static[0], eager[0], rtol=0, atol=0)
        torch.testing.assert_close(static[1], eager[1], rtol=0, atol=0)
        # the backward may sum in a different order (atomics): compare with the rule
        _, _, ref_grads = reference(qe, ke, ve, True, dout=new[3])
        _, _, naive_grads = naive_in_dtype(qe, ke, ve, True, dout=new[3])
        for name, g, r, n in zip(("dq", "dk", "dv"), static[2:], ref_grads, naive_grads):
            assert_close(name, g, r, n, grad=True)


@gpu
@two_gpus
def test_second_device(seed):
    dev = torch.device("cuda", 1)
    before = torch.cuda.current_device()
    q, k, v = (randn(s, torch.float32, seed + i, device=dev, requires_grad=True)
               for i, s in enumerate(CASES["mqa-128x200-d40"]))
    out, lse = fct.attention(q, k, v, causal=True, return_lse=True)
    dout = randn(out.shape, torch.float32, seed + 3, device=dev)
    out.backward(dout)
    assert out.device == dev and lse.device == dev and q.grad.device == dev
    assert torch.cuda.current_device() == before
    ref_out, ref_lse, ref_grads = reference(q, k, v, True, dout=dout)
    n_out, n_lse, n_grads = naive_in_dtype(q, k, v, True, dout=dout)
    assert_close("out", out, ref_out, n_out)
    assert_close("lse", lse, ref_lse, n_lse)
    for name, t, r, n in zip(("dq", "dk", "dv"), (q, k, v), ref_grads, n_grads):
        assert_close(name, t.grad, r, n, grad=True)


@gpu
@two_gpus
def test_second_device_on_its_side_stream(spy, seed):
    dev = torch.device("cuda", 1)
    side = torch.cuda.Stream(device=dev)
    with torch.cuda.device(dev), torch.cuda.stream(side):
        q = randn((1, 2, 64, 64), torch.float32, seed, device=dev)
        fct.attention(q, q, q)
    torch.cuda.synchronize(dev)
    assert spy[0]["device"] == 1 and spy[0]["stream"] == side.cuda_stream


# ----------------------------------------------------------------------------
# opcheck, gradcheck, torch.compile
# ----------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS.get)
def test_opcheck(dtype, causal, seed):
    q = randn((2, 3, 33, 32), dtype, seed, requires_grad=True)
    k = randn((2, 1, 47, 32), dtype, seed + 1, requires_grad=True)
    v = randn((1, 1, 47, 16), dtype, seed + 2, requires_grad=True)
    torch.library.opcheck(torch.ops.flashcupy.attention_fwd.default, (q, k, v, causal, None))
    torch.library.opcheck(torch.ops.flashcupy.attention_fwd.default, (q, k, v, causal, 0.5))
    with torch.no_grad():
        out, lse = torch.ops.flashcupy.attention_fwd(q, k, v, causal, None)
    dout = randn(out.shape, dtype, seed + 3)
    args = (dout, q.detach(), k.detach(), v.detach(), out, lse, causal, None, False)
    torch.library.opcheck(torch.ops.flashcupy.attention_bwd.default, args)


@gpu
@pytest.mark.parametrize("lens", [(6, 9), (9, 6)], ids=["sq<sk", "sq>sk"])
@pytest.mark.parametrize("kv_batch", [(2, 3), (2, 1), (1, 1)], ids=["mha", "mqa", "shared"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck(causal, kv_batch, lens, seed):
    sq, sk = lens
    q = randn((2, 3, sq, 16), torch.float64, seed, requires_grad=True)
    k = randn((*kv_batch, sk, 16), torch.float64, seed + 1, requires_grad=True)
    v = randn((*kv_batch, sk, 8), torch.float64, seed + 2, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fct.attention(q, k, v, causal=causal), (q, k, v))


@gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, seed):
    def loss_fn(q, k, v, w):
        o = fct.attention(q, k, v, causal=True)
        return (o.float() * w).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    q, k, v = make_inputs("gqa-113x77-d128", torch.bfloat16, seed, requires_grad=True)
    w = randn((113, 128), torch.float32, seed + 3)
    for _ in range(2):  # second call: the cached graph
        loss_c = compiled(q, k, v, w)
        grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = loss_fn(q, k, v, w)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-3)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=2e-2, atol=2e-2)


@gpu
def test_compile_sdpa_gqa(seed):
    def f(q, k, v):
        return fct.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q = randn((2, 8, 64, 64), torch.float64, seed, requires_grad=True)
    k = randn((2, 2, 64, 64), torch.float64, seed + 1, requires_grad=True)
    v = randn((2, 2, 64, 64), torch.float64, seed + 2, requires_grad=True)
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads_c = torch.autograd.grad(out_c.sum(), (q, k, v))
    out_e = f(q, k, v)
    grads_e = torch.autograd.grad(out_e.sum(), (q, k, v))
    torch.testing.assert_close(out_c, out_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


# ----------------------------------------------------------------------------
# variants on the GPU: window, softcap, ALiBi, sink
# ----------------------------------------------------------------------------

# True for alibi_slopes / sink: a per-head tensor of the case's HEAD_SHAPES
VARIANTS = {
    "window": dict(window=(17, 5)),
    "causal-left": dict(causal=True, window=(24, None)),
    "right-only": dict(window=(None, 3)),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi_slopes=True),
    "sink": dict(sink=True),
    "window-softcap-sink": dict(window=(20, 8), softcap=3.0, sink=True),
    "all": dict(causal=True, window=(30, None), softcap=4.0, alibi_slopes=True, sink=True),
}
# per-head shapes, broadcast to the batch dims of each case: (H,) against (B, H),
# (B, H), and (Hkv, G) for the grouped case
HEAD_SHAPES = {"mha-97": (3,), "mqa-128x200-d40": (1, 4), "gqa-113x77-d128": (2, 3),
               "decode-1x65-dv48": (1, 2)}
VARIANT_CASES = ([(c, name) for c in ("mha-97", "gqa-113x77-d128") for name in VARIANTS]
                 + [("mqa-128x200-d40", "all"), ("decode-1x65-dv48", "window-softcap-sink")])


def variant_kwargs(name, case, seed, requires_grad=False):
    """The keywords of VARIANTS[name], with float32 slopes and sink on the GPU."""
    kw = dict(VARIANTS[name])
    shape = HEAD_SHAPES[case]
    if kw.get("alibi_slopes"):
        kw["alibi_slopes"] = rand_slopes(shape, seed)
    if kw.get("sink"):
        kw["sink"] = (randn(shape, torch.float32, seed + 1) * 1.5).requires_grad_(requires_grad)
    return kw


@gpu
@pytest.mark.parametrize("case, variant", VARIANT_CASES, ids=[f"{c}-{v}" for c, v in VARIANT_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_variant_forward(dtype, case, variant, seed):
    q, k, v = make_inputs(case, dtype, seed)
    kw = variant_kwargs(variant, case, seed + 10)
    out, lse = fct.attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = reference(q, k, v, **kw)
    naive = naive_in_dtype(q, k, v, **kw) if dtype != torch.float64 else (None, None)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close("out", out, ref_out, naive[0])
    assert_close("lse", lse, ref_lse, naive[1])


@gpu
@pytest.mark.parametrize("case, variant", VARIANT_CASES, ids=[f"{c}-{v}" for c, v in VARIANT_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_variant_backward(dtype, case, variant, seed):
    """dq, dk, dv and dsink (float32, the sink's shape: summed over the axes the
    sink broadcasts along) against the float64 reference."""
    q, k, v = make_inputs(case, dtype, seed, requires_grad=True)
    kw = variant_kwargs(variant, case, seed + 10, requires_grad=True)
    out = fct.attention(q, k, v, **kw)
    dout = randn(out.shape, dtype, seed + 3)
    wrt = (q, k, v) + ((kw["sink"],) if "sink" in kw else ())
    grads = torch.autograd.grad(out, wrt, dout)
    _, _, ref_grads = reference(q, k, v, dout=dout, **kw)
    naive_grads = (naive_in_dtype(q, k, v, dout=dout, **kw)[2] if dtype != torch.float64
                   else (None,) * len(wrt))
    for name, g, r, n, t in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, naive_grads, wrt):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close(name, g, r, n, grad=True)


@gpu
@pytest.mark.parametrize("sink_shape", [(2, 3), (3,), (2, 2, 3), "expanded"],
                         ids=["hkv-g", "g", "b-hkv-g", "expanded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=DT_IDS.get)
def test_gqa_per_head_sink(dtype, sink_shape, seed):
    """q (B, Hkv, G, S, D) against k/v (B, Hkv, 1, S, D) with a sink per query
    head (Hkv, G) (and per-head slopes), or a sink broadcast over Hkv, over
    nothing, or expanded with stride 0: its gradient has its shape."""
    q = randn((2, 2, 3, 70, 64), dtype, seed, requires_grad=True)
    k = randn((2, 2, 1, 90, 64), dtype, seed + 1, requires_grad=True)
    v = randn((2, 2, 1, 90, 64), dtype, seed + 2, requires_grad=True)
    leaf_shape = (2, 3) if sink_shape == "expanded" else sink_shape
    leaf = (randn(leaf_shape, torch.float32, seed + 3) * 1.5).requires_grad_()
    sink = leaf.expand(2, 2, 3) if sink_shape == "expanded" else leaf
    kw = dict(causal=True, window=(40, None), alibi_slopes=rand_slopes((2, 3), seed + 4))
    out = fct.attention(q, k, v, sink=sink, **kw)
    dout = randn(out.shape, dtype, seed + 5)
    grads = torch.autograd.grad(out, (q, k, v, leaf), dout)
    ref_out, _, ref_grads = reference(q, k, v, dout=dout, sink=leaf, **kw)
    n_out, _, n_grads = (naive_in_dtype(q, k, v, dout=dout, sink=leaf, **kw)
                         if dtype != torch.float64 else (None, None, (None,) * 4))
    assert grads[3].shape == leaf.shape and grads[3].dtype == torch.float32
    assert_close("out", out, ref_out, n_out)
    for name, g, r, n in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, n_grads):
        assert_close(name, g, r, n, grad=True)


@gpu
def test_alibi_not_differentiable(seed):
    q, k, v = make_inputs("mha-97", torch.float64, seed, requires_grad=True)
    slopes = rand_slopes((3,), seed + 4).requires_grad_()
    out = fct.attention(q, k, v, causal=True, alibi_slopes=slopes)
    dout = randn(out.shape, torch.float64, seed + 3)
    out.backward(dout)
    assert slopes.grad is None
    _, _, ref_grads = reference(q, k, v, True, dout=dout, alibi_slopes=slopes)
    for name, t, r in zip(("dq", "dk", "dv"), (q, k, v), ref_grads):
        assert_close(name, t.grad, r, grad=True)


@gpu
@pytest.mark.filterwarnings("ignore:Input #3 requires gradient and is not a double")
@pytest.mark.parametrize("lens", [(6, 9), (9, 6)], ids=["sq<sk", "sq>sk"])
@pytest.mark.parametrize("kv_batch", [(2, 3), (2, 1), (1, 1)], ids=["mha", "mqa", "shared"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_window_softcap_sink(causal, kv_batch, lens, seed):
    """float64 gradcheck with window + softcap + sink together; the sink (float32,
    (H,) broadcast over B) is checked too: its values are multiples of 2**-6 and
    eps = 2**-12, so its finite differences are exact perturbations."""
    sq, sk = lens
    q = randn((2, 3, sq, 16), torch.float64, seed, requires_grad=True)
    k = randn((*kv_batch, sk, 16), torch.float64, seed + 1, requires_grad=True)
    v = randn((*kv_batch, sk, 8), torch.float64, seed + 2, requires_grad=True)
    sink = exact_sink((3,), seed + 3).requires_grad_()

    def f(q, k, v, sink):
        return fct.attention(q, k, v, causal=causal, window=(3, 1), softcap=1.5, sink=sink)

    assert torch.autograd.gradcheck(f, (q, k, v, sink), eps=2**-12)


@gpu
@pytest.mark.parametrize("kv_batch", [(2, 3), (2, 1)], ids=["mha", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_alibi(causal, kv_batch, seed):
    q = randn((2, 3, 7, 16), torch.float64, seed, requires_grad=True)
    k = randn((*kv_batch, 10, 16), torch.float64, seed + 1, requires_grad=True)
    v = randn((*kv_batch, 10, 8), torch.float64, seed + 2, requires_grad=True)
    slopes = rand_slopes((2, 3), seed + 3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fct.attention(q, k, v, causal=causal, alibi_slopes=slopes), (q, k, v))


@gpu
@pytest.mark.parametrize("alibi", [False, True], ids=["no-alibi", "alibi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS.get)
def test_opcheck_variants(dtype, alibi, seed):
    """opcheck of both operators with window + softcap + sink (+ ALiBi)."""
    q = randn((2, 3, 33, 32), dtype, seed, requires_grad=True)
    k = randn((2, 1, 47, 32), dtype, seed + 1, requires_grad=True)
    v = randn((1, 1, 47, 16), dtype, seed + 2, requires_grad=True)
    sink = (randn((3,), torch.float32, seed + 3) * 1.5).requires_grad_()
    slopes = rand_slopes((2, 3), seed + 4) if alibi else None
    args = (q, k, v, False, None, 9, 2, 10.0, slopes, sink)
    torch.library.opcheck(torch.ops.flashcupy.attention_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.flashcupy.attention_fwd(*args)
    dout = randn(out.shape, dtype, seed + 5)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out, lse, False, None, False,
                9, 2, 10.0, slopes, sink.detach())
    torch.library.opcheck(torch.ops.flashcupy.attention_bwd.default, bwd_args)


@gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_variants(backend, seed):
    """torch.compile(fullgraph=True) with window + softcap + sink, backward
    (dsink included) as in eager."""
    def loss_fn(q, k, v, sink, w):
        o = fct.attention(q, k, v, causal=True, window=(32, None), softcap=20.0, sink=sink)
        return (o.float() * w).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    q, k, v = make_inputs("gqa-113x77-d128", torch.bfloat16, seed, requires_grad=True)
    sink = (randn((2, 3), torch.float32, seed + 4) * 1.5).requires_grad_()
    w = randn((113, 128), torch.float32, seed + 3)
    for _ in range(2):  # second call: the cached graph
        loss_c = compiled(q, k, v, sink, w)
        grads_c = torch.autograd.grad(loss_c, (q, k, v, sink))
    loss_e = loss_fn(q, k, v, sink, w)
    grads_e = torch.autograd.grad(loss_e, (q, k, v, sink))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-3)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=2e-2, atol=2e-2)


@gpu
def test_plan_key_window(spy, seed):
    """Two windows in a row give different, correct results: a window's plan is
    never replayed for another; the second call of a signature replays."""
    q, k, v = make_inputs("mha-97", torch.float32, seed)
    windows = [(8, 0), (24, 0), (8, 0), (24, 0)]
    outs = [fct.attention(q, k, v, window=w) for w in windows]
    assert [c["kind"] for c in spy] == ["fwd", "fwd"]  # calls 3 and 4 replayed
    assert len(fct._PLANS) == 2
    assert not torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    for w, out in zip(windows, outs):
        ref_out, _ = reference(q, k, v, window=w)
        naive_out, _ = naive_in_dtype(q, k, v, window=w)
        assert_close(f"out window={w}", out, ref_out, naive_out)


@gpu
def test_plan_replay_variant_tensors(spy, seed):
    """A replay takes the call's own slopes and sink (the plan holds their
    metadata, the environment their pointers).  The backward with a sink has
    a CuPy step (dsink), so it goes through the core every call."""
    q, k, v = make_inputs("mha-97", torch.float32, seed)
    kw = dict(window=(16, 0), softcap=5.0)
    results = []
    for trial in range(3):
        slopes = rand_slopes((3,), seed + trial)
        sink = randn((2, 3), torch.float32, seed + 10 + trial)
        with torch.no_grad():
            out, lse = fct.attention(q, k, v, return_lse=True, alibi_slopes=slopes, sink=sink,
                                     **kw)
        results.append((slopes, sink, out, lse))
    assert [c["kind"] for c in spy] == ["fwd"]
    for slopes, sink, out, lse in results:
        ref_out, ref_lse = reference(q, k, v, alibi_slopes=slopes, sink=sink, **kw)
        n_out, n_lse = naive_in_dtype(q, k, v, alibi_slopes=slopes, sink=sink, **kw)
        assert_close("out", out, ref_out, n_out)
        assert_close("lse", lse, ref_lse, n_lse)

    spy.clear()
    for trial in range(2):  # with gradients: ALiBi alone replays, a sink does not
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        slopes = rand_slopes((3,), seed + 20 + trial)
        sink = randn((3,), torch.float32, seed + 30 + trial, requires_grad=True)
        for extra in (dict(alibi_slopes=slopes), dict(alibi_slopes=slopes, sink=sink)):
            out = fct.attention(qg, kg, vg, **kw, **extra)
            dout = randn(out.shape, torch.float32, seed + 40 + trial)
            wrt = (qg, kg, vg) + ((sink,) if "sink" in extra else ())
            grads = torch.autograd.grad(out, wrt, dout)
            _, _, ref_grads = reference(qg, kg, vg, dout=dout, **kw, **extra)
            _, _, n_grads = naive_in_dtype(qg, kg, vg, dout=dout, **kw, **extra)
            for name, g, r, n in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, n_grads):
                assert_close(name, g, r, n, grad=True)
    kinds = [c["kind"] for c in spy]
    # trial 0: fwd+bwd (alibi), fwd+bwd (alibi+sink); trial 1: the sink's backward only
    assert kinds == ["fwd", "bwd", "fwd", "bwd", "bwd"], kinds


# ----------------------------------------------------------------------------
# scaled_dot_product_attention as a drop-in
# ----------------------------------------------------------------------------

SDPA_CASES = {
    "plain": ((2, 4, 70, 64), (2, 4, 90, 64), (2, 4, 90, 64), {}),
    "causal": ((2, 4, 70, 64), (2, 4, 70, 64), (2, 4, 70, 64), dict(is_causal=True)),
    "scale": ((2, 4, 70, 64), (2, 4, 90, 64), (2, 4, 90, 32), dict(scale=0.3)),
    "gqa": ((2, 8, 70, 64), (2, 2, 90, 64), (2, 2, 90, 64), dict(enable_gqa=True)),
    "gqa-causal-scale": ((2, 6, 70, 64), (2, 3, 70, 64), (2, 3, 70, 64),
                         dict(enable_gqa=True, is_causal=True, scale=0.2)),
    "3d": ((4, 50, 32), (4, 50, 32), (4, 50, 32), dict(is_causal=True)),
}


@gpu
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_matches_torch(case, seed):
    qs, ks, vs, kw = SDPA_CASES[case]
    q = randn(qs, torch.float64, seed, requires_grad=True)
    k = randn(ks, torch.float64, seed + 1, requires_grad=True)
    v = randn(vs, torch.float64, seed + 2, requires_grad=True)
    out = fct.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    dout = randn(out.shape, torch.float64, seed + 3)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert_close("out", out, ref)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r, grad=True)


@gpu
def test_autocast_casts_like_sdpa(seed):
    q, k, v = make_inputs("mha-97", torch.float32, seed, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fct.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    assert_close("out", out, reference(qb, kb, vb, True)[0], naive_in_dtype(qb, kb, vb, True)[0])
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.float32


@gpu
def test_sdpa_gqa_views_are_zero_copy(spy, seed):
    q = randn((2, 8, 64, 64), torch.float16, seed)
    k = randn((2, 2, 64, 64), torch.float16, seed + 1)
    out = fct.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    a = spy[0]["arrays"]
    assert a["q"].data.ptr == q.data_ptr() and a["q"].shape == (2, 2, 4, 64, 64)
    assert a["k"].data.ptr == k.data_ptr() and a["k"].shape == (2, 2, 1, 64, 64)
    assert out.shape == (2, 8, 64, 64) and out.data_ptr() == a["out"].data.ptr


# ----------------------------------------------------------------------------
# errors, all before any launch
# ----------------------------------------------------------------------------

def _qkv(dtype=torch.float16, shape=(1, 2, 16, 32)):
    return tuple(torch.randn(shape, device="cuda").to(dtype) for _ in range(3))


@gpu
def test_error_mixed_dtypes(no_launch):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k is float32"):
        fct.attention(q, k.float(), v)


@gpu
def test_error_unsupported_dtype(no_launch):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="int32"):
        fct.attention(q.int(), k.int(), v.int())


@gpu
def test_error_mixed_cpu_and_cuda(no_launch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="v must be a CUDA tensor"):
        fct.attention(q, k, v.cpu())


@gpu
@two_gpus
def test_error_mixed_gpus(no_launch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one device"):
        fct.attention(q, k.to("cuda:1"), v)


@gpu
@pytest.mark.parametrize("bad", ["head_dim", "kv_len", "batch", "ndim"])
def test_error_shapes(bad, no_launch):
    q, k, v = _qkv()
    if bad == "head_dim":
        k = k[..., :16]
    elif bad == "kv_len":
        v = v[..., :8, :]
    elif bad == "batch":
        k = torch.randn(1, 3, 16, 32, device="cuda").half()
    else:
        q = q[0, 0, 0]
    with pytest.raises(ValueError):
        fct.attention(q, k, v)


@gpu
def test_error_bad_scale(no_launch):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="scale"):
        fct.attention(q, k, v, scale="0.1")


@gpu
def test_error_sdpa_gqa_heads(no_launch):
    q = torch.randn(1, 6, 16, 32, device="cuda").half()
    k = torch.randn(1, 4, 16, 32, device="cuda").half()
    with pytest.raises(ValueError, match="multiple"):
        fct.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match="same number of heads"):
        fct.scaled_dot_product_attention(q, k[:, :2], k[:, :3], enable_gqa=True)


@gpu
@pytest.mark.parametrize("bad", list(BAD_VARIANT_TENSORS) + ["sink-on-cpu"])
def test_error_variant_tensors(bad, no_launch):
    """The slopes and sink against CUDA q, k, v: dtype, shape, type, device."""
    q, k, v = _qkv()
    if bad == "sink-on-cpu":
        kw, exc, match = dict(sink=lambda: torch.zeros(2)), ValueError, (
            r"sink is on cpu but q, k and v are on cuda:0")
    else:
        kw, exc, match = BAD_VARIANT_TENSORS[bad]
        if "device" in bad:
            match = match.replace("are on cpu", "are on cuda:0")
    args = {n: make() for n, make in kw.items()}
    args = {n: (x.to(q.device) if isinstance(x, torch.Tensor) and x.device.type == "cpu"
                and bad != "sink-on-cpu" else x) for n, x in args.items()}
    with pytest.raises(exc, match=r"attention\(\): " + match):
        fct.attention(q, k, v, **args)


@gpu
def test_error_variant_scalars_on_gpu(no_launch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"softcap must be a finite number > 0"):
        fct.attention(q, k, v, softcap=float("nan"))


@gpu
def test_double_backward_raises_on_both_nodes(seed):
    """The gradients are not differentiable: a second backward through them
    raises, from the checked route's node and from the fast entry's (which
    skips once_differentiable's wrapper only when no graph is being built),
    and a first backward with create_graph=True still gives the same
    gradients as one without."""
    q, k, v = (randn((2, 3, 80, 64), torch.bfloat16, seed + i).requires_grad_(True)
               for i in range(3))
    # (dout requires grad: else once_differentiable has nothing to guard, and the
    # gradients simply do not require grad)
    dout = randn((2, 3, 80, 64), torch.bfloat16, seed + 5).requires_grad_(True)
    names = []
    for _ in range(3):  # the first call is checked, later ones take the fast entry
        out = fct.attention(q, k, v, causal=True)
        names.append(type(out.grad_fn).__name__)
        plain = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout, create_graph=True)
        assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), plain))
        with pytest.raises(RuntimeError, match="once_differentiable"):
            (dq.float().sum() + dv.float().sum()).backward()
    assert names[0].startswith("_EagerAttention") and names[-1].startswith("_PlainAttention")


@gpu
def test_backward_follows_the_saved_tensors_layout(seed):
    """A saved-tensor hook may hand back the forward's tensors in another layout
    (save_on_cpu copies a strided view into a contiguous tensor): the backward's
    plan, keyed on its forward's, must still follow the strides of the tensors
    it is given, on the checked route and the fast entry alike."""
    xs = [randn((2, 80, 3, 64), torch.bfloat16, seed + i).requires_grad_(True) for i in range(3)]
    dout = randn((2, 3, 80, 64), torch.bfloat16, seed + 5)
    q, k, v = (x.transpose(1, 2) for x in xs)  # (B, H, S, D) views of (B, S, H, D)
    ref, _, ref_grads = reference(q, k, v, True, dout=dout)
    _, _, naive_grads = naive_in_dtype(q, k, v, True, dout=dout)
    for hooked in (False, False, True, True):  # each: the checked route, then the fast entry
        ctx = (torch.autograd.graph.save_on_cpu(pin_memory=True) if hooked
               else contextlib.nullcontext())
        with ctx:
            out = fct.attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out, xs, dout)
        for name, g, r, n in zip(("dq", "dk", "dv"), grads, ref_grads, naive_grads):
            assert_close(name, g.transpose(1, 2), r, n, grad=True)
