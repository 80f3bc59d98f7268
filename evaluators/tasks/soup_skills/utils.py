"""Loads the shipped demo data for lm-eval (``custom_dataset`` in the task YAMLs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"


def load(skill: str, **_: Any) -> Any:
    """A DatasetDict with the ``validation`` (search fitness) and ``test`` (held-out)
    splits of one skill, read from local JSONL."""
    import datasets

    def read(split: str) -> datasets.Dataset:
        path = DATA / f"{skill}_{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return datasets.Dataset.from_list(rows)

    return datasets.DatasetDict({"validation": read("val"), "test": read("test")})
