"""flashcupy.hf: Hugging Face transformers models running on flashcupy attention.

What is checked, and against what
---------------------------------
Small randomly initialized causal LMs built from configs (nothing is
downloaded), each run twice with identical weights: once with
``attn_implementation="eager"`` and once with flashcupy's registered name.

* cases: Llama with GQA (4 query heads on 2 kv heads); Mistral with a sliding
  window shorter than the sequence; Gemma 2 with attention-logit softcapping
  and alternating sliding / full layers; left padding (a 2-D attention_mask
  with leading zeros) on Llama and on Mistral; and, with a KV cache, prefill
  followed by one-token and multi-token steps (the dynamic sliding-window
  cache of Mistral and Gemma 2 included).
* values: logits and every parameter gradient (cross-entropy loss, labels
  -100 on padding) against a float64 run of the same weights (eager attention
  with a float64 softmax: transformers' eager takes it in float32), with the
  project's tolerance rule (``_assert.py``): the error may be at most 2x the
  error of an eager run in the same dtype, plus a floor of a few ulps at the
  reference magnitude.  With left padding only unpadded positions' logits are
  compared (padded query rows see no key: flashcupy gives 0 there, eager the
  mean of v; no unpadded position attends to them).
* GPU-free (they run in CI): the same model comparisons through a
  pure-PyTorch stand-in for ``flashcupy.torch.attention`` that implements its
  documented semantics (bottom-right causal and window, softcap on the scaled
  score, boolean mask, additive bias, sink, 0 for rows that see no key), which
  tests the mask / window / softcap / GQA mapping of ``flashcupy.hf``; the
  mask function against transformers' own materialized masks over many
  shapes, offsets and paddings; the name (no "flash": transformers would
  fetch it as a hub kernel) and its acceptance by ``from_config`` and
  ``set_attn_implementation``; argument plumbing (dropout only in training,
  sliding-window resolution, errors).

Tests marked ``gpu`` skip without a CUDA GPU.
"""
from __future__ import annotations

import json
import os
import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _assert  # noqa: E402
import _naive as nv  # noqa: E402

from flashcupy import hf  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def gpu(f):
    """Needs a CUDA GPU (conftest's marker + torch's own view)."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU")(f))


NAME = hf.register_transformers()
NP_DTYPE = {torch.bfloat16: nv.BF16, torch.float16: nv.F16, torch.float32: nv.F32,
            torch.float64: nv.F64}
DT_IDS = {torch.bfloat16: "bf16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------
# a pure-PyTorch stand-in for flashcupy.torch.attention (its documented semantics)
# ----------------------------------------------------------------------------

CALLS: list = []  # the keyword arguments of every stand-in call (for plumbing checks)


def standin_attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None,
                      bias=None, mask=None, dropout_p=0.0, sink=None):
    """q (..., L, D), k / v (..., S, D) broadcasting like matmul; float32 math
    (float64 for float64), output rounded to q's dtype."""
    CALLS.append(dict(causal=causal, scale=scale, window=window, softcap=softcap,
                      bias=None if bias is None else tuple(bias.shape),
                      mask=None if mask is None else tuple(mask.shape), dropout_p=dropout_p,
                      sink=None if sink is None else tuple(sink.shape)))
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    L, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / D ** 0.5 if scale is None else scale
    s = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(ct)
    i = torch.arange(L, device=q.device)[:, None] + (S - L)  # bottom-right aligned
    j = torch.arange(S, device=q.device)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool, device=q.device)
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    if left is not None:
        keep = keep & (j >= i - left)
    if right is not None:
        keep = keep & (j <= i + right)
    if mask is not None:
        keep = keep & mask
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    if sink is not None:
        sk = sink.to(ct)[..., None, None]
        m = torch.maximum(m, sk)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    if sink is not None:
        den = den + torch.exp(sk - m)
    p = torch.where(den > 0, p / torch.where(den > 0, den, torch.ones_like(den)), 0.0)
    if dropout_p:
        p = torch.nn.functional.dropout(p, dropout_p)
    return (p @ v.to(ct)).to(q.dtype).contiguous()


