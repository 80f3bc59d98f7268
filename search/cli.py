"""The ``soup`` command.

    soup merge RECIPE.yaml OUT_DIR [--device auto|cpu|cuda] [--allow-pickle]
               [--truncate-vocab] [--max-shard-size 2GB] [--force]
    soup methods
    soup search [--cfg job] [OVERRIDE ...]       e.g. soup search experiment=demo
    soup resume RUN_DIR [KEY=VALUE ...]          e.g. soup resume runs/demo n_trials=100
    soup leaderboard RUN_DIR [--top K] [--sort TASK] [--format table|csv|json|markdown]
    soup report RUN_DIR [--out DIR] [--top K] [--force]   (or --storage URL --study NAME
                --out DIR): offline HTML report + PNG figures, default RUN_DIR/report
    soup evaluate RUN_DIR [--top K] [--tasks NAME[,NAME...]] [--no-baselines] [--force]
                  [--device auto|cpu|cuda]   (or --storage URL --study NAME --tasks ...)
    soup export RUN_DIR OUT_DIR [--trial N | --best] [--force] [--max-shard-size 2GB]
                [--device auto|cpu|cuda]   (or --storage URL --study NAME OUT_DIR)

User mistakes print one line starting with ``error:`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from search import __version__
from search.errors import SoupError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"2GB"`` -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB or 2GB")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return max(1, int(float(m.group(1)) * scale))


def _cmd_merge(args: argparse.Namespace) -> int:
    from search.merge.streaming import MergeOptions, merge_to_disk
    from search.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    opts = MergeOptions(device=args.device, allow_pickle=args.allow_pickle,
                        truncate_vocab=args.truncate_vocab, max_shard_bytes=args.max_shard_size,
                        force=args.force)
    out = merge_to_disk(recipe, args.out_dir, opts)
    print(f"merged {recipe.merge_method} of {len(recipe.models)} model(s) into {out}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from search.merge.methods import REGISTRY

    for m in REGISTRY.values():
        params = ", ".join(f"{p.name}{'*' if p.per_model else ''}" for p in m.params)
        print(f"{m.name:18s} base={m.base:8s} {params}")
    print("(* = per-model parameter)")
    return 0


def _search(cfg: Any, raw: Any, args: argparse.Namespace) -> int:
    """Runs (or resumes) the search, then prints its leaderboard."""
    from search.results.leaderboard import Leaderboard
    from search.run.launch import run_search

    study, _ = run_search(cfg, raw, show_progress=not args.no_progress)
    print(Leaderboard.from_study(study).render("table", top=10))
    print(f"run folder: {cfg.run_dir}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from search import config

    raw = config.compose_raw(args.overrides, args.config_dir)
    if args.cfg:
        print(config.to_yaml(raw), end="")
        return 0
    return _search(config.from_hydra(raw), raw, args)


def _cmd_resume(args: argparse.Namespace) -> int:
    from search import config

    raw, cfg = config.load_saved(args.run_dir, args.overrides)
    return _search(cfg, raw, args)


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    """The study and config of RUN_DIR, or of --storage URL --study NAME."""
    from search.results.heldout import open_run

    return open_run(args.run_dir, args.storage, args.study)


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from search.results.leaderboard import Leaderboard

    study, _ = _open(args)
    try:
        board = Leaderboard.from_study(study, sort=args.sort)
    except ValueError as exc:
        raise SoupError(str(exc)) from None
    print(board.render(args.format, top=args.top), end="")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from search.results.heldout import EvaluateOptions, describe, evaluate_run

    tasks = tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip())
    if args.tasks is not None and not tasks:
        raise SoupError(f"--tasks {args.tasks!r}: give task names separated by commas")
    opts = EvaluateOptions(top=args.top, tasks=tasks, baselines=not args.no_baselines,
                           force=args.force, device=args.device,
                           progress=not args.no_progress)
    outcomes = evaluate_run(args.run_dir, opts, args.storage, args.study)
    for outcome in outcomes:
        print(describe(outcome))
    n = {s: sum(o.status == s for o in outcomes) for s in ("evaluated", "skipped", "failed")}
    where = args.run_dir or f"--storage URL --study {args.study}"
    print(f"{n['evaluated']} evaluated, {n['skipped']} skipped, {n['failed']} failed; "
          f"the leaderboard shows them as test:* columns: soup leaderboard {where}")
    return 1 if n["failed"] else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from search.results.export import ExportOptions, export_trial

    study, cfg = _open(args)
    opts = ExportOptions(trial=args.trial, force=args.force,
                         max_shard_bytes=args.max_shard_size, device=args.device)
    print(export_trial(study, args.out_dir, opts, cfg).summary())
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from search.results.report import write_report

    if args.top < 0:
        raise SoupError(f"--top {args.top}: give a count of rows, or 0 for all")
    if args.storage and not args.out:
        raise SoupError("--storage needs --out DIR (there is no run folder to write into)")
    study, cfg = _open(args)
    out_dir = args.out or os.path.join(args.run_dir, "report")
    out = write_report(study, out_dir, storage_url=args.storage or cfg.storage.url,
                       top=args.top, force=args.force)
    print(f"report: {out / 'index.html'} (figures: {out}/*.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="soup", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"soupsearch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge a mergekit-style recipe into a model folder")
    m.add_argument("recipe", help="recipe YAML (mergekit 'models:' form)")
    m.add_argument("out_dir", help="output folder (must not exist unless --force)")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    m.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle checkpoints (pytorch_model.bin); they can run code")
    m.add_argument("--truncate-vocab", action="store_true",
                   help="crop embeddings/LM heads to the smallest vocabulary "
                        "(mergekit's --unsafe-truncate-embeddings)")
    m.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"),
                   help="largest output shard (default 2GB)")
    m.add_argument("--force", action="store_true", help="replace an existing output folder")
    m.set_defaults(func=_cmd_merge)

    ms = sub.add_parser("methods", help="list merge methods and their parameters")
    ms.set_defaults(func=_cmd_methods)

    s = sub.add_parser("search", help="search merges (Hydra overrides, e.g. experiment=demo)")
    s.add_argument("overrides", nargs="*", help="Hydra overrides: GROUP=OPTION or key=value")
    s.add_argument("--cfg", choices=["job"], help="print the composed config and stop")
    s.add_argument("--config-dir", help="a conf/ folder to use instead of the shipped one")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_search)

    r = sub.add_parser("resume", help="continue a search from its run folder")
    r.add_argument("run_dir", help="the run folder (holds config.yaml)")
    r.add_argument("overrides", nargs="*", help="key=value changes, e.g. n_trials=200")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_resume)

    lb = sub.add_parser("leaderboard", help="the top candidates of a study")
    lb.add_argument("run_dir", nargs="?", help="the run folder")
    lb.add_argument("--storage", help="a storage URL instead of a run folder")
    lb.add_argument("--study", help="the study name (with --storage)")
    lb.add_argument("--top", type=int, default=10, help="rows to show (0 = all)")
    lb.add_argument("--sort", help="sort by a task, test:TASK or test:objective (default: "
                                   "the search objective)")
    lb.add_argument("--format", choices=["table", "csv", "json", "markdown"], default="table")
    lb.set_defaults(func=_cmd_leaderboard)

    rp = sub.add_parser("report", help="an offline HTML report with figures of a study")
    rp.add_argument("run_dir", nargs="?", help="the run folder (leave out with --storage)")
    rp.add_argument("--storage", help="a storage URL instead of a run folder")
    rp.add_argument("--study", help="the study name (with --storage)")
    rp.add_argument("--out", help="the report folder (default RUN_DIR/report)")
    rp.add_argument("--top", type=int, default=10,
                    help="leaderboard rows and parallel-coordinate lines (default 10, 0 = all)")
    rp.add_argument("--force", action="store_true", help="replace an existing report folder")
    rp.set_defaults(func=_cmd_report)

    ev = sub.add_parser("evaluate", help="score the top candidates and the baselines on "
                                         "the held-out tasks")
    ev.add_argument("run_dir", nargs="?", help="the run folder (leave out with --storage)")
    ev.add_argument("--storage", help="a storage URL instead of a run folder")
    ev.add_argument("--study", help="the study name (with --storage)")
    ev.add_argument("--top", type=int, default=5,
                    help="the leaderboard's best K distinct candidates (default 5)")
    ev.add_argument("--tasks", help="comma-separated lm-eval tasks (default: the run's "
                                    "evaluator.heldout)")
    ev.add_argument("--no-baselines", action="store_true",
                    help="skip the baselines outside the top K")
    ev.add_argument("--force", action="store_true",
                    help="re-score trials already evaluated on these tasks")
    ev.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the run's)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_evaluate)

    ex = sub.add_parser("export", help="write a trial's merge as a model folder with a card")
    ex.add_argument("run_dir", nargs="?", help="the run folder (leave out with --storage)")
    ex.add_argument("out_dir", help="output folder (must not exist unless --force)")
    which = ex.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, help="the trial number (see soup leaderboard)")
    which.add_argument("--best", action="store_true",
                       help="the best completed trial (the default; single objective)")
    ex.add_argument("--storage", help="a storage URL instead of a run folder")
    ex.add_argument("--study", help="the study name (with --storage)")
    ex.add_argument("--force", action="store_true", help="replace an existing output folder")
    ex.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"),
                    help="largest output shard (default 2GB)")
    ex.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the run's "
                                     "models.device, where the search merged)")
    ex.set_defaults(func=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soup`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after the flags too: soup resume RUN --no-progress n_trials=50
    flags = [e for e in extra if e.startswith("-") or not hasattr(args, "overrides")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the run folder's log keeps INFO
        handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args))
    except SoupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable inputs, unwritable output, full disk
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
