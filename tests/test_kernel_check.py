"""The GPU-free kernel check: every shipped specialization compiles for sm_80 and
sm_90a with NVRTC, with no spills, no more than 255 registers and shared memory
within the architecture's limit.

The full compile runs ``python -m flashcupy.kernels check`` as a user would, in
a subprocess; it takes minutes on two CPU cores, so it is marked
``kernelcheck`` and runs only under ``pytest --kernel-check`` (CI runs the
same command once as its own step).  Which kernels are checked for which
architecture is pure Python and is tested here in every run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90a")


def _check(*args, timeout):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        return subprocess.run([sys.executable, "-m", "flashcupy.kernels", "check", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"kernel check did not finish in {timeout} s; output so far:\n"
                    f"{(e.stdout or b'')[-3000:]!r}")


def _rows(stdout):
    """Table rows as (kernel, arch, status) tuples."""
    rows = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in ARCHS:
            rows.append((parts[0], parts[1], parts[-1]))
    return rows


def test_every_kernel_is_checked_for_every_arch_it_runs_on():
    """The check compiles a spec for an arch exactly when it can run there: sm_90a
    takes every spec; sm_80 all but the tiles whose shared memory only an H100
    has and the sm90 family's wgmma kernels, which are sm_90a instructions
    (neither is ever launched on sm_80: the selection table's next candidate is)."""
    from flashcupy import _config
    from flashcupy import kernels as kc

    specs = kc.shipped_specs()
    assert specs
    assert all(_config.runs_on(s, "sm_90a") for s in specs)
    for s in specs:
        if not _config.runs_on(s, "sm_80"):
            assert s.family == "sm90" or _config.smem_bytes(s) > 163 * 1024, \
                f"{s.key} is not checked for sm_80"
    # the generic forward, the one kernel every dtype can fall back to, runs everywhere
    assert any(s.key.startswith("generic.fwd.") and _config.runs_on(s, "sm_80") for s in specs)


@pytest.mark.kernelcheck
def test_every_specialization_compiles_without_spills():
    args = [a for arch in ARCHS for a in ("--arch", arch)]
    res = _check(*args, timeout=1500)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"kernel check failed (exit {res.returncode}):\n{out[-6000:]}"
    assert "sm_80" in out and "sm_90a" in out, out[-3000:]
    assert "spill" in out.lower(), "the table must report spill bytes"
    rows = _rows(res.stdout)
    assert rows, f"no table rows found in:\n{out[-3000:]}"
    bad = [r for r in rows if r[2].lower() != "ok"]
    assert not bad, f"kernels not ok: {bad}"
    # the table lists each spec for exactly the archs it runs on (see the test above)
    from flashcupy import _config
    from flashcupy import kernels as kc
    kernels = {arch: {k for k, a, _ in rows if a == arch} for arch in ARCHS}
    for arch in ARCHS:
        expected = {s.key for s in kc.shipped_specs() if _config.runs_on(s, arch)}
        assert kernels[arch] == expected, (arch, sorted(kernels[arch] ^ expected)[:10])


@pytest.mark.kernelcheck
def test_filters():
    res = _check("--arch", "sm_80", "--family", "generic", "--kernel", "fwd", timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    rows = _rows(res.stdout)
    assert rows, out[-3000:]
    assert all(arch == "sm_80" for _, arch, _ in rows)
    assert all(k.startswith("generic.fwd.") for k, _, _ in rows), rows