@pytest.fixture
def standin(monkeypatch):
    """Routes flashcupy.hf's flashcupy call to the stand-in (CPU tensors welcome)."""
    CALLS.clear()
    monkeypatch.setattr(hf, "_flashcupy_attention", standin_attention)
    return CALLS


# ----------------------------------------------------------------------------
# the tolerance rule on torch tensors (floors from _assert.py)
# ----------------------------------------------------------------------------

def assert_rule(name, actual, ref, naive, *, grad=False, magnitude=0.0):
    """``max|actual - ref| <= 2 * max|naive - ref| + floor``; ref float64."""
    assert tuple(actual.shape) == tuple(ref.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}")
    a, r, n = (x.detach().double().cpu() for x in (actual, ref, naive))
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = (a - r).abs().max().item() if a.numel() else 0.0
    naive_err = (n - r).abs().max().item() if a.numel() else 0.0
    ref_max = max(r.abs().max().item() if a.numel() else 0.0, magnitude)
    table = _assert.GRAD_FLOOR_ULPS if grad else _assert.FWD_FLOOR_ULPS
    fl = _assert.floor(NP_DTYPE[actual.dtype], ref_max, table)
    tol = 2.0 * naive_err + fl
    assert err <= tol, (f"{name} ({actual.dtype}): max error {err:.3e} > tolerance {tol:.3e} = "
                        f"2 x eager error {naive_err:.3e} + floor {fl:.3e} "
                        f"(max|ref| {ref_max:.3g})")


# ----------------------------------------------------------------------------
# the float64 reference: eager attention with float64 softmax
# ----------------------------------------------------------------------------
# transformers' eager attention takes the softmax in float32 whatever the
# dtype (and its float64 padding mask, finfo(float64).min, becomes -inf there:
# NaN rows that 0 * NaN spreads to every position), so a float64 "eager" run is
# no float64 reference.  This one is eager attention written out in the input
# dtype, on transformers' own boolean masks (causality, windows, padding all
# in the mask), independent of flashcupy.hf.

REF = "eager64_reference"


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        softcap=None, **kwargs):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = (query @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if attention_mask is not None:
        s = (s.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
             else s + attention_mask)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    p = torch.where(den > 0, p / torch.where(den > 0, den, torch.ones_like(den)), 0.0)
    return (p @ v).transpose(1, 2).contiguous(), None


def _reference_mask(**kwargs):
    from transformers import masking_utils as mu

    return mu.sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})


transformers.AttentionInterface.register(REF, reference_attention)
transformers.masking_utils.AttentionMaskInterface.register(REF, _reference_mask)


# ----------------------------------------------------------------------------
# tiny models and inputs
# ----------------------------------------------------------------------------

VOCAB, SEQ, BATCH, PAD = 128, 64, 2, 11
# initializer_range 0.2 (not ~0.02): attention far from uniform and scores of a
# few units, so that a wrong mask, window edge or softcap moves the logits.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, pad_token_id=0)


def make_config(case: str):
    if case.startswith("llama"):
        return transformers.LlamaConfig(**COMMON)
    if case.startswith("mistral"):
        return transformers.MistralConfig(**COMMON, head_dim=16, sliding_window=16)
    if case.startswith("gemma2"):
        # layer_types default: sliding, full, sliding, ...; softcap 2 bites at
        # these score sizes (Gemma 2's own 50 would not)
        return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=16,
                                         query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=30.0)
    raise ValueError(case)


CASES = ["llama_gqa", "mistral_swa", "gemma2_softcap", "llama_left_pad", "mistral_left_pad"]


def make_inputs(case: str, device):
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    keep = torch.ones(BATCH, SEQ, dtype=torch.long)
    if case.endswith("left_pad"):
        keep[0, :PAD] = 0  # row 0 left-padded, row 1 not
        ids[0, :PAD] = 0
    labels = ids.masked_fill(keep == 0, -100)
    am = keep if case.endswith("left_pad") else None
    return (ids.to(device), None if am is None else am.to(device), labels.to(device),
            keep.bool().to(device))


