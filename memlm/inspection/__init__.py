"""Memory inspection: which slots hold which fact (token -> slots -> tokens they promote, slot -> contexts,
checkpoint diffs). Command line: ``python eval/inspect_memory.py`` (:mod:`memlm.inspection.cli`)."""

from memlm.inspection.background import SlotFrequency, load_background
from memlm.inspection.capture import Capture, InspectionError, LayerRecord, capture
from memlm.inspection.contexts import CorpusRecord, record_corpus, slot_contexts
from memlm.inspection.contribution import slot_writes
from memlm.inspection.diff import CheckpointDiff, TableDiff, diff_checkpoints, facts_hitting_changes
from memlm.inspection.readout import TokenReadout
from memlm.inspection.trace import Example, qa_example, text_example, trace_example

__all__ = [
    "Capture",
    "CheckpointDiff",
    "CorpusRecord",
    "Example",
    "InspectionError",
    "LayerRecord",
    "SlotFrequency",
    "TableDiff",
    "TokenReadout",
    "capture",
    "diff_checkpoints",
    "facts_hitting_changes",
    "load_background",
    "qa_example",
    "record_corpus",
    "slot_contexts",
    "slot_writes",
    "text_example",
    "trace_example",
]
