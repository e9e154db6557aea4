"""QA generation speed: ``python eval/qa_speed.py --ckpt runs/tiny/export [--n 64 --out qa_speed.json]``.

Questions/s with batching + KV cache vs. without, outputs checked to agree. Logic: :mod:`memlm.benchmarks.qa_speed`.
"""

import sys

from memlm.benchmarks.qa_speed import main

if __name__ == "__main__":
    sys.exit(main())
