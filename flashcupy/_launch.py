"""Kernel launches: grid, block, shared memory, argument packing.

Arguments follow the ABI of cuda_src/params.cuh: each tensor is a pointer and
four int64 element strides (three batch axes, then rows), followed by the
batch sizes and the kernel's scalars.  Scalars are NumPy scalars of the exact
C type (int32 for ``int``, float32/float64 for ``Acc``), pointers uint64.
Everything launches on the stream the caller passes (CuPy's current stream
for the array API, PyTorch's for flashcupy.torch).
"""
from __future__ import annotations

import threading

import numpy as np

from . import _compile

_MAX_GRID_Y = 65535


def _grid(n_tiles: int, nbatch: int):
    # gridDim.y stops at 65,535: spill the batch into gridDim.z (BatchIndex).
    gy = min(nbatch, _MAX_GRID_Y)
    gz = -(-nbatch // gy)
    return (n_tiles, gy, gz)


def _row_stride(arr) -> int:
    return arr.strides[-2] // arr.itemsize if arr.ndim >= 2 else 0


def _vec_stride(arr) -> int:
    return arr.strides[-1] // arr.itemsize


def pack_args(args):
    """Lays the kernel arguments out in one buffer as the CUDA driver reads a
    kernel's parameters (``cuLaunchKernel``'s CU_LAUNCH_PARAM_BUFFER_POINTER):
    in order, each at an offset aligned to its size.  ``None`` marks a pointer
    filled in at launch time.  Returns (uint8 buffer, byte offsets of the
    pointers, [(offset, size)] of every argument)."""
    sizes = [8 if a is None else np.dtype(type(a)).itemsize for a in args]
    offsets, off = [], 0
    for n in sizes:
        off = -(-off // n) * n
        offsets.append(off)
        off += n
    # The driver wants the exact size (an 8-byte-rounded 252-byte buffer is
    # refused as CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES); pointers are written
    # through a uint64 view of the padded allocation.
    buf = np.zeros(-(-off // 8) * 8, np.uint8)[:off]
    ptrs = []
    for a, o, n in zip(args, offsets, sizes):
        if a is None:
            ptrs.append(o)
        else:
            buf[o:o + n] = np.frombuffer(np.asarray(a).tobytes(), np.uint8)
    return buf, ptrs, list(zip(offsets, sizes))


class Launch:
    """One kernel launch with every argument fixed except the tensor pointers,
    which are filled from a {name: array} environment at each call.  Built once
    per problem signature (see api._Plan), so a repeated call only writes a few
    pointers into a prepacked argument buffer and calls ``cuLaunchKernel``:
    handing CuPy ~35 NumPy scalars to convert one by one cost more host time
    than the kernels of a small problem run."""

    __slots__ = ("name", "kern", "fptr", "grid", "block", "smem", "slots", "param_layout",
                 "_u64", "_keep", "_extra", "_extra_ptr", "_launch", "_lock")

    def __init__(self, kern, grid, block, smem, args, slots, name=""):
        # kern (the cupy.RawKernel) stays referenced: its module owns the CUfunction
        self.name, self.kern, self.grid, self.block, self.smem = name, kern, grid, block, smem
        self.fptr = kern.kernel.ptr  # the CUfunction of the current device's module
        buf, ptr_offsets, self.param_layout = pack_args(args)
        by_index = dict(zip([i for i, a in enumerate(args) if a is None], ptr_offsets))
        # (uint64 word of the pointer, environment name, byte offset into the array)
        self.slots = [(by_index[i] // 8, name, byte_off) for i, name, byte_off in slots]
        self._u64 = buf.base.view(np.uint64)  # the 8-byte-padded allocation (keeps buf alive)
        size = np.array([buf.nbytes], np.uint64)  # a size_t the driver reads: exact
        self._keep = size
        # CU_LAUNCH_PARAM_BUFFER_POINTER (1), &buf, CU_LAUNCH_PARAM_BUFFER_SIZE (2),
        # &size, CU_LAUNCH_PARAM_END (0)
        self._extra = np.array([1, buf.ctypes.data, 2, size.ctypes.data, 0], np.uint64)
        self._extra_ptr = self._extra.ctypes.data
        from cupy_backends.cuda.api import driver  # raises CUDADriverError on failure

        self._launch = driver.launchKernel
        # The buffer is shared by every call of this plan: one thread at a time
        # fills and launches it (the driver copies the arguments at launch).
        self._lock = threading.Lock()

    def run(self, env, stream_ptr):
        u64 = self._u64
        g, b = self.grid, self.block
        with self._lock:
            for word, name, byte_off in self.slots:
                u64[word] = env[name].data.ptr + byte_off
            self._launch(self.fptr, g[0], g[1], g[2], b[0], b[1], b[2], self.smem, stream_ptr, 0,
                         self._extra_ptr)


def launch(spec, device_id, cc, layout, operands, n_rows, middle=(), scalars=(), post=(),
           post_scalars=()):
    """The launches of ``spec`` over every batch chunk of ``layout``.

    operands: [(name, array, row_stride)] in kernel-argument order; the names
    index ``layout.strides`` and the environment the launches run with.
    ``n_rows`` is the length of the tiled sequence axis (queries, or keys for
    dK/dV).  ``middle`` are the arguments between the batch sizes and the
    scalars (the dK/dV group loop); ``post`` operands and ``post_scalars``
    follow the scalars (the atomic-dQ workspace of dK/dV).
    """
    kern = _compile.get_kernel(spec, device_id, cc)
    n_tiles = -(-n_rows // spec.tile_rows)
    block = (spec.threads, 1, 1)
    smem = spec.smem_bytes
    out = []
    for nb0, nb1, nb2, entries in layout.chunks():
        args, slots = [], []

        def tensors(ops):
            for name, arr, rs in ops:
                off, s0, s1, s2 = entries[name]
                slots.append((len(args), name, off * arr.itemsize))
                args.extend((None, np.int64(s0), np.int64(s1), np.int64(s2), np.int64(rs)))
        tensors(operands)
        args.extend((np.int32(nb0), np.int32(nb1), np.int32(nb2)))
        args.extend(middle)
        args.extend(scalars)
        tensors(post)
        args.extend(post_scalars)
        out.append(Launch(kern, _grid(n_tiles, nb0 * nb1 * nb2), block, smem, args, slots,
                          name=spec.name_expression))
    return out


def fwd(spec, device_id, cc, layout, q, k, v, out, lse, p):
    """p: a problem description (seqlen_q, seqlen_k, head_dim, head_dim_v,
    scale, causal, acc_dtype)."""
    acc = p.acc_dtype.type
    return launch(spec, device_id, cc, layout,
           [("q", q, _row_stride(q)), ("k", k, _row_stride(k)), ("v", v, _row_stride(v)),
            ("o", out, _row_stride(out)), ("lse", lse, _vec_stride(lse))],
           n_rows=p.seqlen_q,
           scalars=(np.int32(p.seqlen_q), np.int32(p.seqlen_k), np.int32(p.head_dim),
                    np.int32(p.head_dim_v), acc(p.scale), acc(p.scale * np.log2(np.e)),
                    np.int32(p.causal)))


def bwd_preprocess(spec, device_id, cc, layout, out, dout, delta, p):
    return launch(spec, device_id, cc, layout,
           [("o", out, _row_stride(out)), ("dout", dout, _row_stride(dout)),
            ("delta", delta, _vec_stride(delta))],
           n_rows=p.seqlen_q,
           scalars=(np.int32(p.seqlen_q), np.int32(p.head_dim_v)))


def _bwd_scalars(p):
    acc = p.acc_dtype.type
    return (np.int32(p.seqlen_q), np.int32(p.seqlen_k), np.int32(p.head_dim),
            np.int32(p.head_dim_v), acc(p.scale), acc(p.scale * np.log2(np.e)),
            np.int32(p.causal))


def bwd_dq(spec, device_id, cc, layout, q, k, v, dout, lse, delta, dq, p):
    return launch(spec, device_id, cc, layout,
           [("q", q, _row_stride(q)), ("k", k, _row_stride(k)), ("v", v, _row_stride(v)),
            ("dout", dout, _row_stride(dout)), ("lse", lse, _vec_stride(lse)),
            ("delta", delta, _vec_stride(delta)), ("dq", dq, _row_stride(dq))],
           n_rows=p.seqlen_q, scalars=_bwd_scalars(p))


def bwd_dkdv(spec, device_id, cc, layout, q, k, v, dout, lse, delta, dk, dv, group, p,
             dq_accum=None):
    """group: (n_group, {q, dout, lse, delta[, dq_accum]: element stride}) -- the
    broadcast axis of k and v that the kernel sums over in registers.
    dq_accum: the float32 workspace of fc_sm80_bwd_dkdvq (atomic dQ), or None."""
    n_group, gs = group
    post, post_scalars = (), ()
    if dq_accum is not None:
        post = [("dq_accum", dq_accum, _row_stride(dq_accum))]
        post_scalars = (np.int64(gs["dq_accum"]),)
    return launch(spec, device_id, cc, layout,
           [("q", q, _row_stride(q)), ("k", k, _row_stride(k)), ("v", v, _row_stride(v)),
            ("dout", dout, _row_stride(dout)), ("lse", lse, _vec_stride(lse)),
            ("delta", delta, _vec_stride(delta)), ("dk", dk, _row_stride(dk)),
            ("dv", dv, _row_stride(dv))],
           n_rows=p.seqlen_k,
           middle=(np.int32(n_group), np.int64(gs["q"]), np.int64(gs["dout"]),
                   np.int64(gs["lse"]), np.int64(gs["delta"])),
           scalars=_bwd_scalars(p), post=post, post_scalars=post_scalars)


def bwd_dq_convert(spec, device_id, cc, layout, dq_accum, dq, p):
    """dq = dq_accum * scale in dq's dtype (rows < Sq, columns < head_dim)."""
    return launch(spec, device_id, cc, layout,
           [("dq_accum", dq_accum, _row_stride(dq_accum)), ("dq", dq, _row_stride(dq))],
           n_rows=p.seqlen_q,
           scalars=(np.int32(p.seqlen_q), np.int32(p.head_dim), np.float32(p.scale)))
