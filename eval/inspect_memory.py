"""Inspect memory layers: ``python eval/inspect.py --ckpt runs/tiny/export --text "The capital of France is"``.

Also ``--qa FILE`` (answer tokens of many facts), ``--slot S --layer L`` (what is slot S about?), ``--after CKPT2``
(which value rows a finetune changed) and ``--out DIR`` (report.txt, report.json, PNGs). Logic:
:mod:`memlm.inspection` (see ``memlm/inspection/cli.py``).
"""

import os
import sys

# This file is named like the standard library's ``inspect``, which torch imports: drop this directory from the import
# path before anything else is imported, and put the checkout first (runs without installing).
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

from memlm.inspection.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
