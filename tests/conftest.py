"""Shared fixtures and markers for the flashcupy tests.

Markers
-------
gpu     needs a CUDA GPU; skipped cleanly when none is visible.
bigmem  needs a GPU with more than 20 GB free (arrays past 2**31 elements);
        skipped otherwise.  Always combined with ``gpu``.
kernelcheck
        compiles every shipped kernel with NVRTC (minutes, no GPU needed);
        skipped unless pytest runs with ``--kernel-check``, so that a plain
        ``pytest`` stays a quick loop.  CI runs the same compile once, as
        ``python -m flashcupy.kernels check --arch sm_80 --arch sm_90a``.

Fixtures
--------
seed         an integer derived from the test's node id: every case gets fresh
             random inputs, and a failure reproduces exactly.
poison_pool  a context-manager factory: every device allocation made inside
             it is filled with 0xFF bytes, which read as NaN in float16,
             bfloat16, float32 and float64, so an output element the kernels
             forget to write shows up as NaN.
"""
from __future__ import annotations

import contextlib
import hashlib

import pytest


def _gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no cupy, no driver, no device: all the same here
        return 0


GPU_COUNT = _gpu_count()


def pytest_addoption(parser):
    parser.addoption("--kernel-check", action="store_true", default=False,
                     help="also run the kernelcheck tests: compile every shipped kernel "
                          "with NVRTC for sm_80 and sm_90a (minutes, no GPU needed)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when none is visible")
    config.addinivalue_line(
        "markers", "bigmem: needs a GPU with > 20 GB free memory (arrays past 2**31 elements)")
    config.addinivalue_line(
        "markers", "kernelcheck: compiles every shipped kernel (run with --kernel-check)")


def pytest_collection_modifyitems(config, items):
    skip_kc = pytest.mark.skip(reason="compiles every kernel: run with --kernel-check")
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU visible")
    for item in items:
        if "kernelcheck" in item.keywords and not config.getoption("--kernel-check"):
            item.add_marker(skip_kc)
        if GPU_COUNT == 0 and ("gpu" in item.keywords or "bigmem" in item.keywords):
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request) -> int:
    """A 32-bit seed from the sha256 of the test node id (stable across runs)."""
    digest = hashlib.sha256(request.node.nodeid.encode()).digest()
    return int.from_bytes(digest[:4], "little")


@pytest.fixture
def poison_pool():
    """Returns ``poisoned()``: a context manager under which allocations are NaN-filled.

    The API allocates its outputs itself, so we cannot pre-fill them.  Instead
    the current CuPy allocator is swapped for one that takes memory from the
    default pool as usual and then fills it with 0xFF bytes (NaN in every
    supported float format) on the current stream, before any kernel of the
    call can run.  An element the kernels never write stays NaN, and the
    tests assert there is none.  (Pre-filling the pool with a big freed NaN
    buffer is not enough: the pool may hand out other free chunks first.)
    """
    import cupy as cp

    pool = cp.get_default_memory_pool()

    def malloc(size):
        mem = pool.malloc(size)
        if size:
            mem.memset_async(0xFF, size)
        return mem

    @contextlib.contextmanager
    def poisoned():
        with cp.cuda.using_allocator(malloc):
            yield

    return poisoned
