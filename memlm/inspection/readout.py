"""Read a residual-stream vector out as tokens: which tokens it promotes through the final norm and the unembedding.

The logits are ``lm_head(g ⊙ h / rms(h))`` (``g`` the final RMSNorm gain, ``h`` the last residual stream). A vector
``c`` added to ``h`` changes the logits by about ``lm_head(g ⊙ c) / rms(h)`` (the direct logit effect; the change of
``rms(h)`` is second order). So the tokens ``c`` promotes are the rows of the output embedding with the largest inner
product with ``g ⊙ c`` — a maximum-inner-product search, done with a faiss ``IndexFlatIP`` over the output embedding
matrix (exact, and the same index serves any number of queries).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch


def byte_tokens(tokenizer) -> list[int]:
    """Ids of SentencePiece byte-fallback pieces (``<0x41>``): rare, barely trained, and top of many readouts."""
    if tokenizer is None:
        return []
    n = getattr(tokenizer, "vocab_size", 0)
    return [i for i in range(n) if (p := tokenizer.id_to_piece(i)).startswith("<0x") and p.endswith(">")]


class TokenReadout:
    """faiss ``IndexFlatIP`` over ``model.lm_head.weight`` (vocab, dim); queries are scaled by the final norm's gain.

    ``exclude``: token ids left out of the index (e.g. :func:`byte_tokens`); returned ids are always vocabulary ids.
    """

    def __init__(self, model, tokenizer=None, exclude: list[int] | None = None) -> None:
        emb = model.lm_head.weight.detach().float().cpu()  # (vocab, dim)
        skip = set(exclude or ())
        self.ids = torch.tensor([i for i in range(emb.shape[0]) if i not in skip], dtype=torch.long)  # (V',)
        self.index = faiss.IndexFlatIP(emb.shape[1])
        self.index.add(np.ascontiguousarray(emb[self.ids].numpy()))
        self.gain = model.norm.weight.detach().float().cpu()  # (dim,)
        self.tokenizer = tokenizer

    def piece(self, token: int) -> str:
        return self.tokenizer.id_to_piece(token) if self.tokenizer is not None else str(token)

    @torch.no_grad()
    def top_tokens(
        self, vectors: torch.Tensor, k: int = 5, rms: torch.Tensor | float | None = None, negative: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """vectors (M, dim) -> (token ids (M, k) int64, logit effect (M, k) float32), best first.

        ``rms`` (M,) or a scalar: the residual-stream RMS at each vector's token; scores are then the direct logit
        effect, otherwise ``<g ⊙ c, e_token>``. ``negative``: the tokens most suppressed instead (scores negative).
        """
        q = vectors.detach().float().cpu() * self.gain  # (M, dim)
        if negative:
            q = -q
        k = min(k, self.index.ntotal)
        scores, ids = self.index.search(np.ascontiguousarray(q.numpy()), k)  # (M, k) each
        scores_t = torch.from_numpy(scores)
        if negative:
            scores_t = -scores_t
        if rms is not None:
            r = torch.as_tensor(rms, dtype=torch.float32).cpu()
            scores_t = scores_t / (r.unsqueeze(-1) if r.dim() else r)
        return self.ids[torch.from_numpy(ids).long()], scores_t

    def describe(self, vectors: torch.Tensor, k: int = 5, rms=None) -> list[list[dict]]:
        """For each vector (M, dim): ``[{token, piece, logit}, ...]`` of the k tokens it promotes most."""
        ids, scores = self.top_tokens(vectors, k, rms)
        return [
            [{"token": int(t), "piece": self.piece(int(t)), "logit": round(float(s), 4)} for t, s in zip(row, srow)]
            for row, srow in zip(ids, scores)
        ]
