"""The sm80 selection table picks the Hopper (wgmma) tiles exactly where they can run.

GPU-free: ``_pick`` is the table lookup behind every dispatch, given a compute
capability and a shared-memory limit.  A wgmma kernel compiled for any other
target traps, and its tiles need head-dim buckets of whole 64-column panels, so
a wrong pick is a crash (or, on a fallback, a silent slowdown), never a wrong
number: these tests are the guard.
"""
from __future__ import annotations

import pytest

from flashcupy import _config_sm80 as cfg

H100_SMEM = 227 * 1024
A100_SMEM = 163 * 1024


@pytest.mark.parametrize("kernel", ["fwd", "bwd_dkdvq"])
@pytest.mark.parametrize("d", [40, 64, 72, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_h100_takes_wgmma_tiles(kernel, d, causal):
    spec = cfg._pick(kernel, "bf16", d, d, causal, H100_SMEM, cc=90)
    assert spec is not None and "wg" in spec.extra, spec
    assert cfg.smem_bytes(spec) <= H100_SMEM
    assert cfg.runs_on(spec, "sm_90a") and not cfg.runs_on(spec, "sm_80")
    name = cfg.name_expression(spec)
    if kernel == "fwd":
        assert name.startswith("fc_sm80_fwd_wg<") and cfg.source(spec) == "sm80/fwd_wg.cuh"
    else:  # ..., CAUSAL, SPLIT2D, BULK_DQ, WG_SDP[, WG_ALL]
        assert name.startswith("fc_sm80_bwd_dkdvq<") and name.endswith(", true>")
        flags = name.count("true") + name.count("false")
        assert flags == (5 if "wga" in spec.extra else 4), name
        assert cfg.source(spec) == "sm80/bwd.cuh"


@pytest.mark.parametrize("d", [64, 128])
def test_h100_deterministic_takes_wgmma(d):
    spec = cfg._pick("bwd_dkdv", "fp16", d, d, False, H100_SMEM, cc=90)
    assert "wga" in spec.extra
    # fc_sm80_bwd_dkdv<..., CAUSAL, SPLIT2D, WG_SDP, WG_ALL>: no BULK_DQ flag
    assert cfg.name_expression(spec).endswith("false, true, true, true>")


@pytest.mark.parametrize("cc", [80, 86, 89, 100])
@pytest.mark.parametrize("kernel", ["fwd", "bwd_dkdvq", "bwd_dkdv"])
def test_no_wgmma_off_sm90(cc, kernel):
    smem = H100_SMEM if cc in (90, 100) else A100_SMEM
    for d in (32, 64, 128):
        spec = cfg._pick(kernel, "bf16", d, d, True, smem, cc=cc)
        assert spec is None or "wg" not in spec.extra, (cc, d, spec)


@pytest.mark.parametrize("kernel", ["fwd", "bwd_dkdvq"])
def test_no_wgmma_for_partial_panels(kernel):
    """D = 32 with Dv = 48: the bucket of the pair is 64, but the q/k head dim's
    bucket (32) is no whole 64-column panel (run 3 of session 4 crashed here)."""
    spec = cfg._pick(kernel, "bf16", 32, 48, False, H100_SMEM, cc=90)
    assert spec is None or "wg" not in spec.extra, spec