def base_state(case: str) -> dict:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(case),
                                                          attn_implementation="eager")
    return model.state_dict()


def build(case: str, state: dict, impl: str, dtype, device):
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(make_config(case)),
                                                          attn_implementation=impl)
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype)
    model.eval()  # no dropout anywhere; gradients still flow
    assert model.config._attn_implementation == impl
    return model


def run(model, ids, am, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def compare_models(case: str, dtype, device):
    """flashcupy vs eager in ``dtype`` against float64 eager, same (dtype-rounded) weights."""
    ids, am, labels, keep = make_inputs(case, device)
    state = build(case, base_state(case), "eager", dtype, device).state_dict()
    results = {}
    for impl, dt in ((NAME, dtype), ("eager", dtype), (REF, torch.float64)):
        results[impl, dt] = run(build(case, state, impl, dt, device), ids, am, labels)
    (lf, gf), (le, ge), (lr, gr) = (results[NAME, dtype], results["eager", dtype],
                                    results[REF, torch.float64])
    _report(case, dtype, lf[keep], le[keep], lr[keep], gf, ge, gr)
    assert_rule("logits", lf[keep], lr[keep], le[keep])
    assert gf.keys() == gr.keys()
    for n in gr:
        assert_rule(f"grad {n}", gf[n], gr[n], ge[n], grad=True)


def _report(case, dtype, lf, le, lr, gf, ge, gr):
    """With FLASHCUPY_HF_REPORT=<path>, appends one JSON line of the largest
    logit and gradient differences from the float64 reference, flashcupy's and
    eager's (the figures of a comparison, beside the pass/fail of the rule)."""
    path = os.environ.get("FLASHCUPY_HF_REPORT")
    if not path:
        return

    def err(a, r):
        return (a.detach().double().cpu() - r.detach().double().cpu()).abs().max().item()

    row = {"case": case, "dtype": str(dtype).replace("torch.", ""),
           "logits_fc": err(lf, lr), "logits_eager": err(le, lr),
           "grad_fc": max(err(gf[n], gr[n]) for n in gr),
           "grad_eager": max(err(ge[n], gr[n]) for n in gr)}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def compare_cached(case: str, dtype, device, steps=(40, 1, 1, 5, 1)):
    """Prefill + decode steps through a DynamicCache: per-step logits vs eager."""
    ids, am, _, keep = make_inputs(case, device)
    state = build(case, base_state(case), "eager", dtype, device).state_dict()
    logits = {}
    for impl, dt in ((NAME, dtype), ("eager", dtype), (REF, torch.float64)):
        model = build(case, state, impl, dt, device)
        cache = transformers.DynamicCache(config=model.config)
        out, pos = [], 0
        with torch.no_grad():
            for n in steps:
                kw = {} if am is None else {"attention_mask": am[:, :pos + n]}
                r = model(input_ids=ids[:, pos:pos + n], past_key_values=cache, use_cache=True,
                          **kw)
                out.append(r.logits)
                pos += n
        logits[impl, dt] = torch.cat(out, dim=1)
    k = keep[:, :sum(steps)]
    assert_rule("cached logits", logits[NAME, dtype][k], logits[REF, torch.float64][k],
                logits["eager", dtype][k])


# ----------------------------------------------------------------------------
# GPU-free: registration and the name
# ----------------------------------------------------------------------------

def test_import_does_not_import_transformers():
    code = ("import sys, flashcupy.hf; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "assert 'flashcupy.torch' not in sys.modules, 'flashcupy.torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_name_is_accepted():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert NAME == hf.DEFAULT_NAME and "flash" not in NAME.lower()
    assert NAME in AttentionInterface._global_mapping
    assert NAME in AttentionMaskInterface._global_mapping
    cfg = make_config("llama_gqa")
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME)
    assert model.config._attn_implementation == NAME
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation(NAME)
    assert model.config._attn_implementation == NAME
    assert hf.register_transformers() == NAME  # again: harmless


def test_custom_name():
    assert hf.register_transformers("cupy_attention_test") == "cupy_attention_test"
    model = transformers.AutoModelForCausalLM.from_config(
        make_config("mistral_swa"), attn_implementation="cupy_attention_test")
    assert model.config._attn_implementation == "cupy_attention_test"


@pytest.mark.parametrize("bad", ["flashcupy", "my_flash", "fc_sdpa", "cupy_flex_attention",
                                 "org/repo", "paged|cupy", "kernels:x"])
def test_bad_names(bad):
    with pytest.raises(ValueError, match="name="):
        hf.register_transformers(bad)


def test_bad_name_type():
    with pytest.raises(TypeError, match="name must be"):
        hf.register_transformers("")
    with pytest.raises(TypeError, match="name must be"):
        hf.register_transformers(3)


def test_flash_name_is_what_transformers_rejects():
    """Why the name avoids "flash": transformers 5.17 looks such a name up as a
    flash-attention kernel rather than in the AttentionInterface."""
    from transformers import AttentionInterface

    AttentionInterface.register("flash_cupy_probe", hf._attention)
    try:
        with pytest.raises(ValueError, match="flash attention implementation"):
            transformers.AutoModelForCausalLM.from_config(make_config("llama_gqa"),
                                                          attn_implementation="flash_cupy_probe")
    finally:
        AttentionInterface._global_mapping.pop("flash_cupy_probe", None)


# ----------------------------------------------------------------------------
# GPU-free: the mask function against transformers' own masks
# ----------------------------------------------------------------------------

def _effective(mask, q_len, kv_len, window):
    """The (B, L, S) pattern flashcupy applies for what _mask returned."""
    if mask is not None:
        return mask[:, 0]
    i = torch.arange(q_len)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (j >= i - (window - 1))
    return keep[None]


@pytest.mark.parametrize("window", [None, 4, 16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("q_len,past", [(9, 0), (1, 7), (1, 30), (5, 12), (3, 0), (12, 3)])
def test_mask_matches_transformers(window, padded, q_len, past):
    """Every case of a dynamic (sliding) cache: what our mask function returns,
    with the flags the attention function adds for ``None``, is exactly
    transformers' boolean mask."""
    from transformers import masking_utils as mu

    cfg = transformers.MistralConfig(**COMMON, sliding_window=window)
    B = 2
    total = past + q_len
    am = torch.ones(B, total, dtype=torch.bool)
    if padded:
        am[0, :2] = False
    if window is None:
        fn, local = mu.causal_mask_function, None
        kv_offset, kv_len = 0, total
    else:
        fn, local = mu.sliding_window_causal_mask_function(window), window
        # DynamicSlidingWindowLayer.get_mask_sizes
        kv_offset = max(past - window + 1, 0)
        kv_len = (window - 1 + q_len) if past >= window else total
    kwargs = dict(batch_size=B, q_length=q_len, kv_length=kv_len, q_offset=past,
                  kv_offset=kv_offset, mask_function=fn, attention_mask=am, local_size=local,
                  allow_is_causal_skip=True, dtype=torch.float32, config=cfg, use_vmap=False,
                  device="cpu")
    ours = hf._mask(**kwargs)
    ref = mu.sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})
    # flags exactly when no key in the range is padding
    assert (ours is None) == bool(am[:, kv_offset:kv_offset + kv_len].all())
    got = _effective(ours, q_len, kv_len, window)
    assert torch.equal(got.expand(B, q_len, kv_len), ref[:, 0])


def test_mask_materialized_when_flags_cannot_express_it():
    from transformers import masking_utils as mu

    cfg = transformers.LlamaConfig(**COMMON)
    base = dict(batch_size=1, q_length=4, kv_length=4, q_offset=0, kv_offset=0,
                mask_function=mu.causal_mask_function, attention_mask=None, config=cfg,
                dtype=torch.float32, device="cpu")
    assert hf._mask(**base) is None
    # an overlay (transformers sets allow_is_causal_skip=False), a static cache
    # (kv_length past the filled part), a tensor offset, a custom function,
    # an unknown local size: all materialized, as transformers would
    for change in (dict(allow_is_causal_skip=False), dict(kv_length=8),
                   dict(q_offset=torch.tensor(0)),
                   dict(mask_function=mu.bidirectional_mask_function),
                   dict(local_size=3)):
        m = hf._mask(**{**base, **change})
        assert m is not None and m.dtype == torch.bool and m.dim() == 4, change


# ----------------------------------------------------------------------------
# GPU-free: the models through the stand-in
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_models_cpu_standin(standin, case):
    compare_models(case, torch.float32, "cpu")
    assert standin, "the flashcupy call was not used"


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_swa", "gemma2_softcap", "llama_left_pad"])
def test_models_cpu_standin_bf16(standin, case):
    compare_models(case, torch.bfloat16, "cpu")


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_swa", "gemma2_softcap", "mistral_left_pad"])
def test_kv_cache_cpu_standin(standin, case):
    compare_cached(case, torch.float32, "cpu")


def test_calls_use_flags_without_padding(standin):
    """No padding: no 4-D mask reaches flashcupy; causal (+ window (w-1, 0) on the
    sliding layers) and softcap flags do; GQA as (B, Hkv, G, L, D) broadcasting."""
    ids, am, labels, _ = make_inputs("gemma2_softcap", "cpu")
    model = build("gemma2_softcap", base_state("gemma2_softcap"), NAME, torch.float32, "cpu")
    with torch.no_grad():
        model(input_ids=ids)
    assert len(standin) == 2
    sliding, full = standin
    for c in standin:
        assert c["causal"] and c["mask"] is None and c["bias"] is None
        assert c["softcap"] == 2.0 and c["scale"] == 16 ** -0.5
    assert sliding["window"] == (15, 0) and full["window"] is None


def test_calls_pass_bool_mask_with_padding(standin):
    ids, am, labels, _ = make_inputs("mistral_left_pad", "cpu")
    model = build("mistral_left_pad", base_state("mistral_left_pad"), NAME, torch.float32, "cpu")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    for c in standin:
        # (B, 1, 1, L, S) against q (B, Hkv, G, L, D); the window is in the mask
        assert c["mask"] == (BATCH, 1, 1, SEQ, SEQ) and not c["causal"] and c["window"] is None


def test_user_float_mask_is_bias(standin):
    """A 4-D additive mask built by the caller reaches flashcupy as ``bias``."""
    ids, _, _, _ = make_inputs("llama_gqa", "cpu")
    state = base_state("llama_gqa")
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    fmask = torch.zeros(BATCH, 1, SEQ, SEQ).masked_fill(~causal, torch.finfo(torch.float32).min)
    out = {}
    for impl in (NAME, "eager"):
        with torch.no_grad():
            out[impl] = build("llama_gqa", state, impl, torch.float32, "cpu")(
                input_ids=ids, attention_mask=fmask).logits
    assert standin[0]["bias"] == (BATCH, 1, 1, SEQ, SEQ) and standin[0]["mask"] is None
    torch.testing.assert_close(out[NAME], out["eager"], rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training(standin):
    cfg = make_config("llama_gqa")
    cfg.attention_dropout = 0.25
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME)
    ids = torch.randint(1, VOCAB, (1, 8))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(c["dropout_p"] == 0.0 for c in standin)
    standin.clear()
    model.train()
    model(input_ids=ids)
    assert all(c["dropout_p"] == 0.25 for c in standin) and standin


def test_sink_gpt_oss_cpu_standin(standin):
    """gpt-oss passes per-head sink logits as ``s_aux``: flashcupy's ``sink``."""
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, num_local_experts=2,
                                    num_experts_per_tok=1, sliding_window=8,
                                    max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    ids = torch.randint(1, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    out = {}
    for impl in (NAME, "eager"):
        m = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                          attn_implementation=impl)
        m.load_state_dict(ref.state_dict())
        m.eval()
        with torch.no_grad():
            out[impl] = m(input_ids=ids).logits
    assert standin and all(c["sink"] == (2, 2) for c in standin)
    torch.testing.assert_close(out[NAME], out["eager"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# GPU-free: argument plumbing of the attention function
# ----------------------------------------------------------------------------

class _Module(torch.nn.Module):
    def __init__(self, **attrs):
        super().__init__()
        for k, v in attrs.items():
            setattr(self, k, v)


def _qkv(B=1, H=4, Hkv=2, L=5, S=5, D=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, D, generator=g))


def test_output_contract(standin):
    q, k, v = _qkv()
    out, weights = hf._attention(_Module(is_causal=True), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (1, 5, 4, 8) and out.is_contiguous()
    # GQA order: query head h uses kv head h // G (transformers' repeat_kv)
    rep = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, *rep, is_causal=True, scale=0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_sliding_window_resolution(standin):
    q, k, v = _qkv()
    cfg = transformers.Gemma2Config(**COMMON, sliding_window=3)
    cases = [
        (_Module(is_causal=True), dict(sliding_window=3), (2, 0)),     # the model's argument
        (_Module(is_causal=True), dict(sliding_window=None), None),   # an explicit None wins
        (_Module(is_causal=True, sliding_window=4), {}, (3, 0)),       # the module's attribute
        (_Module(is_causal=True, config=cfg, layer_idx=0), {}, (2, 0)),  # layer_types[0]: sliding
        (_Module(is_causal=True, config=cfg, layer_idx=1), {}, None),    # layer_types[1]: full
        (_Module(is_causal=False), dict(sliding_window=3), None),     # not causal: no window
    ]
    for module, kw, window in cases:
        standin.clear()
        hf._attention(module, q, k, v, None, **kw)
        assert standin[0]["window"] == window, (module.__dict__, kw)
        assert standin[0]["causal"] == module.is_causal


def test_is_causal_argument_overrides_module(standin):
    q, k, v = _qkv()
    hf._attention(_Module(is_causal=True), q, k, v, None, is_causal=False)
    assert not standin[0]["causal"]


def test_per_head_mask(standin):
    """A (B, H, L, S) mask splits its heads like the query: head h = (h // G, h % G)."""
    q, k, v = _qkv(H=6, Hkv=2)
    m = torch.rand(1, 6, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    m[..., 0] = True  # every row sees a key (SDPA gives NaN otherwise)
    out, _ = hf._attention(_Module(), q, k, v, m)
    assert standin[0]["mask"] == (1, 2, 3, 5, 5)
    rep = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, *rep, attn_mask=m)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_attention_errors(standin):
    q, k, v = _qkv()
    mod = _Module(is_causal=True)
    with pytest.raises(ValueError, match="attention_mask"):
        hf._attention(mod, q, k, v, torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        hf._attention(mod, q, k, v, torch.ones(1, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        hf._attention(mod, q, k, v, torch.ones(1, 1, 5, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="attention_mask"):
        hf._attention(mod, q, k, v, object())
    with pytest.raises(ValueError, match="sliding_window"):
        hf._attention(mod, q, k, v, None, sliding_window=0)
    with pytest.raises(ValueError, match="position_bias"):
        hf._attention(mod, q, k, v, None, position_bias=torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="kv heads"):
        hf._attention(mod, q, k[:, :1].expand(1, 3, 5, 8), v[:, :1].expand(1, 3, 5, 8), None)


# ----------------------------------------------------------------------------
# GPU: the real kernels
# ----------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
@pytest.mark.parametrize("case", CASES)
def test_models_gpu(case, dtype):
    compare_models(case, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
@pytest.mark.parametrize("case", ["llama_gqa", "mistral_swa", "gemma2_softcap", "mistral_left_pad"])
def test_kv_cache_gpu(case, dtype):
    compare_cached(case, dtype, "cuda")


@gpu
def test_train_step_gpu():
    """A few optimizer steps under bf16 autocast run and lower the loss."""
    model = transformers.AutoModelForCausalLM.from_config(make_config("mistral_swa"),
                                                          attn_implementation=NAME).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(1, VOCAB, (4, SEQ), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
