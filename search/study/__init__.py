"""The study in storage, the single source of truth: URLs and studies
(:mod:`.storage`), what a trial carries (:mod:`.trials`), driver liveness and recovery
(:mod:`.liveness`), and the sampler (:mod:`.sampler`, imported only where used).

Example:
    >>> from search import study as st
    >>> st.redact("postgresql://soup:secret@db/soup")
    'postgresql://soup:***@db/soup'
"""

from __future__ import annotations

from search.study.storage import StorageError, open_storage, open_study, redact
from search.study.trials import (
    ATTR_BASELINE,
    ATTR_DRIVER,
    ATTR_ERROR,
    ATTR_PER_DOC,
    ATTR_RECIPE,
    ATTR_REQUEUED,
    ATTR_SCORES,
    counts,
    heldout_key,
    heldout_scores,
)

__all__ = [
    "ATTR_BASELINE", "ATTR_DRIVER", "ATTR_ERROR", "ATTR_PER_DOC", "ATTR_RECIPE", "ATTR_REQUEUED",
    "ATTR_SCORES",
    "StorageError", "counts", "heldout_key", "heldout_scores", "open_storage", "open_study",
    "redact",
]
