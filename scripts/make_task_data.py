"""Regenerates the shipped demo task data (deterministic; the files are committed).

    python scripts/make_task_data.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.skills import DATA, generate_splits


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for skill, splits in generate_splits().items():
        for split, items in splits.items():
            path = DATA / f"{skill}_{split}.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in items))
            print(f"wrote {path} ({len(items)} examples)")


if __name__ == "__main__":
    main()
