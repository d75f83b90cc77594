"""Kernel launches: grid, block, shared memory, the parameter block.

Every kernel takes one parameter struct (cuda_src/params.cuh), laid out by
flashcupy/_params.py.  A :class:`Launch` holds that block prepacked with every
scalar and stride of its problem; only the tensor pointers are written at each
call, from a {name: array} environment.  Everything launches on the stream the
caller passes (CuPy's current stream for the array API, PyTorch's for
flashcupy.torch).
"""
from __future__ import annotations

import threading

import numpy as np

from . import _compile, _config, _params

_MAX_GRID_Y = 65535


def _grid(n_tiles: int, nbatch: int):
    # gridDim.y stops at 65,535: spill the batch into gridDim.z (BatchIndex).
    gy = min(nbatch, _MAX_GRID_Y)
    gz = -(-nbatch // gy)
    return (n_tiles, gy, gz)


def row_stride(arr) -> int:
    return arr.strides[-2] // arr.itemsize if arr.ndim >= 2 else 0


def vec_stride(arr) -> int:
    return arr.strides[-1] // arr.itemsize


class Launch:
    """One kernel launch with every parameter fixed except the tensor pointers,
    which are filled from a {name: array} environment at each call.  Built once
    per problem signature (see api._Plan), so a repeated call only writes a few
    pointers into the prepacked parameter block and calls ``cuLaunchKernel``
    (handing CuPy ~35 NumPy scalars to convert one by one cost more host time
    than the kernels of a small problem run)."""

    __slots__ = ("name", "kern", "fptr", "grid", "block", "smem", "slots", "buf",
                 "_u64", "_keep", "_extra", "_extra_ptr", "_launch", "_lock")

    def __init__(self, kern, grid, block, smem, buf, slots, name=""):
        # kern (the cupy.RawKernel) stays referenced: its module owns the CUfunction
        self.name, self.kern, self.grid, self.block, self.smem = name, kern, grid, block, smem
        self.fptr = kern.kernel.ptr  # the CUfunction of the current device's module
        # (uint64 word of the pointer, environment name, byte offset into the array)
        self.slots = [(off // 8, env_name, byte_off) for off, env_name, byte_off in slots]
        # The driver wants the exact size of the parameter block; pointers are
        # written through a uint64 view of an 8-byte-padded allocation.
        padded = np.zeros(-(-buf.nbytes // 8) * 8, np.uint8)
        padded[:buf.nbytes] = buf
        self.buf = padded[:buf.nbytes]
        # (a memoryview's item store takes a Python int several times faster
        # than a NumPy array's: a small call's host time, NOTES.md 14.8)
        self._u64 = memoryview(padded).cast("Q")
        size = np.array([buf.nbytes], np.uint64)  # a size_t the driver reads: exact
        self._keep = size
        # CU_LAUNCH_PARAM_BUFFER_POINTER (1), &buf, CU_LAUNCH_PARAM_BUFFER_SIZE (2),
        # &size, CU_LAUNCH_PARAM_END (0)
        self._extra = np.array([1, padded.ctypes.data, 2, size.ctypes.data, 0], np.uint64)
        self._extra_ptr = self._extra.ctypes.data
        from cupy_backends.cuda.api import driver  # raises CUDADriverError on failure

        self._launch = driver.launchKernel
        # The block is shared by every call of this plan: one thread at a time
        # fills and launches it (the driver copies the parameters at launch).
        self._lock = threading.Lock()

    def run(self, env, stream_ptr):
        u64 = self._u64
        g, b = self.grid, self.block
        with self._lock:
            for word, name, byte_off in self.slots:
                u64[word] = env[name].data.ptr + byte_off
            self._launch(self.fptr, g[0], g[1], g[2], b[0], b[1], b[2], self.smem, stream_ptr, 0,
                         self._extra_ptr)

    def run_ptrs(self, ptrs, stream_ptr):
        """``run`` from a {name: address} map (Plan.run_pointers)."""
        u64 = self._u64
        g, b = self.grid, self.block
        with self._lock:
            for word, name, byte_off in self.slots:
                u64[word] = ptrs[name] + byte_off
            self._launch(self.fptr, g[0], g[1], g[2], b[0], b[1], b[2], self.smem, stream_ptr, 0,
                         self._extra_ptr)


def launch(spec, prob, kind, layout, tensors, n_rows, scalars=None, grid_x_mult=1):
    """The launches of ``spec`` over every batch chunk of ``layout``.

    kind: "fwd" | "bwd" (the parameter struct).  tensors: [(field, env name,
    array, row stride)]; the env names index ``layout.strides`` and the
    environment the launches run with; a row stride of None marks a per-call
    WORD field (no array, no strides).  ``n_rows`` is the length of the tiled
    sequence axis (queries, or keys for dK/dV).  scalars: {field: value} beyond
    the problem's own (Problem.scalars).  ``grid_x_mult``: CTAs per tile along
    x (split-KV's splits, cuda_src/split.cuh).
    """
    kern = _compile.get_kernel(spec, prob.device_id, prob.cc)
    # sequences: every kernel of the call reads SeqArgs' per-call pointers
    tensors = list(tensors) + [(f"seq.{n}", n, None, None) for n in prob.seq_words]
    n_tiles = -(-n_rows // _config.tile_rows(spec)) * grid_x_mult
    block = (spec.threads, 1, 1)
    smem = _config.smem_bytes(spec)
    values0 = dict(prob.scalars(), **(scalars or {}))
    out = []
    for nb0, nb1, nb2, entries in layout.chunks():
        values = dict(values0, nb0=nb0, nb1=nb1, nb2=nb2)
        offsets = []
        for field, env_name, arr, rs in tensors:
            if rs is None:  # a per-call WORD (_params.py): no strides, no offset
                offsets.append((field, env_name, 0))
                continue
            off, s0, s1, s2 = entries[env_name]
            values.update({f"{field}.sb0": s0, f"{field}.sb1": s1, f"{field}.sb2": s2,
                           f"{field}.sr": rs})
            offsets.append((field, env_name, off * arr.itemsize))
        buf, ptrs = _params.pack(kind, prob.acc_bytes, values)
        slots = [(ptrs[field], env_name, byte_off) for field, env_name, byte_off in offsets]
        out.append(Launch(kern, _grid(n_tiles, nb0 * nb1 * nb2), block, smem, buf, slots,
                          name=_config.name_expression(spec)))
    return out
