"""``soup report``: an HTML page with figures, from the study alone.

:mod:`.data` turns trials into plain rows, :mod:`.figures` draws them, :mod:`.page`
writes the folder.
"""

from __future__ import annotations

from search.results.report.page import TITLES, write_report

__all__ = ["TITLES", "write_report"]
