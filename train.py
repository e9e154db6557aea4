#!/usr/bin/env python
"""Train a memlm language model (see README). With no arguments: the built-in tiny Memory+ default on CPU."""

import sys

from memlm.training.launcher import main

if __name__ == "__main__":
    sys.exit(main())
