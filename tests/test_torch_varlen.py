"""GPU tests of flashcupy.torch.attention_varlen (autograd) and
flashcupy.torch.attention_with_kvcache (an operator that mutates the caches):
the same numbers as the CuPy calls (bit for bit: the same kernels on the same
memory), gradients through ``torch.autograd``, the appends visible to PyTorch,
``torch.compile(fullgraph=True)`` and CUDA-graph capture of a decode step."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy")
import flashcupy as fc  # noqa: E402

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # (a CPU build of torch beside a GPU)
    pytest.skip("torch has no CUDA", allow_module_level=True)

import flashcupy.torch as ft  # noqa: E402


def _c(t):
    return cp.from_dlpack(t.detach())


def _eq(a, b):
    return bool((_c(a) == b).all()) if isinstance(b, cp.ndarray) else bool(torch.equal(a, b))


def test_varlen_autograd_matches_cupy():
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [70, 0, 129, 33]
    total = sum(lens)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")
    q, k, v, do = (torch.randn(*s, total, 64, device="cuda", dtype=torch.bfloat16, generator=g)
                   for s in ((2, 2), (2, 1), (2, 1), (2, 2)))
    sink = torch.randn(2, 2, device="cuda", generator=g)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sink)]
    out = ft.attention_varlen(*leaves[:3], cu, cu, causal=True, sink=leaves[3], softcap=5.0)
    out.backward(do)
    o_c, lse_c = fc.attention_varlen(_c(q), _c(k), _c(v), _c(cu), _c(cu), causal=True,
                                     sink=_c(sink), softcap=5.0, return_lse=True)
    grads = fc.attention_varlen_backward(_c(do), _c(q), _c(k), _c(v), o_c, lse_c, _c(cu),
                                         _c(cu), causal=True, sink=_c(sink), softcap=5.0)
    assert _eq(out, o_c)
    for leaf, g_c in zip(leaves, grads):
        assert leaf.grad is not None and _eq(leaf.grad, g_c)


def test_varlen_dropout_backward_reuses_the_seed():
    torch.manual_seed(3)
    lens = [40, 90]
    cu = torch.tensor([0, 40, 130], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(2, 130, 32, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    out = ft.attention_varlen(q, k, v, cu, cu, dropout_p=0.3, seed=99)
    out.sum().backward()
    o_c, lse_c = fc.attention_varlen(_c(q), _c(k), _c(v), _c(cu), _c(cu), dropout_p=0.3, seed=99,
                                     return_lse=True)
    dq, dk, dv = fc.attention_varlen_backward(cp.ones_like(o_c), _c(q), _c(k), _c(v), o_c, lse_c,
                                              _c(cu), _c(cu), dropout_p=0.3, seed=99)
    assert _eq(out, o_c) and _eq(q.grad, dq) and _eq(k.grad, dk) and _eq(v.grad, dv)
    assert lens  # (two sequences)


def _decode_case(paged):
    g = torch.Generator(device="cuda").manual_seed(1)
    B, H, D = 3, 2, 64
    if paged:
        kc, vc = (torch.randn(10, H, 16, D, device="cuda", dtype=torch.bfloat16, generator=g)
                  for _ in range(2))
        table = torch.tensor([[4, 1, 7], [0, 9, 2], [3, 5, 6]], dtype=torch.int32, device="cuda")
    else:
        kc, vc = (torch.randn(B, H, 48, D, device="cuda", dtype=torch.bfloat16, generator=g)
                  for _ in range(2))
        table = None
    lens = torch.tensor([5, 17, 30], dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kn, vn = (torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
              for _ in range(2))
    return q, kc, vc, lens, kn, vn, table


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_op_matches_cupy_and_appends(paged):
    q, kc, vc, lens, kn, vn, table = _decode_case(paged)
    kc2, vc2 = kc.clone(), vc.clone()
    out = ft.attention_with_kvcache(q, kc, vc, lens, k_new=kn, v_new=vn, block_table=table,
                                    causal=True)
    want = fc.attention_with_kvcache(_c(q), _c(kc2), _c(vc2), _c(lens), k_new=_c(kn),
                                     v_new=_c(vn), block_table=None if table is None else _c(table),
                                     causal=True)
    assert _eq(out, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)   # the appends landed in torch's memory
    if not paged:
        assert torch.equal(kc[torch.arange(3), :, lens.long()], kn[:, :, 0])


def test_kvcache_op_opcheck():
    q, kc, vc, lens, kn, vn, table = _decode_case(True)
    torch.library.opcheck(torch.ops.flashcupy.attention_with_kvcache.default,
                          (q, kc, vc, lens, kn, vn, None, table, True, None, None, None, None,
                           None, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_kvcache_torch_compile():
    q, kc, vc, lens, kn, vn, table = _decode_case(True)
    kc2, vc2 = kc.clone(), vc.clone()

    @torch.compile(fullgraph=True)
    def step(q, kc, vc, lens, kn, vn, table):
        return ft.attention_with_kvcache(q, kc, vc, lens, k_new=kn, v_new=vn, block_table=table,
                                         causal=True) * 2

    got = step(q, kc, vc, lens, kn, vn, table)
    want = ft.attention_with_kvcache(q, kc2, vc2, lens, k_new=kn, v_new=vn, block_table=table,
                                     causal=True) * 2
    assert torch.equal(got, want) and torch.equal(kc, kc2)


def test_kvcache_cuda_graph():
    q, kc, vc, lens, kn, vn, table = _decode_case(False)
    ft.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, k_new=kn, v_new=vn,
                              causal=True)   # compile every kernel before the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            out = ft.attention_with_kvcache(q, kc, vc, lens, k_new=kn, v_new=vn, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    for step in range(3):   # a decode loop: new lengths and tokens in the same tensors
        lens += 1
        kn.normal_()
        vn.normal_()
        ref_k, ref_v = kc.clone(), vc.clone()
        graph.replay()
        torch.cuda.synchronize()
        want = ft.attention_with_kvcache(q, ref_k, ref_v, lens, k_new=kn, v_new=vn, causal=True)
        assert torch.equal(out, want), step
        assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v), step
