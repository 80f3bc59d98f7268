"""Short, unique display names of models: the one rule every part of the tool uses.

A model's short name is its folder name (the last part of its path or hub id). For a
``MODEL+ADAPTER`` reference that is the adapter's folder name, the part that tells two
adapters on one base apart. When two names clash, or a name holds ``+`` (which joins
names in a subset choice such as ``slerp.models``), every model is named by its
position instead: ``m0``, ``m1``… The search space's parameter keys
(``ties.weight.NAME``) use these names, so they never change for a saved study.

This module imports nothing of the project.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence


def folder_name(model: str) -> str:
    """The last part of ``model``'s path or hub id (trailing slashes ignored)."""
    return os.path.basename(model.rstrip("/")) or model


def short_names(models: Sequence[str]) -> list[str]:
    """Readable, unique names of ``models``, in order: folder names, else ``m0``, ``m1``…

    Args:
        models: model references (paths, hub ids or ``MODEL+ADAPTER``), each once.

    Returns:
        One name per model; no two are equal and none holds ``+``.

    Example:
        >>> short_names(["/models/expert_a/", "org/expert_b", "/m/base+/m/lora_add"])
        ['expert_a', 'expert_b', 'lora_add']
        >>> short_names(["/a/checkpoint", "/b/checkpoint"]), short_names(["/m/a+b", "/m/c"])
        (['m0', 'm1'], ['m0', 'm1'])
    """
    names = [folder_name(m) for m in models]
    if len(set(names)) != len(names) or any("+" in n for n in names):
        return [f"m{i}" for i in range(len(models))]
    return names


def name_map(models: Sequence[str], others: Iterable[str] = ()) -> dict[str, str]:
    """Unique short names of ``models`` (as :func:`short_names` gives them) and of
    ``others`` (models outside that set: the base, a seed recipe's extra model).

    ``models`` keep exactly the names the search space gives them; each of ``others``
    not among them takes its folder name if no model named so far has that name or
    that folder name, else the first free ``m<i>`` counting on from the models.

    Example:
        >>> name_map(["/a/m", "/b/m"], ["/m/base", "/a/m"])
        {'/a/m': 'm0', '/b/m': 'm1', '/m/base': 'base'}
    """
    unique = list(dict.fromkeys(models))
    out = dict(zip(unique, short_names(unique), strict=True))
    taken = set(out.values()) | {folder_name(m) for m in out}
    for model in others:
        if model in out:
            continue
        name, i = folder_name(model), len(out)
        while name in taken or "+" in name:
            name, i = f"m{i}", i + 1
        out[model] = name
        taken |= {name, folder_name(model)}
    return out
