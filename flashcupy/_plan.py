"""Plans: everything derived from a call's signature, built once and replayed.

A plan is a list of steps over a {name: array} environment (allocations,
workspace zeroing, launches, CuPy reductions).  Validation, batch layout,
kernel choice and parameter packing happen once per signature; a repeated call
only checks types, looks the plan up, allocates outputs and writes pointers.

:data:`CACHE` is the one plan cache of the process: ``flashcupy.api`` keys it
on CuPy array metadata, ``flashcupy.torch`` on tensor metadata (its keys start
with "torch"), and both replay the same plans.
"""
from __future__ import annotations

import threading


class Plan:
    """Steps over a {name: array} environment: ("alloc", name, shape, dtype),
    ("alias", name, other), ("zero", name), ("launch", Launch),
    ("host", fn, names): ``fn(env)`` with CuPy on the launch stream (gradient
    reductions, dsink)."""

    __slots__ = ("prob", "steps", "call", "workspaces", "_arena")

    def __init__(self, prob, call=None):
        # prob: the problem the kernels run; call: the caller's (its output
        # shapes), another one where the arrays were re-viewed (_pack.py)
        self.prob, self.steps = prob, []
        self.call = prob if call is None else call
        self.workspaces = False  # any "alloc" step (_keep_if_captured)
        self._arena = None       # the workspaces' layout in one block (arena)

    def alloc(self, env, name, shape, dtype):
        import cupy

        self.steps.append(("alloc", name, tuple(shape), dtype))
        self.workspaces = True
        self._arena = None
        env[name] = cupy.empty(shape, dtype)
        return env[name]

    def alias(self, env, name, other):
        self.steps.append(("alias", name, other))
        env[name] = env[other]
        return env[name]

    def launches(self, ls):
        self.steps.extend(("launch", x) for x in ls)

    def seq_view(self, env, name, src, n):
        """``env[name]``: ``env[src]`` seen along a new leading sequence axis of
        size ``n`` at stride 0 (packed buffers, flashcupy/_varlen.py)."""
        self.steps.append(("seqview", name, src, n))
        env[name] = _seq_view(env[src], n)
        return env[name]

    def host(self, fn):
        self.steps.append(("host", fn))

    def zero(self, name):
        self.steps.append(("zero", name))

    @property
    def pointers_only(self) -> bool:
        """Whether the steps need nothing of the arrays but their pointers (no
        CuPy operation): what flashcupy.torch replays without CuPy views."""
        return all(st[0] not in ("host", "seqview") for st in self.steps)

    def run(self, env, stream_ptr=None, alloc=None):
        """Replays the steps on CuPy's current stream, or on ``stream_ptr``;
        ``alloc(shape, dtype)`` replaces ``cupy.empty`` for the workspaces."""
        import cupy

        if stream_ptr is None:
            stream_ptr = cupy.cuda.get_current_stream().ptr
        if alloc is None and self.workspaces:
            _keep_if_captured(self, env, stream_ptr)
        for st in self.steps:
            kind = st[0]
            if kind == "launch":
                st[1].run(env, stream_ptr)
            elif kind == "alloc":
                if st[1] not in env:  # the first run reuses what building allocated
                    env[st[1]] = cupy.empty(st[2], st[3]) if alloc is None else alloc(*st[2:])
            elif kind == "alias":
                env[st[1]] = env[st[2]]
            elif kind == "seqview":
                env[st[1]] = _seq_view(env[st[2]], st[3])
            elif kind == "zero":
                x = env[st[1]]  # contiguous (allocated by the plan)
                cupy.cuda.runtime.memsetAsync(x.data.ptr, 0, x.nbytes, stream_ptr)
            elif cupy.cuda.get_current_stream().ptr == stream_ptr:
                st[1](env)
            else:
                with cupy.cuda.ExternalStream(stream_ptr):
                    st[1](env)

    def arena(self):
        """The workspaces in one block: ``(bytes, ((name, offset, bytes), ..))``,
        each at a 256-byte boundary (cudaMalloc's alignment)."""
        if self._arena is None:
            import numpy as np

            at, parts = 0, []
            for st in self.steps:
                if st[0] == "alloc":
                    n = int(np.prod(st[2], dtype=np.int64)) * np.dtype(st[3]).itemsize
                    parts.append((st[1], at, n))
                    at += -(-n // 256) * 256
            self._arena = (at, tuple(parts))
        return self._arena

    def run_pointers(self, ptrs, stream_ptr, alloc_bytes, nbytes_of):
        """A replay from addresses alone (``pointers_only`` plans; flashcupy.torch):
        ``ptrs`` maps each environment name to its address (a per-call word to
        its value) and gains the workspaces', which ``alloc_bytes(n)`` provides
        as one block of n bytes (its address) that stays valid until the
        launches are queued; ``nbytes_of(name)`` is the size of a caller's
        array that a step zeroes (dbias).  One allocation and no array objects: the
        workspaces of a backward cost two allocator calls and every operand an
        object before (bench_overhead.py, NOTES.md 14.8)."""
        total, parts = self.arena()
        sizes = {}
        if total:
            base = alloc_bytes(total)
            for name, off, n in parts:
                ptrs[name] = base + off
                sizes[name] = n
        for st in self.steps:
            kind = st[0]
            if kind == "launch":
                st[1].run_ptrs(ptrs, stream_ptr)
            elif kind == "alias":
                ptrs[st[1]] = ptrs[st[2]]
                sizes[st[1]] = sizes[st[2]] if st[2] in sizes else nbytes_of(st[2])
            elif kind == "zero":
                import cupy

                n = sizes[st[1]] if st[1] in sizes else nbytes_of(st[1])
                cupy.cuda.runtime.memsetAsync(ptrs[st[1]], 0, n, stream_ptr)
            elif kind != "alloc":
                raise RuntimeError(f"a pointer replay of a plan with a {kind!r} step")


# Workspaces of plans run inside a CUDA-graph capture on CuPy's pool: the graph
# writes them at every replay, but nothing else holds them once the call
# returns, so the pool could hand their blocks to later arrays.  They are kept
# for the life of the process (a capture is rare and its workspaces small: a
# decode step's split-KV partials, a backward's dQ workspace).
_CAPTURED: list = []


def _keep_if_captured(plan, env, stream_ptr) -> None:
    import cupy

    if not cupy.cuda.runtime.streamIsCapturing(stream_ptr):
        return
    for st in plan.steps:
        if st[0] == "alloc":
            if st[1] not in env:
                env[st[1]] = cupy.empty(st[2], st[3])
            _CAPTURED.append(env[st[1]])


def _seq_view(x, n):
    import cupy

    return cupy.broadcast_to(x[None], (n,) + x.shape)


class PlanCache:
    """signature -> Plan, bounded (a full cache is simply cleared)."""

    def __init__(self, max_plans: int = 4096):
        self._plans: dict = {}
        self._max = max_plans
        self._lock = threading.Lock()

    def get(self, key):
        return self._plans.get(key) if key is not None else None

    def put(self, key, plan) -> None:
        if key is None or plan is None:
            return
        with self._lock:
            if len(self._plans) >= self._max:
                self._plans.clear()
            self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


CACHE = PlanCache()
