"""The live progress bar: trials done / budget, running, failed, pruned, best so far.

Elapsed and remaining time come from tqdm (the rate counts this run's trials only, so a
resumed run estimates from its own pace).

Example:
    >>> p = Progress(10, enabled=False)
    >>> p.update({"done": 3, "running": 2, "failed": 1, "pruned": 0}, 0.81)
    >>> p.postfix
    'best=0.8100 run=2 fail=1 pruned=0'
"""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A tqdm bar fed from the storage counts (so every driver shows the whole study)."""

    def __init__(self, total: int, enabled: bool = True, multi: bool = False) -> None:
        self.total, self.postfix = total, ""
        self._label = "best mean" if multi else "best"
        self._bar: Any = None
        self._enabled = enabled

    def update(self, counts: dict[str, int], best: float | None) -> None:
        """Moves the bar to ``counts["done"]`` and refreshes the figures."""
        best_text = "-" if best is None else f"{best:.4f}"
        self.postfix = (f"{self._label}={best_text} run={counts.get('running', 0)} "
                        f"fail={counts.get('failed', 0)} pruned={counts.get('pruned', 0)}")
        if not self._enabled:
            return
        done = min(counts.get("done", 0), self.total)
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=done, desc="trials", unit="trial",
                             file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                             mininterval=0.5)
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)
        self._bar.set_postfix_str(self.postfix, refresh=False)

    def close(self) -> None:
        """Leaves the final bar on screen."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._enabled = False
