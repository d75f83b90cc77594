"""The sm80 specializations this family ships, with their launch geometry.

Each entry mirrors what flashcupy/_config_sm80.py should hold.  smem formulas
are the ones in the kernel headers.
"""
from dataclasses import dataclass

DTYPES = ("fc_half", "fc_bf16")
PAD = 8

# head-dim bucket -> (BLOCK_M, BLOCK_N, NWARPS, STAGES), forward.  Measured on H100
# (bf16, B*S=16k, H*D=2048; dev/sm80/harness.py --variants), TFLOP/s at S=4k/16k:
#   64:  128x64, 4 warps x 32 rows (MT=2: each K/V fragment feeds two m16 tiles, half the
#        ldmatrix traffic per mma) 253/282 non-causal, 201/269 causal; 128x128x8w 221/251, 127/247
#   128: 128x128, 8 warps: 251/285, 212/288 (174 KB smem: H100 only, > A100's 163 KB);
#        128x64x8w 239/275, 198/268 (104 KB) is the sm_80/sm_86 choice (FWD_TILES_SM80)
#   32:  like 64 (MT=2), not timed;  256: 64x32x4w, the largest that fits 163 KB and 255 regs
FWD_TILES = {
    32: (128, 64, 4, 2),
    64: (128, 64, 4, 2),
    128: (128, 128, 8, 2),
    256: (64, 32, 4, 2),
}
FWD_TILES_SM80 = {128: (128, 64, 8, 2)}  # A100/A10: smem <= 163 KB
# dK/dV (deterministic): (BLOCK_M [queries per step], BLOCK_N [keys per CTA], NWARPS, STAGES)
#   64:  64x128x8w 201/197 (S=16k, full det bwd), 64x64x4w 191/191, 3 stages no gain
#   128: 32x64x4w (2 CTAs/SM) 202/198 and 187 vs 174 causal at 4k; BLOCK_M 64 spills
BWD_TILES = {
    32: (64, 128, 8, 2),
    64: (64, 128, 8, 2),
    128: (32, 64, 4, 2),
}
# dK/dV + atomic dQ: 8 warps clearly better (4-warp CTAs: 130-138 TFLOP/s, the atomics
# of a 64-key tile are twice as many per flop); 128: BLOCK_M 64 spills
BWDQ_TILES = {
    32: (64, 128, 8, 2),
    64: (64, 128, 8, 2),
    128: (32, 128, 8, 2),
}
# deterministic dQ kernel: 64: 64x128x4w 197-204; 128: 64x64x4w 180-203 (3 stages slower)
DQ_TILES = {
    32: (64, 64, 4, 2),
    64: (64, 128, 4, 2),
    128: (64, 64, 4, 2),
}


def fwd_smem(hd, hdv, bm, bn, nw, st):
    return 2 * (bm * (max(hd, hdv) + PAD) + st * bn * (hd + hdv + 2 * PAD))


def dkdv_smem(hd, hdv, bm, bn, nw, st, atomic):
    s = 2 * (bn * (hd + PAD) + bn * (hdv + PAD))           # K, V
    s += st * (2 * bm * (hd + PAD) + 2 * bm * (hdv + PAD) + 8 * bm)  # Q, dO, lse, delta
    if atomic:
        s += 2 * bn * (bm + PAD)                              # dS^T
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


def b(x):
    return "true" if x else "false"


def all_specs(dtypes=DTYPES):
    out = []
    for t in dtypes:
        for hd, (bm, bn, nw, st) in list(FWD_TILES.items()) + list(FWD_TILES_SM80.items()):
            for causal in (False, True):
                out.append(Spec("fwd", f"fc_sm80_fwd<{t}, {hd}, {hd}, {bm}, {bn}, {nw}, {st}, {b(causal)}>",
                                fwd_smem(hd, hd, bm, bn, nw, st), nw * 32, (bm, bn)))
        for atomic in (False, True):
            for hd, (bm, bn, nw, st) in (BWDQ_TILES if atomic else BWD_TILES).items():
              for causal in (False, True):
                    kname = "fc_sm80_bwd_dkdvq" if atomic else "fc_sm80_bwd_dkdv"
                    out.append(Spec("dkdvq" if atomic else "dkdv",
                                    f"{kname}<{t}, {hd}, {hd}, {bm}, {bn}, {nw}, {st}, {b(causal)}>",
                                    dkdv_smem(hd, hd, bm, bn, nw, st, atomic), nw * 32, (bm, bn)))
        for hd, (bm, bn, nw, st) in DQ_TILES.items():
            for causal in (False, True):
                out.append(Spec("dq", f"fc_sm80_bwd_dq<{t}, {hd}, {hd}, {bm}, {bn}, {nw}, {st}, {b(causal)}>",
                                dq_smem(hd, hd, bm, bn, nw, st), nw * 32, (bm, bn)))
        out.append(Spec("convert", f"fc_sm80_bwd_dq_convert<{t}, 4>", 0, 128, (4, 0)))
    return out


# Tile variants timed by harness.py --variants (bf16): kind -> hd -> [tiles]
VARIANTS = {
    "fwd": {64: [(128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 4, 2), (64, 64, 4, 2), (128, 128, 8, 3),
                 (128, 64, 8, 2)],
            128: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2),
                  (64, 32, 4, 2)]},
    "dkdv": {64: [(64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 3), (32, 128, 8, 2)],
             128: [(32, 128, 8, 2), (32, 64, 4, 2), (32, 128, 8, 3), (16, 128, 8, 2)]},
    "dkdvq": {64: [(64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 3), (32, 128, 8, 2)],
              128: [(32, 128, 8, 2), (32, 64, 4, 2), (32, 128, 8, 3), (16, 128, 8, 2)]},
    "dq": {64: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2)],
           128: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2)]},
}
_KN = {"fwd": "fc_sm80_fwd", "dkdv": "fc_sm80_bwd_dkdv", "dkdvq": "fc_sm80_bwd_dkdvq",
       "dq": "fc_sm80_bwd_dq"}


def variant_specs(t="fc_bf16"):
    out = []
    for kind, per in VARIANTS.items():
        for hd, lst in per.items():
            for (bm, bn, nw, st) in lst:
                for causal in (False, True):
                    if kind == "fwd":
                        sm = fwd_smem(hd, hd, bm, bn, nw, st)
                    elif kind == "dq":
                        sm = dq_smem(hd, hd, bm, bn, nw, st)
                    else:
                        sm = dkdv_smem(hd, hd, bm, bn, nw, st, kind == "dkdvq")
                    out.append(Spec(kind, f"{_KN[kind]}<{t}, {hd}, {hd}, {bm}, {bn}, {nw}, {st}, {b(causal)}>",
                                    sm, nw * 32, (bm, bn)))
    return out
