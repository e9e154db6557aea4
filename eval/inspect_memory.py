"""Inspect memory layers: ``python eval/inspect_memory.py --ckpt runs/tiny/export --text "The capital of France is"``.

Also ``--qa FILE`` (answer tokens of many facts), ``--slot S --layer L`` (what is slot S about?), ``--after CKPT2``
(which value rows a finetune changed) and ``--out DIR`` (report.txt, report.json, PNGs). Logic:
:mod:`memlm.inspection` (see ``memlm/inspection/cli.py``).
"""

import sys

from memlm.inspection.cli import main

if __name__ == "__main__":
    sys.exit(main())
