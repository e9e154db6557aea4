"""An lm-evaluation-harness ``LM`` over a memlm checkpoint, so any lm-eval task runs on it (optional extra).

Needs ``pip install lm_eval`` (not a memlm dependency). Importing this module registers the model name ``memlm``::

    import lm_eval
    import memlm.evaluation.lm_eval_model  # noqa: F401  (registers "memlm")

    out = lm_eval.simple_evaluate(model="memlm", model_args="pretrained=runs/tiny/export,batch_size=16",
                                  tasks=["hellaswag"], limit=100)

The three calls go to :class:`~memlm.evaluation.adapter.MemLMAdapter` (the same code ``eval/run.py`` uses).
Generation is greedy; sampling arguments in a task's ``generation_kwargs`` are ignored with a warning.
"""

from __future__ import annotations

import logging

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the optional package
    raise ImportError(
        "memlm.evaluation.lm_eval_model needs lm-evaluation-harness: pip install lm_eval "
        "(memlm's own harness, eval/run.py, does not)"
    ) from e

from memlm.evaluation.adapter import MemLMAdapter

log = logging.getLogger("memlm.evaluation")


@register_model("memlm")
class MemLMHarnessLM(LM):
    """``model_args``: ``pretrained`` (export dir or .ckpt), ``batch_size`` (int; "auto" -> 16), ``device``,
    ``tokenizer`` (dir, if the checkpoint has none), ``max_gen_toks`` (default 256)."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 16,
        device: str = "cpu",
        tokenizer: str | None = None,
        max_gen_toks: int = 256,
        **_: object,
    ) -> None:
        super().__init__()
        import torch

        from memlm.evaluation.cli import load_checkpoint

        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm_eval's command line defaults to cuda
            log.warning("memlm lm_eval model: %s requested but CUDA is not available; evaluating on the CPU", device)
            device = "cpu"

        model, tok, _, _ = load_checkpoint(pretrained, tokenizer, device)
        try:
            bs = int(batch_size)
        except (TypeError, ValueError):
            bs = 16
        self.adapter = MemLMAdapter(model, tok, batch_size=bs, progress=True)
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> MemLMHarnessLM:
        """lm_eval's command line passes ``--batch_size`` / ``--device`` beside ``--model_args``: a value given in
        ``model_args`` wins instead of colliding (the base class raises on a keyword given twice)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MemLMHarnessLM:
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.adapter.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.adapter.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # requests sharing generation settings are run together (batched, sorted by length inside the adapter)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kw.get("do_sample") or float(kw.get("temperature") or 0.0) > 0:
                log.warning("memlm lm_eval model decodes greedily; ignoring sampling settings %s", kw)
            key = (tuple(until), int(kw.get("max_gen_toks", self.max_gen_toks)))
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_toks), idx in groups.items():
            texts = self.adapter.generate_until([requests[i].args[0] for i in idx], list(until), max_toks)
            for i, t in zip(idx, texts):
                out[i] = t
        return out
