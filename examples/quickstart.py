# examples/quickstart.py: attention and its backward on the GPU, checked against
# flashcupy's float64 NumPy reference
import cupy as cp
import ml_dtypes
import numpy as np

import flashcupy as fc
from flashcupy import reference

bf16 = np.dtype(ml_dtypes.bfloat16)  # CuPy takes ml_dtypes' bfloat16 as an array dtype
B, H, S, D = 2, 4, 256, 64           # batch, heads, sequence length, head dim
q, k, v, dout = (cp.random.standard_normal((B, H, S, D), dtype=cp.float32).astype(bf16)
                 for _ in range(4))

out = fc.attention(q, k, v, causal=True)                 # softmax(q kᵀ / √D) v, exact
out, lse = fc.attention(q, k, v, causal=True, return_lse=True)
dq, dk, dv = fc.attention_backward(dout, q, k, v, out, lse, causal=True)

# the same from the same bfloat16 inputs, in float64 on the CPU
q64, k64, v64, dout64 = (cp.asnumpy(x.astype(cp.float64)) for x in (q, k, v, dout))
ref_out, ref_lse = reference.attention_naive(q64, k64, v64, causal=True)
ref_grads = reference.attention_backward_naive(dout64, q64, k64, v64, ref_out, ref_lse,
                                               causal=True)
for name, x, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref_out, *ref_grads)):
    err = np.abs(cp.asnumpy(x.astype(cp.float64)) - ref).max()
    print(f"{name}: {x.dtype} {x.shape}, max |error| {err:.1e}, max |ref| {np.abs(ref).max():.1f}")
