"""Synthetic skills for the demo: prompts, targets and deterministic splits.

Three skills a tiny byte-level model learns in seconds:

- ``add``: two-digit addition, ``57+38=`` -> ``95``
- ``reverse``: reverse 5 to 8 letters, ``rev:abcdef=`` -> ``fedcba``
- ``dup``: double every letter of 3 to 5, ``dup:abc=`` -> ``aabbcc``

The ``val`` split is the search's fitness data, ``test`` is held out; both are shipped
as JSONL in ``evaluators/tasks/soup_skills/data`` and never overlap each other or the
training stream.

Example:
    >>> import random
    >>> make_example("add", random.Random(0))
    ('59+63=', '122')
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from pathlib import Path

SKILLS = ("add", "reverse", "dup")
SPLITS = ("val", "test")
DATA = Path(__file__).parent / "tasks" / "soup_skills" / "data"


def make_example(skill: str, rng: random.Random) -> tuple[str, str]:
    """One ``(prompt, target)`` pair of ``skill``."""
    if skill == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}+{b}=", str(a + b)
    if skill == "reverse":
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 8)))
        return f"rev:{word}=", word[::-1]
    if skill == "dup":
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 5)))
        return f"dup:{word}=", "".join(c + c for c in word)
    raise ValueError(f"unknown skill {skill!r}; choose from {SKILLS}")


def generate_splits(seed: int = 20261123, size: int = 200) -> dict[str, dict[str, list[dict]]]:
    """Disjoint ``val`` and ``test`` splits of ``size`` unique prompts per skill."""
    out: dict[str, dict[str, list[dict]]] = {}
    for skill in SKILLS:
        rng = random.Random(f"{seed}/{skill}")
        seen: set[str] = set()
        items: list[dict] = []
        while len(items) < 2 * size:
            prompt, target = make_example(skill, rng)
            if prompt not in seen:
                seen.add(prompt)
                items.append({"prompt": prompt, "target": target})
        out[skill] = {"val": items[:size], "test": items[size:]}
    return out


def load_split(skill: str, split: str) -> list[dict]:
    """The shipped examples of one skill and split."""
    path = DATA / f"{skill}_{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def held_out_prompts() -> set[str]:
    """Every val and test prompt, which training must never see."""
    return {d["prompt"] for s in SKILLS for sp in SPLITS for d in load_split(s, sp)}


def training_stream(skills: tuple[str, ...], seed: int) -> Iterator[tuple[str, str]]:
    """An endless stream of training pairs from ``skills``, excluding held-out prompts."""
    rng = random.Random(seed)
    exclude = held_out_prompts()
    while True:
        prompt, target = make_example(rng.choice(skills), rng)
        if prompt not in exclude:
            yield prompt, target
