"""Multi-run experiments: the variant ladder of ``eval/compare.py`` (:mod:`.compare`)."""
