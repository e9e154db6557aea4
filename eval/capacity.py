"""Knowledge-capacity ladder: ``python eval/capacity.py --ladder configs/experiments/capacity_tiny.yaml --jobs 2``.

Trains every model of the ladder on the same invented-people recipe for ``--seeds`` seeds, scores recall per
exposure level, and writes ``capacity.{md,json}`` and two plots under the ladder's ``out`` (resumable: rerun the same
command). Options: ``--help``; logic: :mod:`memlm.experiments.capacity`.
"""

import sys

from memlm.experiments.capacity import main

if __name__ == "__main__":
    sys.exit(main())
