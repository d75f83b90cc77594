"""The selection tables pick the Hopper (wgmma, sm90 family) tiles exactly where they run.

GPU-free: ``pick`` is the table lookup behind every dispatch, given a compute
capability and a shared-memory limit.  A wgmma kernel does not compile for any
other target, and its tiles need head-dim buckets of whole 64-column panels,
so a wrong pick is a crash (or, on a fallback, a silent slowdown), never a
wrong number: these tests are the guard.
"""
from __future__ import annotations

import pytest

from flashcupy import _config
from flashcupy._families import sm80, sm90
from flashcupy._spec import VF_LOCAL, VF_RIGHT, VF_SINK

H100_SMEM = 227 * 1024
A100_SMEM = 163 * 1024


@pytest.mark.parametrize("kernel", ["fwd", "bwd_dkdvq", "bwd_dkdv"])
@pytest.mark.parametrize("d", [40, 64, 72, 128])
@pytest.mark.parametrize("vf", [0, VF_LOCAL])
def test_h100_takes_wgmma_tiles(kernel, d, vf):
    spec = sm90.pick(kernel, "bf16", d, d, vf, H100_SMEM, cc=90)
    assert spec is not None and spec.family == "sm90", spec
    assert _config.smem_bytes(spec) <= H100_SMEM
    assert _config.runs_on(spec, "sm_90a") and not _config.runs_on(spec, "sm_80")
    name = _config.name_expression(spec)
    assert name.startswith(f"fc_sm90_{kernel}<") and name.endswith(f", {vf}>"), name
    assert _config.source(spec) == ("sm90/fwd.cuh" if kernel == "fwd" else "sm90/bwd.cuh")


def test_backward_drops_the_sink_flag():
    """The sink reaches the backward through the LSE: one backward kernel serves
    calls with and without a sink."""
    fwd = sm90.pick("fwd", "bf16", 64, 64, VF_LOCAL | VF_SINK, H100_SMEM, cc=90)
    bwd = sm90.pick("bwd_dkdvq", "bf16", 64, 64, VF_LOCAL | VF_SINK, H100_SMEM, cc=90)
    assert fwd.variant == VF_LOCAL | VF_SINK and bwd.variant == VF_LOCAL


def test_sm90_falls_back_to_sm80_tables():
    """Buckets without a wgmma tile (32, 256) and kernels the family has none of
    (the deterministic dQ) come from the sm80 table."""
    for kernel, d in (("fwd", 32), ("fwd", 256), ("bwd_dq", 128), ("bwd_dkdvq", 32)):
        spec = sm90.pick(kernel, "bf16", d, d, 0, H100_SMEM, cc=90)
        assert spec is not None and spec.family == "sm80", (kernel, d, spec)


@pytest.mark.parametrize("cc", [80, 86, 89, 100])
@pytest.mark.parametrize("kernel", ["fwd", "bwd_dkdvq", "bwd_dkdv"])
def test_no_wgmma_off_sm90(cc, kernel):
    smem = H100_SMEM if cc in (90, 100) else A100_SMEM
    for d in (32, 64, 128):
        spec = sm90.pick(kernel, "bf16", d, d, VF_LOCAL, smem, cc=cc)
        assert spec is None or spec.family == "sm80", (cc, d, spec)
    assert _config.families_for("bf16", cc) == ("generic", "sm80")


@pytest.mark.parametrize("kernel", ["fwd", "bwd_dkdvq"])
def test_no_wgmma_for_partial_panels(kernel):
    """D = 32 with Dv = 48: the bucket of the pair is 64, but the q/k head dim's
    bucket (32) is no whole 64-column panel (a crash once, on an H100)."""
    spec = sm90.pick(kernel, "bf16", 32, 48, 0, H100_SMEM, cc=90)
    assert spec is None or spec.family == "sm80", spec


def test_auto_family_order():
    assert _config.choose_family("bf16", 90) == "sm90"
    assert _config.choose_family("fp16", 80) == "sm80"
    assert _config.choose_family("fp32", 90) == "generic"
    assert _config.families_for("fp16", 90) == ("generic", "sm80", "sm90")
    with _config.kernel_family("sm90"):
        with pytest.raises(ValueError, match="cannot run"):
            _config.choose_family("bf16", 80)


def test_every_table_row_has_a_kernel_and_smem():
    for mod in (sm80, sm90):
        for s in mod.shipped_specs((0, VF_LOCAL)):
            assert _config.name_expression(s) and _config.smem_bytes(s) >= 0


