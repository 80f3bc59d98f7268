"""The leaderboard read from an in-memory study shaped like the driver's, in every format."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search.recipe import ModelEntry, Recipe
from search.results.leaderboard import FORMATS, Leaderboard, short_params
from search.run.baselines import soup
from search.study import heldout_key

TASKS = ["soup_add", "soup_reverse"]
EXPERTS = ["/m/expert_add", "/m/expert_reverse", "/m/expert_dup"]
TIES = Recipe("ties", (ModelEntry(EXPERTS[0], {"weight": 0.52, "density": 0.5}),
                       ModelEntry(EXPERTS[1], {"weight": 0.31, "density": [0.4, 0.6]})),
              "/m/base", {"lambda": 1.125})


def _scores(objective: float, add: float, rev: float, total: float = 0.2) -> dict[str, Any]:
    return {"metrics": {"soup_add": add, "soup_reverse": rev},
            "n_docs": {"soup_add": 50, "soup_reverse": 50}, "objective": objective,
            "values": [objective], "stage": 0, "final": True,
            "timings": {"merge": 0.01, "total": total}}


# (recipe, scores, extra user attrs) of the completed, distinct trials, in trial order.
COMPLETE: list[tuple[Recipe, dict[str, Any], dict[str, Any]]] = [
    (soup([EXPERTS[0]]), _scores(0.5, 0.9, 0.1), {"baseline": "parent"}),
    (soup([EXPERTS[1]]), _scores(0.45, 0.05, 0.85), {"baseline": "parent"}),
    (soup([EXPERTS[2]]), _scores(0.3, 0.3, 0.3), {"baseline": "parent"}),
    (soup(EXPERTS), _scores(0.6, 0.55, 0.65), {"baseline": "uniform_soup"}),
    (soup(EXPERTS[:2]), _scores(0.7, 0.75, 0.65), {"baseline": "greedy_step"}),
    (TIES, _scores(0.8125, 0.625, 1.0, total=1.5), {}),
]
GREEDY = 4  # trial number of the finished greedy soup
HELD_TASKS = ["soup_add_test", "soup_reverse_test"]
# soup evaluate's records (study attrs heldout.<trial>): trial 5 scored, trial 2 failed.
HELDOUT = {5: {"metrics": {"soup_add_test": 0.6, "soup_reverse_test": 0.95},
               "objective": 0.775, "tasks": HELD_TASKS,
               "n_docs": {"soup_add_test": 50, "soup_reverse_test": 50}, "time_s": 0.3,
               "at": "2025-01-01T00:00:00+00:00"},
           2: {"error": "NonFiniteMergeError: tensor x holds NaN", "tasks": HELD_TASKS,
               "time_s": 0.1, "at": "2025-01-01T00:00:00+00:00"}}


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    """Six scored candidates, three failures, a retried one, a running, a pruned and a
    duplicate trial, with the study attributes the driver writes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(direction="maximize")
    s.set_user_attr("search", {"tasks": TASKS, "objective": "mean", "base": "/m/base",
                               "experts": EXPERTS})
    s.set_user_attr("baselines.greedy", {"trial": GREEDY, "score": 0.7})
    for number, record in HELDOUT.items():
        s.set_user_attr(heldout_key(number), record)
    for recipe, scores, extra in COMPLETE:
        s.add_trial(create_trial(value=scores["objective"], user_attrs={
            "recipe": recipe.to_dict(), "scores": scores, **extra}))
    failures = ["InvalidRecipeError: della, tensor x: density ± epsilon must lie in (0, 1)",
                "InvalidRecipeError: weights sum to 0",
                "NonFiniteScore: task soup_add scored nan"]
    for reason in failures:
        s.add_trial(create_trial(state=TrialState.FAIL, user_attrs={
            "recipe": TIES.to_dict(), "error": reason}))
    s.add_trial(create_trial(state=TrialState.FAIL, user_attrs={
        "recipe": TIES.to_dict(), "error": "WorkerDied: lost", "requeued": True}))
    s.add_trial(create_trial(state=TrialState.RUNNING, user_attrs={
        "recipe": TIES.to_dict(), "driver": "host:1:abc"}))
    s.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={0: 0.1},
                             user_attrs={"recipe": TIES.to_dict(),
                                         "scores": _scores(0.1, 0.1, 0.1)}))
    s.add_trial(create_trial(value=0.7, user_attrs={
        "recipe": soup(EXPERTS[:2]).to_dict(), "duplicate_of": GREEDY}))
    return s


