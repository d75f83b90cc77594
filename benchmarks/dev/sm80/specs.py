"""The sm80 specializations this family ships, with their launch geometry.

Each entry mirrors what flashcupy/_config_sm80.py held before session 4; the
Hopper ("wg" / "wga") tiles the library now takes first on sm_90a are timed here
as VARIANTS only.  smem formulas are the ones in the kernel headers.
"""
from dataclasses import dataclass

DTYPES = ("fc_half", "fc_bf16")
PAD = 8

# head-dim bucket -> (BLOCK_M, BLOCK_N, NWARPS, STAGES[, "qs" = Q_IN_REGS false]), forward.
# Measured on H100 (bf16, B*S=16k, H*D=2048; harness.py --fwd-variants, h100_run2_fwd.log),
# TFLOP/s at S = 1k / 4k / 16k, non-causal:
#   32:  128x128x4w "qs" (MT=2, Q re-read from smem: 240-246 regs, no spill) 168/213/229 vs
#        128x64x4w 159/194/206 (+5-11 %); 128x128x4w with Q in registers is faster still
#        (185/221/238) but spills 128 B on sm_80 (non-causal)
#   64:  128x64x4w (MT=2, Q in registers); 128x128x4w "qs" 233/241/298 is no better overall
#   128: 128x128x8w (MT=1) 228/282/305 vs the flash-attn tile 128x64x4w (MT=2, Q from smem,
#        255 regs, no spill) 231/274/295, causal 167/226/306 vs 165/213/269: 8 warps stay;
#        174 KB smem: H100 only; 128x64x8w (104 KB) is the sm_80/sm_86 choice (FWD_TILES_SM80)
#   256: 128x64x8w (MT=1, Q from smem, k loop rolled by 4) 212/241/289, causal 130/221/291 vs
#        64x32x4w 186/205/234, 131/194/228 (+13-28 % at S >= 4k); 198 KB smem: H100 only,
#        64x32x4w (99 KB) stays the sm_80 choice
FWD_TILES = {
    32: (128, 128, 4, 2, "qs"),
    64: (128, 64, 4, 2),
    128: (128, 64, 4, 2),
    256: (128, 64, 8, 2),
}
FWD_TILES_SM80 = {128: (128, 64, 8, 2), 256: (64, 32, 4, 2)}  # A100/A10: smem <= 163 KB
# dK/dV (deterministic): (BLOCK_M [queries per step], BLOCK_N [keys per CTA], NWARPS, STAGES
# [, "2d" = SPLIT2D: S/dP 2 x 4 warps, P and dS through smem, dK/dV 4 x 2 warps])
#   64:  64x128x8w (1-D) 189/184 at S=16k (full det bwd); 2-D 178/174 (64x128), 193/180 (128x128)
#   128: 2-D 64x128x8w 204/202 vs 1-D 32x64x4w 185/190 (S=16k), 203/182 vs 180/170 (4k);
#        175 KB smem: H100 only; A100 keeps 32x64x4w (BWD_TILES_SM80)
BWD_TILES = {
    32: (64, 128, 8, 2),
    64: (64, 128, 8, 2),
    128: (64, 128, 8, 2, "2d"),
}
BWD_TILES_SM80 = {128: (32, 64, 4, 2)}  # A100/A10: smem <= 163 KB
# dK/dV + atomic dQ (flash-attn 2's default path):
#   64:  2-D 128x128x8w 197/188 vs 1-D 64x128x8w 186/183 (S=16k), 189/167 vs 182/164 (4k)
#   128: 2-D 64x128x8w 213/203 vs 1-D 32x128x8w 188/182 (16k), 206/188 vs 181/163 (4k)
#   both 2-D tiles need 175-178 KB of smem (H100 only) and spill on sm_80 (ptxas, 20-170 B):
#   the sm_80 path keeps the 1-D tiles (BWDQ_TILES_SM80)
BWDQ_TILES = {
    32: (64, 128, 8, 2),
    64: (128, 128, 8, 2, "2d"),
    128: (64, 128, 8, 2, "2d", "bulk"),
}
BWDQ_TILES_SM80 = {64: (64, 128, 8, 2), 128: (32, 128, 8, 2)}
# deterministic dQ kernel: 64: 64x128x4w 197-204; 128: 64x64x4w 180-203 (3 stages slower)
DQ_TILES = {
    32: (64, 64, 4, 2),
    64: (64, 128, 4, 2),
    128: (64, 64, 4, 2),
}
# Specializations shipped for sm_90 only (more than A100's 163 KB of smem): checked on sm_90a.
H100_ONLY = {("dkdv", 128), ("dkdvq", 64), ("dkdvq", 128)}


def fwd_smem(hd, hdv, bm, bn, nw, st):
    return 2 * (bm * (max(hd, hdv) + PAD) + st * bn * (hd + hdv + 2 * PAD))


def dkdv_smem(hd, hdv, bm, bn, nw, st, atomic):
    s = 2 * (bn * (hd + PAD) + bn * (hdv + PAD))           # K, V
    s += st * (2 * bm * (hd + PAD) + 2 * bm * (hdv + PAD) + 8 * bm)  # Q, dO, lse, delta
    if atomic:
        s += 2 * bn * (bm + PAD)                              # dS^T
    return s


def dkdv2d_smem(hd, hdv, bm, bn, nw, st, atomic, bulk=False):
    """SPLIT2D = true: K, V | STAGES x (Q, dO, lse, delta) | P, dS (as T), both kernels."""
    s = 2 * bn * (hd + hdv + 2 * PAD)
    s += st * (2 * bm * (hd + hdv) + 8 * bm)  # Q, dO swizzled: no pad
    s += 4 * bm * (bn + PAD)
    if atomic and bulk:
        s += 4 * bm * hd  # float32 dQ staging tile
    return s


