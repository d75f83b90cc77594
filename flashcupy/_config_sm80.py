"""Tensor-core (sm_80+, mma.sync) family: specializations and their table.

Filled in when the family lands; until then ``AVAILABLE`` is False and the
dispatcher never picks it.
"""
from __future__ import annotations

AVAILABLE = False


def source(spec) -> str:
    raise NotImplementedError("the sm80 kernel family is not available yet")


def name_expression(spec) -> str:
    raise NotImplementedError("the sm80 kernel family is not available yet")


def smem_bytes(spec) -> int:
    raise NotImplementedError("the sm80 kernel family is not available yet")
