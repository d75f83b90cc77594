"""flashcupy: exact, memory-efficient FlashAttention for CuPy arrays.

    out = flashcupy.attention(q, k, v, causal=True)
    out, lse = flashcupy.attention(q, k, v, return_lse=True)
    dq, dk, dv = flashcupy.attention_backward(dout, q, k, v, out, lse)
    out = flashcupy.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)   # packed batches
    out = flashcupy.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens)
    out = flashcupy.merge_attention([out1, out2], [lse1, lse2])   # disjoint key sets

Kernels are CUDA C++ (``cuda_src/``) compiled at run time by NVRTC through
``cupy.RawModule``; PyTorch users see ``flashcupy.torch``.  ``flashcupy.reference``
(float64 NumPy) needs no CuPy and no GPU.
"""
__version__ = "0.1.0"

from . import reference
from ._config import kernel_family

# The GPU entry points live in flashcupy.api, which needs CuPy.  They are loaded
# on first use so that `import flashcupy` and flashcupy.reference work on a
# machine without CuPy; there, using one raises api's ImportError with the
# install command.
_LAZY = ("attention", "attention_backward")
_LAZY_VARLEN = ("attention_varlen", "attention_varlen_backward", "attention_with_kvcache")
_LAZY_MERGE = ("merge_attention",)


def __getattr__(name):
    if name in _LAZY or name in _LAZY_VARLEN or name in _LAZY_MERGE:
        from . import _merge, _varlen, api

        value = getattr(api if name in _LAZY else _varlen if name in _LAZY_VARLEN else _merge,
                        name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


def families_for(dtype, device=None) -> tuple:
    """Kernel families that can run ``dtype`` inputs on ``device`` (default: the
    current CuPy device), in the order ``kernel_family`` accepts them.

    Raises ``RuntimeError`` when no CUDA GPU or driver is found."""
    from . import _config, _dtypes, api

    if not _dtypes.is_supported(dtype):
        raise TypeError(f"unsupported dtype {dtype}; expected {_dtypes.describe_supported()}")
    cc = api._compute_capability(api._device_id(device))
    return _config.families_for(_dtypes.info(dtype).name, cc)


__all__ = ["attention", "attention_backward", "attention_varlen", "attention_varlen_backward",
           "attention_with_kvcache", "merge_attention", "kernel_family", "families_for", "reference",
           "__version__"]
