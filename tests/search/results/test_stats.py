"""Bootstrap intervals and paired comparisons, on cases whose answers are known."""

from __future__ import annotations

import math
from typing import Any

import pytest

from search import study as st
from search.results.stats import compare, interval, objective

W = {"t": 1.0}


def test_constant_scores_have_no_spread() -> None:
    assert interval({"t": [0.7] * 50}, W) == pytest.approx((0.7, 0.7))


def test_interval_matches_the_binomial_standard_error() -> None:
    """p = 0.6 on 400 documents: about 0.6 ± 1.96 * sqrt(0.24 / 400) = 0.6 ± 0.048."""
    lo, hi = interval({"t": [1.0] * 240 + [0.0] * 160}, W)
    half = 1.96 * math.sqrt(0.24 / 400)
    assert lo == pytest.approx(0.6 - half, abs=0.01)
    assert hi == pytest.approx(0.6 + half, abs=0.01)


def test_weighted_objective_over_tasks() -> None:
    per_doc = {"a": [1.0, 1.0], "b": [0.0, 1.0]}
    assert objective(per_doc, {"a": 3.0, "b": 1.0}) == pytest.approx(0.75 + 0.125)


def test_identical_candidates_tie() -> None:
    a = {"t": [1.0, 0.0] * 50}
    c = compare(a, a, W)
    assert (c.diff, c.low, c.high, c.verdict) == (0.0, 0.0, 0.0, "tie")


def test_pairing_detects_a_small_consistent_gain() -> None:
    """a fixes 10 of b's 200 documents and breaks none: +0.05, certainly better, although
    the two unpaired intervals overlap."""
    b = [1.0] * 100 + [0.0] * 100
    a = [1.0] * 110 + [0.0] * 90
    c = compare({"t": a}, {"t": b}, W)
    assert c.diff == pytest.approx(0.05)
    assert c.verdict == "better" and c.p_not_better == 0.0
    assert interval({"t": a}, W)[0] < interval({"t": b}, W)[1]  # unpaired: overlap
    assert "beats" in c.words("the winner", "the greedy soup")


def test_gains_and_losses_that_cancel_are_a_tie() -> None:
    b = [1.0] * 100 + [0.0] * 100
    a = [0.0] * 10 + [1.0] * 100 + [0.0] * 90  # loses 10, wins 10
    c = compare({"t": a}, {"t": b}, W)
    assert c.diff == pytest.approx(0.0) and c.verdict == "tie"
    assert "within the documents' noise" in c.words("a", "b")
    assert compare({"t": b}, {"t": [0.0] * 200}, W).verdict == "better"
    assert compare({"t": [0.0] * 200}, {"t": b}, W).verdict == "worse"


def test_different_documents_cannot_be_paired() -> None:
    with pytest.raises(ValueError, match="same documents"):
        compare({"t": [1.0] * 3}, {"t": [1.0] * 4}, W)


def test_a_search_stores_per_document_scores_and_the_leaderboard_reads_them(
        small_study: Any) -> None:
    """A real search (lm-eval on tiny models) stores each task's per-document scores; their
    mean is the task's metric; the leaderboard shows an interval around each objective and
    says, in words, how the winner compares with the greedy soup and the best parent."""
    from search.results.leaderboard import Leaderboard
    from tests.search.results.common import load_small

    study = load_small(small_study)
    done = [t for t in study.trials if t.state.name == "COMPLETE"
            and t.user_attrs.get("duplicate_of") is None]
    for t in done:
        per_doc = t.user_attrs[st.ATTR_PER_DOC]
        metrics = t.user_attrs[st.ATTR_SCORES]["metrics"]
        assert set(per_doc) == set(metrics)
        for task, values in per_doc.items():
            assert len(values) == 16 and set(values) <= {0.0, 1.0}
            assert sum(values) / 16 == pytest.approx(metrics[task])
    board = Leaderboard.from_study(study)
    header, *rows = board.table(top=0)
    ci = header.index("ci95")
    for cells, row in zip(rows, board.rows, strict=True):
        lo, hi = (float(x) for x in cells[ci].split("-"))
        assert lo <= row["objective"] <= hi
    words = board.verdicts()
    assert words and all(w.startswith(f"the winner (trial {board.rows[0]['trial']})")
                         for w in words)
    assert words[0] in board.footer()
