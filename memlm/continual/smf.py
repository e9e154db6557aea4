"""Sparse memory finetuning (SMF) — Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning".

Per finetuning batch:

1. count slot accesses ``c(i)`` over every non-padding token x head x top-k of the batch (``MemoryLayer.last_indices``
   of the training forward itself: no second forward), optionally only at answer tokens;
2. rank the accessed slots against the background statistics (:mod:`memlm.continual.background`):
   TF-IDF ``c(i)/sum(c) * log((|B|+1)/(df(i)+1))`` (documents = background batches as in the paper, or sequences:
   ``smf.df_unit``), KL ``p_b(i) * log(p_b(i)/p_bg(i))`` with ``p_bg = (bg_count + 1) / (sum bg_count + N)``
   (add-one smoothing of the background), or TF only ``c(i)`` (the paper's ablation);
3. update ONLY the top-t value rows, with row-sparse SGD (the paper: lr 2.0, no weight decay) or lazy Adam from
   :mod:`memlm.model.memory.sparse_update`. Every other value row, its optimizer state, and every non-memory parameter
   stays bitwise unchanged: non-value parameters are frozen (no gradient at all), and the row-sparse steps touch
   nothing but the given rows (no weight decay, no stale momentum).

Logged per step (:meth:`SparseMemoryFinetuning.update`): rows the batch read, rows selected, selected rows whose
score is <= 0 (IDF 0: read in every background document), overlap with the previous step's selection, the fraction
of the batch's slot accesses the selection covers, the relative change of the updated rows, and — when
:meth:`SparseMemoryFinetuning.set_protected` was given the slots the held-in facts read — the fraction of selected
rows among those slots (next to that set's share of the table, the overlap a random selection would have).
"""

from __future__ import annotations

import math

import torch

from memlm.config import FinetuneConfig
from memlm.continual.background import BackgroundStats, table_counts
from memlm.continual.methods import FinetuneMethod, check_method_applies, freeze_all_but
from memlm.model.memory.sparse_update import RowSparseAdam, sgd_rows_
from memlm.model.memory.values import shard_of

# ----------------------------------------------------------------------------------------------------------------------
# ranking and selection (pure functions on count tables)


def tfidf_scores(counts: torch.Tensor, df: torch.Tensor, n_batches: int) -> torch.Tensor:
    """(N,) batch counts, (N,) background document frequencies -> (N,) TF-IDF scores (0 where not accessed)."""
    counts = counts.double()
    tf = counts / counts.sum().clamp_min(1.0)  # (N,)
    idf = torch.log((n_batches + 1.0) / (df.double().to(counts.device) + 1.0))  # (N,)
    return tf * idf


def kl_scores(counts: torch.Tensor, bg_counts: torch.Tensor) -> torch.Tensor:
    """(N,) batch counts, (N,) background counts -> (N,) KL terms ``p_b log(p_b / p_bg)`` (0 where not accessed)."""
    counts = counts.double()
    bg = bg_counts.double().to(counts.device)
    p_b = counts / counts.sum().clamp_min(1.0)  # (N,)
    p_bg = (bg + 1.0) / (bg.sum() + bg.numel())  # (N,) add-one smoothing: never 0
    safe = torch.where(counts > 0, p_b, torch.ones_like(p_b))
    return torch.where(counts > 0, p_b * torch.log(safe / p_bg), torch.zeros_like(p_b))


def rank_scores(
    counts: torch.Tensor, stats: BackgroundStats, table: int, ranking: str, df_unit: str = "batch"
) -> torch.Tensor:
    if ranking == "tfidf":
        df, n_docs = stats.doc_freq(table, df_unit)
        return tfidf_scores(counts, df, n_docs)
    if ranking == "kl":
        return kl_scores(counts, stats.counts[table])
    if ranking == "tf":
        return counts.double()
    raise ValueError(f"unknown SMF ranking {ranking!r} (tfidf, kl or tf)")


