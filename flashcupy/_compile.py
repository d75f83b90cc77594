"""Source assembly and compilation of kernel specializations.

Every module handed to NVRTC is one self-contained string: the kernel's file
from ``cuda_src`` with its quoted ``#include``s inlined recursively.  CuPy's
on-disk cache keys on that string (it does not hash headers found through
``-I``), so an edited header can never resurrect a stale binary.

Compiled kernels are memoized per (device, spec) in this process; CuPy's disk
cache (``CUPY_CACHE_DIR``) makes later processes skip NVRTC altogether.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.M)

# -std=c++17 for constexpr/if-constexpr in the kernels.  No --use_fast_math: it
# would flush float32 denormals and approximate division in the softmax
# normalization; exp2 is fast without it.
COMPILE_OPTIONS = ("-std=c++17",)


def source_dir() -> Path:
    """The kernel sources: inside the package when installed from a wheel
    (setup.cfg maps cuda_src to flashcupy/cuda_src), beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "cuda_src", here.parent / "cuda_src"):
        if (cand / "common.cuh").is_file():
            return cand
    raise FileNotFoundError(
        f"flashcupy kernel sources not found (looked in {here / 'cuda_src'} and "
        f"{here.parent / 'cuda_src'}); reinstall flashcupy")


def _inline(path: Path, seen: set) -> str:
    path = path.resolve()
    if path in seen:
        return ""
    seen.add(path)
    text = _PRAGMA_ONCE.sub("", path.read_text())

    def repl(m):
        return _inline(path.parent / m.group(1), seen)

    body = _INCLUDE.sub(repl, text)
    rel = path.relative_to(source_dir().resolve())
    return f"// ---- begin {rel} ----\n{body}\n// ---- end {rel} ----\n"


@functools.lru_cache(maxsize=None)
def module_source(relpath: str) -> str:
    """Self-contained source text of one cuda_src file."""
    return _inline(source_dir() / relpath, set())


# ---------------------------------------------------------------------------
# On the GPU: cupy.RawModule, memoized per device.
# ---------------------------------------------------------------------------
_KERNELS: dict = {}


def arch_options(cc: int) -> tuple:
    # Hopper-only features (wgmma, setmaxnreg) need the "a" target; CuPy adds
    # its own -arch=sm_90 and NVRTC keeps the sm_90a one.
    return ("-arch=sm_90a",) if cc == 90 else ()


def get_kernel(spec, device_id: int, cc: int):
    """The compiled ``cupy.RawKernel`` for ``spec`` on ``device_id``."""
    key = (device_id, spec)
    kern = _KERNELS.get(key)
    if kern is None:
        import cupy

        from . import _config

        name = _config.name_expression(spec)
        src = module_source(_config.source(spec))
        mod = cupy.RawModule(code=src, options=COMPILE_OPTIONS + arch_options(cc),
                             name_expressions=[name])
        kern = mod.get_function(name)
        smem = _config.smem_bytes(spec)
        if smem > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = smem
        _KERNELS[key] = kern
    return kern


# ---------------------------------------------------------------------------
# GPU-free: NVRTC directly (CuPy's compile path asks the driver for a device).
# ---------------------------------------------------------------------------
_PTXAS_FN = re.compile(r"Function properties for (\S+)")
_PTXAS_STACK = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?", re.S)


def nvrtc_compile(src: str, arch: str, name_expressions, extra_options=()):
    """Compiles with NVRTC for ``arch`` (e.g. "sm_80", "sm_90a") without a GPU.

    Returns (ok, log, {name_expression: lowered_name}).
    """
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(src, "flashcupy.cu", [], [])
    try:
        for ne in name_expressions:
            nvrtc.addNameExpression(prog, ne)
        opts = list(COMPILE_OPTIONS) + [f"-arch={arch}", "-Xptxas=-v"] + list(extra_options)
        try:
            nvrtc.compileProgram(prog, opts)
            ok = True
        except nvrtc.NVRTCError:
            ok = False
        log = nvrtc.getProgramLog(prog).rstrip("\x00")
        lowered = {ne: nvrtc.getLoweredName(prog, ne) for ne in name_expressions} if ok else {}
        return ok, log, lowered
    finally:
        nvrtc.destroyProgram(prog)


def parse_ptxas(log: str) -> dict:
    """{mangled name: {regs, smem, stack, spill_stores, spill_loads}} from a -v log."""
    out = {}
    blocks = re.split(r"(?=ptxas info\s+: Compiling entry function)", log)
    for b in blocks:
        m = re.search(r"Compiling entry function '([^']+)'", b)
        if not m:
            continue
        st = _PTXAS_STACK.search(b)
        regs = re.search(r"Used (\d+) registers", b)
        smem = re.search(r"(\d+) bytes smem", b)
        out[m.group(1)] = {
            "regs": int(regs.group(1)) if regs else -1,
            "smem": int(smem.group(1)) if smem else 0,
            "stack": int(st.group(1)) if st else -1,
            "spill_stores": int(st.group(2)) if st else -1,
            "spill_loads": int(st.group(3)) if st else -1,
        }
    return out


@functools.lru_cache(maxsize=None)
def has_builtin_offsetof() -> bool:
    """Whether this NVRTC knows __builtin_offsetof (the PyPI NVRTC does; some
    CUDA images' do not), which the parameter-layout asserts need."""
    src = "struct fc_probe { int a; double b; };\n" \
          "static_assert(__builtin_offsetof(fc_probe, b) == 8, \"\");\n"
    ok, _, _ = nvrtc_compile(src, "sm_80", [])
    return ok
