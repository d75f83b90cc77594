"""One launch of each bf16 attention kernel (ours and SDPA's FLASH_ATTENTION backend) for
Nsight Compute.  B=2, H=16, S=4096, D=$PROF_D (128), non-causal unless PROF_CAUSAL=1.

ncu --set full -k regex:'flash_fwd_kernel|flash_bwd_dq_dk_dv|fc_sm80' python3 prof.py
"""
import math
import os
import sys

import cupy as cp
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

D = int(os.environ.get("PROF_D", "128"))
causal = os.environ.get("PROF_CAUSAL", "0") == "1"
B, H, S = 2, 16, 4096
tq, tk, tv, tdo = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
for t in (tq, tk, tv):
    t.requires_grad_(True)
with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    torch.autograd.grad(out, (tq, tk, tv), tdo)
torch.cuda.synchronize()
q, k, v, do = (cp.from_dlpack(x.detach().view(torch.int16)).view(cp.uint16) for x in (tq, tk, tv, tdo))
harness.T = "bf16"
o, lse = harness.fwd(q, k, v, "bf16", causal, D ** -0.5, B, H)
for mode in os.environ.get("PROF_MODES", "det atomic").split():
    harness.bwd(q, k, v, o, lse, do, "bf16", causal, D ** -0.5, mode, B, H)
cp.cuda.Device().synchronize()
print("done")
