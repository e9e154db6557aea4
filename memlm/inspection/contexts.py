"""Slot -> contexts: over a corpus sample, which tokens retrieve a given slot, how often and how strongly.

:func:`record_corpus` runs the model over the sample once (documents packed into ``max_seq_len`` windows, bos before
each document, as in pretraining) and keeps every memory layer's recorded indices and weights — an index from slot to
the tokens that read it. :func:`slot_contexts` answers "what is slot s of layer l about?": the contexts with the
largest weight on s, the tokens it fires on, the tokens that follow, and what it writes there on average.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from memlm.inspection.capture import InspectionError, capture, memory_blocks, require_memory
from memlm.inspection.contribution import slot_writes
from memlm.inspection.query_index import keyspace_queries, nearest_queries, slot_key, supports
from memlm.inspection.readout import TokenReadout


@dataclass
class CorpusRecord:
    """Recorded reads over a corpus sample of ``n_tokens`` positions (windows flattened in order)."""

    tokens: torch.Tensor  # (W, T) token ids of the windows
    indices: list[torch.Tensor]  # per memory layer (W, T, heads, knn) int64 rows
    weights: list[torch.Tensor]  # per memory layer (W, T, heads, knn) float32 weights
    n_rows: list[int]  # per memory layer: rows of its value table
    n_docs: int
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (W, T, heads, k_dim) key-space queries

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    def usage(self, layer: int) -> torch.Tensor:
        """(rows,) float64 read counts of a layer's slots over the sample."""
        return torch.bincount(self.indices[layer].reshape(-1), minlength=self.n_rows[layer]).double()


