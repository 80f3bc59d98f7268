"""Converting plain config values field by field: scalars against their annotations,
lists, stages, mappings, model references, with did-you-mean for unknown keys.

Example:
    >>> stages([0.25, 1], "evaluator.stages")
    (0.25, 1.0)
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from search.errors import ConfigError


def build(cls: type, data: Any, where: str, convert: Mapping[str, Any] | None = None) -> Any:
    """Instantiates dataclass ``cls`` from a mapping, with did-you-mean for unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    names = [f.name for f in fields(cls)]
    types = {f.name: str(f.type) for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}.{key}: unknown option; {hint}options: {', '.join(names)}")
        fn = (convert or {}).get(key)
        kwargs[key] = fn(value, f"{where}.{key}") if fn else typed(value, types[key],
                                                                      f"{where}.{key}")
    missing = [f.name for f in fields(cls) if f.name not in kwargs
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required option {missing[0]!r}")
    return cls(**kwargs)


_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,),
                                         "str": (str,)}


def typed(value: Any, annotation: str, where: str) -> Any:
    """Checks a scalar option against its annotation (``int``, ``float | None``, …)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    for kind in kinds:
        ok = _SCALARS.get(kind)
        if ok is None:
            return value  # not a scalar option: checked by its converter or by _check
        if isinstance(value, ok) and not (kind != "bool" and isinstance(value, bool)):
            return float(value) if kind == "float" else value  # type: ignore[arg-type]
    want = " or ".join("null" if k == "None" else {"str": "a string", "int": "an integer",
                                                     "float": "a number", "bool": "true/false"
                                                     }.get(k, k) for k in kinds)
    raise ConfigError(f"{where}: expected {want}, got {value!r}")


def stages(value: Any, where: str) -> tuple[float, ...]:
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else None
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise ConfigError(f"{where}: expected a list of fractions like [0.25, 1.0], got "
                          f"{value!r}")
    return tuple(float(v) for v in items)


def tuple_of_str(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return tuple(str(v) for v in value)


def model_ref(name: str) -> str:
    """A local path made absolute (recipes then work from any folder); hub ids as given.

    ``MODEL+ADAPTER`` (a LoRA adapter applied to a model) has both parts resolved.
    """
    path = Path(os.path.expanduser(name))
    if "+" in name and not path.exists():
        model, _, adapter = name.partition("+")
        return f"{model_ref(model)}+{model_ref(adapter)}" if model and adapter else name
    if name.startswith((".", "/", "~")) or path.exists():
        return str(path.absolute())
    return name


def expert_ref(name: str, base: str) -> str:
    """An expert as a parent reference: a PEFT adapter folder is applied to the base."""
    ref = model_ref(name)
    if "+" not in ref and Path(ref, "adapter_config.json").is_file() \
            and not Path(ref, "config.json").is_file():
        return f"{base}+{ref}"
    return ref


def mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value
