"""Helpers shared by the results tests: the CLI in-process, and the small study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search.cli import main


def soup(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs ``soup ARGV`` in this process: exit code, stdout, stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def load_small(run: Path) -> optuna.Study:
    """The ``small`` study of a run folder."""
    return optuna.load_study(study_name="small", storage=f"sqlite:///{run}/study.db")
