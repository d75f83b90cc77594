"""Hugging Face ``transformers`` on flashcupy: an attention backend for its models.

``register_transformers()`` registers flashcupy as an attention implementation
with ``transformers.AttentionInterface`` (and a matching mask builder with
``transformers.masking_utils.AttentionMaskInterface``), after which::

    name = flashcupy.hf.register_transformers()          # "cupy_attention"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    model.set_attn_implementation(name)                  # or switch an existing model

runs every attention layer of the model (Llama, Mistral, Qwen, Gemma 2, ...)
through ``flashcupy.torch.attention``: forward and backward, GQA without
copying k/v, sliding windows, logit softcapping, attention sinks (``s_aux``),
padding and packed-sequence masks, KV caches.

Importing this module imports neither ``transformers`` nor ``flashcupy.torch``
(so ``flashcupy.torch`` can re-export ``register_transformers``); both are
imported when first needed.

The name
--------
transformers decides what an ``attn_implementation`` string *is* from its
spelling before it looks it up: a name containing ``"flash"`` is treated as a
flash-attention request (and, when it is not one of its own, fetched as a hub
kernel), one containing ``"sdpa"`` or ``"flex_attention"`` gets those backends'
checks, and ``"org/repo"`` is a hub kernel (``PreTrainedModel.
_check_and_adjust_attn_implementation`` / ``get_correct_attn_implementation``,
``utils.generic.is_flash_attention_requested``, ``integrations.hub_kernels.
is_kernel``).  Hence the default ``"cupy_attention"``; ``register_transformers``
refuses names that would be taken for one of those.

Masks: what the models hand us, and what flashcupy gets
-------------------------------------------------------
transformers builds each layer's 4-D mask with the mask function registered
under the config's attention name (``masking_utils.create_causal_mask`` and
friends); without one it would pass no mask at all.  Ours (``_mask``) returns:

* ``None`` when the mask is exactly what flashcupy's flags express:
  no padding (or an all-ones padding mask), no packed sequences or custom
  overlays (transformers then sets ``allow_is_causal_skip``), integer offsets
  with ``q_offset + q_length == kv_offset + kv_length`` (the queries are the
  last positions of the keys, as with no cache or a dynamic cache), and the
  pattern plain causal, or causal with the config's sliding window.  The
  attention function then calls flashcupy with ``causal=True`` (bottom-right
  aligned: query ``i`` sees key ``j`` iff ``j <= i + S - L``, i.e. key position
  ``<=`` query position) and, for a sliding layer, ``window=(w - 1, 0)``:
  transformers' ``sliding_window_overlay`` keeps key ``kv`` for query ``q`` iff
  ``kv > q - w``, i.e. ``q - kv <= w - 1`` (the query and the ``w - 1`` keys
  before it).  No (L, S) mask is built or read, and the kernels skip the
  tiles outside the causal band / window.
* otherwise a boolean ``(B, 1, L, S)`` mask, True = attend (transformers'
  ``sdpa_mask``, which already contains causality, window, padding and
  packing), passed to flashcupy as ``mask``.

A 4-D mask the caller built (transformers passes it on as is) is used as it
comes: boolean as ``mask``, floating-point (additive, 0 / large negative) as
``bias``.  Rows that see no key (left padding) give 0 in flashcupy where
eager attention gives the mean of ``v``: both only at padded positions, which
no unpadded position attends to.

The window of a sliding layer whose mask is ``None`` comes from the
``sliding_window`` argument the model passes to the attention function (as for
transformers' own flash-attention integration, which gets no 4-D mask
either); for models that do not pass it, from the module's ``sliding_window``
attribute, else from ``config.sliding_window`` and ``config.layer_types``
(the rule the models use to pick a layer's mask).  With a mask present the
mask alone decides, as in eager and SDPA attention.
"""
from __future__ import annotations

import torch

__all__ = ["register_transformers", "DEFAULT_NAME"]

DEFAULT_NAME = "cupy_attention"

_UNSET = object()  # "the model did not pass this argument at all"


# ----------------------------------------------------------------------------
# the flashcupy call (resolved at call time, so that tests can replace it)
# ----------------------------------------------------------------------------

