"""The ``soup`` command.

    soup merge RECIPE.yaml OUT_DIR [--device auto|cpu|cuda] [--allow-pickle]
               [--truncate-vocab] [--max-shard-size 2GB] [--force]
    soup methods

User mistakes print one line starting with ``error:`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

from search import __version__
from search.errors import SoupError
from search.recipe import RecipeError

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soup`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args))
    except (SoupError, RecipeError) as exc:
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
