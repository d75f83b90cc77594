"""Shared benchmark helpers: the one place that says how flashcupy is timed.

Everything the benchmark scripts report goes through here:

* :func:`do_bench` -- CUDA-event timing, the same recipe as
  ``triton.testing.do_bench``: one untimed call (compiles), an estimate over 5 calls,
  warm-up for ``warmup_ms``, then ``rep_ms`` worth of repetitions (at least
  ``min_reps``), each bracketed by its own pair of events and preceded by a
  256 MiB memset that evicts L2; the result is the median.
* :func:`attention_flops` -- the one FLOP formula (forward 4*B*H*Sq*Sk*D, halved
  when causal; backward 2.5x forward), so every table's TFLOP/s compare.
* :func:`peak_extra_bytes` -- extra GPU memory of one call.
* :func:`environment` / :func:`format_environment` -- GPU name and versions,
  printed with every table.
* :func:`require_gpu` -- exits with status 2 and a clear message when there
  is no usable GPU, so ``--help`` works anywhere but a sweep never half-runs.

Streams: flashcupy launches on CuPy's current stream.  The events here are
recorded on that stream, and :func:`torch_on_cupy_stream` makes PyTorch
enqueue on the same stream, so one event pair brackets any provider.

This module imports no GPU library at import time.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass

EXIT_NO_GPU = 2

# L2 on an H100 is 50 MB; flush with something comfortably larger (Triton uses 256 MiB).
L2_FLUSH_BYTES = 256 * 1024 * 1024

WARMUP_MS = 25.0
REP_MS = 100.0
MIN_REPS = 10
MAX_REPS = 2000


def timing_method(warmup_ms=WARMUP_MS, rep_ms=REP_MS, min_reps=MIN_REPS, flush_l2=True,
                  rotate=2) -> str:
    """One line that says how the numbers in a table were measured."""
    flush = "256 MiB L2-evicting memset before each rep" if flush_l2 else "no L2 flush"
    return (f"median of per-call CUDA events on CuPy's current stream "
            f"(torch runs on the same stream); "
            f"1 untimed call, {warmup_ms:g} ms warm-up, {rep_ms:g} ms of reps (>= {min_reps}); "
            f"{flush}; inputs standard normal, rotated among {rotate} sets; "
            f"FLOPs fwd 4*B*H*Sq*Sk*D (halved if causal), bwd 2.5x fwd")


# --------------------------------------------------------------------------- GPU presence


def require_gpu() -> None:
    """Exit with status 2 and a one-line reason unless CuPy sees a CUDA GPU."""
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - any import failure means "cannot run"
        _die(f"cannot import cupy ({type(e).__name__}: {e})")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError, missing driver, ...
        _die(f"no CUDA GPU or driver found ({type(e).__name__}: {e})")
    if n < 1:
        _die("no CUDA GPU or driver found (cudaGetDeviceCount returned 0)")


def _die(msg: str) -> None:
    print(f"error: {msg}; these benchmarks need an NVIDIA GPU.", file=sys.stderr, flush=True)
    sys.exit(EXIT_NO_GPU)


# --------------------------------------------------------------------------- FLOPs


def attention_flops(B, H, Sq, Sk, D, causal, mode="fwd") -> float:
    """fwd = 4*B*H*Sq*Sk*D (two matmuls, 2 FLOPs per MAC), halved if causal; bwd = 2.5 x fwd."""
    f = 4.0 * B * H * Sq * Sk * D
    if causal:
        f /= 2.0
    if mode == "bwd":
        f *= 2.5
    elif mode != "fwd":
        raise ValueError(f"mode must be 'fwd' or 'bwd', got {mode!r}")
    return f


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------- streams


def torch_on_cupy_stream():
    """Context in which PyTorch enqueues on CuPy's current stream."""
    import cupy
    import torch

    ptr = cupy.cuda.get_current_stream().ptr
    if torch.cuda.current_stream().cuda_stream == ptr:
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(ptr))


def synchronize() -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    ms: float         # median
    min_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def as_dict(self):
        return asdict(self)


_flush_buf = None


