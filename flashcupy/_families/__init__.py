"""Kernel families: one module per hardware path, each with its selection
table (the reason beside every row) and the functions that turn a
:class:`~flashcupy._spec.KernelSpec` of its family into a source file, a name
expression, a shared-memory size and a tile height.

* ``generic``: plain FMA in the accumulator type; every dtype, every GPU.
* ``sm80``: float16/bfloat16 on tensor cores with ``mma.sync`` (sm_80+).
* ``sm90``: float16/bfloat16 with warpgroup MMA (``wgmma``, sm_90a only), for the
  head dims it has tiles for; everything else of the call runs on sm80 kernels.
"""