@pytest.mark.parametrize("kernel", ["bwd_dkdvq", "bwd_dkdv"])
@pytest.mark.parametrize("d", [64, 128])
def test_softcap_with_alibi_backward_leaves_the_wgmma_tiles(kernel, d):
    """Softcap and ALiBi together spill in the 255-register wgmma dK/dV bodies:
    that backward takes the sm80 table's tile; either alone keeps the wgmma one."""
    from flashcupy._spec import VF_ALIBI, VF_SOFTCAP
    both = sm90.pick(kernel, "bf16", d, d, VF_SOFTCAP | VF_ALIBI, H100_SMEM, cc=90)
    assert both is not None and both.family == "sm80", both
    for vf in (VF_SOFTCAP, VF_ALIBI):
        assert sm90.pick(kernel, "bf16", d, d, vf, H100_SMEM, cc=90).family == "sm90"
    assert sm90.pick("fwd", "bf16", d, d, VF_SOFTCAP | VF_ALIBI, H100_SMEM, cc=90).family == "sm90"


def test_f64mma_selection():
    """float64 on the double-precision tensor cores from sm_80 on; split-KV and
    the backward's delta kernel are the generic family's, the D = 256 tile only
    where its shared memory fits, one-fragment warps where two spill."""
    from flashcupy._families import f64mma
    from flashcupy._spec import VF_BIAS, VF_DROPOUT, VF_SEQ, VF_SPLIT

    assert _config.choose_family("fp64", 80) == "f64mma"
    assert _config.choose_family("fp64", 90) == "f64mma"
    assert _config.choose_family("fp64", 75) == "generic"
    assert _config.choose_family("fp32", 90) == "generic"
    assert _config.families_for("fp64", 90) == ("generic", "f64mma")
    assert _config.families_for("bf16", 90) == ("generic", "sm80", "sm90")
    with _config.kernel_family("f64mma"):
        with pytest.raises(ValueError, match="cannot run"):
            _config.choose_family("fp32", 90)
    for d in (32, 64, 128, 256):
        s = f64mma.pick("fwd", "fp64", d, d, VF_RIGHT, H100_SMEM)
        assert s is not None and s.family == "f64mma" and s.rows == (8 if d == 256 else 16)
        assert s.nwarps == (4 if d == 256 else 8)
        assert f64mma.pick("bwd_preprocess", "fp64", d, d, 0, H100_SMEM) is None
        assert f64mma.pick("fwd", "fp64", d, d, VF_SPLIT, H100_SMEM) is None
    assert f64mma.pick("fwd", "fp64", 256, 256, 0, A100_SMEM) is None
    assert f64mma.pick("fwd", "fp64", 128, 128, 0, A100_SMEM).nwarps == 4  # (203 KB at 8)
    assert f64mma.pick("fwd", "fp64", 128, 128, VF_DROPOUT, H100_SMEM).rows == 8
    assert f64mma.pick("fwd", "fp64", 128, 128, VF_BIAS | VF_SEQ, H100_SMEM).rows == 8
    assert f64mma.pick("fwd", "fp64", 128, 128, VF_BIAS, H100_SMEM).rows == 16
    assert _config.group_max("f64mma") == _config.group_max("generic")


def test_f64mma_backward_tiles(monkeypatch):
    """dQ and dK/dV tiles where they fit; none at D = 256 (the generic kernels
    run); one fragment per warp where two spill.  (Selected only with
    f64mma.BACKWARD; off, the generic kernels run.)"""
    from flashcupy._families import f64mma
    from flashcupy._spec import VF_BIAS, VF_DROPOUT, VF_SEQ, VF_SINK

    monkeypatch.setattr(f64mma, "BACKWARD", False)
    assert f64mma.pick("bwd_dq", "fp64", 64, 64, 0, H100_SMEM) is None
    monkeypatch.setattr(f64mma, "BACKWARD", True)

    for kernel in ("bwd_dq", "bwd_dkdv"):
        assert f64mma.pick(kernel, "fp64", 256, 256, 0, H100_SMEM) is None
        for d in (32, 64, 128):
            s = f64mma.pick(kernel, "fp64", d, d, VF_RIGHT | VF_SINK, H100_SMEM)
            assert s.family == "f64mma" and s.kernel == kernel and not s.variant & VF_SINK
            assert f64mma.smem_bytes(s) <= H100_SMEM
    assert f64mma.pick("bwd_dq", "fp64", 128, 128, 0, H100_SMEM).rows == 16
    assert f64mma.pick("bwd_dq", "fp64", 128, 128, 0, A100_SMEM).rows == 8  # (203 KB at 16)
    assert f64mma.pick("bwd_dkdv", "fp64", 128, 128, 0, H100_SMEM).rows == 8
    assert f64mma.pick("bwd_dkdv", "fp64", 64, 64, 0, H100_SMEM).rows == 16
    assert f64mma.pick("bwd_dkdv", "fp64", 64, 64, VF_DROPOUT, H100_SMEM).rows == 8
    assert f64mma.pick("bwd_dq", "fp64", 128, 128, VF_BIAS | VF_SEQ, H100_SMEM).rows == 8