def _flush_l2():
    global _flush_buf
    import cupy

    if _flush_buf is None:
        _flush_buf = cupy.empty(L2_FLUSH_BYTES // 4, dtype=cupy.int32)
    _flush_buf.fill(0)


def release_flush_buffer():
    global _flush_buf
    _flush_buf = None


def do_bench(fn, warmup_ms=WARMUP_MS, rep_ms=REP_MS, min_reps=MIN_REPS, max_reps=MAX_REPS,
             flush_l2=True) -> Timing:
    """Median milliseconds of ``fn()`` by CUDA events, do_bench style.

    ``fn`` should rotate among >= 2 input sets itself (see :class:`Rotate`).
    Every GPU op it issues must go to CuPy's current stream (use
    :func:`torch_on_cupy_stream` for PyTorch).
    """
    import cupy

    stream = cupy.cuda.get_current_stream()
    flush = _flush_l2 if flush_l2 else (lambda: None)

    fn()  # compiles / autotunes / allocates; untimed
    stream.synchronize()

    # Estimate the cost of one (flush + call), as Triton does: up to 5 calls,
    # fewer when they are slow (their time counts as warm-up).
    est_ms, n_est = 0.0, 0
    while n_est < 5 and (n_est == 0 or est_ms < warmup_ms):
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        flush()
        e0.record(stream)
        fn()
        e1.record(stream)
        e1.synchronize()
        est_ms += cupy.cuda.get_elapsed_time(e0, e1)
        n_est += 1
    est = max(est_ms / n_est, 1e-3)

    n_warmup = max(0, int((warmup_ms - est_ms) / est))
    n_rep = min(max(min_reps, int(rep_ms / est)), max(max_reps, min_reps))

    for _ in range(n_warmup):
        fn()
    starts = [cupy.cuda.Event() for _ in range(n_rep)]
    ends = [cupy.cuda.Event() for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        flush()
        s.record(stream)
        fn()
        e.record(stream)
    ends[-1].synchronize()
    times = sorted(cupy.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends))
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(ms=statistics.median(times), min_ms=times[0], p20_ms=q[0], p80_ms=q[3],
                  reps=n_rep)


def graph_ms(call, sets, bench) -> float:
    """``bench(fn)`` (milliseconds) of CUDA-graph replays of ``call(*s)``, one
    graph per input set, rotated: the call with no host work, as a serving or
    training loop that captures its step runs it.  Each set is called once
    eagerly first (compiles, plans, allocates), then captured on a
    non-blocking stream."""
    import cupy

    cupy.cuda.Device().synchronize()  # (inputs made on the default stream are ready)
    graphs = []
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for s in sets:
            call(*s)
            stream.synchronize()
            stream.begin_capture()
            call(*s)
            graphs.append(stream.end_capture())
    it = iter(range(10 ** 9))

    def replay():
        graphs[next(it) % len(graphs)].launch(cupy.cuda.get_current_stream())
    return bench(replay)


class Rotate:
    """Callable that runs ``body(*inputs)`` on the next of several input sets.

    Rotating among >= 2 sets (each larger than L2 in the paper setup) means a
    call never finds its inputs left in L2 by the previous call.
    """

    def __init__(self, body, input_sets):
        if not input_sets:
            raise ValueError("need at least one input set")
        self.body = body
        self.sets = list(input_sets)
        self.i = 0

    def __call__(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return self.body(*s)


# --------------------------------------------------------------------------- memory


class _PeakHook:
    """CuPy memory hook tracking bytes held from the memory pool, and their peak."""

    def __init__(self):
        import cupy

        class Hook(cupy.cuda.MemoryHook):
            name = "flashcupy-bench-peak"

            def __init__(hook):
                hook.cur = 0
                hook.peak = 0

            def malloc_postprocess(hook, **kw):
                hook.cur += kw["mem_size"]
                hook.peak = max(hook.peak, hook.cur)

            def free_postprocess(hook, **kw):
                hook.cur -= kw["mem_size"]

        self.hook = Hook()


def peak_extra_bytes(fn) -> int:
    """Peak extra GPU memory of one ``fn()`` call, in bytes.

    Method: CuPy side -- a ``cupy.cuda.MemoryHook`` sums the (rounded) sizes
    of memory-pool allocations made during the call minus those freed, and
    keeps the maximum; PyTorch side (if torch is loaded) --
    ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()``
    after ``reset_peak_memory_stats()``.  The two are added.  Counts outputs
    and workspaces; excludes the inputs and anything allocated outside the
    two allocators (cuBLAS/cuDNN handles' own workspaces, CUDA context).
    """
    torch = sys.modules.get("torch")
    use_torch = torch is not None and torch.cuda.is_available()
    synchronize()
    if use_torch:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    h = _PeakHook().hook
    with h:
        result = fn()
        synchronize()
    del result
    extra = h.peak
    if use_torch:
        torch.cuda.synchronize()
        extra += max(0, torch.cuda.max_memory_allocated() - base)
    return int(extra)


def free_gpu_memory(collect=False) -> None:
    """Return cached blocks of both allocators to the driver (between runs).

    ``collect`` runs the garbage collector first (slow with torch loaded; use
    after an exception, whose traceback may hold arrays in a cycle).
    """
    import gc

    if collect:
        gc.collect()
    try:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    except Exception:  # noqa: BLE001
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- errors


def classify_error(e: BaseException) -> str:
    """Short status string for a provider that could not run."""
    name = type(e).__name__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "OutOfMemory" in name or "out of memory" in msg.lower():
        return "OOM"
    if "No available kernel" in msg or "No viable backend" in msg:
        return "unsupported"
    if isinstance(e, NotImplementedError):
        return f"unsupported: {msg[:80]}"
    return f"error {name}: {msg[:80]}"


# --------------------------------------------------------------------------- inputs


def randn(shape, dtype, scale=1.0):
    """Standard-normal CuPy array of ``dtype`` (bfloat16 = ml_dtypes.bfloat16 works)."""
    import cupy
    import numpy as np

    x = cupy.random.standard_normal(shape, dtype=cupy.float32)
    if scale != 1.0:
        x *= scale
    dt = np.dtype(dtype)
    if dt == np.float32:
        return x
    if dt == np.float64:
        return cupy.random.standard_normal(shape, dtype=cupy.float64) * scale
    try:
        return x.astype(dt)
    except Exception:  # noqa: BLE001 - CuPy without a bfloat16 cast: truncate the bits
        if dt.itemsize == 2 and dt.name == "bfloat16":
            return (x.view(cupy.uint32) >> 16).astype(cupy.uint16).view(dt)
        raise


def dtype_from_name(name: str):
    import ml_dtypes
    import numpy as np

    return {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16),
            "fp32": np.dtype(np.float32), "fp64": np.dtype(np.float64)}[name]


def torch_dtype_from_name(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp64": torch.float64}[name]


# --------------------------------------------------------------------------- optional imports


def try_import_torch():
    """(torch, None) or (None, reason)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return None, f"torch not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA (CPU build?)"
    return torch, None


def try_import_flashcupy():
    """(flashcupy, None) or (None, reason).  Prefers the working tree over an installed copy."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import flashcupy
    except Exception as e:  # noqa: BLE001
        return None, f"flashcupy not importable ({type(e).__name__}: {e})"
    return flashcupy, None


def kernel_family(fc, family):
    """``fc.kernel_family(family)`` where the API has it; a no-op for 'auto' otherwise."""
    kf = getattr(fc, "kernel_family", None)
    if kf is None:
        if family in (None, "auto"):
            return contextlib.nullcontext()
        raise NotImplementedError("flashcupy has no kernel_family() yet")
    return kf(family)


# --------------------------------------------------------------------------- environment


def environment() -> dict:
    """GPU name and library versions (only what is importable)."""
    import cupy

    env = {"python": platform.python_version()}
    rt = cupy.cuda.runtime
    dev = cupy.cuda.Device()
    props = rt.getDeviceProperties(dev.id)
    name = props["name"]
    env["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    env["compute_capability"] = f"{props['major']}.{props['minor']}"
    env["sm_count"] = props.get("multiProcessorCount")
    env["l2_bytes"] = props.get("l2CacheSize")
    env["gpu_mem_bytes"] = props.get("totalGlobalMem")
    env["cupy"] = cupy.__version__
    env["cuda_runtime"] = _cuda_ver(rt.runtimeGetVersion())
    env["cuda_driver"] = _cuda_ver(rt.driverGetVersion())
    try:
        from cupy_backends.cuda.libs import nvrtc

        env["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception as e:  # noqa: BLE001
        env["nvrtc"] = f"? ({type(e).__name__})"
    env["driver"] = _driver_version()
    import numpy

    env["numpy"] = numpy.__version__
    try:
        import ml_dtypes

        env["ml_dtypes"] = ml_dtypes.__version__
    except Exception:  # noqa: BLE001
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        try:
            env["cudnn"] = str(torch.backends.cudnn.version())
        except Exception:  # noqa: BLE001
            pass
    fc = sys.modules.get("flashcupy")
    if fc is not None:
        env["flashcupy"] = getattr(fc, "__version__", "?")
        env["flashcupy_path"] = os.path.dirname(getattr(fc, "__file__", "") or "")
    env["git_commit"] = _git_commit()
    return env


def _driver_version():
    """The kernel driver's version string (e.g. 580.65.06), or None."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            for tok in f.readline().split():
                if tok[:1].isdigit() and "." in tok:
                    return tok
    except OSError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001
        return None


def _cuda_ver(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _git_commit():
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        pass
    return None


def format_environment(env: dict, method: str) -> str:
    gb = (env.get("gpu_mem_bytes") or 0) / 2**30
    l2 = (env.get("l2_bytes") or 0) / 2**20
    lines = [
        f"GPU: {env.get('gpu')} (sm_{env.get('compute_capability', '?').replace('.', '')}, "
        f"{env.get('sm_count')} SMs, {gb:.0f} GiB, L2 {l2:.0f} MiB)",
        "versions: " + ", ".join(
            f"{k} {env[k]}" for k in ("flashcupy", "cupy", "torch", "torch_cuda", "cudnn",
                                      "cuda_runtime", "cuda_driver", "driver", "nvrtc",
                                      "numpy", "ml_dtypes", "python", "git_commit")
            if env.get(k) is not None),
        f"timing: {method}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- tables


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.{nd}f}"
    return str(x)


def format_table(rows, columns, sep="  ") -> str:
    """Plain fixed-width table, right-aligned; ``rows`` are lists of strings."""
    headers = columns
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    out = [sep.join(h.rjust(w) for h, w in zip(headers, widths)),
           sep.join("-" * w for w in widths)]
    for r in rows:
        out.append(sep.join(c.rjust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