def dq_smem(hd, hdv, bm, bn, nw, st):
    return 2 * (bm * (hd + PAD) + bm * (hdv + PAD) + st * bn * (hd + hdv + 2 * PAD))


@dataclass
class Spec:
    kind: str
    name: str
    smem: int
    nthreads: int
    tiles: tuple
    causal: bool = False
    archs: tuple = ("sm_80", "sm_90a")


def b(x):
    return "true" if x else "false"


def all_specs(dtypes=DTYPES):
    out = []
    for t in dtypes:
        for hd, tiles in list(FWD_TILES.items()) + list(FWD_TILES_SM80.items()):
            for causal in (False, True):
                out.append(make_spec("fwd", t, hd, tiles, causal))
        for kind, table, table80 in (("dkdv", BWD_TILES, BWD_TILES_SM80),
                                     ("dkdvq", BWDQ_TILES, BWDQ_TILES_SM80)):
            for hd, tiles in table.items():
                for causal in (False, True):
                    sp = make_spec(kind, t, hd, tiles, causal)
                    if (kind, hd) in H100_ONLY:
                        sp.archs = ("sm_90a",)
                    out.append(sp)
            for hd, tiles in table80.items():
                for causal in (False, True):
                    out.append(make_spec(kind, t, hd, tiles, causal))
        for hd, tiles in DQ_TILES.items():
            for causal in (False, True):
                out.append(make_spec("dq", t, hd, tiles, causal))
        out.append(Spec("convert", f"fc_sm80_bwd_dq_convert<{t}, 4>", 0, 128, (4, 0)))
    return out


# Tile variants timed by harness.py --variants (bf16): kind -> hd -> [tiles]
VARIANTS = {
    "fwd": {32: [(128, 128, 4, 2, "qs"), (128, 64, 4, 2)],
            64: [(128, 64, 4, 2), (128, 64, 8, 2, "wg"), (64, 64, 4, 2, "wg")],
            128: [(128, 64, 4, 2), (128, 128, 8, 2, "wg"), (64, 64, 4, 2, "wg")],
            256: [(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)]},
    "dkdv": {64: [(64, 128, 8, 2, "2d", "wg", "wga"), (128, 128, 8, 2, "2d")],
             128: [(64, 128, 8, 2, "2d", "wg", "wga"), (64, 128, 8, 2, "2d")]},
    # session 3 (NOTES.md s. 7): the swizzled 2-D body, 2 vs 3 stages
    # the 2-D mma.sync tiles: the choice on sm_90+ GPUs without wgmma (sm_100)
    "dkdvq": {64: [(128, 128, 8, 2, "2d", "wg", "wga"), (128, 128, 8, 2, "2d")],
              128: [(64, 128, 8, 2, "2d", "wg", "wga"), (64, 128, 8, 2, "2d", "bulk")]},
}
_KN = {"fwd": "fc_sm80_fwd", "dkdv": "fc_sm80_bwd_dkdv", "dkdvq": "fc_sm80_bwd_dkdvq",
       "dq": "fc_sm80_bwd_dq"}


def make_spec(kind, t, hd, tiles, causal):
    """tiles = (BLOCK_M, BLOCK_N, NWARPS, STAGES[, flag]): "2d" appends SPLIT2D = true (dK/dV),
    "qs" appends Q_IN_REGS = false (fwd)."""
    bm, bn, nw, st = tiles[:4]
    split = len(tiles) > 4
    if kind == "fwd" and "wg" in tiles:
        sm = 2 * (bm * hd + 2 * bn * (hd + hd))
    elif kind == "fwd":
        sm = fwd_smem(hd, hd, bm, bn, nw, st)
    elif kind == "dq":
        sm = dq_smem(hd, hd, bm, bn, nw, st)
    elif "wga" in tiles:
        ring = 2 * bn * 2 * hd + st * (2 * bm * 2 * hd + 8 * bm)
        sm = -(-ring // 1024) * 1024 + 4 * bm * bn + (4 * bm * hd if "bulk" in tiles else 0)
    elif split:
        sm = dkdv2d_smem(hd, hd, bm, bn, nw, st, kind == "dkdvq", "bulk" in tiles)
    else:
        sm = dkdv_smem(hd, hd, bm, bn, nw, st, kind == "dkdvq")
    if kind == "fwd":  # fwd 5th element "qs": Q_IN_REGS = false (Q re-read from smem)
        extra = ", false" if split and tiles[4] == "qs" else ""
    else:
        extra = ", true" if split else ""
        if kind == "dkdvq" and ("bulk" in tiles or "wg" in tiles):  # BULK_DQ (dkdvq)
            extra += ", true" if "bulk" in tiles else ", false"
        if "wg" in tiles:  # WG_SDP = WG_ALL = true: every product by wgmma (bwd_wg.cuh)
            extra += ", true, true"
    kn = "fc_sm80_fwd_wg" if kind == "fwd" and "wg" in tiles else _KN[kind]
    if kind == "fwd" and "wg" in tiles:
        extra = ""
    return Spec(kind, f"{kn}<{t}, {hd}, {hd}, {bm}, {bn}, {nw}, {st}, {b(causal)}{extra}>",
                sm, nw * 32, (bm, bn), causal)


def variant_specs(t="fc_bf16", kinds=None):
    out = []
    for kind, per in VARIANTS.items():
        if kinds is not None and kind not in kinds:
            continue
        for hd, lst in per.items():
            for tiles in lst:
                for causal in (False, True):
                    out.append(make_spec(kind, t, hd, tiles, causal))
    return out
