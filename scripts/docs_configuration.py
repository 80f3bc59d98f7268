r"""docs/configuration.md: conf/ file by file, the dataclasses field by field, and where
the two disagree.

Example:
    >>> text = render_configuration()
    >>> text.startswith(HEADER) and "\n## Dataclasses\n" in text
    True
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields

from docs_common import (
    HEADER,
    anchor,
    code,
    contents,
    docstring_md,
    no_tags,
    prose,
    table,
    value_text,
)
from docs_conf import (
    ConfFile,
    component_groups,
    conf_meanings,
    config_classes,
    default_text,
    defaults_list,
    documented_classes,
    groups,
    key_comments,
    keys_set,
    mismatches,
    search_yaml,
    set_in,
)

from search import config as config_module

CONFIG_INTRO = """\
`soup search` composes `conf/search.yaml` with Hydra: one option from each config group
(`GROUP=OPTION`, e.g. `sampler=cmaes`) plus `key=value` overrides (`n_trials=200`,
`parallel.workers=4`). `soup search --cfg job ...` prints the composed config and stops.
The composed config is converted once, in `search/config.py`, into the frozen dataclasses
of `search/settings.py`:
an unknown key or a wrong type is an error with a did-you-mean hint. `soup resume RUN_DIR
key=value` changes keys of a saved run (not groups)."""


def _field_doc(cls: type) -> dict[str, str]:
    """``Attributes:`` entries of a Google docstring (``a, b: text`` names two fields)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    last: list[str] = []
    for line in doc.split("Attributes:", 1)[1].splitlines() if "Attributes:" in doc else []:
        match = re.match(r"^\s{4}([\w, ]+):\s*(.*)$", line)
        if match:
            last = [n.strip() for n in match.group(1).split(",")]
            out.update({name: match.group(2) for name in last})
        elif line.startswith(" " * 8) and last:
            out.update({name: out[name] + " " + line.strip() for name in last})
    return out


# How search/config.py's converters name fields that conf/ spells differently.
FIELD_NOTES = {
    ("ComponentConfig", "target"): "written `_target_`: the class to build (null = none)",
    ("ComponentConfig", "kwargs"): "every other key of the file, passed to the class",
    ("EvaluatorConfig", "target"): "written `_target_`: the evaluator class each worker builds "
                                   "(contract: `evaluators.base.Evaluator`)",
}


def dataclass_section(cls: type, paths: Sequence[str], found: Mapping[tuple[str, str], list[str]],
                      meanings: Mapping[tuple[str, str], str]) -> str:
    """A dataclass's fields: type, default, meaning and the conf files that set each."""
    docs = _field_doc(cls)
    rows = []
    for f in fields(cls):
        meaning = docs.get(f.name) or FIELD_NOTES.get((cls.__name__, f.name)) or next(
            (meanings[(p, f.name)] for p in paths if (p, f.name) in meanings), "")
        where = ", ".join(set_in(paths, f.name, found)) or "**nowhere** (the default applies)"
        rows.append([code(f.name), code(str(f.type)), default_text(f), docstring_md(meaning),
                     where])
    summary = docstring_md((inspect.getdoc(cls) or "").split("\n\n")[0])
    where = ", ".join(f"`{p}`" if p else "the top level" for p in paths)
    return "\n".join([f"### {cls.__name__}", "", f"{summary} Config path: {where}.", "",
                      table(["field", "type", "default", "meaning", "set in conf/"], rows), ""])


def _summary(conf: ConfFile) -> str:
    first = prose(conf.comment).split("\n\n")[0]
    return re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s", first)[0] if first else ""


def _group_intro(group: str, default: str | None) -> str:
    if group == "experiment":
        return ("Presets: `experiment=NAME` applies a file's overrides to the whole config "
                "(`# @package _global_`), after every other group. Default: none.")
    if default is None:
        return ("Not a config group (not in the `defaults:` list): files used by path, "
                "e.g. as `seeds=[conf/recipes/NAME.yaml]` or with `soup merge`.")
    cls = config_classes().get(group)
    if cls is not None:
        target = f"Becomes [`{cls.__name__}`]({anchor(cls.__name__)})."
    elif group in component_groups():
        target = ("`_target_` is the Optuna class to build; the other keys are its keyword "
                  "arguments (not checked against a dataclass).")
    else:
        target = "**No field of `SearchConfig` takes this group: composing it fails.**"
    more = " Method names and their parameters: [methods.md](methods.md)." * (group == "space")
    return f"Pick one with `{group}=NAME`; default: `{default}`. {target}{more}"


def group_section(group: str, files: Sequence[ConfFile], default: str | None) -> str:
    """One conf/ folder: what it is, an options table, each file's comment and YAML."""
    summary = [[code(c.path.stem), _summary(c)] for c in files]
    parts = [f"### {group}", "", _group_intro(group, default), "",
             table(["option", "summary"], summary), ""]
    for conf in files:
        parts += [f"#### {conf.label}", "", prose(conf.comment), "", "```yaml", conf.body,
                  "```", ""]
    return "\n".join(parts)


def _top_level(all_groups: Mapping[str, list[ConfFile]]) -> list[str]:
    top = ConfFile.read(search_yaml())
    comments = key_comments(top.body)
    types = {f.name: str(f.type) for f in fields(config_module.SearchConfig)}
    group_rows = [[f"[{g}]({anchor(g)})", code(o), no_tags(c)]
                  for g, o, c in defaults_list(search_yaml())]
    key_rows = [[code(k), code(value_text(v)), code(types.get(k, "(no field)")),
                 comments.get(k) or "—"] for k, v in top.data.items() if k != "defaults"]
    return ["## Top-level keys", "", prose(top.comment), "",
            table(["group", "default", "comment"], group_rows), "",
            table(["key", "value in search.yaml", "type", "meaning"], key_rows), ""]


def render_configuration() -> str:
    """The text of docs/configuration.md."""
    all_groups = groups()
    defaults = {g: o for g, o, _ in defaults_list(search_yaml())}
    order = [g for g in defaults if g in all_groups] + sorted(set(all_groups) - set(defaults))
    paths = documented_classes()
    found, meanings = keys_set(all_groups), conf_meanings(all_groups)
    toc = [(0, "Top-level keys"), (0, "Config groups"), *[(1, g) for g in order],
           (0, "Dataclasses"), *[(1, c.__name__) for c in paths],
           (0, "Conf keys and dataclass fields")]
    parts = [HEADER, "# Configuration reference", "", CONFIG_INTRO, "", "## Contents", "",
             contents(toc), "", *_top_level(all_groups), "## Config groups", ""]
    parts += [group_section(g, all_groups[g], defaults.get(g)) for g in order]
    parts += ["## Dataclasses", "",
              "The frozen dataclasses of `search/settings.py`, nested as in the composed "
              "config. \"set in conf/\" lists the shipped files that set a field.", ""]
    parts += [dataclass_section(c, p, found, meanings) for c, p in paths.items()]
    problems = mismatches(all_groups) or ["none: conf/ and the dataclasses agree."]
    parts += ["## Conf keys and dataclass fields", "",
              "Differences between conf/ and the dataclasses, found by this generator:", "",
              *[f"- {p}" for p in problems]]
    return "\n".join(parts).rstrip() + "\n"
