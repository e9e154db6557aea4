"""Sweep the Triton kernels' launch settings on this GPU: ``python eval/tune_kernels.py [--speed "--out F.json"]``.

Checks every setting against the defaults' results, times it, prints the fastest first; ``--speed ARGS`` then runs
eval/speed.py with the fastest correct settings applied. Logic: :mod:`memlm.benchmarks.tune`.
"""

from memlm.benchmarks.tune import main

if __name__ == "__main__":
    main()
