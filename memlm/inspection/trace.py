"""Token -> slots: for each memory layer and each inspected token, the slots it read, their weights and what each
wrote into the residual stream (read out as the tokens it promotes).

A slot picked by several heads at one token is listed once, its weights and writes summed (exact, the write is linear
in the weight). Slots are ranked by the magnitude of their summed weight. For QA rows the inspected tokens are the
ones that *predict* the answer tokens (position t predicts token t + 1), and each slot also gets its direct logit
effect on that answer token (``target_logit``). ``reads`` lists every (slot, weight) a layer read at the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlm.inspection.background import SlotFrequency
from memlm.inspection.capture import Capture, InspectionError, capture
from memlm.inspection.contribution import slot_writes
from memlm.inspection.readout import TokenReadout

QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"  # as the continual stream and the evaluation harness ask


@dataclass
class Example:
    """Token ids to run (bos first), the positions to inspect, and the target token each predicts (or None)."""

    name: str
    ids: list[int]
    positions: list[int]
    targets: list[int | None]


def text_example(tok, text: str, max_len: int, last: int | None = None) -> Example:
    """Every token of ``text`` (after a bos; the last ``max_len`` tokens when longer), or only its ``last`` ones."""
    ids = [tok.bos_id, *tok.encode(text)][-max_len:]
    if len(ids) < 2:
        raise InspectionError(f"--text {text!r} gives no tokens")
    if last is not None and last < 1:
        raise InspectionError(f"--last must be at least 1, got {last}")
    start = 1 if last is None else max(1, len(ids) - last)
    positions = list(range(start, len(ids)))
    return Example(text, ids, positions, [ids[t + 1] if t + 1 < len(ids) else None for t in positions])


def qa_example(tok, row: dict, max_len: int, template: str = QA_TEMPLATE) -> Example:
    """A QA row rendered like the continual stream does: bos + prompt + answer; inspects the positions that predict
    the answer tokens (so a fact's memory reads are where its answer is produced)."""
    answer = row["answers"][0]
    before, after = template.split("{answer}")
    pre = tok.encode(before.format(question=row["question"]).rstrip())
    ans = tok.encode(answer)
    ids = [tok.bos_id, *pre, *ans]
    cut = max(0, len(ids) - max_len)
    ids = ids[cut:]
    first = len(ids) - len(ans)  # index of the first answer token
    positions = [t for t in range(max(first - 1, 0), len(ids) - 1)]
    name = f"{row.get('id', '?')}: {row['question']} -> {answer}"
    return Example(name, ids, positions, [ids[t + 1] for t in positions])


def _merge_heads(idx: torch.Tensor, w: torch.Tensor, writes: torch.Tensor):
    """(heads, knn), (heads, knn), (heads, knn, dim) -> unique slots (S,), summed weights (S,), summed writes (S, dim),
    and for each unique slot the heads that picked it."""
    flat_idx, flat_w = idx.reshape(-1), w.reshape(-1)  # (heads*knn,)
    uniq, inv = torch.unique(flat_idx, return_inverse=True)  # (S,), (heads*knn,)
    sw = torch.zeros(len(uniq), dtype=torch.float32).index_add_(0, inv, flat_w.float().cpu())  # (S,)
    swr = torch.zeros(len(uniq), writes.shape[-1]).index_add_(0, inv, writes.reshape(-1, writes.shape[-1]).cpu())
    heads = [sorted({h for h in range(idx.shape[0]) for k in range(idx.shape[1]) if int(idx[h, k]) == int(s)})
             for s in uniq]  # fmt: skip
    return uniq.cpu(), sw, swr, heads


@torch.no_grad()
def trace_example(
    model,
    tok,
    ex: Example,
    readout: TokenReadout,
    top_slots: int = 5,
    top_tokens: int = 5,
    background: SlotFrequency | None = None,
    layers: list[int] | None = None,
    cap: Capture | None = None,
) -> dict:
    """The JSON-ready trace of one example (see the module docstring); ``cap`` reuses a recorded forward."""
    device = model.tok_emb.weight.device
    cap = cap or capture(model, torch.tensor([ex.ids], device=device))
    which = range(len(cap.layers)) if layers is None else layers
    emb = model.lm_head.weight.detach().float().cpu()  # (vocab, dim)
    pos_out = []
    for t, target in zip(ex.positions, ex.targets):
        rms = float(cap.final_rms[0, t])
        probs = cap.logits[0, t].float().softmax(-1)  # (vocab,)
        pred = int(probs.argmax())
        entry = {"pos": t, "token": tok.id_to_piece(ex.ids[t]), "predicts": tok.id_to_piece(pred),
                 "p_predicts": round(float(probs[pred]), 4), "layers": []}  # fmt: skip
        if target is not None:
            entry.update(target=tok.id_to_piece(target), p_target=round(float(probs[target]), 4))
        for j in which:
            rec = cap.layers[j]
            layer = model.memory_layers[j]
            writes = slot_writes(layer, rec.x[0, t], rec.indices[0, t], rec.weights[0, t])  # (heads, knn, dim)
            slots, w, wr, heads = _merge_heads(rec.indices[0, t], rec.weights[0, t], writes)
            order = w.abs().argsort(descending=True)[:top_slots]  # (top,)
            promotes = readout.describe(wr[order], top_tokens, rms=rms)
            out_vec = rec.out[0, t].float().cpu()  # (dim,)
            items = []
            for r, s_i in enumerate(order.tolist()):
                s = int(slots[s_i])
                item = {"slot": s, "weight": round(float(w[s_i]), 4), "heads": heads[s_i],
                        "write_norm": round(float(wr[s_i].norm()), 4), "promotes": promotes[r]}  # fmt: skip
                if target is not None:
                    item["target_logit"] = round(float((wr[s_i] * readout.gain) @ emb[target]) / rms, 4)
                if background is not None:
                    item["df"] = background.df(j, s)
                items.append(item)
            layer_entry = {
                "layer": j,
                "block": rec.block,
                "out_norm": round(float(out_vec.norm()), 4),
                "promotes": readout.describe(out_vec[None], top_tokens, rms=rms)[0],
                "slots": items,
                "reads": [[int(slots[i]), round(float(w[i]), 4)] for i in w.abs().argsort(descending=True)],
            }
            if target is not None:
                layer_entry["target_logit"] = round(float((out_vec * readout.gain) @ emb[target]) / rms, 4)
            entry["layers"].append(layer_entry)
        pos_out.append(entry)
    return {"name": ex.name, "tokens": [tok.id_to_piece(i) for i in ex.ids], "positions": pos_out}
