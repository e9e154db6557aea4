"""Forgetting report: ``python eval/forgetting.py --base BASE --after CKPT [CKPT ...] --tasks nq_open,... --out DIR``.

Evaluates the same tasks on every checkpoint (or reads results JSONs of eval/run.py) and writes relative drops per
task to DIR/forgetting.json plus a plot DIR/forgetting.png. Logic: :mod:`memlm.evaluation.forgetting`.
"""

import os
import sys

# eval/ is sys.path[0] when a script in it runs: swap it for the checkout (runs without installing), so that
# eval/inspect.py cannot shadow the standard library's inspect
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from memlm.evaluation.cli import forgetting_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(forgetting_main())
