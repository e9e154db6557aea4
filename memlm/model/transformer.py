"""A decoder-only transformer LM with optional memory layers (MemLM).

Llama-style blocks: RMSNorm, rotary positions, causal attention through ``F.scaled_dot_product_attention`` (with
grouped-query heads), SwiGLU FFN. Blocks listed in ``memory.layers`` get a memory layer (PKM / Memory+ / ...), either
instead of their FFN (``replace``, as in the PKM and Memory+ papers) or beside it (``parallel``). Generation uses a
preallocated KV cache, supports batches of left-padded prompts, greedy or sampled decoding, and stop tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlm.config import ModelConfig
from memlm.model.memory import MemoryLayer, ProductKeys, ValueTable, build_memory_layer, build_shared_values


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (length, head_dim / 2) for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hd/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B or 1, 1, T, hd/2). Rotates (first half, second half) pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


@dataclass
class KVCache:
    """Preallocated keys/values of one attention layer: (B, kv_heads, max_len, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.wo.residual = True  # scaled init
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, hd)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[:, :, start : start + T] = k
            cache.v[:, :, start : start + T] = v
            k, v = cache.k[:, :, : start + T], cache.v[:, :, : start + T]  # (B, KVH, S, hd)
        if self.kv_heads != self.n_heads:
            rep = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)  # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w2.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, shared_values: ValueTable | None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        has_memory = layer_idx in cfg.memory_layers()
        replace = has_memory and cfg.memory.mode == "replace"
        self.ffn = None if replace else SwiGLU(cfg.dim, cfg.hidden_dim)
        self.memory: MemoryLayer | None = build_memory_layer(cfg, layer_idx, shared_values) if has_memory else None
        # skip-layer (UltraMem): the memory reads this block's input and MemLM adds its output after block i + skip
        self.skip = cfg.memory.skip if has_memory else 0
        self.mem_norm = RMSNorm(cfg.dim, cfg.norm_eps) if self.skip > 0 else None
        if self.ffn is None and self.skip > 0:
            self.ffn_norm = None  # nothing left in this block's FFN position
        self.drop = nn.Dropout(cfg.dropout)

    def skip_read(self, x: torch.Tensor) -> torch.Tensor:
        """The skip-layer memory's output for block input x (B, T, dim)."""
        return self.drop(self.memory(self.mem_norm(x)))

    def forward(self, x, cos, sin, mask=None, cache=None, start=0):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, start))
        if self.ffn_norm is None:
            return x
        h = self.ffn_norm(x)
        out = 0
        if self.ffn is not None:
            out = self.ffn(h)
        if self.memory is not None and self.skip == 0:
            out = out + self.memory(h)
        return x + self.drop(out)


