"""Typed, actionable errors.

Every user mistake raises a subclass of :class:`SoupError` whose message says what is
wrong, with which input, and how to fix it, in one line. The CLI prints it and exits 2.
"""

from __future__ import annotations


class SoupError(Exception):
    """Base class for errors caused by the user's input (exit code 2 in the CLI)."""


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
