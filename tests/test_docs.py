"""The generated docs are current, and each covers what it must on its own terms.

``test_docs_are_current`` fails whenever the code changes what a doc would say; the other
tests catch a generator that silently drops a method, an option file, a key or a field.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import re
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GENERATORS = ("gen_docs", "docs_common", "docs_methods", "docs_conf", "docs_configuration",
              "docs_troubleshooting")


def _load(name: str) -> ModuleType:
    """A module of scripts/ (the generator and the docs_* modules it imports)."""
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module(name)


gen_docs, common, methods, conf_reader, troubleshooting = (
    _load(n) for n in ("gen_docs", "docs_common", "docs_methods", "docs_conf",
                       "docs_troubleshooting"))


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    """The freshly generated docs, by file name."""
    return {path.name: text for path, text in gen_docs.generate().items()}


def _section(text: str, heading: str) -> str:
    """The body of ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    end = re.search(rf"\n#{{1,{len(level)}}} ", text[start + len(heading) + 2:])
    return text[start:] if end is None else text[start:start + len(heading) + 2 + end.start()]


def test_docs_are_current(docs: dict[str, str]) -> None:
    committed = {name: (ROOT / "docs" / name).read_text(encoding="utf-8")
                 if (ROOT / "docs" / name).is_file() else None for name in docs}
    stale = [name for name, text in docs.items() if committed[name] != text]
    assert not stale, f"stale docs {stale}: run python scripts/gen_docs.py and commit them"


def test_check_mode_exit_status(docs: dict[str, str], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen_docs, "DOCS", tmp_path)
    monkeypatch.setattr(gen_docs, "generate",
                        lambda: {tmp_path / name: text for name, text in docs.items()})
    assert gen_docs.main(["--check"]) == 1  # nothing written yet: all stale
    assert gen_docs.main([]) == 0
    assert gen_docs.main(["--check"]) == 0
    (tmp_path / "methods.md").write_text("edited by hand\n", encoding="utf-8")
    assert gen_docs.stale(gen_docs.generate()) == [tmp_path / "methods.md"]


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_examples_run(name: str) -> None:
    result = doctest.testmod(_load(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed, f"scripts/{name}.py: examples fail"


def test_every_doc_starts_with_the_generated_line(docs: dict[str, str]) -> None:
    for text in docs.values():
        first = text.splitlines()[0]
        assert "python scripts/gen_docs.py" in first and "not edit by hand" in first


def test_every_method_has_a_section_and_its_parameters(docs: dict[str, str]) -> None:
    from search.merge.methods import REGISTRY

    text = docs["methods.md"]
    for name, method in REGISTRY.items():
        body = _section(text, f"### {name}")
        for spec in method.params:
            assert f"| `{spec.name}` |" in body, f"{name}.{spec.name} is not documented"


def test_example_recipes_are_valid() -> None:
    from search.merge.methods import REGISTRY, validate_recipe
    from search.recipe import Recipe

    for method in REGISTRY.values():
        recipe = Recipe.from_yaml(methods.example_recipe(method), where=method.name)
        assert validate_recipe(recipe) is method


def test_every_conf_option_file_is_documented(docs: dict[str, str]) -> None:
    text = docs["configuration.md"]
    for folder in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir()):
        assert f"\n### {folder.name}\n" in text, f"conf/{folder.name} has no section"
        for path in sorted(folder.glob("*.yaml")):
            assert f"\n#### {folder.name}/{path.name}\n" in text, f"{path} is not documented"


def test_every_top_level_key_is_documented(docs: dict[str, str]) -> None:
    top = _section(docs["configuration.md"], "## Top-level keys")
    data = yaml.safe_load((ROOT / "conf" / "search.yaml").read_text(encoding="utf-8"))
    for key in data:
        if key != "defaults":
            assert f"| `{key}` |" in top, f"search.yaml key {key!r} is not documented"
    for entry in data["defaults"]:
        if isinstance(entry, dict):
            assert f"[{next(iter(entry))}](" in top, f"default {entry} is not documented"


def _nested_configs(cls: type) -> set[type]:
    """``cls`` and every dataclass its fields hold, directly or as tuple items."""
    found = {cls}
    for hint in typing.get_type_hints(cls).values():
        for sub in (hint, *typing.get_args(hint)):
            if is_dataclass(sub) and isinstance(sub, type) and sub not in found:
                found |= _nested_configs(sub)
    return found


def test_every_dataclass_field_is_documented(docs: dict[str, str]) -> None:
    from search.config import SearchConfig

    text = docs["configuration.md"]
    classes = _nested_configs(SearchConfig)
    assert len(classes) >= 8  # models, space, component, evaluator, task, storage, parallel
    for cls in classes:
        body = _section(text, f"### {cls.__name__}")
        for f in fields(cls):
            assert f"| `{f.name}` |" in body, f"{cls.__name__}.{f.name} is not documented"


def test_a_conf_key_without_a_field_is_reported(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    (conf / "parallel").mkdir(parents=True)
    (conf / "search.yaml").write_text(
        "defaults:\n  - parallel: serial\n  - _self_\nstudy_name: x\nbogus_top: 1\n",
        encoding="utf-8")
    (conf / "parallel" / "serial.yaml").write_text("# One process.\nkind: serial\nworkerz: 2\n",
                                                   encoding="utf-8")
    monkeypatch.setattr(conf_reader, "CONF", conf)
    found = "\n".join(conf_reader.mismatches(conf_reader.groups()))
    assert "`parallel.workerz` (set in parallel/serial.yaml) has no field" in found
    assert "`bogus_top` (set in search.yaml) has no field" in found


SAMPLE = '''
import argparse

class SoupError(Exception):
    pass

class ConfigError(SoupError):
    pass

def _wrap(error):
    return SoupError(f"worker failed: {error}")

class Thing:
    def check(self, n, names):
        if n < 0:
            raise ConfigError(f"n={n!r}: must be >= 0; known: {', '.join(sorted(names))}")
        if n == 1:
            raise ValueError(f"internal: {n}")
        if n == 2:
            raise TypeError("misuse")
        if n == 3:
            raise _wrap(n)
        if n == 4:
            raise ConfigError(str(n))
        raise NotImplementedError
'''


def test_scan_rule_keeps_user_errors_and_skips_builtins() -> None:
    classes = troubleshooting.user_classes(iter([ast.parse(SAMPLE)]))
    assert {"SoupError", "ConfigError"} <= classes
    found = troubleshooting.scan_source(SAMPLE, "search/sample.py", classes)
    assert [(r.where, r.error, r.message) for r in found] == [
        ("Thing.check", "ConfigError", "n={n}: must be >= 0; known: {names}"),
        ("Thing.check", "SoupError", "worker failed: {error}"),
    ]


def test_every_scanned_error_is_on_the_page(docs: dict[str, str]) -> None:
    text = docs["troubleshooting.md"]
    found = troubleshooting.scan()
    assert found
    for raised in found:
        assert common.code(raised.message).replace("|", "\\|") in text, raised
