"""Reading conf/ and matching it to the dataclasses of search/settings.py.

A conf file is its leading comment (the docs' prose), its body and its data; the config
paths of the dataclasses say where each file's keys land, so keys without a field and
fields no file sets can be listed.

Example:
    >>> ConfFile.read(search_yaml()).label
    'search.yaml'
    >>> config_classes()[""].__name__
    'SearchConfig'
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from docs_common import ROOT, code, value_text

from search import config as config_module
from search.merge.methods import REGISTRY

CONF = ROOT / "conf"


def search_yaml() -> Path:
    """conf/search.yaml, the root of the composed config."""
    return CONF / "search.yaml"


@dataclass(frozen=True)
class ConfFile:
    """One YAML file of conf/: its leading comment, body and parsed data."""

    path: Path
    comment: tuple[str, ...]
    body: str
    data: Any

    @property
    def label(self) -> str:
        """``group/name.yaml`` (or ``search.yaml``)."""
        return self.path.relative_to(CONF).as_posix()

    @classmethod
    def read(cls, path: Path) -> ConfFile:
        """Splits the leading comment (Hydra's ``# @`` directives stay in the body)."""
        lines = path.read_text(encoding="utf-8").splitlines()
        comment: list[str] = []
        kept: list[str] = []
        i = 0
        while i < len(lines) and lines[i].startswith("#"):
            line = lines[i]
            (kept if line.startswith("# @") else comment).append(
                line if line.startswith("# @") else line[1:].removeprefix(" "))
            i += 1
        body = "\n".join(kept + lines[i:]).strip("\n")
        return cls(path, tuple(comment), body, yaml.safe_load(body) or {})


def groups() -> dict[str, list[ConfFile]]:
    """Every folder of conf/ and its YAML files, sorted."""
    return {d.name: [ConfFile.read(p) for p in sorted(d.glob("*.yaml"))]
            for d in sorted(CONF.iterdir()) if d.is_dir()}


def key_comments(body: str) -> dict[str, str]:
    """Top-level key -> the comment lines right above it plus its inline comment."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in body.splitlines():
        match = re.match(r"^([A-Za-z_]\w*):([^#]*)(?:#\s*(.*))?$", line)
        if line.startswith("#") and not line.startswith("# @"):
            above.append(line[1:].strip())
        elif match:
            out[match.group(1)] = " ".join([*above, match.group(3) or ""]).strip()
            above = []
        else:
            above = []
    return out


def defaults_list(path: Path) -> list[tuple[str, str, str]]:
    """``(group, option, comment)`` of the ``defaults:`` list of search.yaml."""
    entry = re.compile(r"^\s+-\s+(\w+):\s*(\S+)\s*(?:#\s*(.*))?$")
    return [(m.group(1), m.group(2), m.group(3) or "")
            for m in map(entry.match, path.read_text(encoding="utf-8").splitlines()) if m]


def dataclass_of(annotation: Any) -> type | None:
    """The dataclass in a field's type: itself, or the item type of a tuple."""
    if is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    for arg in typing.get_args(annotation):
        found = dataclass_of(arg)
        if found is not None:
            return found
    return None


def config_classes() -> dict[str, type]:
    """Config path (``""`` = top level) -> the dataclass it becomes, for every nested config.

    ``ComponentConfig`` (sampler, pruner) is left out: its keys are the keyword arguments
    of its ``_target_`` class, not fields.
    """
    out: dict[str, type] = {"": config_module.SearchConfig}
    todo: list[tuple[str, type]] = [("", config_module.SearchConfig)]
    while todo:
        prefix, cls = todo.pop(0)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            sub = dataclass_of(hints[f.name])
            if sub is not None and sub is not config_module.ComponentConfig:
                path = f"{prefix}.{f.name}".lstrip(".")
                out[path] = sub
                todo.append((path, sub))
    return out


def component_groups() -> tuple[str, ...]:
    """Top-level fields typed ``ComponentConfig`` (``_target_`` + keyword arguments)."""
    hints = typing.get_type_hints(config_module.SearchConfig)
    return tuple(f.name for f in fields(config_module.SearchConfig)
                 if hints[f.name] is config_module.ComponentConfig)


def composed_groups() -> set[str]:
    """Every group a top-level field of ``SearchConfig`` takes."""
    return {p for p in config_classes() if p and "." not in p} | set(component_groups())


def walk_keys(data: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """``(config path of the mapping, key)`` for every key a conf file sets."""
    if not isinstance(data, Mapping) or prefix in component_groups():
        return
    for key, value in data.items():
        if str(key) == "defaults":
            continue
        yield prefix, "target" if key == "_target_" else str(key)  # as the converter reads it
        path = f"{prefix}.{key}".lstrip(".")
        for item in value if isinstance(value, list) else [value]:
            yield from walk_keys(item, path)


def conf_files(all_groups: Mapping[str, list[ConfFile]]) -> list[tuple[str, ConfFile]]:
    """``(config path its keys land under, file)`` for search.yaml and every composed file."""
    out = [("", ConfFile.read(search_yaml()))]
    composed = composed_groups()
    for group, files in all_groups.items():
        if group == "experiment" or group in composed:
            out += [("" if group == "experiment" else group, c) for c in files]
    return out


def documented_classes() -> dict[type, list[str]]:
    """Every dataclass of the config (``ComponentConfig`` included) -> its config paths."""
    out: dict[type, list[str]] = {}
    for path, cls in config_classes().items():
        out.setdefault(cls, []).append(path)
    out[config_module.ComponentConfig] = list(component_groups())
    return out


def keys_set(all_groups: Mapping[str, list[ConfFile]]) -> dict[tuple[str, str], list[str]]:
    """``(config path, key)`` -> the conf files that set it (``_target_`` sets ``target``,
    the other keys of a component set ``kwargs``)."""
    found: dict[tuple[str, str], list[str]] = {}
    for prefix, conf in conf_files(all_groups):
        keys: Iterator[tuple[str, str]] | list[tuple[str, str]] = walk_keys(conf.data, prefix)
        if prefix in component_groups():
            keys = [(prefix, "target" if k == "_target_" else "kwargs") for k in conf.data]
        for key in dict.fromkeys(keys):
            found.setdefault(key, []).append(conf.label)
    return found


def conf_meanings(all_groups: Mapping[str, list[ConfFile]]) -> dict[tuple[str, str], str]:
    """``(config path, key)`` -> the first comment written for it in conf/."""
    out: dict[tuple[str, str], str] = {}
    for prefix, conf in conf_files(all_groups):
        for key, text in key_comments(conf.body).items():
            if text and (prefix, key) not in out:
                out[(prefix, key)] = text
    return out


def default_text(f: Any) -> str:
    if f.default is not MISSING:
        return code(value_text(f.default))
    if f.default_factory is not MISSING:
        return code(value_text(f.default_factory()))
    return "**required**"


def set_in(paths: Sequence[str], name: str,
            found: Mapping[tuple[str, str], list[str]]) -> list[str]:
    """The conf files (or group) that set field ``name`` of the config at any of ``paths``."""
    where = [w for p in paths for w in found.get((p, name), [])]
    if "" in paths and name in composed_groups():
        where = [f"the `{name}` group", *where]
    return list(dict.fromkeys(where))


def mismatches(all_groups: Mapping[str, list[ConfFile]]) -> list[str]:
    """Conf keys and groups with no field, fields no conf file sets, missing defaults."""
    classes = config_classes()
    found = keys_set(all_groups)
    out = []
    for (path, key), where in sorted(found.items()):
        cls = classes.get(path)
        if cls is not None and key not in {f.name for f in fields(cls)} and key != "experiment":
            out.append(f"{code(f'{path}.{key}'.lstrip('.'))} (set in {', '.join(where)}) "
                       f"has no field in `{cls.__name__}`: composing it fails")
    for cls, where in documented_classes().items():
        out += [f"`{cls.__name__}.{f.name}` is set by no file in conf/: its default "
                f"{default_text(f)} applies"
                for f in fields(cls) if not set_in(where, f.name, found)]
    for conf in all_groups.get("space", []):
        unknown = [m for m in conf.data.get("methods") or [] if m not in REGISTRY]
        out += [f"{conf.label} lists `{m}`, which is not a registered merge method"
                for m in unknown]
    for group, option, _ in defaults_list(search_yaml()):
        if group != "experiment" and group not in composed_groups():
            out.append(f"the group `{group}` has no field in `SearchConfig`: composing it fails")
        elif option != "null" and not (CONF / group / f"{option}.yaml").is_file():
            out.append(f"the default `{group}: {option}` has no file conf/{group}/{option}.yaml")
    return out
