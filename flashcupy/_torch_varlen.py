"""PyTorch counterparts of the packed-batch and KV-cache calls (flashcupy/_varlen.py),
exported by ``flashcupy.torch``.

* ``attention_varlen``: differentiable (a ``torch.autograd.Function``) in q, k, v
  and the sink; the backward is ``flashcupy.attention_varlen_backward``.
* ``attention_with_kvcache``: the custom operator
  ``torch.ops.flashcupy.attention_with_kvcache`` (``torch.library.custom_op``),
  which declares that it mutates ``k_cache`` and ``v_cache`` and has a fake
  implementation, so ``torch.compile(fullgraph=True)`` traces it and the
  in-place appends are visible to PyTorch (they are the tensors' own memory).
  Inside CUDA-graph capture its device checks are skipped (flashcupy/_varlen.py),
  so a decode step with a fixed cache shape captures and replays.

Both run the CuPy implementation on zero-copy views of the tensors, on
PyTorch's current stream, with workspaces from PyTorch's allocator
(``flashcupy.torch._cupy_on_torch``).  Unlike ``flashcupy.torch.attention`` they
do not replay plans on raw pointers: each call goes through the CuPy views
(tens of microseconds of host time).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from flashcupy import _varlen


def _ft():
    from flashcupy import torch as ft   # (the module that imports this one)
    return ft


def _cp(t):
    return None if t is None else _ft()._as_cupy(t)


def _to_torch(x):
    return torch.from_dlpack(x)


def _check(fn, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(f"{fn}: {name} is on {t.device}; expected a CUDA tensor")


def _draw_seed(dropout_p, seed):
    if not dropout_p:
        return None
    if seed is not None:
        return int(seed)
    # (a host draw from PyTorch's default generator: torch.manual_seed reproduces it)
    return int(torch.randint(0, 2**62, (1,)).item())


class _Varlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, cu_q, cu_k, kw):
        ft = _ft()
        with ft._cupy_on_torch(q.device):
            out, lse = _varlen.attention_varlen(_cp(q), _cp(k), _cp(v), _cp(cu_q), _cp(cu_k),
                                                sink=_cp(sink), return_lse=True, **kw)
            out, lse = _to_torch(out), _to_torch(lse)
        ctx.save_for_backward(q, k, v, sink, cu_q, cu_k, out, lse)
        ctx.kw = kw
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sink, cu_q, cu_k, out, lse = ctx.saved_tensors
        ft = _ft()
        with ft._cupy_on_torch(q.device):
            grads = _varlen.attention_varlen_backward(
                _cp(dout.contiguous()), _cp(q), _cp(k), _cp(v), _cp(out), _cp(lse), _cp(cu_q),
                _cp(cu_k), sink=_cp(sink), **ctx.kw)
            grads = [_to_torch(g) for g in grads]
        dsink = grads[3] if sink is not None else None
        return grads[0], grads[1], grads[2], dsink, None, None, None


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                     max_seqlen_k=None, causal=False, scale=None, return_lse=False,
                     window=None, softcap=None, alibi_slopes=None, sink=None, bias=None,
                     mask=None, dropout_p=0.0, seed=None):
    """``flashcupy.attention_varlen`` on CUDA tensors, differentiable in q, k, v
    and ``sink`` (``bias`` and ``mask`` enter the forward only: their gradient
    is None).  The layouts, lengths and keywords are those of the CuPy call;
    flash-attn's ``(total, H, D)`` is ``x.transpose(0, 1)`` (a view).  With
    ``dropout_p > 0`` and no ``seed``, the seed is drawn from PyTorch's default
    generator (``torch.manual_seed`` reproduces it); the backward reuses it.
    The LSE (with ``return_lse``) is not differentiable."""
    fn = "flashcupy.torch.attention_varlen"
    _check(fn, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
           alibi_slopes=alibi_slopes, sink=sink, bias=bias, mask=mask)
    kw = dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal,
              scale=scale, window=window, softcap=softcap, alibi_slopes=_cp(alibi_slopes),
              bias=_cp(bias), mask=_cp(mask), dropout_p=dropout_p,
              seed=_draw_seed(dropout_p, seed))
    out, lse = _Varlen.apply(q, k, v, sink, cu_seqlens_q, cu_seqlens_k, kw)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------
# the KV cache, as an operator that mutates the caches
# ----------------------------------------------------------------------------

def _out_shapes(q, k_cache, v_cache):
    heads = tuple(torch.broadcast_shapes(tuple(q.shape[1:-2]), tuple(k_cache.shape[1:-2])))
    return ((q.shape[0],) + heads + (q.shape[-2], v_cache.shape[-1]),
            (q.shape[0],) + heads + (q.shape[-2],))


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("flashcupy::attention_with_kvcache", mutates_args=("k_cache", "v_cache"),
                         device_types="cuda")
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                cache_seqlens: torch.Tensor, k_new: torch.Tensor | None,
                v_new: torch.Tensor | None, cache_batch_idx: torch.Tensor | None,
                block_table: torch.Tensor | None, causal: bool, scale: float | None,
                window_left: int | None, window_right: int | None, softcap: float | None,
                alibi: torch.Tensor | None, sink: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    ft = _ft()
    window = None if window_left is None and window_right is None else (window_left,
                                                                          window_right)
    with ft._cupy_on_torch(q.device):
        out, lse = _varlen.attention_with_kvcache(
            _cp(q), _cp(k_cache), _cp(v_cache), _cp(cache_seqlens), k_new=_cp(k_new),
            v_new=_cp(v_new), cache_batch_idx=_cp(cache_batch_idx),
            block_table=_cp(block_table), causal=causal, scale=scale, window=window,
            softcap=softcap, alibi_slopes=_cp(alibi), sink=_cp(sink), return_lse=True)
        return _to_torch(out), _to_torch(lse)


@_kvcache_op.register_fake
def _kvcache_fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_batch_idx,
                  block_table, causal, scale, window_left, window_right, softcap, alibi, sink):
    o, l = _out_shapes(q, k_cache, v_cache)
    return q.new_empty(o), q.new_empty(l, dtype=_lse_dtype(q.dtype))


def _window_sides(fn, window):
    if window is None:
        return None, None
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise TypeError(f"{fn}: window must be a (left, right) pair, got {window!r}")
    return window[0], window[1]


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None,
                           cache_batch_idx=None, block_table=None, causal=False, scale=None,
                           window=None, softcap=None, alibi_slopes=None, sink=None,
                           return_lse=False):
    """``flashcupy.attention_with_kvcache`` on CUDA tensors (forward only).

    WRITES ``k_new`` / ``v_new`` INTO ``k_cache`` / ``v_cache`` IN PLACE (the
    operator declares the mutation, so ``torch.compile`` orders it).  Works
    under ``torch.compile(fullgraph=True)`` and inside ``torch.cuda.graph``
    capture (the device checks are skipped there: the lengths, tables and
    indices must then be valid).  ``cache_seqlens`` is an int32 CUDA tensor
    ``(B,)`` or an int."""
    fn = "flashcupy.torch.attention_with_kvcache"
    _check(fn, q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new,
           cache_batch_idx=cache_batch_idx, block_table=block_table,
           alibi_slopes=alibi_slopes, sink=sink)
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((q.shape[0],), int(cache_seqlens), dtype=torch.int32,
                                   device=q.device)
    _check(fn, cache_seqlens=cache_seqlens)
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"{fn}: scale must be finite, got {scale!r}")
    wl, wr = _window_sides(fn, window)
    out, lse = _kvcache_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_batch_idx,
                           block_table, bool(causal), None if scale is None else float(scale),
                           wl, wr, None if softcap is None else float(softcap), alibi_slopes,
                           sink)
    return (out, lse) if return_lse else out
