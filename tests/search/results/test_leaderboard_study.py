"""`soup leaderboard` on a real finished search: numbers, formats, counts, PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from tests.search.results.common import load_small as _load
from tests.search.results.common import soup as _soup

TASKS = ["soup_add", "soup_dup"]


def _expected(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Completed, non-duplicate trials, best objective first, ties by trial number."""
    done = [t for t in trials if t.state == TrialState.COMPLETE
            and t.user_attrs.get("duplicate_of") is None]
    return sorted(done, key=lambda t: (-t.user_attrs["scores"]["objective"], t.number))


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = _soup(capsys, "leaderboard", *argv, "--format", "json")
    assert code == 0, err
    return dict(json.loads(out))


def test_json_equals_stored_trials(small_study: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Every row's objective and per-task metrics are the trial's stored values."""
    study = _load(small_study)
    expected = _expected(study.get_trials())
    data = _json(capsys, str(small_study), "--top", "0")
    assert data["tasks"] == TASKS
    assert [r["trial"] for r in data["rows"]] == [t.number for t in expected]
    assert len(data["rows"]) == 10
    for row, t in zip(data["rows"], expected, strict=True):
        scores = t.user_attrs["scores"]
        assert row["objective"] == scores["objective"] == t.values[0]
        assert row["metrics"] == scores["metrics"]
        assert set(row["metrics"]) == set(TASKS)
    greedy = study.user_attrs["baselines.greedy"]["trial"]
    for row, t in zip(data["rows"], expected, strict=True):
        tags = set(filter(None, row["baseline"].split(",")))
        tag = t.user_attrs.get("baseline")
        assert (tag in tags) == (tag not in (None, "greedy_step"))
        assert ("greedy_soup" in tags) == (t.number == greedy)
    assert {tag for r in data["rows"] for tag in r["baseline"].split(",") if tag} == {
        "base", "parent", "uniform_soup", "greedy_soup"}
    assert data["counts"]["complete"] == 10 and data["counts"]["failed"] == 0


def _csv(capsys: pytest.CaptureFixture[str], run: Path) -> list[dict[str, str]]:
    _, out, _ = _soup(capsys, "leaderboard", str(run), "--top", "0", "--format", "csv")
    return list(csv.DictReader(io.StringIO(out)))


def _markdown(capsys: pytest.CaptureFixture[str], run: Path) -> list[dict[str, str]]:
    _, out, _ = _soup(capsys, "leaderboard", str(run), "--top", "0", "--format", "markdown")
    lines = out.splitlines()
    header = [c.strip() for c in lines[0].strip("| ").split(" | ")]
    body = [line for line in lines[2:] if line.startswith("| ")]
    return [dict(zip(header, (c.strip() for c in line[2:-2].split(" | ")), strict=True))
            for line in body]


def _table(capsys: pytest.CaptureFixture[str], run: Path) -> list[dict[str, str]]:
    """The plain table read back by column position (cells may be empty)."""
    _, out, _ = _soup(capsys, "leaderboard", str(run), "--top", "0")
    lines = out.splitlines()
    names = lines[0].split()
    starts = [lines[0].index(f"{n} ") if n != names[-1] else lines[0].rindex(n)
              for n in names]
    rows = []
    for line in lines[1:11]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def test_text_formats_carry_the_same_numbers(small_study: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """CSV, Markdown and the table: same order, same numbers (4 decimals), same tags."""
    data = _json(capsys, str(small_study), "--top", "0")
    for rows in (_csv(capsys, small_study), _markdown(capsys, small_study),
                 _table(capsys, small_study)):
        assert [int(r["trial"]) for r in rows] == [r["trial"] for r in data["rows"]]
        for got, want in zip(rows, data["rows"], strict=True):
            assert got["rank"] == str(want["rank"])
            assert got["objective"] == f"{want['objective']:.4f}"
            for task in TASKS:
                assert got[task] == f"{want['metrics'][task]:.4f}"
            assert got["baseline"] == want["baseline"]
            assert got["method"] == want["method"]


def test_top_and_sort(small_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--top keeps the best rows; --sort TASK orders by that task, ties by trial number."""
    every = _json(capsys, str(small_study), "--top", "0")["rows"]
    top3 = _json(capsys, str(small_study), "--top", "3")["rows"]
    assert top3 == every[:3]
    by_dup = _json(capsys, str(small_study), "--top", "0", "--sort", "soup_dup")["rows"]
    assert [r["trial"] for r in by_dup] == [r["trial"] for r in sorted(
        every, key=lambda r: (-r["metrics"]["soup_dup"], r["trial"]))]
    assert [r["rank"] for r in by_dup] == list(range(1, 11))
    code, out, err = _soup(capsys, "leaderboard", str(small_study), "--sort", "soup_mul")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "soup_mul" in err and "soup_add" in err


def test_running_and_failed_counted(small_study: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A running and a failed trial are counted (not listed); the reason is in the footer."""
    run = Path(shutil.copytree(small_study, tmp_path / "run"))
    study = _load(run)
    study.ask()  # stays RUNNING
    failed = study.ask()
    failed.set_user_attr("error", "InvalidRecipeError: weights sum to 0; give a weight > 0")
    study.tell(failed, state=TrialState.FAIL)
    data = _json(capsys, str(run), "--top", "0")
    assert len(data["rows"]) == 10
    c = data["counts"]
    assert (c["complete"], c["running"], c["failed"], c["pruned"]) == (10, 1, 1, 0)
    assert data["failures"] == [{"reason": "InvalidRecipeError", "count": 1}]
    code, out, _ = _soup(capsys, "leaderboard", str(run))
    assert code == 0
    assert "10 complete (0 reused), 1 running, 0 pruned, 1 failed, 0 waiting, 0 retried; " \
           "failures: InvalidRecipeError ×1" in out
    # the copy is its own study: the original is unchanged
    assert _json(capsys, str(small_study))["counts"]["running"] == 0


def test_postgres_study(small_study: Path, postgres_url: str,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """The same study copied to PostgreSQL reads the same; the password is never shown."""
    optuna.copy_study(from_study_name="small", from_storage=f"sqlite:///{small_study}/study.db",
                      to_storage=postgres_url, to_study_name="small_on_pg")
    local = _json(capsys, str(small_study), "--top", "0")
    remote = _json(capsys, "--storage", postgres_url, "--study", "small_on_pg", "--top", "0")
    assert remote == local
    secret = postgres_url.split("://", 1)[1].split("@", 1)[0]  # user:password
    for fmt in ("table", "csv", "markdown"):
        code, out, err = _soup(capsys, "leaderboard", "--storage", postgres_url,
                               "--study", "small_on_pg", "--format", fmt)
        assert code == 0 and secret not in out + err
    code, out, err = _soup(capsys, "leaderboard", "--storage", postgres_url,
                           "--study", "no_such_study")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no_such_study" in err and ":***@" in err and secret not in out + err
