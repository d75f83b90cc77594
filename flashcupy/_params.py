"""The kernels' parameter structs (cuda_src/params.cuh), mirrored field by field.

Every kernel takes one struct: ``FwdParams<T, Acc>`` for the forward,
``BwdParams<T, Acc, TG>`` for every backward kernel.  The field lists below are
the Python half of that ABI: :func:`layout` places each field at its natural
alignment, in order (C's rule for these all-scalar structs; nested structs
start at their own alignment), and :func:`pack` writes a buffer that the
driver copies as the kernel's parameter block.  ``tests/test_params.py``
compiles a static_assert of every offset with NVRTC, so the two halves cannot
drift apart.

A tensor is a ``TensorView``: its pointer (filled in at each launch from the
plan's environment) and four int64 element strides (three batch axes, rows).
"""
from __future__ import annotations

import functools

import numpy as np

TENSOR = "tensor"  # TensorView<T>: ptr, sb0, sb1, sb2, sr
NESTED = "nested"  # a nested struct: (name, NESTED, fields)
# A 64-bit word written at each launch like a tensor pointer (from the
# environment: ``env[name].data.ptr``), for per-call values such as the dropout
# seed that a replayed plan must not bake in.
WORD = "word"

VARIANT_FIELDS = (
    ("window_left", "i32"), ("window_right", "i32"),
    ("softcap_inv2", "acc"), ("softcap_log2", "acc"),
    ("alibi", TENSOR), ("sink", TENSOR),
    ("alibi_sg", "i64"), ("sink_sg", "i64"),
    ("bias", TENSOR), ("bias_sc", "i64"), ("bias_sg", "i64"),
    ("mask", TENSOR), ("mask_sc", "i64"), ("mask_sg", "i64"),
    ("dbias", TENSOR), ("dbias_sc", "i64"), ("dbias_sg", "i64"),
    ("dropout_seed", WORD), ("dropout_offset", WORD),
    ("dropout_index", TENSOR), ("dropout_index_sg", "i64"),
    ("dropout_threshold", "i32"), ("dropout_rp", "acc"), ("dropout_keep", "acc"),
)
# SeqArgs (cuda_src/params.cuh): the sequences of a packed batch or a KV cache;
# the pointers are per-call words (the caller's cu_seqlens / lengths / table)
SEQ_FIELDS = (
    ("cu_q", WORD), ("cu_k", WORD), ("cu_qa", WORD), ("len_k", WORD), ("table", WORD),
    ("table_stride", "i64"), ("k_page_stride", "i64"), ("v_page_stride", "i64"),
    ("page_magic", "u64"), ("page_size", "i32"),
)
FWD_FIELDS = (
    ("q", TENSOR), ("k", TENSOR), ("v", TENSOR), ("o", TENSOR), ("lse", TENSOR),
    ("nb0", "i32"), ("nb1", "i32"), ("nb2", "i32"),
    ("seqlen_q", "i32"), ("seqlen_k", "i32"), ("head_dim", "i32"), ("head_dim_v", "i32"),
    ("scale", "acc"), ("scale_log2", "acc"),
    ("var", NESTED, VARIANT_FIELDS),
    ("seq", NESTED, SEQ_FIELDS),
    # split-KV (cuda_src/split.cuh): the partial buffers and the split count
    ("o_part", TENSOR), ("lse_part", TENSOR), ("o_part_ss", "i64"), ("lse_part_ss", "i64"),
    ("n_splits", "i32"),
)
BWD_FIELDS = (
    ("q", TENSOR), ("k", TENSOR), ("v", TENSOR), ("dout", TENSOR), ("o", TENSOR),
    ("lse", TENSOR), ("delta", TENSOR), ("dq", TENSOR), ("dk", TENSOR), ("dv", TENSOR),
    ("dq_accum", TENSOR),
    ("nb0", "i32"), ("nb1", "i32"), ("nb2", "i32"), ("n_group", "i32"),
    ("q_sg", "i64"), ("dout_sg", "i64"), ("lse_sg", "i64"), ("delta_sg", "i64"),
    ("dq_accum_sg", "i64"),
    ("seqlen_q", "i32"), ("seqlen_k", "i32"), ("head_dim", "i32"), ("head_dim_v", "i32"),
    ("scale", "acc"), ("scale_log2", "acc"),
    ("var", NESTED, VARIANT_FIELDS),
    ("seq", NESTED, SEQ_FIELDS),
)
STRUCTS = {"fwd": FWD_FIELDS, "bwd": BWD_FIELDS}
_SCALAR = {"i32": np.int32, "i64": np.int64, "u64": np.uint64, "ptr": np.uint64}