def select_top_t(scores: torch.Tensor, counts: torch.Tensor, t: int) -> torch.Tensor:
    """Sorted (<= t,) row ids: the t highest-scoring rows among those the batch accessed (ties -> lower id).

    Ties are common (e.g. every row the background read in all of its batches has IDF 0), so the order is made
    explicit: a stable sort of the ascending candidates keeps lower ids first among equal scores."""
    cand = (counts > 0).nonzero().squeeze(1)  # (C,) ascending
    if cand.numel() > t:
        order = torch.sort(scores[cand], descending=True, stable=True).indices[:t]  # (t,)
        cand = cand[order]
    return cand.sort().values


def group_counts(counts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A memory-parallel shard's (N,) access counts summed over its group, in place (a collective), so every rank
    selects the same rows; its gradient already holds every rank's tokens (``memlm.model.memory.parallel``). An
    unsharded table's counts are returned as they are."""
    spec = shard_of(table)
    if spec is not None and spec.world > 1:
        torch.distributed.all_reduce(counts, group=spec.group)
    return counts


def row_mask(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) bool mask of the selected rows (which value rows are trainable this step)."""
    m = torch.zeros(n_rows, dtype=torch.bool, device=rows.device)
    m[rows] = True
    return m


def rows_of_grad(grad: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of ``rows`` (sorted unique): dense -> index_select; sparse COO -> the rows it holds."""
    if grad.is_sparse:
        g = grad.coalesce()
        idx, vals = g.indices()[0], g.values()  # (U,), (U, D)
        keep = torch.isin(idx, rows)
        return idx[keep], vals[keep]
    return rows, grad.index_select(0, rows)  # (t,), (t, D)


# ----------------------------------------------------------------------------------------------------------------------
# the method


class SparseMemoryFinetuning(FinetuneMethod):
    """Only the top-t value rows of each batch are trainable; everything else is frozen, bitwise."""

    name = "sparse_memory"

    def __init__(self, model, cfg: FinetuneConfig, background: BackgroundStats) -> None:
        super().__init__(model, cfg)
        check_method_applies(model, cfg)
        self.smf = cfg.smf
        self.stats = background
        self.tables = [t.weight for t in model.value_tables()]
        if [w.shape[0] for w in self.tables] != [d.numel() for d in background.df]:
            raise ValueError("background statistics do not match the model's value tables")
        dev = self.tables[0].device  # ranked every step: keep the background on the tables' device once
        background.df = [d.to(dev) for d in background.df]
        background.counts = [c.to(dev) for c in background.counts]
        if background.seq_df is not None:
            background.seq_df = [d.to(dev) for d in background.seq_df]
        if self.smf.ranking == "tfidf":
            background.doc_freq(0, self.smf.df_unit)  # raises now (before any step) when the unit is missing
        freeze_all_but(model, self.tables)
        for layer in model.memory_layers:
            layer.record = True
        o = cfg.optim
        self.opt = None
        if o.name == "adam":
            self.opt = RowSparseAdam(self.tables, lr=o.lr, betas=tuple(o.betas), eps=o.eps, per_row_step=o.per_row_step)
        self.prev: list[torch.Tensor | None] = [None] * len(self.tables)
        # the previous fact's selection (paraphrase mode: consecutive steps of one fact select nearly the same rows,
        # so the step-to-step overlap says little; the fact-to-fact overlap shows whether facts get their own slots)
        self.fact: str | None = None
        self.prev_fact_rows: list[torch.Tensor | None] = [None] * len(self.tables)
        self.cur_fact_rows: list[torch.Tensor | None] = [None] * len(self.tables)
        self.touched = [torch.zeros(w.shape[0], dtype=torch.bool, device=w.device) for w in self.tables]
        self.last_rows: list[torch.Tensor] = []
        self.protected: list[torch.Tensor] | None = None  # per table (rows,) bool: slots the held-in facts read

    def set_protected(self, masks: list[torch.Tensor]) -> None:
        """Per value table, a (rows,) bool mask of slots to watch (e.g. those held-in facts read): every step then logs
        the fraction of selected rows inside it (``smf/protected_overlap``) and the mask's share of the table
        (``smf/protected_frac``, the overlap of a random selection)."""
        self.protected = [m.to(w.device) for m, w in zip(masks, self.tables)]

    def select(self, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(rows per table, counts per table) from the last forward's recorded indices."""
        mask = batch.answer if self.smf.answer_only else batch.valid  # (B, T): padding never counts
        counts = table_counts(self.model, mask)
        rows = []
        self.last_scores = []
        for k, c in enumerate(counts):
            c = group_counts(c, self.tables[k])
            counts[k] = c
            scores = rank_scores(c, self.stats, k, self.smf.ranking, self.smf.df_unit)
            rows.append(select_top_t(scores, c, self.smf.top_t))
            self.last_scores.append(scores)
        return rows, counts

    @torch.no_grad()
    def update(self, batch) -> dict[str, float]:
        rows_per_table, counts = self.select(batch)
        fact = getattr(batch, "fact", None)
        if fact is not None and fact != self.fact:
            self.fact, self.prev_fact_rows = fact, list(self.cur_fact_rows)
        keys = ("read", "selected", "zero", "overlap", "fact_overlap", "covered", "total", "protected", "dw2", "w2")
        n = dict.fromkeys(keys, 0.0)
        rel_rows: list[torch.Tensor] = []
        self.last_rows = rows_per_table
        for k, (w, rows, c) in enumerate(zip(self.tables, rows_per_table, counts)):
            if w.grad is not None and rows.numel():
                r, g = rows_of_grad(w.grad, rows)
                before = w.detach()[r].float()  # (t, D) the rows before their step
                if self.opt is None:
                    sgd_rows_(w, r, g, self.cfg.optim.lr)
                else:
                    self.opt.step_rows(w, r, g)
                self.touched[k][r] = True
                dw = w.detach()[r].float() - before  # (t, D)
                n["dw2"] += float(dw.square().sum())
                n["w2"] += float(before.square().sum())
                rel_rows.append(dw.norm(dim=1) / before.norm(dim=1).clamp_min(1e-12))  # (t,)
            prev = self.prev[k]
            if prev is not None and rows.numel():
                n["overlap"] += float(torch.isin(rows, prev).sum())
            self.prev[k] = rows
            if fact is not None:
                if self.prev_fact_rows[k] is not None and rows.numel():
                    n["fact_overlap"] += float(torch.isin(rows, self.prev_fact_rows[k]).sum())
                self.cur_fact_rows[k] = rows
            n["read"] += float((c > 0).sum())
            n["selected"] += rows.numel()
            n["zero"] += float((self.last_scores[k][rows] <= 0).sum())
            n["covered"] += float(c[rows].sum())
            n["total"] += float(c.sum())
            if self.protected is not None:
                n["protected"] += float(self.protected[k][rows].sum())
        sel = n["selected"]
        logs = {
            "smf/rows_read": n["read"],
            "smf/selected": sel,
            "smf/selected_zero_score": n["zero"],
            "smf/overlap_prev": n["overlap"] / sel if sel else 0.0,
            "smf/overlap_prev_fact": n["fact_overlap"] / sel if sel else 0.0,
            "smf/access_coverage": n["covered"] / n["total"] if n["total"] else 0.0,
            # how far one step moves the updated rows: ||dW|| / ||W|| over them, and the median row's own ratio
            "smf/rel_change": math.sqrt(n["dw2"] / n["w2"]) if n["w2"] else 0.0,
            "smf/rel_change_median_row": float(torch.cat(rel_rows).median()) if rel_rows else 0.0,
        }
        if self.protected is not None:
            logs["smf/protected_overlap"] = n["protected"] / sel if sel else 0.0
            logs["smf/protected_frac"] = sum(float(m.sum()) for m in self.protected) / sum(
                m.numel() for m in self.protected
            )
        return logs

    def summary(self) -> dict[str, float]:
        n = sum(int(t.sum()) for t in self.touched)
        rows = sum(t.numel() for t in self.touched)
        per_step = sum(min(self.smf.top_t, w.shape[0]) * w[0].numel() for w in self.tables)
        # trainable_params: the tables any step may update; per step at most top_t rows of each
        return {"trainable_params": sum(w.numel() for w in self.tables), "trainable_params_per_step": per_step,
                "rows_updated": n, "rows_updated_frac": n / rows if rows else math.nan}  # fmt: skip
