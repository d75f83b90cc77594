"""Split-KV: how many CTAs share one query tile's key range (cuda_src/split.cuh).

A forward launches one CTA per (batch element, query tile).  A decode step
(Sq of 1 to 16 rows, after GQA packing one tile per (batch, KV head)) has too
few of them to keep the GPU's memory system busy: B8 x Hkv8 is 64 CTAs on a
132-SM H200 that holds 264 of these CTAs at once, and B1 x Hkv8 is 8.  Split
s of n then takes key tiles [s, s + 1) x ceil(T / n) of the tile's T, writes
float32 partial O and LSE, and one combine kernel merges them.

The rule, flash-attn 2's occupancy model (``num_splits_heuristic`` in
flash_api.cpp) over CTA slots instead of SMs (a bandwidth-bound decode CTA
leaves the SM to its neighbours, so residency, not SM count, is the wave):

- ``ctas >= FULL * slots``: no split (the grid already fills the GPU);
- otherwise the smallest n (at most ``MAX_SPLITS``, and at least
  ``MIN_TILES`` key tiles a split) whose wave efficiency
  ``w / ceil(w)``, ``w = ctas * n / slots``, is within ``NEAR`` of the best.

The constants below are the model's; benchmarks/dev/NOTES.md (section 14)
holds the measurements against forced counts.
"""
from __future__ import annotations

import functools
import math

from . import _config

FULL = 0.8        # a grid of >= 80 % of the slots runs as is (flash-attn's cut)
NEAR = 0.85       # within 85 % of the best efficiency: fewer splits, less merge traffic
MIN_TILES = 4     # >= 4 key tiles (256 keys at BLOCK_N = 64) a split: the pipeline's
                  # prologue and the partial row's write stay small beside its loads
MAX_SPLITS = 128  # flash-attn's cap; the combine holds 4 LSEs a lane (FC_SPLIT_MAX)


def count_for(ctas: int, key_tiles: int, slots: int) -> int:
    """The split count of a grid of ``ctas`` CTAs with ``key_tiles`` key tiles
    each, on a GPU that holds ``slots`` of them at once (the model above)."""
    most = min(MAX_SPLITS, key_tiles // MIN_TILES)
    if ctas <= 0 or most < 2 or ctas >= FULL * slots:
        return 1
    eff = {}
    for n in range(1, most + 1):
        w = ctas * n / slots
        eff[n] = w / math.ceil(w)
    best = max(eff.values())
    return min(n for n, e in eff.items() if e >= NEAR * best)


def supports(spec) -> bool:
    """The forward kernels that have a split mode (the tensor-core families)."""
    return spec.kernel == "fwd" and spec.family in ("sm80", "sm90")


@functools.lru_cache(maxsize=None)
def _slots(spec, device_id: int, cc: int) -> int:
    """CTAs of ``spec``'s split kernel resident on the whole GPU (the driver's
    occupancy figure times the SM count)."""
    import cupy
    from cupy_backends.cuda.api import driver

    from . import _compile

    kern = _compile.get_kernel(spec, device_id, cc)
    per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(
        kern.kernel.ptr, spec.threads, _config.smem_bytes(spec))
    sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
    return max(1, per_sm) * sms


def _slots_at_most(spec, device_id: int) -> int:
    """An upper bound of ``_slots`` from two device attributes, no compile: the
    SMs times the CTAs of ``spec.threads`` threads an SM can hold."""
    import cupy

    attrs = cupy.cuda.Device(device_id).attributes
    return attrs["MultiProcessorCount"] * max(1, attrs["MaxThreadsPerMultiProcessor"]
                                              // spec.threads)


def choose(prob, split_spec) -> int:
    """The split count of ``prob`` for its split kernel ``split_spec``, from the
    forcing hook (flashcupy._config.split_kv) or the model."""
    if not supports(split_spec) or "cu_q" in prob.seq_words:
        return 1  # (packed query rows: a varlen batch has query tiles to spare)
    key_tiles = -(-prob.seqlen_k // split_spec.block_n)
    forced = _config.split_mode()
    if forced != "auto":
        return max(1, min(int(forced), key_tiles, MAX_SPLITS))
    ctas = -(-prob.seqlen_q // _config.tile_rows(split_spec)) * prob.nbatch
    if ctas >= FULL * _slots_at_most(split_spec, prob.device_id):
        return 1  # (a full grid on any occupancy: no need to build the split kernel)
    return count_for(ctas, key_tiles, _slots(split_spec, prob.device_id, prob.cc))
