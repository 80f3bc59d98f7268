"""Typed, actionable errors.

Every user mistake raises a subclass of :class:`SoupError` whose message says what is
wrong, with which input, and how to fix it, in one line. The CLI prints it and exits 2.
:class:`search.recipe.RecipeError` and :class:`evaluators.base.EvaluatorError` derive
from it too; :func:`one_line` is the one way an exception becomes a stored or printed line.

Example:
    >>> one_line(ValueError("bad weight\\nmore detail"), with_type=True)
    'ValueError: bad weight'
"""

from __future__ import annotations


class SoupError(Exception):
    """Base class for errors caused by the user's input (exit code 2 in the CLI)."""


def one_line(exc: BaseException, with_type: bool = False, empty: str | None = None) -> str:
    """The first non-empty line of ``exc``'s message (its ``repr`` when it has none, or
    ``empty`` if given), prefixed by the exception's class name when ``with_type``."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else (repr(exc) if empty is None else empty)
    return f"{type(exc).__name__}: {line}" if with_type else line


class ModelNotFoundError(SoupError):
    """A model path or hub id cannot be resolved locally."""


class PickleCheckpointError(SoupError):
    """A model only has pickle weights and ``allow_pickle`` was not given."""


class IncompatibleModelsError(SoupError):
    """Parents differ in architecture, tensor names, shapes or vocabulary size."""


class InvalidRecipeError(SoupError):
    """A recipe names an unknown method or has an out-of-range parameter."""


class NonFiniteMergeError(SoupError):
    """A merged tensor holds NaN or infinite values."""


class OutputExistsError(SoupError):
    """The output folder exists and ``force`` was not given."""


class AdapterError(SoupError):
    """A PEFT adapter parent cannot be read, is of a kind that has no weight update, or
    does not fit the model it is applied to."""


class ConfigError(SoupError):
    """A config value or override that cannot be used."""
