"""Continual learning of new facts: sparse memory finetuning (Lin et al. 2025) and its baselines (full finetuning,
LoRA, memory-only), a new-fact stream, and the continual-finetune script.

    python -m memlm.continual --ckpt runs/tiny/export --config configs/finetune/sparse_memory.yaml
    python -m memlm.continual.compare --ckpt runs/tiny/export        # all four methods, one table
"""

from memlm.continual.background import BackgroundError, BackgroundStats, compute_background, load_or_compute
from memlm.continual.factory import build_method
from memlm.continual.methods import FinetuneMethod, MethodError
from memlm.continual.smf import SparseMemoryFinetuning, kl_scores, select_top_t, tfidf_scores
from memlm.continual.stream import StreamError

__all__ = [
    "BackgroundError", "BackgroundStats", "FinetuneMethod", "MethodError", "SparseMemoryFinetuning", "StreamError",
    "build_method", "compute_background", "kl_scores", "load_or_compute", "select_top_t", "tfidf_scores",
]  # fmt: skip
