"""flashcupy on a machine without CuPy, and with CuPy but without a GPU.

``flashcupy.reference`` is pure NumPy and must import and run without CuPy;
``import flashcupy`` works too, and the GPU entry points raise an ImportError
whose install command works as typed.  With CuPy but no GPU or driver, the
calls that ask CUDA for the device say so plainly.

The CuPy-less cases run in a subprocess whose ``sys.modules['cupy'] = None``
makes every ``import cupy`` fail, as on a machine where it is not installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import GPU_COUNT

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ["__version__", "attention", "attention_backward", "attention_varlen",
          "attention_varlen_backward", "attention_with_kvcache", "families_for", "kernel_family",
          "merge_attention", "reference"]


def _run_without_cupy(code: str) -> subprocess.CompletedProcess:
    prelude = ("import sys\n"
               "for name in ('cupy', 'cupyx', 'cupy_backends'):\n"
               "    sys.modules[name] = None  # import cupy raises ImportError\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def _ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_reference_runs_without_cupy():
    out = _ok(_run_without_cupy("""
        import numpy as np
        import flashcupy.reference as ref
        from flashcupy import reference
        assert reference is ref
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 2, 70, 16)) for _ in range(3))
        o_t, l_t = reference.attention_tiled(q, k, v, causal=True, block_m=32, block_n=32)
        o_n, l_n = reference.attention_naive(q, k, v, causal=True)
        print("diff", float(np.abs(o_t - o_n).max()))
        assert "cupy" not in [m for m in sys.modules if sys.modules[m] is not None]
    """))
    assert float(out.split()[-1]) < 1e-12


def test_import_flashcupy_without_cupy_and_the_install_hint():
    out = _ok(_run_without_cupy("""
        import flashcupy
        print(sorted(dir(flashcupy)))
        print(flashcupy.__version__, flashcupy.kernel_family)
        for get in (lambda: flashcupy.attention, lambda: flashcupy.attention_backward,
                    lambda: flashcupy.attention_varlen, lambda: flashcupy.attention_with_kvcache,
                    lambda: flashcupy.merge_attention, lambda: flashcupy.families_for("float16")):
            try:
                get()
            except ImportError as e:
                print("HINT", e)
            else:
                raise SystemExit("no ImportError without CuPy")
        try:
            from flashcupy import attention  # noqa: F401
        except ImportError as e:
            print("HINT", e)
        else:
            raise SystemExit("no ImportError without CuPy")
    """))
    lines = out.splitlines()
    assert lines[0] == repr(PUBLIC)
    hints = [ln for ln in lines if ln.startswith("HINT ")]
    assert len(hints) == 7
    for h in hints:
        # a command that works: CuPy's own package, or the checkout's extras;
        # never flashcupy from the package index, where it is not published
        assert 'pip install "cupy-cuda13x[ctk]"' in h and "cupy-cuda12x" in h, h
        assert 'pip install -e ".[cuda13]"' in h, h
        assert "flashcupy[" not in h, h


def test_self_check_without_cupy():
    out = _ok(_run_without_cupy("""
        import runpy
        sys.argv = ["python -m flashcupy"]
        try:
            runpy.run_module("flashcupy", run_name="__main__")
        except SystemExit as e:
            raise SystemExit(e.code)
    """))
    assert "CuPy is not installed" in out
    assert "MISMATCH" not in out and out.count("(ok)") == 2, out


def test_dir_lists_public_names_only():
    import flashcupy

    assert sorted(dir(flashcupy)) == PUBLIC
    assert sorted(flashcupy.__all__) == PUBLIC
    for name in ("annotations", "api"):
        assert name not in dir(flashcupy)


def _cupy_without_gpu():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return GPU_COUNT == 0


@pytest.mark.skipif(not _cupy_without_gpu(), reason="needs CuPy installed and no usable GPU")
def test_no_gpu_is_said_plainly():
    import flashcupy

    with pytest.raises(RuntimeError, match="no CUDA GPU or driver found"):
        flashcupy.families_for("float16")
    with pytest.raises(RuntimeError, match="no CUDA GPU or driver found"):
        flashcupy.families_for("float32", device=0)
    with pytest.raises(TypeError, match="unsupported dtype"):  # bad input is still TypeError
        flashcupy.families_for("int8")


@pytest.mark.skipif(not _cupy_without_gpu(), reason="needs CuPy installed and no usable GPU")
def test_benchmarks_without_gpu_exit_2_with_the_reason():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "no CUDA GPU or driver found" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
