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
  (``cpu_kernels``: the float64 reference as the kernel).

Tests marked ``gpu`` skip without a CUDA GPU; the rest (import hygiene, fake
shapes on meta tensors, errors on CPU tensors) run anywhere PyTorch does.
"""
from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import cupy  # noqa: E402

import flashcupy.torch as fct  # noqa: E402
from flashcupy import _plan, api  # noqa: E402

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
                    alibi_slopes=None, sink=None):
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
    out = p @ v
    lse = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))),
                      torch.full_like(l, float("-inf")))
    return out, lse.squeeze(-1)


# floor of the rule in ulps at |ref| + 0.3, as in tests/_assert.py
FWD_ULPS = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 8, torch.float64: 2**16}
GRAD_ULPS = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 16, torch.float64: 2**18}


def assert_close(name, actual, ref, naive=None, *, grad=False):
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
    ref_max = r.abs().max().item() if r.numel() else 0.0
    ulps = (GRAD_ULPS if grad else FWD_ULPS)[actual.dtype]
    floor = ulps * torch.finfo(actual.dtype).eps * (ref_max + 0.3)
    tol = 2.0 * naive_err + floor
    assert err <= tol, (f"{name} ({actual.dtype}): max error {err:.3e} > tolerance {tol:.3e} = "
                        f"2 x naive error {naive_err:.3e} + floor {floor:.3e}")


def reference(q, k, v, causal=False, scale=None, dout=None, *, window=None, softcap=None,
              alibi_slopes=None, sink=None):
    """float64 (out, lse) and, with ``dout``, float64 (dq, dk, dv), plus dsink
    (float64, the sink's shape) when a sink is given."""
    grad = dout is not None
    q64, k64, v64 = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    a64 = None if alibi_slopes is None else alibi_slopes.detach().double()
    s64 = None if sink is None else sink.detach().double().requires_grad_(grad)
    out, lse = naive_attention(q64, k64, v64, causal, scale, window, softcap, a64, s64)
    if dout is None:
        return out, lse
    wrt = (q64, k64, v64) if sink is None else (q64, k64, v64, s64)
    return out, lse, torch.autograd.grad(out, wrt, dout.double())


def naive_in_dtype(q, k, v, causal=False, scale=None, dout=None, *, window=None, softcap=None,
                   alibi_slopes=None, sink=None):
    grad = dout is not None
    qd, kd, vd = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    sd = None if sink is None else sink.detach().clone().requires_grad_(grad)
    al = None if alibi_slopes is None else alibi_slopes.detach()
    out, lse = naive_attention(qd, kd, vd, causal, scale, window, softcap, al, sd)
    if dout is None:
        return out, lse
    wrt = (qd, kd, vd) if sink is None else (qd, kd, vd, sd)
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
                             dq=kw["dq"], dk=kw["dk"], dv=kw["dv"]), kw)
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
    dq, dk, dv, dsink = torch.ops.flashcupy.attention_bwd(out, q, k, v, out, lse, True, None,
                                                          False)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    assert dsink.shape == (0,) and dsink.dtype == torch.float32  # no sink: empty


def test_cpu_tensors_rejected(no_launch):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        fct.attention(q, q, q)
    with pytest.raises(ValueError, match="query must be a CUDA tensor"):
        fct.scaled_dot_product_attention(q, q, q)


def test_sdpa_unsupported_arguments(no_launch):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        fct.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fct.scaled_dot_product_attention(q, q, q, dropout_p=0.1)


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
    dq, dk, dv, dsink = torch.ops.flashcupy.attention_bwd(
        out, q, k, v, out, lse, False, None, False, 4, 0, 30.0, alibi, sink)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dsink.shape == (3,) and dsink.dtype == torch.float32 and dsink.is_contiguous()
    schema = str(torch.ops.flashcupy.attention_fwd.default._schema)
    for arg in ("int? window_left=None", "int? window_right=None", "float? softcap=None",
                "Tensor? alibi=None", "Tensor? sink=None"):
        assert arg in schema
    assert str(torch.ops.flashcupy.attention_bwd.default._schema).endswith(
        "-> (Tensor, Tensor, Tensor, Tensor)")


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

    keys = [key(), key(window_left=8, window_right=0), key(window_left=16, window_right=0),
            key(window_left=8), key(window_right=0), key(window_left=0, window_right=8),
            key(softcap=5.0), key(softcap=6.0), key(extras=(a, None)), key(extras=(None, s1)),
            key(extras=(a, s1)), key(extras=(None, s2)), key(extras=(None, s1.expand(2, 3))),
            fct._plan_key("fwd", (q, q, q), True, None, window_left=8)]
    assert len(set(keys)) == len(keys)
    assert all(kk[0] == "torch" for kk in keys)
    assert key(window_left=8, window_right=0, softcap=5.0, extras=(a, s1)) == key(
        window_left=8, window_right=0, softcap=5.0, extras=(torch.empty(3), torch.empty(3)))
    # a scalar of a type the API would judge: no key, so no replay
    assert key(softcap=5) is None and key(window_left=True) is None