@pytest.fixture(scope="module")
def board(study: optuna.Study) -> Leaderboard:
    return Leaderboard.from_study(study)


def test_rows_ranked_by_objective(board: Leaderboard) -> None:
    """Completed, non-duplicate trials, best objective first, ranks 1…n."""
    assert [r["trial"] for r in board.rows] == [5, 4, 3, 0, 1, 2]
    assert [r["rank"] for r in board.rows] == list(range(1, 7))
    objectives = [r["objective"] for r in board.rows]
    assert objectives == sorted(objectives, reverse=True)
    assert board.tasks == TASKS
    assert board.heldout == HELD_TASKS


def test_row_contents(board: Leaderboard) -> None:
    """Each row carries the stored scores, tags, recipe summary and hash."""
    rows = {r["trial"]: r for r in board.rows}
    for number, (recipe, scores, _) in enumerate(COMPLETE):
        row = rows[number]
        assert row["objective"] == scores["objective"]
        assert row["metrics"] == scores["metrics"]
        assert row["recipe_hash"] == recipe.hash()
        assert row["method"] == recipe.merge_method
        assert row["time_s"] == pytest.approx(scores["timings"]["total"] + 0.01)
    assert [rows[n]["baseline"] for n in range(6)] == [
        "parent", "parent", "parent", "uniform_soup", "greedy_soup", ""]
    assert rows[3]["models"] == "expert_add+expert_reverse+expert_dup"
    assert rows[5]["params"] == "w=0.52/0.31 d=0.50/0.40→0.60 λ=1.12"
    assert rows[5]["heldout"] == {"soup_add_test": 0.6, "soup_reverse_test": 0.95}
    assert rows[5]["heldout_objective"] == 0.775 and rows[5]["heldout_error"] is None
    assert rows[0]["heldout"] == {} and rows[0]["heldout_objective"] is None
    assert rows[2]["heldout"] == {} and rows[2]["heldout_objective"] is None
    assert rows[2]["heldout_error"] == HELDOUT[2]["error"]


def test_sort_by_task(study: optuna.Study) -> None:
    """--sort TASK orders by that task's score."""
    by_add = Leaderboard.from_study(study, sort="soup_add")
    assert [r["trial"] for r in by_add.rows] == [0, 4, 5, 3, 2, 1]
    by_rev = Leaderboard.from_study(study, sort="soup_reverse")
    assert [r["trial"] for r in by_rev.rows][:2] == [5, 1]
    assert [r["rank"] for r in by_rev.rows] == list(range(1, 7))


def test_unknown_sort_task(study: optuna.Study) -> None:
    """Sorting by a task the study does not have names the tasks."""
    with pytest.raises(ValueError, match="soup_mul") as info:
        Leaderboard.from_study(study, sort="soup_mul")
    assert "soup_add" in str(info.value)


def test_counts_and_failures(board: Leaderboard) -> None:
    """Running, failed, retried, pruned and reused trials are counted, not listed."""
    c = board.counts
    assert (c["complete"], c["duplicates"], c["running"], c["pruned"]) == (7, 1, 1, 1)
    assert (c["failed"], c["requeued"], c["waiting"]) == (3, 1, 0)
    assert board.failures == [("InvalidRecipeError", 2), ("NonFiniteScore", 1)]
    footer = board.footer()
    assert footer.startswith("7 complete (1 reused), 1 running, 1 pruned, 3 failed, "
                             "0 waiting, 1 retried")
    assert "failures: InvalidRecipeError ×2, NonFiniteScore ×1" in footer
    assert "held-out" in footer


