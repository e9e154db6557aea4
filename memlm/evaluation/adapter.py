"""MemLMAdapter: lm-evaluation-harness's three model calls over any MemLM + tokenizer.

- ``generate_until(prompts, until, max_new_tokens)``: greedy continuation, batched (prompts sorted by length so a
  batch wastes little padding), through ``MemLM.generate`` and its KV cache. String stop sequences are applied on
  the decoded text (the output is cut at the first one). Tokens whose text *begins* with a stop sequence (after
  whitespace), and EOS, also end a row inside the decoding loop, so a batch stops early without changing the result.
  ``use_cache=False`` decodes by re-running the full forward each step (for speed comparisons only).
- ``loglikelihood(requests)``: ``(sum log p(continuation | context), is_greedy)`` per (context, continuation) pair.
  As in lm-eval, trailing whitespace of the context moves to the continuation, and the continuation's tokens are
  those of ``encode(context + continuation)`` after the first ``len(encode(context))`` tokens.
- ``loglikelihood_rolling(texts)``: the summed log-likelihood of every token of each text (perplexity), scored in
  windows of the model's context length; each window predicts new tokens given up to ``max_seq_len`` previous ones.

A BOS token is prepended to every sequence (``add_bos``), which is also what the first text token is predicted from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class MemLMAdapter:
    """Evaluation calls over a ``MemLM`` and a tokenizer with ``encode/decode/bos_id/eos_id/pad_id``."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 16,
        add_bos: bool = True,
        use_cache: bool = True,
        progress: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.add_bos = add_bos
        self.use_cache = use_cache
        self.progress = progress
        self.max_len = int(model.cfg.max_seq_len)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_id if getattr(tokenizer, "pad_id", -1) >= 0 else 0
        self._stop_token_cache: dict[tuple[str, ...], set[int]] = {}

    # ------------------------------------------------------------------------------------------------- helpers
    def _prefix(self) -> list[int]:
        return [self.tok.bos_id] if self.add_bos and self.tok.bos_id >= 0 else []

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    def stop_tokens(self, until: Sequence[str]) -> set[int]:
        """EOS plus every token whose text starts (after whitespace) with one of ``until``."""
        key = tuple(until)
        if key not in self._stop_token_cache:
            stops = {self.tok.eos_id} if self.tok.eos_id >= 0 else set()
            for i in range(self.tok.vocab_size):
                text = self.tok.decode([i])
                for s in key:
                    at = text.find(s) if s else -1
                    if at >= 0 and not text[:at].strip():
                        stops.add(i)
                        break
            self._stop_token_cache[key] = stops
        return self._stop_token_cache[key]

    @staticmethod
    def cut_at_stops(text: str, until: Sequence[str]) -> str:
        """``text`` up to the first occurrence of any stop sequence."""
        end = len(text)
        for s in until:
            if s:
                at = text.find(s)
                if at >= 0:
                    end = min(end, at)
        return text[:end]

    # ------------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_until(
        self,
        prompts: Sequence[str],
        until: Sequence[str] | None = ("\n",),
        max_new_tokens: int = 32,
        desc: str = "generate",
    ) -> list[str]:
        """Greedy continuations of ``prompts``, each cut at the first stop sequence and stripped."""
        until = list(until or [])
        stop = self.stop_tokens(until)
        keep = max(1, self.max_len - max_new_tokens)
        encoded = [(self._prefix() + self.tok.encode(p))[-keep:] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        bar = self._bar(len(prompts), desc)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = [encoded[i] for i in chunk]
            if self.use_cache:
                new = self.model.generate(batch, max_new_tokens, stop_tokens=stop, pad_id=self.pad_id)
            else:
                new = self._generate_no_cache(batch, max_new_tokens, stop)
            for i, toks in zip(chunk, new):
                outputs[i] = self.cut_at_stops(self.tok.decode(toks), until).strip()
            bar.update(len(chunk))
        bar.close()
        return outputs

    def _generate_no_cache(self, prompts: list[list[int]], max_new_tokens: int, stop: set[int]) -> list[list[int]]:
        """Greedy decoding by a full forward over the whole (left-padded) sequence at every step."""
        device = self.device
        B = len(prompts)
        seqs = [list(p) for p in prompts]
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for _ in range(max_new_tokens):
            T = max(len(s) for s in seqs)
            idx = torch.full((B, T), self.pad_id, dtype=torch.long, device=device)
            valid = torch.zeros(B, T, dtype=torch.bool, device=device)
            for b, s in enumerate(seqs):
                idx[b, T - len(s) :] = torch.tensor(s, dtype=torch.long, device=device)
                valid[b, T - len(s) :] = True
            lengths = valid.sum(1)
            positions = (torch.arange(T, device=device).unsqueeze(0) - (T - lengths).unsqueeze(1)).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
            mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)  # (B, T, T)
            logits, _ = self.model(idx, positions=positions, attn_mask=mask.unsqueeze(1))  # (B, T, V)
            nxt = logits[:, -1].argmax(-1).tolist()  # (B,)
            for b, t in enumerate(nxt):
                if done[b]:
                    continue
                if t in stop:
                    done[b] = True
                else:
                    out[b].append(t)
                seqs[b].append(t)  # finished rows keep a dummy token so all rows stay aligned
            if all(done):
                break
        return out

    # ------------------------------------------------------------------------------------------------- scoring
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[: len(context) - n_space], context[-n_space:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        cont = whole[len(ctx) :]
        return self._prefix() + whole[: len(ctx)], cont

    @torch.no_grad()
    def _score(self, requests: list[tuple[list[int], int]], desc: str) -> list[tuple[float, bool]]:
        """Each request is (tokens, n): the sum log-prob of the last n tokens given the ones before, and whether all
        of them are the argmax. ``tokens`` must fit ``max_len + 1`` (callers crop)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        bar = self._bar(len(requests), desc)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            T = max(len(requests[i][0]) for i in chunk) - 1
            idx = torch.full((len(chunk), T), self.pad_id, dtype=torch.long, device=self.device)
            for b, i in enumerate(chunk):
                toks = requests[i][0]
                idx[b, : len(toks) - 1] = torch.tensor(toks[:-1], dtype=torch.long)  # right padding: causal-safe
            logits, _ = self.model(idx)  # (B, T, V)
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for b, i in enumerate(chunk):
                toks, n = requests[i]
                if n == 0:
                    results[i] = (0.0, True)
                    continue
                L = len(toks) - 1
                target = torch.tensor(toks[L - n + 1 :], dtype=torch.long, device=self.device)  # (n,)
                rows = logp[b, L - n : L]  # (n, V)
                ll = rows.gather(-1, target.unsqueeze(-1)).sum().item()
                greedy = bool((rows.argmax(-1) == target).all())
                results[i] = (ll, greedy)
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood"
    ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` for each (context, continuation)."""
        reqs = []
        for context, continuation in requests:
            ctx, cont = self._encode_pair(context, continuation)
            toks = (ctx + cont)[-(self.max_len + 1) :]
            reqs.append((toks, min(len(cont), len(toks) - 1)))
        return self._score(reqs, desc)

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], int]]:
        """Windows (tokens, n_scored) that together score ``tokens[1:]`` exactly once, each with the longest
        context that fits the model."""
        L = self.max_len
        windows = []
        pos = 1  # next token to score
        while pos < len(tokens):
            end = min(pos + L, len(tokens))  # score tokens[pos:end]
            begin = max(0, end - L - 1)
            windows.append((tokens[begin:end], end - pos))
            pos = end
        return windows

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "perplexity") -> list[float]:
        """Summed log-likelihood of every token of each text (given BOS), for perplexity."""
        owners, reqs = [], []
        for j, text in enumerate(texts):
            for w in self.rolling_windows(self._prefix() + self.tok.encode(text)):
                owners.append(j)
                reqs.append(w)
        totals = [0.0] * len(texts)
        for j, (ll, _) in zip(owners, self._score(reqs, desc)):
            totals[j] += ll
        return totals

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``loglikelihood_rolling`` scores for ``text``."""
        return len(self._prefix() + self.tok.encode(text)) - 1
