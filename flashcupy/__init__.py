"""flashcupy: exact, memory-efficient FlashAttention for CuPy arrays.

    out = flashcupy.attention(q, k, v, causal=True)
    out, lse = flashcupy.attention(q, k, v, return_lse=True)
    dq, dk, dv = flashcupy.attention_backward(dout, q, k, v, out, lse)

Kernels are CUDA C++ (``cuda_src/``) compiled at run time by NVRTC through
``cupy.RawModule``; PyTorch users see ``flashcupy.torch``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import _config, _dtypes
from .api import attention, attention_backward  # raises a helpful ImportError without CuPy
from ._config import kernel_family
from . import reference


def families_for(dtype, device=None) -> tuple:
    """Kernel families that can run ``dtype`` inputs on ``device`` (default: the
    current CuPy device), in the order ``kernel_family`` accepts them."""
    import cupy

    dev = cupy.cuda.Device(device) if device is not None else cupy.cuda.Device()
    if not _dtypes.is_supported(dtype):
        raise TypeError(f"unsupported dtype {dtype}; expected {_dtypes.describe_supported()}")
    return _config.families_for(_dtypes.info(dtype).name, int(dev.compute_capability))


__all__ = ["attention", "attention_backward", "kernel_family", "families_for", "reference",
           "__version__"]
