r"""docs/troubleshooting.md: every user-facing error message of search/ and evaluators/,
read from their ``raise`` statements with ``ast`` and grouped by what the user was doing.

Example:
    >>> source = 'def f(n):\n    raise SoupError(f"n={n!r}: must be >= 0")\n'
    >>> [(r.where, r.message) for r in scan_source(source, "search/x.py", {"SoupError"})]
    [('f', 'n={n}: must be >= 0')]
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass

from docs_common import HEADER, ROOT, code, contents, dotted, table, template

USER_ERRORS = ("SoupError", "RecipeError", "EvaluatorError")
ALSO_USER = {"argparse.ArgumentTypeError": ("search/cli.py",),
             # the CLI re-raises these as SoupError
             "ValueError": ("search/results/leaderboard.py",)}
SCANNED = ("search", "evaluators")

RULE = """\
The CLI prints a user mistake as one line, `error: MESSAGE`, and exits with status 2. In
the messages below an f-string field is shown as `{name}`, text chosen by a condition as
`a/b` (or as the text alone when the other choice is empty), and `{hint}` is a
did-you-mean suggestion (empty when no name is close).

**Listed.** Every `raise` in `search/` and `evaluators/` of an exception meant for a
user, whose message is a string or f-string literal: a class derived from `SoupError`,
`RecipeError` or `EvaluatorError`; `argparse.ArgumentTypeError` in `search/cli.py`
(argparse prints it as a usage error); and `ValueError` in `search/results/leaderboard.py` (the
CLI re-raises it as `SoupError`). During a search, a candidate's error does not stop the
search: it becomes the FAILED trial's stored reason. Messages passed on from another
exception (`str(exc)`) are listed where they are first raised.

**Not listed.** Built-in exceptions (`ValueError`, `TypeError`, `RuntimeError`,
`NotImplementedError`, ...) raised anywhere else: they mark a programming error or the
misuse of an internal function, not a user mistake, and show a traceback. Please report
those as bugs."""

GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Command line", "Arguments of the `soup` subcommands: a missing or conflicting flag. "
     "Run `soup COMMAND --help` for the forms each command accepts.", ("search/cli.py",)),
    ("Configuration: soup search and soup resume",
     "The composed config (conf/ plus overrides) is checked before any model loads. The "
     "message names the config key (e.g. `space.params.density`); fix it in the conf/ file "
     "or with an override, and use `soup search --cfg job ...` to see what was composed.",
     ("search/config.py", "search/config_fields.py", "search/run/space.py",
      "search/run/launch.py")),
    ("Recipes: soup merge, seeds= and every candidate",
     "A recipe's structure, method and parameter values are checked before any weight is "
     "read. The message names the recipe key (`models[1].parameters.density`) and the "
     "valid range; docs/methods.md lists every method's parameters.",
     ("search/recipe.py", "search/merge/methods.py", "search/merge/plan.py")),
    ("Models, checkpoints and merged weights",
     "Loading the parents and writing a merge: paths and hub ids that cannot be found "
     "locally, pickle-only checkpoints, parents that differ in architecture, shapes or "
     "vocabulary, existing output folders, non-finite results. The message names the "
     "model and tensor; merge only models fine-tuned from the same base.", ("search/merge/",)),
    ("Storage and studies",
     "Opening the Optuna storage (`storage.url`) and the study in it, and writing trials "
     "to it (a process beside the driver applies its writes; a write that fails stops "
     "the search with the storage's message, password redacted). Check the URL, that "
     "the database driver is installed and the database reachable, and that "
     "`study_name` is the study you mean.",
     ("search/study/",)),
    ("Running a search: workers, baselines, seeds",
     "Starting workers and enqueuing the first trials. A worker that fails to set up "
     "(missing model, bad task) stops the search with its reason; a single bad candidate "
     "does not: it becomes a FAILED trial with its reason stored (the footer of `soup "
     "leaderboard` counts failures by reason).",
     ("search/run/driver.py", "search/run/executors.py", "search/run/worker.py",
      "search/run/baselines.py", "search/run/launch.py")),
    ("Scoring: lm-eval tasks and soup evaluate",
     "The evaluator's tasks (config group `evaluator`) and `soup evaluate`'s held-out "
     "tasks. Task names must be known to lm-eval: the shipped ones, or YAML folders listed "
     "in `evaluator.include_path`.", ("evaluators/", "search/results/heldout.py")),
    ("Reading a study: soup leaderboard and soup report",
     "Pure reads of a finished or running study: sort keys, row counts, output folders.",
     ("search/results/leaderboard.py", "search/results/report/")),
    ("Exporting a model: soup export",
     "Writing one trial as a model folder: which trial, the output folder, and the parents "
     "the run used (they must still be where the run found them).",
     ("search/results/export.py", "search/results/card.py")),
    ("Other modules", "Errors of modules not grouped above.", ("",)),
)


@dataclass(frozen=True)
class Raised:
    """One user-facing error: its class, message template and where it is raised."""

    module: str
    where: str
    error: str
    message: str


def user_classes(trees: Iterator[ast.Module]) -> set[str]:
    """Names of the classes derived (in the scanned code) from ``USER_ERRORS``."""
    bases: dict[str, set[str]] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {dotted(b).rsplit(".", 1)[-1] for b in node.bases}
    found = set(USER_ERRORS)
    while True:
        more = {name for name, bs in bases.items() if bs & found} - found
        if not more:
            return found
        found |= more


def _helpers(tree: ast.Module, classes: set[str]) -> dict[str, ast.Call]:
    """Module-level functions that return a user error: name -> the returned call."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for ret in ast.walk(node):
                if (isinstance(ret, ast.Return) and isinstance(ret.value, ast.Call)
                        and dotted(ret.value.func) in classes):
                    out[node.name] = ret.value
    return out


