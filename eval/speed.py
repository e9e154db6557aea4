"""Speed benchmarks of the memory layers: ``python eval/speed.py --out runs/speed.json`` (GPU: sections a-f).

``--sections b,e --profile`` (top device kernels), ``--sections b --compile``, ``--device cpu --quick`` (CPU smoke
run, seconds). Sections and options: ``--help``; logic: :mod:`memlm.benchmarks` (see ``memlm/benchmarks/cli.py``).
"""

from memlm.benchmarks.cli import main

if __name__ == "__main__":
    main()
