"""The sm80 specializations this family ships, with their launch geometry.

Each entry mirrors what flashcupy/_config_sm80.py should hold.  smem formulas
are the ones in the kernel headers.
"""
from dataclasses import dataclass

DTYPES = ("fc_half", "fc_bf16")
PAD = 8

# head-dim bucket -> (BLOCK_M, BLOCK_N, NWARPS, STAGES), forward
FWD_TILES = {
    32: (128, 128, 8, 2),
    64: (128, 128, 8, 2),
    128: (128, 64, 8, 2),
    256: (64, 32, 4, 2),
}
# head-dim bucket -> (BLOCK_M [queries per step], BLOCK_N [keys per CTA], NWARPS, STAGES)
BWD_TILES = {
    32: (64, 128, 8, 2),
    64: (64, 128, 8, 2),
    128: (32, 128, 8, 2),
}
# dK/dV + atomic dQ kernel, same columns
BWDQ_TILES = {
    32: (64, 128, 8, 2),
    64: (64, 128, 8, 2),
    128: (32, 128, 8, 2),
}
# deterministic dQ kernel: (BLOCK_M, BLOCK_N, NWARPS, STAGES)
DQ_TILES = {
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
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
        for hd, (bm, bn, nw, st) in FWD_TILES.items():
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