_fc_torch = None


def _flashcupy_attention(q, k, v, **kwargs):
    """``flashcupy.torch.attention``, imported on first use (not at module import:
    flashcupy.torch re-exports this module's ``register_transformers``)."""
    global _fc_torch
    if _fc_torch is None:
        from flashcupy import torch as fc_torch

        _fc_torch = fc_torch
    return _fc_torch.attention(q, k, v, **kwargs)


# ----------------------------------------------------------------------------
# the mask function (AttentionMaskInterface)
# ----------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _flags_suffice(mu, *, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                   local_size, allow_is_causal_skip, config) -> bool:
    """Whether the causal / sliding-window pattern transformers asks for is exactly
    flashcupy's bottom-right ``causal`` (+ ``window``) on these shapes."""
    if not allow_is_causal_skip:  # custom overlays, packed sequences, bidirectional masks
        return False
    # Bottom-right alignment equals transformers' absolute positions iff the
    # queries are the last q_length of the kv positions.  (A static cache
    # reports a tensor q_offset or a kv_length past the filled part: mask.)
    if not (_is_int(q_offset) and _is_int(kv_offset)):
        return False
    if q_offset + q_length != kv_offset + kv_length:
        return False
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        if mu.is_tracing(padding):  # a data-dependent check: not under compile/export
            return False
        if not bool(padding[:, kv_offset:kv_offset + kv_length].all()):
            return False
    if local_size is None:
        return mask_function is mu.causal_mask_function
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is not None and local_size == chunk:
        # chunked attention (Llama 4): plain causal while every position is in chunk 0
        return kv_offset + kv_length <= local_size
    return local_size == getattr(config, "sliding_window", None)


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
          attention_mask=None, local_size=None, allow_is_causal_skip=True, config=None, **kwargs):
    """transformers' mask-interface signature: None where flashcupy's flags express the
    pattern exactly (see the module docstring), else the boolean 4-D mask of ``sdpa_mask``."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    if _flags_suffice(mu, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                      kv_offset=kv_offset, mask_function=mask_function,
                      attention_mask=attention_mask, local_size=local_size,
                      allow_is_causal_skip=allow_is_causal_skip, config=config):
        return None
    kwargs.pop("allow_is_bidirectional_skip", None)
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                        q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                        attention_mask=attention_mask, local_size=local_size,
                        allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                        config=config, **kwargs)


# ----------------------------------------------------------------------------
# the attention function (AttentionInterface)
# ----------------------------------------------------------------------------

def _layer_sliding_window(module, sliding_window):
    """The sliding window of this layer when its mask was skipped (None: none)."""
    if sliding_window is not _UNSET:
        return sliding_window  # the model's own word, as for flash attention
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if layer_types is not None and layer_idx is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


def _heads(x: torch.Tensor, heads: int, kv_heads: int, name: str) -> torch.Tensor:
    """A (B, 1 | H, ...) tensor as (B, 1 | Hkv, 1 | G, ...) against q's (B, Hkv, G, L, D)."""
    if x.shape[1] == 1:
        return x.unsqueeze(2)
    if x.shape[1] == heads:
        return x.unflatten(1, (kv_heads, heads // kv_heads))
    raise ValueError(f"attention_mask: {name} has {x.shape[1]} heads on dim 1, expected 1 or "
                     f"{heads} (the query's heads), shape {tuple(x.shape)}")


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               sliding_window=_UNSET, softcap=None, is_causal=None, s_aux=None,
               position_bias=None, **kwargs):
    """transformers' attention-function contract (see integrations/sdpa_attention.py):
    query (B, H, L, D), key / value (B, Hkv, S, D) -> ((B, L, H, Dv) contiguous, None)."""
    if position_bias is not None:
        raise ValueError("position_bias: relative position biases are not supported by the "
                         "flashcupy attention backend; use attn_implementation='sdpa' or 'eager'")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query, key, value must be 4-D (batch, heads, seq, head_dim), got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    batch, heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    if kv_heads == 0 or heads % kv_heads or value.shape[1] != kv_heads:
        raise ValueError(f"key, value: {kv_heads} and {value.shape[1]} kv heads; need one count "
                         f"that divides the query's {heads} heads")
    groups = heads // kv_heads
    # GQA by broadcasting: query heads h = kv * G + g share kv head `kv`
    # (transformers' repeat_kv order); k/v get a size-1 group axis, no copy.
    q = query.unflatten(1, (kv_heads, groups))  # (B, Hkv, G, L, D)
    k = key.unsqueeze(2)  # (B, Hkv, 1, S, D)
    v = value.unsqueeze(2)

    kw = {}
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal:
            kw["causal"] = True
            window = _layer_sliding_window(module, sliding_window)
            if window is not None:
                if not _is_int(window) or window < 1:
                    raise ValueError(f"sliding_window must be a positive int or None, got "
                                     f"{window!r}")
                # transformers keeps key kv for query q iff q - window < kv <= q
                kw["window"] = (window - 1, 0)
    elif isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() != 4:
            raise ValueError(f"attention_mask must be a 4-D (batch, 1 | heads, q_len, kv_len) "
                             f"tensor or None, got shape {tuple(attention_mask.shape)}")
        m = _heads(attention_mask, heads, kv_heads, "the mask")
        if m.dtype == torch.bool:
            kw["mask"] = m  # True = attend: flashcupy's convention
        elif m.is_floating_point():
            kw["bias"] = m if m.dtype == query.dtype else m.float()  # additive
        else:
            raise TypeError(f"attention_mask must be bool (True = attend) or floating-point "
                            f"(additive), got dtype {m.dtype}")
    else:
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got "
                        f"{type(attention_mask).__name__} (flex-attention BlockMasks are for "
                        f"attn_implementation='flex_attention')")

    if scaling is not None:
        kw["scale"] = float(scaling)
    if softcap:  # None or 0.0: no softcapping (0 means off in flash-attn's convention too)
        kw["softcap"] = float(softcap)
    if dropout and module.training:
        kw["dropout_p"] = float(dropout)
    if s_aux is not None:
        # one sink logit per query head, unscaled, in the softmax denominator (gpt-oss)
        if not isinstance(s_aux, torch.Tensor) or s_aux.numel() != heads:
            raise ValueError(
                f"flashcupy attention: s_aux must hold one sink logit per query head "
                f"({heads}), got "
                f"{tuple(s_aux.shape) if isinstance(s_aux, torch.Tensor) else type(s_aux).__name__}")
        kw["sink"] = s_aux.float().reshape(kv_heads, groups)

    out = _flashcupy_attention(q, k, v, **kw)  # (B, Hkv, G, L, Dv)
    out = out.reshape(batch, heads, q_len, out.shape[-1])
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------