def test_csv_parses_back(board: Leaderboard) -> None:
    """CSV: a header and one row per candidate; numbers match the stored ones."""
    rows = list(csv.DictReader(io.StringIO(board.render("csv", top=None))))
    assert [int(r["trial"]) for r in rows] == [r["trial"] for r in board.rows]
    by_trial = {int(r["trial"]): r for r in rows}
    for number, (_, scores, _) in enumerate(COMPLETE):
        row = by_trial[number]
        assert float(row["objective"]) == pytest.approx(scores["objective"], abs=5e-5)
        for task in TASKS:
            assert float(row[task]) == pytest.approx(scores["metrics"][task], abs=5e-5)
    assert by_trial[5]["test:soup_reverse_test"] == "0.9500"
    assert by_trial[5]["test:objective"] == "0.7750"
    assert by_trial[0]["test:soup_add_test"] == "" and by_trial[0]["test:objective"] == ""
    assert by_trial[2]["test:soup_add_test"] == "" and by_trial[2]["test:objective"] == "error"
    assert by_trial[4]["baseline"] == "greedy_soup"
    assert by_trial[5]["params"] == "w=0.52/0.31 d=0.50/0.40→0.60 λ=1.12"


def test_csv_top(board: Leaderboard) -> None:
    """--top N keeps the N best; 0 (the CLI's "all") keeps every row."""
    rows = list(csv.reader(io.StringIO(board.render("csv", top=2))))
    assert [r[1] for r in rows[1:]] == ["5", "4"]
    assert len(list(csv.reader(io.StringIO(board.render("csv", top=0))))) == 1 + 6


def test_json_matches(board: Leaderboard) -> None:
    """JSON holds the rows, tasks, counts and failures exactly."""
    data = json.loads(board.render("json", top=None))
    assert data["tasks"] == TASKS
    assert data["counts"] == board.counts
    assert data["failures"] == [{"reason": "InvalidRecipeError", "count": 2},
                                {"reason": "NonFiniteScore", "count": 1}]
    assert data["rows"] == board.rows
    assert {r["trial"]: r["objective"] for r in data["rows"]} == {
        n: s["objective"] for n, (_, s, _) in enumerate(COMPLETE)}


def test_markdown(board: Leaderboard) -> None:
    """Markdown: a header row, a separator, one row per candidate, then the footer."""
    lines = board.render("markdown", top=3).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:8] == ["rank", "trial", "baseline", "method", "models", "params",
                          "objective", "ci95"]
    assert header[8:10] == TASKS and header[-1] == "time_s"
    assert lines[1] == "|" + "---|" * len(header)
    body = lines[2:5]
    assert all(line.startswith("| ") and line.endswith(" |") for line in body)
    assert all(len(line.strip("|").split(" | ")) == len(header) for line in body)
    assert body[0].startswith("| 1 | 5 |")
    assert lines[5] == ""
    assert lines[6].startswith("7 complete")


def test_markdown_escapes_pipes(study: optuna.Study) -> None:
    """A '|' inside a cell does not split it."""
    board = Leaderboard.from_study(study)
    board.rows[0]["models"] = "a|b"
    line = board.render("markdown", top=1).splitlines()[2]
    assert "a\\|b" in line


def test_table(board: Leaderboard) -> None:
    """The plain table: aligned columns, the greedy soup marked, the footer last."""
    text = board.render("table", top=10)
    lines = text.rstrip("\n").split("\n")
    assert lines[0].split()[:3] == ["rank", "trial", "baseline"]
    rows = lines[1:7]
    assert len(rows) == 6
    assert "greedy_soup" in rows[1] and rows[1].split()[1] == "4"
    assert rows[0].split()[:2] == ["1", "5"]
    assert "0.8125" in rows[0]
    starts = {line.index(line.split()[1], len(line.split()[0])) for line in rows}
    assert len(starts) == 1  # the trial column is aligned
    assert lines[7].startswith("7 complete (1 reused)")


