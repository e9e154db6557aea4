"""``python -m memlm.continual --ckpt PATH --config configs/finetune/<method>.yaml [--section.key=value ...]``."""

import sys

from memlm.continual.script import main

if __name__ == "__main__":
    sys.exit(main())
