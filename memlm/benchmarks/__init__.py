"""Speed benchmarks of the memory layers (the sections of ``eval/speed.py``).

One module per kind of measurement: :mod:`.timing` (device-aware timers, copy bandwidth, kernel profiles, tables),
:mod:`.lookup` (a), :mod:`.training` (b, c), :mod:`.retrieval` (d), :mod:`.layer` (e), :mod:`.optimizer` (f),
:mod:`.cpu_targets` (g: the CPU targets at 1 and 2 threads, vs the PyPI peers). Each section is a function
``(args, device, bandwidth) -> dict`` that prints its own table and returns JSON-able rows.
"""

from memlm.benchmarks.cpu_targets import section_cpu_targets
from memlm.benchmarks.layer import section_layer
from memlm.benchmarks.lookup import section_lookup
from memlm.benchmarks.optimizer import section_value_optimizer
from memlm.benchmarks.retrieval import section_retrieval
from memlm.benchmarks.training import section_slot_scaling, section_tokens_per_s

SECTIONS = {
    "a": section_lookup,
    "b": section_tokens_per_s,
    "c": section_slot_scaling,
    "d": section_retrieval,
    "e": section_layer,
    "f": section_value_optimizer,
    "g": section_cpu_targets,
}

__all__ = ["SECTIONS"]
