"""Forgetting report: ``python eval/forgetting.py --base BASE --after CKPT [CKPT ...] --tasks nq_open,... --out DIR``.

Evaluates the same tasks on every checkpoint (or reads results JSONs of eval/run.py) and writes relative drops per
task to DIR/forgetting.json plus a plot DIR/forgetting.png. Logic: :mod:`memlm.evaluation.forgetting`.
"""

import sys

from memlm.evaluation.cli import forgetting_main

if __name__ == "__main__":
    sys.exit(forgetting_main())