def test_table_truncates_long_params() -> None:
    """The params column is capped at 48 characters with an ellipsis."""
    many = tuple(ModelEntry(f"/m/e{i}", {"weight": 0.123, "density": 0.5}) for i in range(8))
    s = optuna.create_study(direction="maximize")
    s.set_user_attr("search", {"tasks": ["t"]})
    s.add_trial(create_trial(value=0.5, user_attrs={
        "recipe": Recipe("ties", many, "/m/base").to_dict(),
        "scores": {"metrics": {"t": 0.5}, "objective": 0.5}}))
    text = Leaderboard.from_study(s).render("table")
    row = text.splitlines()[1]
    assert "…" in row
    assert "params" in text.splitlines()[0]


def test_unknown_format(board: Leaderboard) -> None:
    """An unknown format names the valid ones."""
    with pytest.raises(ValueError, match="html") as info:
        board.render("html")
    for fmt in FORMATS:
        assert fmt in str(info.value)


def test_empty_study() -> None:
    """A new study renders a header and zero counts in every format."""
    s = optuna.create_study(direction="maximize")
    board = Leaderboard.from_study(s)
    assert board.rows == [] and board.tasks == [] and board.failures == []
    for fmt in FORMATS:
        assert board.render(fmt)
    assert board.render("table").splitlines()[1].startswith("0 complete (0 reused)")


def test_objective_falls_back_to_value() -> None:
    """Without stored scores the trial's value is the objective."""
    s = optuna.create_study(direction="maximize")
    s.add_trial(create_trial(value=0.25, user_attrs={"recipe": soup(["/m/a"]).to_dict()}))
    row = Leaderboard.from_study(s).rows[0]
    assert row["objective"] == 0.25 and row["metrics"] == {} and row["time_s"] == 0.0
    assert not math.isnan(row["objective"])


def test_short_params() -> None:
    """Per-model values joined by '/', lists as gradients, a lone weight left out."""
    assert short_params(TIES) == "w=0.52/0.31 d=0.50/0.40→0.60 λ=1.12"
    assert short_params(soup(["/m/a"])) == ""
    assert short_params(soup(["/m/a", "/m/b"])) == "w=1.00/1.00"
    cond = Recipe("ties", (ModelEntry("/m/a", {"density": [{"filter": "mlp", "value": 0.5}]}),),
                  "/m/base", {"normalize": False, "epsilon": 0.1})
    assert short_params(cond) == "d=… normalize=false ε=0.10"


def test_heldout_columns_apart(board: Leaderboard) -> None:
    """Held-out columns come after the search columns, and the footer says which is which."""
    header = board.render("csv").splitlines()[0].split(",")
    assert header[6:10] == ["objective", "ci95", *TASKS]
    assert header[10:13] == ["test:soup_add_test", "test:soup_reverse_test", "test:objective"]
    assert board.columns() == {"search": ["objective", *TASKS],
                               "heldout": ["test:soup_add_test", "test:soup_reverse_test",
                                           "test:objective"]}
    footer = board.footer()
    assert "objective, soup_add, soup_reverse = search scores" in footer
    assert "test:* = held-out scores from `soup evaluate` (1 scored)" in footer
    assert "held-out evaluation failed for trial 2: NonFiniteMergeError" in footer
    assert json.loads(board.render("json"))["columns"] == board.columns()


def test_sort_by_heldout(study: optuna.Study) -> None:
    """--sort test:TASK orders by the held-out score; rows without one come last."""
    by_test = Leaderboard.from_study(study, sort="test:soup_add_test")
    assert [r["trial"] for r in by_test.rows] == [5, 0, 1, 2, 3, 4]
    by_mean = Leaderboard.from_study(study, sort="test:objective")
    assert by_mean.rows[0]["trial"] == 5
    with pytest.raises(ValueError, match="test:soup_mul"):
        Leaderboard.from_study(study, sort="test:soup_mul")