def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    low = name.lower()
    taken = [w for w in ("flash", "sdpa", "flex_attention") if w in low]
    if taken:
        raise ValueError(
            f"name={name!r}: transformers treats attn_implementation names containing "
            f"{taken[0]!r} as its own backend of that kind (\"flash\": a flash-attention "
            f"kernel it fetches from the hub); choose another, e.g. {DEFAULT_NAME!r}")
    if any(c in name for c in "/:|@"):
        raise ValueError(f"name={name!r}: '/', ':', '|' and '@' mark hub kernels and paged "
                         f"variants in attn_implementation names; choose another, e.g. "
                         f"{DEFAULT_NAME!r}")
    return name


def register_transformers(name: str = DEFAULT_NAME) -> str:
    """Registers flashcupy attention with transformers under ``name``; returns ``name``.

    Afterwards ``from_pretrained(..., attn_implementation=name)``,
    ``from_config(cfg, attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` run the model's attention layers
    through ``flashcupy.torch.attention`` (CUDA tensors).  Registering again,
    under the same or another name, is harmless.

    Raises ImportError without transformers, ValueError for a name transformers
    would read as one of its own backends (see the module docstring).
    """
    name = _check_name(name)
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError("register_transformers() needs the transformers package "
                          "(pip install transformers)") from e
    AttentionInterface.register(name, _attention)
    AttentionMaskInterface.register(name, _mask)
    return name
