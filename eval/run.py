"""Evaluate a memlm checkpoint: ``python eval/run.py --ckpt runs/tiny/export --tasks triviaqa,nq_open,worldfacts``.

Options: ``--limit N --shots K --batch_size B --out results.json --tensorboard DIR --predictions --list_tasks``.
All logic lives in :mod:`memlm.evaluation` (see ``memlm/evaluation/cli.py``).
"""

import os
import sys

# eval/ is sys.path[0] when a script in it runs: swap it for the checkout (runs without installing), so that
# eval/inspect.py cannot shadow the standard library's inspect
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from memlm.evaluation.cli import run_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main())