class MemLM(nn.Module):
    """The language model. ``logits, loss = model(idx, targets)``; ``loss`` is None without targets.

    Targets equal to -100 are ignored (e.g. to train only on answer tokens).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.memory_values = build_shared_values(cfg)  # Memory+ shared pool (None when each layer owns its table)
        self.blocks = nn.ModuleList(Block(cfg, i, self.memory_values) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    # ---------------------------------------------------------------------------------------------- init & params
    @torch.no_grad()
    def init_weights(self) -> None:
        """The one init routine: N(0, init_std) for linears/embeddings, residual projections scaled by
        1/sqrt(2 n_layers) (GPT-2), PKM keys uniform(+-1/sqrt(k_dim)), values N(0, v_dim^-0.5), norms to one."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                s = std / math.sqrt(2 * self.cfg.n_layers) if getattr(m, "residual", False) else std
                nn.init.normal_(m.weight, 0.0, s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, (ProductKeys, ValueTable)):
                m.reset_parameters()
            elif isinstance(m, (RMSNorm, nn.RMSNorm, nn.LayerNorm, nn.BatchNorm1d)):
                m.reset_parameters()
        for m in self.modules():  # after the generic rules, so a memory layer's own init (UltraMemV2, cores) wins
            if isinstance(m, MemoryLayer) and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    @property
    def memory_layers(self) -> list[MemoryLayer]:
        return [b.memory for b in self.blocks if b.memory is not None]

    def value_tables(self) -> list[ValueTable]:
        """The distinct value tables (one when shared)."""
        seen, out = set(), []
        for layer in self.memory_layers:
            for t in layer.sparse_tables():  # value table (+ PEER's u, UltraMemV2's pre-values)
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    def value_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.value_tables()]

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Total parameter count (tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_emb.weight.numel()
        return n

    def param_groups(
        self,
        weight_decay: float,
        lr: float,
        value_lr: float | None = None,
        value_lr_mult: float = 1.0,
        keys_weight_decay: bool = False,
    ) -> list[dict]:
        """Optimizer parameter groups (nanoGPT style, from parameter properties).

        - ``decay``: matrices (>= 2-D) of the dense network, with ``weight_decay``;
        - ``no_decay``: norms, biases, product keys (unless ``keys_weight_decay``) and the memory layers'
          ``no_decay_parameters()`` (UltraMem's Tucker core);
        - ``memory_values``: the value tables, own lr (``value_lr`` fixed, else ``lr * value_lr_mult``), no decay.
        Each group carries ``name`` and ``lr_scale``/``fixed_lr`` so schedulers treat the value group apart.
        """
        value_ids = {id(p) for p in self.value_parameters()}
        key_ids = {id(m.weight) for m in self.modules() if isinstance(m, ProductKeys)}
        kept = {id(p) for m in self.memory_layers for p in m.no_decay_parameters()}  # e.g. UltraMem's Tucker core
        decay, no_decay, values = [], [], []
        for p in self.parameters():  # deduplicated (tied / shared weights appear once)
            if not p.requires_grad:
                continue
            if id(p) in value_ids:
                values.append(p)
            elif id(p) in key_ids:
                (decay if keys_weight_decay else no_decay).append(p)
            elif p.dim() >= 2 and id(p) not in kept:
                decay.append(p)
            else:
                no_decay.append(p)
        groups = [
            {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr": lr},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": lr},
        ]
        if values:
            groups.append(
                {
                    "name": "memory_values",
                    "params": values,
                    "weight_decay": 0.0,
                    "lr": value_lr if value_lr is not None else lr * value_lr_mult,
                    "fixed_lr": value_lr is not None,
                }
            )
        return [g for g in groups if g["params"]]

    # ---------------------------------------------------------------------------------------------- forward
    def _rope(self, positions: torch.Tensor | None, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (B or 1, 1, T, hd/2) for explicit per-row positions or the range [start, start+T)."""
        # the range's end is known on the host: no device sync (``positions.max()`` would stall every training step's
        # forward until the previous step's kernels finish, and breaks torch.compile graphs)
        need = start + T if positions is None else (int(positions.max()) + 1 if positions.numel() else 0)
        if need > self.rope_cos.shape[0]:  # extend the tables (e.g. long generation); rope extrapolates mechanically
            cos, sin = rope_tables(self.cfg.head_dim, max(need, 2 * self.rope_cos.shape[0]), self.cfg.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        if positions is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, hd/2) views
            return cos[None, None], sin[None, None]  # (1, 1, T, hd/2)
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hd/2)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab) fp32, loss (mean CE over targets != -100) or None.

        ``positions`` (B, T), ``attn_mask`` (B, 1, T, S) bool and ``caches`` are for generation; training uses the
        plain causal path.
        """
        B, T = idx.shape
        cos, sin = self._rope(positions, start, T)
        x = self.tok_emb(idx)  # (B, T, dim)
        pending: dict[int, list[torch.Tensor]] = {}  # skip-layer memory outputs, by the block they follow
        for i, block in enumerate(self.blocks):
            if block.skip:
                pending.setdefault(i + block.skip, []).append(block.skip_read(x))
            x = block(x, cos, sin, attn_mask, None if caches is None else caches[i], start)
            for y in pending.pop(i, ()):
                x = x + y
        logits = self.lm_head(self.norm(x)).float()  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            aux = [m.aux_loss for m in self.memory_layers if m.aux_loss is not None]
            if aux:
                loss = loss + sum(aux)
        return logits, loss

    # ---------------------------------------------------------------------------------------------- generation
    def new_caches(self, batch: int, length: int) -> list[KVCache]:
        p = self.tok_emb.weight
        dtype = torch.get_autocast_dtype("cuda") if (p.is_cuda and torch.is_autocast_enabled()) else p.dtype
        shape = (batch, self.cfg.kv_heads, length, self.cfg.head_dim)
        return [
            KVCache(torch.zeros(shape, device=p.device, dtype=dtype), torch.zeros(shape, device=p.device, dtype=dtype))
            for _ in self.blocks
        ]

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        stop_tokens: set[int] | list[int] | None = None,
        pad_id: int = 0,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Continue each prompt; returns the new tokens of each (without the stop token that ended it).

        Prompts of different lengths are left-padded; padded positions are masked out of attention and every row
        gets its own rotary positions, so a prompt's output does not depend on the others in the batch. Greedy when
        ``temperature == 0``. Cost per new token is one forward of one position against the cache (not quadratic).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs at least one non-empty prompt")
        was_training = self.training
        self.eval()
        device = self.tok_emb.weight.device
        stop = set(stop_tokens or [])
        limit = self.cfg.max_seq_len
        keep = max(1, limit - max_new_tokens)
        prompts = [list(p[-keep:]) for p in prompts]  # crop from the left to fit the context
        B, P = len(prompts), max(len(p) for p in prompts)
        total = P + max_new_tokens
        idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(B, total, dtype=torch.bool, device=device)  # which cache positions hold real tokens
        for b, p in enumerate(prompts):
            idx[b, P - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
            valid[b, P - len(p) : P] = True
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        positions = (torch.arange(P, device=device).unsqueeze(0) - (P - lengths).unsqueeze(1)).clamp(min=0)  # (B, P)
        caches = self.new_caches(B, total)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()  # (P, P)
        eye = torch.eye(P, dtype=torch.bool, device=device)
        # a padded query attends only to itself (avoids all-masked rows); real queries never see pads
        mask = (causal & valid[:, None, :P]) | eye  # (B, P, P)
        logits, _ = self(idx, positions=positions, attn_mask=mask.unsqueeze(1), caches=caches, start=0)
        next_logits = logits[:, -1]  # (B, vocab)
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        pos = lengths.clone()  # next rotary position of each row
        for step in range(max_new_tokens):
            tok = self._sample(next_logits, temperature, top_k, generator)  # (B,)
            for b in range(B):
                if not done[b]:
                    t = int(tok[b])
                    if t in stop:
                        done[b] = True
                    else:
                        out[b].append(t)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            cur = P + step
            valid[:, cur] = True
            mask = valid[:, None, None, : cur + 1]  # (B, 1, 1, S)
            logits, _ = self(
                tok.unsqueeze(1), positions=pos.unsqueeze(1), attn_mask=mask, caches=caches, start=cur
            )  # (B, 1, vocab)
            next_logits = logits[:, -1]
            pos = pos + 1
        self.train(was_training)
        return out

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[..., -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
