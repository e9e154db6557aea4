"""Fair comparison of the memory-layer variants: ``python eval/compare.py [--steps 400] [--variants dense,pkm]``.

Trains every variant of the equal-FLOP ladder (``configs/model/{scale}_{variant}.yaml``) with the same recipe, data,
token budget and seed, then writes one table: ``runs/compare/{scale}/compare.{md,json}``. ``--scale small`` is the
GPU ladder, ``--skip_existing`` resumes; any ``--section.key=value`` overrides every variant's config. Options:
``--help``; logic: :mod:`memlm.experiments.compare`.
"""

import sys

from memlm.experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
