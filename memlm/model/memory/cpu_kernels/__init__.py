"""CPU kernels for the memory layers' scattered work, compiled with numba (the CPU counterpart of ``kernels/``).

Modules: :mod:`.topk` (the search forward and backward), :mod:`.lookup` (the lookup backward, row dots),
:mod:`.adam` (lazy Adam on rows), :mod:`.norm` (RMS norm), :mod:`.grad_norm` (gradient norms), :mod:`._base` (the
switch, threads, numpy views).

Stock PyTorch runs these steps as chains of mid-size ops, each a full pass over (tokens, heads, k) tensors; on CPU the
passes, not the arithmetic, are the cost. Each kernel here is one pass, parallel over rows:

- :func:`product_topk`: the exact product-key top-k from the two halves' dense scores: each half's top-k (a
  threshold pass, 64 scores per vector compare mask, keeps a few more than k candidates, which are ranked), then the
  top-k pair sums, in order, from a heap frontier over the two sorted lists, written as slot ids. Replaces
  ``torch.topk`` on both halves, the staircase candidate sums and a second ``torch.topk``. Narrow query halves are
  scored in chunks of queries, each chunk's batched matmul writing a cache-sized tile that the selection then reads.
- :func:`lookup_backward`: both gradients of a weighted lookup from one pass over each touched row's occurrences
  (sorted by ``torch.sort``): each occurrence's output-gradient row is read once, for its weight's dot with the value
  row and for the row's gradient sum. Replaces an embedding bag over the segments plus a sampled matmul.
- :func:`search_backward`: the product-key search's query and sub-key gradients, one task per (head, half), no sort.
- :func:`row_dots`: ``<table[idx[m, k]], x[m]>`` (PEER's and UltraMemV2's row dots).
- :func:`adam_rows_`: lazy Adam on the touched rows of fp32 tables in place: one pass reading the gradient, parameter
  and moment rows, where PyTorch gathers the moments, steps the gathered copy and scatters it back.
- :func:`rms_norm`: the query net's RMSNorm and Memory+'s qk-norm, one pass forward and one backward.
- :func:`l2_norm`: the norm of a value table's gradient rows for clipping, on every thread (PyTorch's CPU norm runs
  on one).

``available()`` is False when numba is missing, under ``MEMLM_CPU_KERNELS=0``, inside torch.compile and under CPU
autocast; every caller then keeps its PyTorch path (the two are checked against each other in
tests/test_cpu_kernels.py). Kernels compile on first use (cached on disk by numba) and run on
``torch.get_num_threads()`` threads. Ties: within a half the top-k keeps the lower sub-key id first; equal pair sums
come out in heap order. A row with NaN scores gets valid but arbitrary slots (``torch.topk`` ranks NaN highest); the
NaN reaches the layer's output either way. Tensors reach numba as views made from their data pointers (:func:`_np`),
never through ``Tensor.numpy()``, which would pin the storage's size (FSDP resizes parameter storage). Row ids are
not bounds-checked: out-of-range ids read or write arbitrary memory, as the Triton kernels would.
"""

from __future__ import annotations

from memlm.model.memory.cpu_kernels._base import FLOATS, available, numba
from memlm.model.memory.cpu_kernels.adam import adam_rows_
from memlm.model.memory.cpu_kernels.grad_norm import l2_norm
from memlm.model.memory.cpu_kernels.lookup import lookup_backward, row_dots, segments
from memlm.model.memory.cpu_kernels.norm import rms_norm
from memlm.model.memory.cpu_kernels.topk import CHUNK_MAX_HALF, product_topk, search_backward, topk_of_half_scores

__all__ = ["CHUNK_MAX_HALF", "FLOATS", "adam_rows_", "available", "l2_norm", "lookup_backward", "numba",
           "product_topk", "rms_norm", "row_dots", "search_backward", "segments", "topk_of_half_scores"]  # fmt: skip