@pytest.mark.parametrize("window, exc, match", [
    ((-1, 0), ValueError, r"window left side must be >= 0"),
    ((0, -3), ValueError, r"window right side must be >= 0"),
    ((1.5, 0), TypeError, r"window left side must be an int"),
    ((0, "4"), TypeError, r"window right side must be an int"),
    ((True, 0), TypeError, r"window left side must be an int"),
    ((4,), TypeError, r"window must be None or a pair"),
    ((1, 2, 3), TypeError, r"window must be None or a pair"),
    (8, TypeError, r"window must be None or a pair"),
], ids=["neg-left", "neg-right", "float", "str", "bool", "single", "triple", "int"])
def test_error_window(window, exc, match, no_launch):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(exc, match=r"attention\(\): " + match):
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


def _cpu_fwd(q, k, v, causal, scale, window_left=None, window_right=None, softcap=None,
             alibi=None, sink=None):
    """The forward operator as a CPU kernel: the float64 reference."""
    window = None if window_left is None and window_right is None else (window_left, window_right)
    out, lse = reference(q, k, v, causal, scale, window=window, softcap=softcap,
                         alibi_slopes=alibi, sink=sink)
    return out.to(q.dtype).contiguous(), lse.to(fct._lse_dtype(q.dtype)).contiguous()


def _cpu_bwd(dout, q, k, v, out, lse, causal, scale, deterministic, window_left=None,
             window_right=None, softcap=None, alibi=None, sink=None):
    """The backward operator as a CPU kernel, written out (a kernel runs below
    autograd): P = exp(s - lse), dV = P^T dO, dS = P (dO V^T - delta), times
    1 - tanh^2 under a softcap, dQ = scale dS K, dK = scale dS^T Q,
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
    right = 0 if causal else window_right
    visible = torch.ones_like(rel, dtype=torch.bool)
    if window_left is not None:
        visible &= rel >= -window_left
    if right is not None:
        visible &= rel <= right
    l = lse.double()[..., None]
    seen = torch.isfinite(l)
    p = torch.where(visible & seen, torch.exp(s - torch.where(seen, l, 0)), 0)
    delta = (do * o).sum(-1)
    ds = p * (do @ v64.transpose(-1, -2) - delta[..., None])
    if softcap is not None:
        ds = ds * (1 - t * t)
    dq = _sum_to(scale * ds @ k64, q.shape).to(q.dtype)
    dk = _sum_to(scale * ds.transpose(-1, -2) @ q64, k.shape).to(k.dtype)
    dv = _sum_to(p.transpose(-1, -2) @ do, v.shape).to(v.dtype)
    if sink is None:
        return dq, dk, dv, torch.empty((0,), dtype=torch.float32)
    p_sink = torch.exp(sink.double()[..., None] - lse.double())
    return dq, dk, dv, _sum_to(-(p_sink * delta).sum(-1), sink.shape).float()


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
    monkeypatch.setattr(fct, "_fwd_impl", lambda *a: torch.ops.flashcupy.attention_fwd(*a))
    monkeypatch.setattr(fct, "_bwd_impl", lambda *a: torch.ops.flashcupy.attention_bwd(*a))
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
    dq, dk, dv, _ = torch.ops.flashcupy.attention_bwd(dout, q, k, v, out, lse, False, None,
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
def test_error_sdpa_causal_rectangular(no_launch):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="top-left"):
        fct.scaled_dot_product_attention(q[..., :8, :], k, v, is_causal=True)


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
    with pytest.raises(ValueError, match=r"window left side must be >= 0"):
        fct.attention(q, k, v, window=(-1, 0))
    with pytest.raises(ValueError, match=r"softcap must be a finite number > 0"):
        fct.attention(q, k, v, softcap=float("nan"))
