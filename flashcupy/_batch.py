"""Batch axes: numpy.matmul-style broadcasting without materializing it.

Kernels see three batch axes (cuda_src/params.cuh).  Here the broadcast batch
shape of all operands is reduced to as few axes as possible by merging
adjacent axes that are contiguous with each other in every operand; when more
than three remain, the launcher loops over the outermost ones on the host.
Broadcast axes have stride 0 in the operands that broadcast them.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


def batch_strides(shape, strides_elems, bshape) -> list:
    """Strides (in elements) of an operand over the broadcast batch shape.

    ``shape``/``strides_elems`` are the operand's batch part (leading dims only);
    they align to the right of ``bshape``.  Missing or size-1 axes get 0.
    """
    n = len(bshape)
    out = [0] * n
    off = n - len(shape)
    for i, (s, st) in enumerate(zip(shape, strides_elems)):
        out[off + i] = 0 if s == 1 else st
    return out


def is_broadcast(shape, bshape) -> list:
    """Per batch axis: True where the operand has size 1 (or lacks the axis) but
    the broadcast shape is larger, i.e. where its gradient must be summed."""
    n = len(bshape)
    off = n - len(shape)
    res = []
    for i in range(n):
        s = shape[i - off] if i >= off else 1
        res.append(s == 1 and bshape[i] > 1)
    return res


@dataclass
class Layout:
    """Coalesced batch axes: ``sizes[i]`` and, per operand, ``strides[name][i]``."""

    sizes: list
    strides: dict
    pinned: bool = False  # sizes[0] is the sequence axis: the kernels' b0 (seq.cuh)

    @classmethod
    def build(cls, bshape, dims, strides: dict, pin_first: bool = False) -> "Layout":
        """Keeps the axes ``dims`` of ``bshape`` (others are handled elsewhere),
        drops size-1 axes and merges axis i into i+1 wherever every operand has
        stride[i] == stride[i+1] * size[i+1].  ``pin_first``: the first of
        ``dims`` is the sequence axis, kept alone (even of size 1) and handed
        to the kernels as their axis b0."""
        dims = list(dims)
        if pin_first:
            d0 = dims[0]
            rest = cls.build(bshape, dims[1:], strides)
            return cls([bshape[d0]] + rest.sizes,
                       {k: [strides[k][d0]] + rest.strides[k] for k in strides}, True)
        sizes = []
        st = {k: [] for k in strides}
        for d in dims:
            if bshape[d] == 1:
                continue
            if sizes and all(st[k][-1] == strides[k][d] * bshape[d] for k in strides):
                sizes[-1] *= bshape[d]
                for k in strides:
                    st[k][-1] = strides[k][d]
                continue
            sizes.append(bshape[d])
            for k in strides:
                st[k].append(strides[k][d])
        return cls(sizes, st)

    @property
    def nbatch(self) -> int:
        return math.prod(self.sizes)

    def chunks(self):
        """Yields (nb0, nb1, nb2, {name: (element offset, sb0, sb1, sb2)}): the
        innermost three axes go to the kernel, the rest are looped over here."""
        if self.pinned:
            # the sequence axis, then the innermost two of the others (host loop
            # over the rest)
            hs = [1] * max(0, 2 - (len(self.sizes) - 1)) + list(self.sizes[1:])
            hst = {k: [0] * max(0, 2 - (len(v) - 1)) + list(v[1:]) for k, v in self.strides.items()}
            outer = hs[:-2]
            for idx in itertools.product(*[range(n) for n in outer]):
                offs = {k: sum(i * s for i, s in zip(idx, hst[k][:-2])) for k in hst}
                yield (self.sizes[0], *hs[-2:],
                       {k: (offs[k], self.strides[k][0], *hst[k][-2:]) for k in hst})
            return
        sizes = [1] * max(0, 3 - len(self.sizes)) + list(self.sizes)
        st = {k: [0] * max(0, 3 - len(v)) + list(v) for k, v in self.strides.items()}
        outer, inner = sizes[:-3], sizes[-3:]
        for idx in itertools.product(*[range(n) for n in outer]):
            offs = {k: sum(i * s for i, s in zip(idx, st[k][:-3])) for k in st}
            yield (*inner, {k: (offs[k], *st[k][-3:]) for k in st})