def pack_windows(tok, docs: list[str], seq_len: int) -> torch.Tensor:
    """Documents -> (W, seq_len) token windows: bos + tokens per document, concatenated and cut (last one dropped
    when partial, unless it is the only one)."""
    stream: list[int] = []
    for d in docs:
        stream += [tok.bos_id, *tok.encode(d)]
    if not stream:
        raise InspectionError("the corpus sample is empty")
    n = max(1, len(stream) // seq_len)
    stream = (stream + [tok.pad_id] * seq_len)[: n * seq_len]
    return torch.tensor(stream, dtype=torch.long).view(n, seq_len)  # (W, seq_len)


@torch.no_grad()
def record_corpus(
    model, tok, docs: list[str], batch_size: int = 8, progress: bool = True, queries_of: list[int] = ()
) -> CorpusRecord:
    """Run ``model`` over ``docs`` and keep every memory layer's indices and weights (see :class:`CorpusRecord`), and
    the key-space queries of the layers in ``queries_of`` (those :func:`~memlm.inspection.query_index.supports`)."""
    require_memory(model)
    device = model.tok_emb.weight.device
    windows = pack_windows(tok, docs, model.cfg.max_seq_len)  # (W, T)
    n_layers = len(model.memory_layers)
    idx: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    wts: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    qs: dict[int, list[torch.Tensor]] = {j: [] for j in queries_of if supports(model.memory_layers[j])}
    for start in tqdm(range(0, len(windows), batch_size), desc="recording slot reads", disable=not progress,
                      leave=False):  # fmt: skip
        cap = capture(model, windows[start : start + batch_size].to(device))
        for j, rec in enumerate(cap.layers):
            idx[j].append(rec.indices.cpu())  # (b, T, heads, knn)
            wts[j].append(rec.weights.cpu())
            if j in qs:
                qs[j].append(keyspace_queries(model.memory_layers[j], rec.x).cpu())  # (b, T, heads, k_dim)
    rows = [layer.value_table.weight.shape[0] for layer in model.memory_layers]
    queries = {j: torch.cat(q) for j, q in qs.items()}
    return CorpusRecord(windows, [torch.cat(i) for i in idx], [torch.cat(w) for w in wts], rows, len(docs), queries)


def _context(tok, window: torch.Tensor, t: int, left: int = 12) -> str:
    """Text of the tokens before position t, then [token t], then the next token."""
    before = tok.decode(window[max(0, t - left) : t].tolist()).replace("\n", "⏎")
    cur = tok.decode([int(window[t])]).replace("\n", "⏎")
    nxt = tok.decode([int(window[t + 1])]).replace("\n", "⏎") if t + 1 < len(window) else ""
    return f"{before}[{cur}]{nxt}"


@torch.no_grad()
def slot_contexts(
    model,
    tok,
    record: CorpusRecord,
    layer: int,
    slot: int,
    top: int = 10,
    readout: TokenReadout | None = None,
    top_tokens: int = 8,
) -> dict:
    """What slot ``slot`` of memory layer ``layer`` is about, over the recorded sample (JSON-ready dict)."""
    if not 0 <= layer < len(record.indices):
        raise InspectionError(f"--layer {layer} out of range: the model has {len(record.indices)} memory layer(s)")
    if not 0 <= slot < record.n_rows[layer]:
        raise InspectionError(f"--slot {slot} out of range: memory layer {layer} has {record.n_rows[layer]} slots")
    idx, w = record.indices[layer], record.weights[layer]  # (W, T, heads, knn)
    hit = idx == slot  # (W, T, heads, knn)
    per_tok = (w * hit).sum((-1, -2))  # (W, T) summed weight on the slot (heads merged)
    mask = hit.any(-1).any(-1)  # (W, T)
    n_hits = int(mask.sum())
    usage = record.usage(layer)
    rank = int((usage > usage[slot]).sum()) + 1
    out = {"layer": layer, "block": memory_blocks(model)[layer], "slot": slot, "hits": n_hits,
           "hit_rate": n_hits / max(record.n_tokens, 1), "tokens_scanned": record.n_tokens, "docs": record.n_docs,
           "usage_rank": rank, "n_slots": record.n_rows[layer], "contexts": [], "fires_on": [], "followed_by": [],
           "total_weight": round(float(per_tok.sum()), 4)}  # fmt: skip
    if layer in record.queries:  # contexts whose queries score the slot highest (whether or not it made the top-k)
        q = record.queries[layer]  # (W, T, heads, k_dim)
        T = q.shape[1]
        key = slot_key(model.memory_layers[layer], slot).cpu()  # (heads, k_dim)
        tokens, heads, scores = nearest_queries(q.flatten(0, 1), key, top)
        out["nearest"] = [{"window": int(i) // T, "pos": int(i) % T, "head": int(h), "score": round(float(s), 4),
                           "retrieved": bool((record.indices[layer][int(i) // T, int(i) % T, int(h)] == slot).any()),
                           "text": _context(tok, record.tokens[int(i) // T], int(i) % T)}
                          for i, h, s in zip(tokens, heads, scores)]  # fmt: skip
    if n_hits == 0:
        return out
    wins, poss = mask.nonzero(as_tuple=True)  # (n_hits,) each
    strength = per_tok[wins, poss]  # (n_hits,)
    order = strength.abs().argsort(descending=True)
    fires = Counter(tok.id_to_piece(int(record.tokens[a, b])) for a, b in zip(wins.tolist(), poss.tolist()))
    T = record.tokens.shape[1]
    follow = Counter(tok.id_to_piece(int(record.tokens[a, b + 1])) for a, b in zip(wins.tolist(), poss.tolist())
                     if b + 1 < T)  # fmt: skip
    out["fires_on"] = [[p, c] for p, c in fires.most_common(top)]
    out["followed_by"] = [[p, c] for p, c in follow.most_common(top)]
    chosen = order[:top]
    for i in chosen.tolist():
        a, b = int(wins[i]), int(poss[i])
        out["contexts"].append({"window": a, "pos": b, "weight": round(float(strength[i]), 4),
                                "text": _context(tok, record.tokens[a], b)})  # fmt: skip
    if readout is not None:  # what the slot writes at its strongest contexts (the gate makes it token-dependent)
        device = model.tok_emb.weight.device
        mem = model.memory_layers[layer]
        sel_w = torch.unique(wins[chosen])
        cap = capture(model, record.tokens[sel_w].to(device))
        rec = cap.layers[layer]
        writes, rms = [], []
        for i in chosen.tolist():
            a = int((sel_w == wins[i]).nonzero()[0, 0])
            b = int(poss[i])
            wr = slot_writes(mem, rec.x[a, b], rec.indices[a, b], rec.weights[a, b])  # (heads, knn, dim)
            writes.append((wr * (rec.indices[a, b] == slot).unsqueeze(-1)).sum((0, 1)).cpu())  # (dim,)
            rms.append(float(cap.final_rms[a, b]))
        mean = torch.stack(writes).mean(0, keepdim=True)  # (1, dim)
        out["promotes"] = readout.describe(mean, top_tokens, rms=sum(rms) / len(rms))[0]
        out["write_norm"] = round(float(mean.norm()), 4)
    return out
