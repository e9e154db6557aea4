"""Evaluate a memlm checkpoint: ``python eval/run.py --ckpt runs/tiny/export --tasks triviaqa,nq_open,worldfacts``.

Options: ``--limit N --shots K --batch_size B --out results.json --tensorboard DIR --predictions --list_tasks``.
All logic lives in :mod:`memlm.evaluation` (see ``memlm/evaluation/cli.py``).
"""

import sys

from memlm.evaluation.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main())
