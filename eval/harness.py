"""lm-evaluation-harness on a memlm export: lm_eval's own command line, with the model name ``memlm`` registered.

    python eval/harness.py --model memlm --model_args pretrained=runs/tiny/export --batch_size 16 \\
        --include_path eval/lm_eval_tasks --tasks memlm_local_qa,memlm_local_mc,memlm_local_text

Every lm_eval option works (``--limit``, ``--output_path``, ``--log_samples``, hub tasks such as ``hellaswag``).
Needs the optional extra: ``pip install -e ".[lm_eval]"``.
"""

import sys


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print('error: lm-evaluation-harness is not installed: pip install -e ".[lm_eval]"', file=sys.stderr)
        return 2
    import memlm.evaluation.lm_eval_model  # noqa: F401  (registers the model name "memlm")

    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