def _flat(fields, acc, prefix=""):
    """[(dotted name, numpy type or None for a pointer, alignment group start)]."""
    out = []
    for f in fields:
        name, kind = f[0], f[1]
        if kind == WORD:
            out.append((f"{prefix}{name}", None, 8))
        elif kind == TENSOR:
            out.append((f"{prefix}{name}.ptr", None, 8))
            out.extend((f"{prefix}{name}.{s}", np.int64, 0) for s in ("sb0", "sb1", "sb2", "sr"))
        elif kind == NESTED:
            sub = _flat(f[2], acc, f"{prefix}{name}.")
            out.append((sub[0][0], sub[0][1], _struct_align(f[2], acc)))
            out.extend(sub[1:])
        else:
            out.append((f"{prefix}{name}", acc if kind == "acc" else _SCALAR[kind], 0))
    return out


def _struct_align(fields, acc) -> int:
    al = 1
    for f in fields:
        kind = f[1]
        al = max(al, 8 if kind in (TENSOR, WORD, "i64") else _struct_align(f[2], acc) if kind == NESTED
                 else np.dtype(acc if kind == "acc" else _SCALAR[kind]).itemsize)
    return al


@functools.lru_cache(maxsize=None)
def layout(kind: str, acc_bytes: int):
    """({dotted field name: (offset, numpy type or None)}, struct size) of the
    ``kind`` ("fwd" | "bwd") struct with an accumulator of ``acc_bytes``."""
    acc = np.float64 if acc_bytes == 8 else np.float32
    fields = STRUCTS[kind]
    offs, off = {}, 0
    for name, typ, group_align in _flat(fields, acc):
        size = 8 if typ is None else np.dtype(typ).itemsize
        al = max(size, group_align)
        off = -(-off // al) * al
        offs[name] = (off, typ)
        off += size
    align = _struct_align(fields, acc)
    return offs, -(-off // align) * align


def pack(kind: str, acc_bytes: int, values: dict):
    """The parameter block: a uint8 buffer of the struct's size with every
    scalar of ``values`` ({dotted name: value}; absent fields are 0) in place.
    Returns (buffer, {tensor name: byte offset of its pointer})."""
    offs, size = layout(kind, acc_bytes)
    buf = np.zeros(size, np.uint8)
    ptrs = {}
    for name, (off, typ) in offs.items():
        if typ is None:  # a tensor's pointer ("x.ptr": key "x") or a WORD
            ptrs[name[:-len(".ptr")] if name.endswith(".ptr") else name] = off
            continue
        v = values.get(name, 0)
        buf[off:off + np.dtype(typ).itemsize] = np.frombuffer(typ(v).tobytes(), np.uint8)
    unknown = set(values) - set(offs)
    if unknown:
        raise KeyError(f"not fields of the {kind} parameter struct: {sorted(unknown)}")
    return buf, ptrs


def offset_asserts(kind: str, cxx_type: str, acc_bytes: int) -> str:
    """C++ static_asserts that the struct ``cxx_type`` has this module's layout
    (through an alias: some NVRTC versions do not parse a template argument
    list inside __builtin_offsetof)."""
    offs, size = layout(kind, acc_bytes)
    alias = "fc_layout_" + "".join(c if c.isalnum() else "_" for c in cxx_type)
    lines = [f"typedef {cxx_type} {alias};",
             f"static_assert(sizeof({alias}) == {size}, \"{kind} params: size\");"]
    for name, (off, _) in offs.items():
        lines.append(f"static_assert(__builtin_offsetof({alias}, {name}) == {off}, "
                     f"\"{kind} params: {name}\");")
    return "\n".join(lines)
