"""UltraMem (Huang et al. 2024, ICLR 2025, "Ultra-Sparse Memory Network").

Implements, on top of the shared product-key retrieval (``product_topk``) and value lookup (``value_lookup``):

- TDQKR (Tucker-decomposed query-key retrieval): each half of the query gives ``r`` row (column) queries; sub-key i of
  a half scores ``s_row[i] in R^r``; slot (i, j) scores ``s_row[i]^T C s_col[j]`` with a learned r x r core C.
  Candidate search uses the rank-1 SVD approximation ``C ~ sigma u v^T``: rows are ranked by ``u . s_row[i]`` and
  columns by ``v . s_col[j]``. Because these marginals are signed, the candidates are each half's top-knn AND
  bottom-knn (``product_topk(signed=True)``), which makes the search exact for a rank-1 core; the (2 knn)^2 candidate
  grid is then rescored exactly with C and its top-knn kept. The SVD factors are buffers refreshed once per optimizer
  step (``refresh()``, or automatically on the first forward after the core changed). Auxiliary loss
  ``alpha * sum relu(sigma_i - tau)^2`` over the non-leading singular values keeps C close to rank 1.
- MCS (multi-core scoring): ``cores`` cores C_1..C_h per head; their sum selects the top-k; core c's score weights
  the c-th 1/h slice of the value vector.
- IVE (implicit value expansion): ``n_keys**2`` virtual slots over ``n_keys**2 / E`` physical rows. A fixed seeded
  permutation maps virtual v to p = perm[v], physical row p mod N and group p div N; the selected rows are weighted and
  sum-pooled per group, then one Linear(E * v_dim -> dim) maps the E pooled vectors to the output.
- Raw scores as weights (no softmax); parameter-free LayerNorm on the query halves and on the sub-keys, scores are
  their cosine similarity (dot / half, bounded); value dim halved by default + output projection.

Skip-layer placement is done by the model (``memory.skip``); the value-lr schedule by training.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.config import MemoryConfig
from memlm.model.memory.base import MemoryLayer
from memlm.model.memory.pkm import QueryNet
from memlm.model.memory.product_keys import ProductKeys, product_topk
from memlm.model.memory.values import ValueTable, value_lookup


def virtual_slot_map(n_virtual: int, expansion: int, seed: int) -> torch.Tensor:
    """The fixed IVE permutation: (n_virtual,) int64 ``p``; virtual v -> (row p[v] mod N, group p[v] div N).

    With ``expansion == 1`` it is the identity (virtual slot == physical row), so E = 1 is the plain layer.
    """
    if expansion == 1:
        return torch.arange(n_virtual)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_virtual, generator=g)


class UltraMem(MemoryLayer):
    """UltraMem layer: TDQKR + MCS + IVE. ``last_indices`` are physical value rows (what ``value_table`` indexes);
    ``last_virtual`` keeps the virtual slot ids; ``last_weights`` the selection score (sum over cores)."""

    def __init__(self, dim: int, cfg: MemoryConfig, v_dim: int, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.dim, self.v_dim = cfg, dim, v_dim
        self.heads, self.knn, self.n_keys = cfg.heads, cfg.knn, cfg.n_keys
        self.rank, self.n_cores, self.expansion = cfg.tucker_rank, cfg.cores, cfg.value_expansion
        self.half = cfg.half_dim
        self.n_virtual = cfg.n_slots
        self.n_slots = cfg.physical_rows  # rows of the value table
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.query_dropout = nn.Dropout(cfg.query_dropout)
        self.value_dropout = nn.Dropout(cfg.value_dropout)
        self.query = QueryNet(dim, cfg.heads * cfg.tucker_rank, cfg.k_dim, cfg.query_norm)  # r queries per head
        self.keys = ProductKeys(cfg.heads, cfg.n_keys, cfg.k_dim)  # (heads, 2, n_keys, half); normalized in scores
        self.core = nn.Parameter(torch.empty(cfg.heads, cfg.cores, cfg.tucker_rank, cfg.tucker_rank))
        self.values = ValueTable(self.n_slots, v_dim)
        self.out = nn.Linear(self.expansion * v_dim, dim, bias=False)
        self.out.residual = True
        self.register_buffer("virtual_map", virtual_slot_map(self.n_virtual, self.expansion, seed))
        self.register_buffer("svd_u", torch.zeros(cfg.heads, cfg.tucker_rank), persistent=False)
        self.register_buffer("svd_v", torch.zeros(cfg.heads, cfg.tucker_rank), persistent=False)
        self._svd_key: tuple[int, int] | None = None
        self.last_virtual: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Cores start near rank 1: C_c = e1 e1^T / h + N(0, 0.05^2), so sum_c C_c ~ e1 e1^T (sigma_2 < tau)."""
        self.core.normal_(0.0, 0.05)
        self.core[..., 0, 0] += 1.0 / self.n_cores
        self._svd_key = None

    @property
    def value_table(self) -> ValueTable:
        return self.values

    # ---------------------------------------------------------------------------------------------- Tucker core
    def _core_key(self) -> tuple[int, int]:
        return (self.core.data_ptr(), self.core._version)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the rank-1 factors of each head's summed core. Call after every optimizer step (cheap:
        ``heads`` SVDs of r x r); forward also calls it when the core changed since the last refresh."""
        c = self.core.detach().float().sum(1)  # (heads, r, r)
        u, _, vh = torch.linalg.svd(c)  # (heads, r, r), (heads, r), (heads, r, r)
        self.svd_u.copy_(u[..., 0])  # (heads, r)
        self.svd_v.copy_(vh[..., 0, :])  # (heads, r)
        self._svd_key = self._core_key()

    def singular_values(self) -> torch.Tensor:
        """(heads, r) singular values of each head's summed core (for logging)."""
        return torch.linalg.svdvals(self.core.detach().float().sum(1))

    def no_decay_parameters(self) -> list[nn.Parameter]:
        # raw scores are the mixing weights: decaying the core would shrink every read (the aux loss shapes it)
        return [self.core]

    def _aux(self) -> torch.Tensor | None:
        if self.rank == 1 or self.cfg.aux_alpha == 0:
            return None
        sigma = torch.linalg.svdvals(self.core.float().sum(1))  # (heads, r), descending
        return self.cfg.aux_alpha * F.relu(sigma[:, 1:] - self.cfg.aux_tau).pow(2).sum()

    # ---------------------------------------------------------------------------------------------- retrieval
    def half_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., dim) -> s_row, s_col each (..., heads, n_keys, r): cosine of each row query with each sub-key,
        in fp32 also under autocast (raw scores are the mixing weights, no softmax)."""
        q = self.query_dropout(self.query(x))  # (..., heads * r, k_dim)
        q = q.unflatten(-2, (self.heads, self.rank)).unflatten(-1, (2, self.half))  # (..., heads, r, 2, half)
        with torch.autocast(q.device.type, enabled=False):
            q = F.layer_norm(q.float(), (self.half,))
            k = F.layer_norm(self.keys.weight.float(), (self.half,))  # (heads, 2, n_keys, half)
            s = torch.einsum("...hrsd,hsnd->...hsnr", q, k) / self.half  # (..., heads, 2, n_keys, r)
        return s[..., 0, :, :], s[..., 1, :, :]

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., dim) -> (per-core weights (..., heads, cores, knn), virtual slots (..., heads, knn),
        selection scores (..., heads, knn) sorted descending). Weights carry gradient; the search does not."""
        if self._svd_key != self._core_key():
            self.refresh()
        s_row, s_col = self.half_scores(x)  # (..., heads, n_keys, r) each, fp32
        with torch.autocast(x.device.type, enabled=False):  # search, rescoring and weights all in fp32
            return self._search_and_weigh(s_row, s_col)

    def _search_and_weigh(self, s_row: torch.Tensor, s_col: torch.Tensor):
        """The exact signed search over the half scores, then each selected slot's per-core weight (see retrieve)."""
        core_sum = self.core.float().sum(1)  # (heads, r, r)
        with torch.no_grad():
            a = torch.einsum("...hnr,hr->...hn", s_row, self.svd_u)  # (..., heads, n_keys) rank-1 row marginal
            b = torch.einsum("...hnr,hr->...hn", s_col, self.svd_v)  # (..., heads, n_keys) rank-1 col marginal
            sr, sc, cs = s_row.detach(), s_col.detach(), core_sum.detach()

            def grid(i1: torch.Tensor, i2: torch.Tensor) -> torch.Tensor:
                rows = sr.gather(-2, i1.unsqueeze(-1).expand(*i1.shape, self.rank))  # (..., heads, c1, r)
                cols = sc.gather(-2, i2.unsqueeze(-1).expand(*i2.shape, self.rank))  # (..., heads, c2, r)
                left = torch.einsum("...hir,hrs->...his", rows, cs)  # (..., heads, c1, r)
                return left @ cols.transpose(-1, -2)  # (..., heads, c1, c2) exact score with the summed core

            scores, virtual = product_topk(a, b, self.knn, signed=True, grid=grid)  # (..., heads, knn) each
        r_idx, c_idx = virtual // self.n_keys, virtual % self.n_keys  # (..., heads, knn)
        rows = s_row.gather(-2, r_idx.unsqueeze(-1).expand(*r_idx.shape, self.rank))  # (..., heads, knn, r)
        cols = s_col.gather(-2, c_idx.unsqueeze(-1).expand(*c_idx.shape, self.rank))  # (..., heads, knn, r)
        weights = torch.einsum("...hkr,hcrs,...hks->...hck", rows, self.core.float(), cols)  # (..., heads, cores, knn)
        return weights, virtual, scores

    def physical(self, virtual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Virtual slot ids (...) -> (physical row, group), each (...)."""
        p = self.virtual_map[virtual]  # (...)
        return p % self.n_slots, p // self.n_slots

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_dropout(x)
        weights, virtual, _ = self.retrieve(h)  # (B, T, heads, cores, knn), (B, T, heads, knn)
        rows, group = self.physical(virtual)  # (B, T, heads, knn) each
        self._record(rows, weights.sum(-2))
        if self.record:
            self.last_virtual = virtual.detach()
        self.aux_loss = self._aux() if self.training else None  # a training regulariser: not part of val loss
        hc, E = self.n_cores, self.expansion
        lead = rows.shape[:-2]
        m = self.heads * self.knn
        rows = rows.reshape(*lead, m)  # (B, T, M) all heads' rows in one bag
        w = weights.transpose(-3, -2).reshape(*lead, hc, m)  # (B, T, cores, M)
        table = self.values.weight
        if hc > 1:
            table = table.view(self.n_slots * hc, -1)  # row n, slice c -> row n * h + c (-1: also a column shard's)
            idx = rows.unsqueeze(-2) * hc + torch.arange(hc, device=rows.device).unsqueeze(-1)  # (B, T, cores, M)
        else:
            idx = rows.unsqueeze(-2)  # (B, T, 1, M)
        if E > 1:
            # one bag per (group, core): entries of other groups get weight 0 (reads each row E times; see report)
            member = group.reshape(*lead, 1, m) == torch.arange(E, device=rows.device).unsqueeze(-1)  # (B, T, E, M)
            w = w.unsqueeze(-3) * member.unsqueeze(-2)  # (B, T, E, cores, M)
            idx = idx.unsqueeze(-3).expand(*lead, E, hc, m)  # (B, T, E, cores, M)
        read = value_lookup(table, idx, w, sparse=self.cfg.sparse_grad)  # (B, T, [E,] cores, v_dim / cores)
        read = self.value_dropout(read.reshape(*lead, E * self.v_dim))  # (B, T, E * v_dim)
        return self.out(read)

    def extra_repr(self) -> str:
        return (
            f"virtual={self.n_virtual}, rows={self.n_slots}, E={self.expansion}, rank={self.rank}, "
            f"cores={self.n_cores}, heads={self.heads}, knn={self.knn}, v_dim={self.v_dim}"
        )
