"""QA generation speed: questions/s with batching + KV cache vs. without (``MemLMAdapter(use_cache=False)``).

    python eval/qa_speed.py --ckpt runs/tiny/export --n 64 --max_new_tokens 16 --out qa_speed.json

Questions are worldfacts questions in the QA prompt format. Stop sequences are off (EOS only), so every setting
generates the same number of tokens and the comparison is fair; the outputs of all settings are checked to agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from memlm.evaluation import MemLMAdapter
from memlm.evaluation.cli import USER_ERRORS, load_checkpoint
from memlm.utils.cli import HelpFormatter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="eval/qa_speed.py",
        description="QA generation speed: questions/s with batching + KV cache vs. without.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="export directory or .ckpt of the model")
    p.add_argument("--n", type=int, default=64, help="questions (worldfacts, pretraining facts)")
    p.add_argument("--max_new_tokens", type=int, default=16, help="tokens generated per question")
    p.add_argument("--batch_size", type=int, default=16, help="questions per batch in the batched settings")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (median reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok, _, _ = load_checkpoint(args.ckpt)
        from memlm.data.facts import worldfacts_qa

        rows = worldfacts_qa("pretrain")[: args.n]
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = [f"Question: {r['question']}\nAnswer:" for r in rows]
    settings = [("batched + KV cache", args.batch_size, True), ("unbatched + KV cache", 1, True),
                ("batched, no cache", args.batch_size, False), ("unbatched, no cache", 1, False)]  # fmt: skip
    results, outputs = [], {}
    for name, bs, cache in settings:
        adapter = MemLMAdapter(model, tok, batch_size=bs, use_cache=cache)
        adapter.generate_until(prompts[: min(4, len(prompts))], [], args.max_new_tokens)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outputs[name] = adapter.generate_until(prompts, [], args.max_new_tokens)
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        results.append({"setting": name, "batch_size": bs, "kv_cache": cache, "seconds": round(sec, 3),
                        "questions_per_s": round(len(prompts) / sec, 2)})  # fmt: skip
    agree = len({tuple(o) for o in outputs.values()}) == 1
    print(f"{len(prompts)} questions, {args.max_new_tokens} new tokens each, {torch.get_num_threads()} threads, "
          f"model {model.num_params():,} params; outputs identical across settings: {agree}")  # fmt: skip
    print("| setting | batch | questions/s | seconds |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['setting']} | {r['batch_size']} | {r['questions_per_s']:.2f} | {r['seconds']:.2f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"n": len(prompts), "max_new_tokens": args.max_new_tokens, "outputs_agree": agree,
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)  # fmt: skip
    return 0
