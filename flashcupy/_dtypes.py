"""Supported dtypes and their kernel-side names.

Each input dtype maps to the C storage type the kernels read, the accumulator
type they compute in, and the NumPy dtype of the LSE they return.  16- and
32-bit inputs accumulate in float32; float64 accumulates in float64, so the
float64 path is a true double-precision reference-grade kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class DtypeInfo:
    name: str          # short name used in cache keys and tables
    storage: str       # C type of the storage element (cuda_src/common.cuh)
    acc: str           # C accumulator type
    acc_dtype: np.dtype  # NumPy dtype of the accumulator (LSE, delta, workspaces)


_INFO = {
    np.dtype(np.float16): DtypeInfo("fp16", "fc_half", "float", np.dtype(np.float32)),
    BFLOAT16: DtypeInfo("bf16", "fc_bf16", "float", np.dtype(np.float32)),
    np.dtype(np.float32): DtypeInfo("fp32", "float", "float", np.dtype(np.float32)),
    np.dtype(np.float64): DtypeInfo("fp64", "double", "double", np.dtype(np.float64)),
}

SUPPORTED = tuple(_INFO)
BY_NAME = {info.name: dt for dt, info in _INFO.items()}


def info(dtype) -> DtypeInfo:
    return _INFO[np.dtype(dtype)]


def is_supported(dtype) -> bool:
    try:
        return np.dtype(dtype) in _INFO
    except TypeError:
        return False


def describe_supported() -> str:
    return "float16, bfloat16 (ml_dtypes.bfloat16), float32 or float64"