def _raises(node: ast.AST, scope: str) -> Iterator[tuple[str, ast.Raise]]:
    """``(qualified function name, raise)`` for every raise under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _raises(child, f"{scope}.{child.name}".lstrip("."))
        elif isinstance(child, ast.Raise):
            yield scope or "<module>", child
        else:
            yield from _raises(child, scope)


def scan_source(source: str, module: str, classes: set[str]) -> list[Raised]:
    """The user-facing errors raised in one module's source, in source order."""
    tree = ast.parse(source)
    helpers = _helpers(tree, classes)
    allowed = classes | {n for n, mods in ALSO_USER.items() if module in mods}
    out: list[Raised] = []
    for where, node in _raises(tree, ""):
        call = node.exc
        if not isinstance(call, ast.Call):
            continue
        name = dotted(call.func)
        if name in helpers:
            call = helpers[name]
            name = dotted(call.func)
        message = template(call.args[0]) if call.args else None
        if name not in allowed or message is None:
            continue
        entry = Raised(module, where, name.rsplit(".", 1)[-1], " ".join(message.split()))
        if entry not in out:
            out.append(entry)
    return out


def _sources() -> list[tuple[str, str]]:
    paths = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    return [(p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8")) for p in paths]


def scan() -> list[Raised]:
    """Every user-facing error of search/ and evaluators/."""
    sources = _sources()
    classes = user_classes(ast.parse(text) for _, text in sources)
    return [r for module, text in sources for r in scan_source(text, module, classes)]


def group_of(module: str) -> str:
    """The title of the first group whose prefixes match ``module``."""
    return next(t for t, _, prefixes in GROUPS if any(module.startswith(p) for p in prefixes))


def render_troubleshooting() -> str:
    """The text of docs/troubleshooting.md."""
    found = scan()
    by_group: dict[str, dict[str, list[Raised]]] = {}
    for r in found:
        by_group.setdefault(group_of(r.module), {}).setdefault(r.module, []).append(r)
    titles = [t for t, _, _ in GROUPS if t in by_group]
    toc = [(0, "Reading this page")] + [(0, t) for t in titles]
    parts = [HEADER, "# Troubleshooting: every error message", "",
             "Each message says what is wrong, with which input, and how to fix it. Find "
             "yours here (search the page for a fixed part of it) to see where it comes "
             f"from. {len(found)} messages in {sum(map(len, by_group.values()))} modules.",
             "", "## Contents", "", contents(toc), "", "## Reading this page", "", RULE, ""]
    for title, intro, _ in GROUPS:
        if title not in by_group:
            continue
        parts += [f"## {title}", "", intro, ""]
        for module, entries in by_group[title].items():
            dotted = module.removesuffix(".py").replace("/", ".")
            rows = [[code(r.message), f"`{r.error}`", f"`{dotted}:{r.where}`"] for r in entries]
            parts += [f"### {module}", "", table(["message", "error", "raised in"], rows), ""]
    return "\n".join(parts).rstrip() + "\n"
