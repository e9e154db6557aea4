"""UltraMemV2 (2025, "UltraMemV2: Memory Networks Scaling to 120B Parameters with Superior Long-Context Learning").

Implements the memory layer of UltraMemV2 on the shared product-key retrieval and value lookup:

- PEER-style value processing: every slot i also has a small pre-value p_i; the weight of a selected slot is
  ``score_i * act(<p_i, W_pre x>)`` (scores normalized by ``memory.score_fn``, softmax by default).
- Value expansion by a single linear projection: values are ``v_dim`` wide (dim / 2 by default), one
  Linear(v_dim -> dim) writes the output.
- One global value (and pre-value) table for the whole model; memory layer m reads its own window of
  ``n_keys**2`` rows starting at ``m * window_stride`` (disjoint windows by default, overlapping when the stride is
  smaller). ``last_indices`` are global row ids, so SMF and row-sparse updates act on the right rows.
- Placement (a memory in every block, parallel to a smaller FFN) is configuration: ``layers`` lists every block,
  ``mode: parallel`` and a smaller ``ffn_hidden``.

Init (the output variance does not depend on knn, heads or depth), derived in :meth:`UltraMemV2.reset_parameters`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.config import MemoryConfig
from memlm.model.memory.base import MemoryLayer
from memlm.model.memory.pkm import QueryNet
from memlm.model.memory.product_keys import ProductKeys, normalize_scores
from memlm.model.memory.values import ValueTable, row_dot, value_lookup

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "sigmoid": torch.sigmoid}


def act_second_moment(name: str) -> float:
    """E[act(z)^2] for z ~ N(0, 1), by quadrature on a fine grid (deterministic, no sampling)."""
    z = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return float((ACTIVATIONS[name](z).pow(2) * pdf).sum() * (z[1] - z[0]))


class GlobalValues(nn.Module):
    """UltraMemV2's model-level tables: values (rows, v_dim) and pre-values (rows, pre_dim), windows per layer."""

    def __init__(self, rows: int, v_dim: int, pre_dim: int) -> None:
        super().__init__()
        self.values = ValueTable(rows, v_dim)  # N(0, 1 / v_dim)
        self.pre = ValueTable(rows, pre_dim)  # N(0, 1 / pre_dim)


class UltraMemV2(MemoryLayer):
    """UltraMemV2 memory layer reading window ``window_index`` of a :class:`GlobalValues` pool."""

    def __init__(
        self,
        dim: int,
        cfg: MemoryConfig,
        pool: GlobalValues,
        window_index: int,
        n_memory_layers: int,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.cfg, self.dim = cfg, dim
        self.heads, self.knn = cfg.heads, cfg.knn
        self.v_dim, self.pre_dim = pool.values.dim, pool.pre.dim
        self.window = cfg.n_slots  # rows this layer addresses
        self.offset = window_index * cfg.window_step  # first global row of the window
        self.n_slots = pool.values.n_slots  # last_indices are global rows of the pool
        self.n_memory_layers, self.init_std = n_memory_layers, init_std
        self.act = ACTIVATIONS[cfg.pre_value_act]
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.query_dropout = nn.Dropout(cfg.query_dropout)
        self.value_dropout = nn.Dropout(cfg.value_dropout)
        self.query = QueryNet(dim, cfg.heads, cfg.k_dim, cfg.query_norm)
        self.keys = ProductKeys(cfg.heads, cfg.n_keys, cfg.k_dim, qk_norm=cfg.use_qk_norm)
        self.pre_proj = nn.Linear(dim, self.pre_dim, bias=False)  # W_pre
        self.out = nn.Linear(self.v_dim, dim, bias=False)  # the single value-expansion projection
        object.__setattr__(self, "_pool", pool)  # not registered: the model owns the global tables
        # read scale g: makes each read coordinate unit-variance at init (see reset_parameters)
        self.read_scale = math.sqrt(self.knn * self.v_dim / (self.heads * act_second_moment(cfg.pre_value_act)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Init keeping Var(output) = init_std^2 / n_memory_layers, whatever knn, heads and depth.

        Derivation (x = the RMS-normalized block input, unit variance per coordinate):
        1. W_pre ~ N(0, 1/dim) -> (W_pre x)_j has variance 1; pre-values p_i ~ N(0, 1/pre_dim) (the table's init)
           -> z_i = <p_i, W_pre x> ~ N(0, 1) and E[act(z)^2] = c_act (computed by quadrature).
        2. At init the top-knn scores of a head are near-tied (they are the knn largest of n_keys^2 nearly
           exchangeable scores), so softmax gives s_k ~ 1/knn and sum_k s_k^2 ~ 1/knn.
        3. Values V ~ N(0, 1/v_dim), independent across rows. The read r = g * sum_{h,k} s_hk act(z_hk) V[i_hk] has
           Var(r_j) = g^2 * heads * knn * (1/knn^2) * c_act * (1/v_dim) = g^2 * heads * c_act / (knn * v_dim),
           so g = sqrt(knn * v_dim / (heads * c_act)) (``read_scale``, a constant) gives Var(r_j) = 1.
        4. W_o ~ N(0, init_std^2 / (v_dim * L_mem)): Var(y_i) = v_dim * Var(W_o) * 1 = init_std^2 / L_mem.
           The L_mem memory outputs are independent at init, so together they add init_std^2 (the variance of a
           token embedding) to the residual stream, at any depth.
        (The approximation in 2 makes the result hold to within ~20-40 %, tested over knn in {4, 16}.)
        """
        nn.init.normal_(self.pre_proj.weight, 0.0, 1.0 / math.sqrt(self.dim))
        nn.init.normal_(self.out.weight, 0.0, self.init_std / math.sqrt(self.v_dim * self.n_memory_layers))

    @property
    def value_table(self) -> ValueTable:
        return self._pool.values

    def sparse_tables(self) -> list[nn.Module]:
        return [self._pool.values, self._pool.pre]

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., dim) -> (raw scores, global rows), each (..., heads, knn)."""
        scores, idx = self.keys.retrieve(self.query(x), self.knn)  # (..., heads, knn), window-local
        return scores, idx + self.offset

    def local_slots(self, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
        return indices - self.offset, self.window  # global rows -> rows of this layer's window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_dropout(x)
        q = self.query_dropout(self.query(h))  # (B, T, heads, k_dim)
        scores, idx = self.keys.retrieve(q, self.knn)  # (B, T, heads, knn)
        rows = idx + self.offset  # (B, T, heads, knn) global rows
        s = normalize_scores(scores, self.cfg.score_fn)  # (B, T, heads, knn) fp32
        lead = rows.shape[:-2]
        flat = rows.reshape(*lead, self.heads * self.knn)  # (B, T, M)
        z = row_dot(self._pool.pre.weight, flat, self.pre_proj(h), sparse=self.cfg.sparse_grad)  # (B, T, M)
        w = s.reshape(*lead, -1) * self.act(z.float()) * self.read_scale  # (B, T, M)
        self._record(rows, w.view_as(s))
        read = value_lookup(self._pool.values.weight, flat, w, sparse=self.cfg.sparse_grad)  # (B, T, v_dim)
        return self.out(self.value_dropout(read))

    def extra_repr(self) -> str:
        return (
            f"window=[{self.offset}, {self.offset + self.window}), heads={self.heads}, knn={self.knn}, "
            f"v_dim={self.v_dim}, pre_dim={self.pre_dim}, act={self.cfg.pre_value_act}"
        )
