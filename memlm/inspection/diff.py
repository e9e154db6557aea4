"""Compare two checkpoints of one architecture (base vs. after continual finetuning): which value rows changed.

A row counts as changed when any of its bytes differ (bitwise, so a change of one ulp counts and a NaN equal to itself
does not); for each changed row the L2 norm of its change, its relative change and the base row norm. Parameters
outside the value tables are listed by name with their number of changed elements, so "only memory moved" (SMF) is
checked at the same time. :func:`facts_hitting_changes` then runs the finetuned model on new facts and lists, per fact,
the changed slots its answer queries read and what the change writes there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlm.inspection.capture import InspectionError, capture
from memlm.inspection.contribution import slot_writes
from memlm.inspection.readout import TokenReadout
from memlm.inspection.trace import Example


def changed_elements(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise element inequality (same shape and dtype) -> bool tensor of a's shape."""
    if a.dtype.is_floating_point or a.dtype.is_complex:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return a.contiguous().view(bits) != b.contiguous().view(bits)
    return a != b


@dataclass
class TableDiff:
    """Changes of one value table (rows, v_dim)."""

    name: str
    layers: list[int]  # memory layers reading it
    is_value: bool  # a value table (False: PEER's input experts, UltraMemV2's pre-values)
    n_rows: int
    rows: torch.Tensor  # (C,) int64 changed rows, ascending
    delta: torch.Tensor  # (C, v_dim) after - base, float32
    base_norm: torch.Tensor  # (C,)

    @property
    def delta_norm(self) -> torch.Tensor:
        return self.delta.norm(dim=-1)  # (C,)


@dataclass
class CheckpointDiff:
    tables: list[TableDiff]
    other_changed: dict[str, int]  # parameter name -> changed elements (outside the value tables)
    other_total: int  # parameters outside the value tables

    def changed_rows(self, layer: int) -> set[int]:
        return {int(r) for t in self.tables if t.is_value and layer in t.layers for r in t.rows}


def _table_names(model) -> dict[int, str]:
    """id(weight) -> parameter name of every value table's weight (first name of shared tensors)."""
    want = {id(t.weight) for t in model.value_tables()}
    names = {}
    for name, p in model.named_parameters():  # shared tensors appear once
        if id(p) in want:
            names[id(p)] = name
    return names


@torch.no_grad()
def diff_checkpoints(base, after) -> CheckpointDiff:
    """Row-level diff of two models of the same architecture (value tables) + a per-tensor diff of everything else."""
    sb, sa = base.state_dict(), after.state_dict()
    if sb.keys() != sa.keys() or any(sb[k].shape != sa[k].shape for k in sb):
        raise InspectionError("the two checkpoints have different architectures: --after must be a finetune of --ckpt")
    names = _table_names(base)
    layers_of: dict[str, list[int]] = {}
    for j, layer in enumerate(base.memory_layers):
        for t in layer.sparse_tables():
            layers_of.setdefault(names[id(t.weight)], []).append(j)
    value_names = {names[id(layer.value_table.weight)] for layer in base.memory_layers}
    tables = []
    for name in sorted(layers_of):
        a, b = sb[name].cpu(), sa[name].cpu()  # (rows, v_dim)
        rows = changed_elements(a, b).any(-1).nonzero().squeeze(-1)  # (C,)
        delta = b[rows].float() - a[rows].float()  # (C, v_dim)
        tables.append(TableDiff(name, sorted(set(layers_of[name])), name in value_names, a.shape[0], rows, delta,
                                a[rows].float().norm(dim=-1)))  # fmt: skip
    other, total = {}, 0
    seen_ptr = set()
    for name, t in sb.items():
        if name in layers_of or t.data_ptr() in seen_ptr:
            continue
        seen_ptr.add(t.data_ptr())
        total += t.numel()
        n = int(changed_elements(t.cpu(), sa[name].cpu()).sum())
        if n:
            other[name] = n
    return CheckpointDiff(tables, other, total)


@torch.no_grad()
def facts_hitting_changes(
    after, tok, examples: list[Example], diff: CheckpointDiff, readout: TokenReadout, top_tokens: int = 5
) -> list[dict]:
    """Per fact (QA example run through the finetuned model): at each answer-predicting position and memory layer,
    the changed slots it reads, their weight share, and what the *change* writes there (its promoted tokens and its
    direct logit effect on the answer token)."""
    device = after.tok_emb.weight.device
    emb = after.lm_head.weight.detach().float().cpu()  # (vocab, dim)
    deltas = {}  # layer -> {row: delta (v_dim,)}
    for t in diff.tables:
        for j in t.layers if t.is_value else ():
            deltas.setdefault(j, {}).update({int(r): d for r, d in zip(t.rows, t.delta)})
    out = []
    for ex in examples:
        cap = capture(after, torch.tensor([ex.ids], device=device))
        fact = {"name": ex.name, "positions": []}
        for t, target in zip(ex.positions, ex.targets):
            rms = float(cap.final_rms[0, t])
            pos = {"pos": t, "target": tok.id_to_piece(target) if target is not None else None, "layers": []}
            for j, rec in enumerate(cap.layers):
                idx, w = rec.indices[0, t], rec.weights[0, t]  # (heads, knn)
                changed = deltas.get(j, {})
                hit = torch.tensor([[int(s) in changed for s in row] for row in idx.tolist()])  # (heads, knn)
                share = float((w.abs().cpu() * hit).sum() / w.abs().sum().clamp_min(1e-12))
                entry = {"layer": j, "reads": int(idx.numel()), "changed_reads": int(hit.sum()),
                         "changed_weight": round(share, 4), "slots": []}  # fmt: skip
                if hit.any():
                    layer = after.memory_layers[j]
                    rows = torch.zeros(*idx.shape, layer.value_table.weight.shape[1])  # (heads, knn, v_dim) deltas
                    for h, k in hit.nonzero().tolist():
                        rows[h, k] = changed[int(idx[h, k])]
                    writes = slot_writes(layer, rec.x[0, t], idx, w, value_rows=rows.to(rec.x.device)).cpu()
                    total = writes.sum((0, 1))  # (dim,) what all changes together write here
                    for s in sorted({int(idx[h, k]) for h, k in hit.nonzero().tolist()}):
                        m = (idx.cpu() == s).unsqueeze(-1)  # (heads, knn, 1)
                        ws = (writes * m).sum((0, 1))  # (dim,)
                        item = {"slot": s, "weight": round(float((w.cpu() * m.squeeze(-1)).sum()), 4),
                                "delta_write_norm": round(float(ws.norm()), 4),
                                "promotes": readout.describe(ws[None], top_tokens, rms=rms)[0]}  # fmt: skip
                        if target is not None:
                            item["target_logit"] = round(float((ws * readout.gain) @ emb[target]) / rms, 4)
                        entry["slots"].append(item)
                    entry["delta_promotes"] = readout.describe(total[None], top_tokens, rms=rms)[0]
                    if target is not None:
                        entry["delta_target_logit"] = round(float((total * readout.gain) @ emb[target]) / rms, 4)
                pos["layers"].append(entry)
            fact["positions"].append(pos)
        out.append(fact)
    return out
