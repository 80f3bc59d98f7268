"""`soup report`: an offline HTML report with PNG figures, from a real finished study and
from small studies built here (multi-objective, too few trials, none finished)."""

from __future__ import annotations

import base64
import io
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from search.cli import main
from search.recipe import ModelEntry, Recipe
from search.results.report import TITLES, write_report
from search.results.report import data as rd
from search.run.baselines import soup

PNG = b"\x89PNG\r\n\x1a\n"
ALWAYS = ("score_over_trials", "score_by_method", "parallel_coordinates")


class Page(HTMLParser):
    """Every tag with its attributes, the figure ids, and the leaderboard's cells."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def figures(self) -> list[str]:
        """The ids of the figure headings, in page order."""
        return [a["id"] for t, a in self.tags if t == "h2" and a.get("id") in TITLES]


def _page(folder: Path) -> Page:
    return Page((folder / "index.html").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run(small_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the small study's run folder with its report written by `soup report`."""
    folder = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(small_study, folder)
    assert main(["report", str(folder), "--top", "0"]) == 0
    return folder


def _load(run_dir: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="small", storage=f"sqlite:///{run_dir}/study.db")


def test_report_is_offline_and_has_every_figure(run: Path) -> None:
    page = _page(run / "report")
    text = (run / "report" / "index.html").read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object")]
    for _, attrs in page.tags:
        for key in ("src", "href"):
            assert not attrs.get(key, "").startswith(("http:", "https:", "//")), attrs
    images = [a["src"] for t, a in page.tags if t == "img"]
    figures = page.figures()
    assert set(ALWAYS) <= set(figures)
    assert "pareto_front" not in figures  # one objective
    assert "param_importance" in figures or "Parameter importance" in text
    assert len(images) == len(figures)
    for name, src in zip(figures, images, strict=True):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        data = base64.b64decode(src[len(prefix):], validate=True)
        assert data.startswith(PNG)
        Image.open(io.BytesIO(data)).verify()
        assert (run / "report" / f"{name}.png").read_bytes() == data
    assert sorted(p.name for p in (run / "report").iterdir()) == sorted(
        ["index.html", *(f"{n}.png" for n in figures)])
    assert "optuna-dashboard sqlite:///" in text


def test_leaderboard_numbers_match_the_stored_trials(run: Path) -> None:
    study = _load(run)
    header, *rows = _page(run / "report").rows
    tasks = study.user_attrs["search"]["tasks"]
    scored = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))
              if t.user_attrs.get("duplicate_of") is None}
    assert len(rows) == len(scored) >= 5
    col = {name: i for i, name in enumerate(header)}
    objectives = []
    for row in rows:
        scores = scored[int(row[col["trial"]])].user_attrs["scores"]
        assert row[col["objective"]] == f"{scores['objective']:.4f}"
        for task in tasks:
            assert row[col[task]] == f"{scores['metrics'][task]:.4f}"
        objectives.append(float(row[col["objective"]]))
    assert objectives == sorted(objectives, reverse=True)
    assert [int(r[col["rank"]]) for r in rows] == list(range(1, len(rows) + 1))


def test_report_only_reads_the_study(run: Path, tmp_path: Path) -> None:
    def snapshot() -> Any:
        s = _load(run)
        return (s.user_attrs, [(t.number, t.state, t.values, t.user_attrs, t.params)
                               for t in s.get_trials()])

    before = snapshot()
    assert main(["report", str(run), "--out", str(tmp_path / "again")]) == 0
    assert snapshot() == before


def test_existing_report_is_kept_without_force_and_replaced_with_it(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = run / "report"
    # an earlier report alone is brought up to date by running the command again
    assert main(["report", str(run), "--top", "2"]) == 0
    assert len(_page(folder).rows) == 1 + 2
    stamp = (folder / "index.html").stat().st_mtime_ns
    assert main(["report", str(run), "--top", "4"]) == 0
    assert len(_page(folder).rows) == 1 + 4
    assert (folder / "index.html").stat().st_mtime_ns != stamp
    # a picture of the user's own, or another study's report: kept unless --force
    (folder / "my_plot.png").write_bytes(b"png")
    assert main(["report", str(run)]) == 2
    assert (folder / "my_plot.png").read_bytes() == b"png"
    (folder / "my_plot.png").unlink()
    index = (folder / "index.html").read_text(encoding="utf-8")
    (folder / "index.html").write_text(index.replace("soup report: small", "soup report: x"),
                                       encoding="utf-8")
    assert main(["report", str(run)]) == 2
    assert "soup report: x" in (folder / "index.html").read_text(encoding="utf-8")
    # anything else in the folder: kept unless --force
    (folder / "mine.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--force" in err
    assert (folder / "mine.txt").read_text() == "keep me"
    assert main(["report", str(run), "--force", "--top", "3"]) == 0
    assert not (folder / "mine.txt").exists()
    _, *rows = _page(folder).rows
    assert len(rows) == 3
    assert [p.name for p in run.iterdir() if p.name.startswith(".report")] == []


@pytest.mark.parametrize("args", [
    ["report", "{tmp}/no-such-run"],
    ["report", "{tmp}"],  # a folder without config.yaml
    ["report", "--storage", "sqlite:///{tmp}/x.db", "--study", "s"],  # no --out
    ["report", "{tmp}", "--storage", "sqlite:///{tmp}/x.db", "--study", "s"],
    ["report", "{tmp}", "--top", "-1"],
])
def test_bad_input_exits_2_with_one_line(args: list[str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "report").exists()


EXPERTS = ["/m/expert_a", "/m/expert_b"]
TASKS = ["soup_a", "soup_b", "soup_c"]


def _scores(metrics: list[float]) -> dict[str, Any]:
    return {"metrics": dict(zip(TASKS, metrics, strict=False)),
            "objective": sum(metrics) / len(metrics), "values": metrics, "final": True,
            "timings": {"merge": 0.01, "total": 0.1}}


def _multi_study(url: str, n: int) -> None:
    """Baselines and TIES candidates scored on ``n`` tasks, one objective each."""
    study = optuna.create_study(storage=url, study_name="multi", directions=["maximize"] * n)
    study.set_user_attr("search", {"tasks": TASKS[:n], "objective": "mean",
                                   "base": "/m/base", "experts": EXPERTS})
    study.set_user_attr("baselines.greedy", {"trial": 1})
    fixed = [("base", soup(["/m/base"]), [0.2, 0.2, 0.2]),
             ("parent", soup(EXPERTS[:1]), [0.9, 0.1, 0.4]),
             ("parent", soup(EXPERTS[1:]), [0.1, 0.9, 0.4]),
             ("uniform_soup", soup(EXPERTS), [0.5, 0.5, 0.5])]
    for tag, recipe, metrics in fixed:
        study.add_trial(create_trial(values=metrics[:n], user_attrs={
            "recipe": recipe.to_dict(), "scores": _scores(metrics[:n]), "baseline": tag}))
    for i in range(6):
        a = 0.3 + 0.1 * i
        recipe = Recipe("ties", tuple(ModelEntry(e, {"weight": w, "density": 0.5})
                                      for e, w in zip(EXPERTS, (a, 1 - a), strict=True)),
                        "/m/base", {"lambda": 1.0})
        metrics = [a, 1.05 - a, 0.3 + 0.05 * i]
        study.add_trial(create_trial(values=metrics[:n], user_attrs={
            "recipe": recipe.to_dict(), "scores": _scores(metrics[:n])}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={
        "recipe": soup(EXPERTS).to_dict(), "error": "InvalidRecipeError: bad"}))


@pytest.mark.parametrize("n", [2, 3])
def test_multi_objective_study_gets_a_pareto_front(n: int, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/multi.db"
    _multi_study(url, n)
    out = tmp_path / "out"
    assert main(["report", "--storage", url, "--study", "multi", "--out", str(out)]) == 0
    page = _page(out)
    assert "pareto_front" in page.figures()
    assert (out / "pareto_front.png").read_bytes().startswith(PNG)
    text = (out / "index.html").read_text(encoding="utf-8")
    assert f"{n} objectives" in text and "1 failed" in text


def test_few_or_no_finished_trials_give_notes_not_crashes(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    out = write_report(study, tmp_path / "empty", storage_url="sqlite:///x.db")
    page = _page(out)
    assert page.figures() == []
    assert "No trial has finished yet" in (out / "index.html").read_text(encoding="utf-8")
    study.add_trial(create_trial(value=0.5, user_attrs={
        "recipe": soup(EXPERTS[:1]).to_dict(), "scores": _scores([0.5])}))
    out = write_report(study, tmp_path / "one", storage_url="sqlite:///x.db")
    text = (out / "index.html").read_text(encoding="utf-8")
    assert _page(out).figures() == ["score_over_trials", "score_by_method"]
    assert "Parameter importance: no method has" in text
    assert "Parallel coordinates: need two or more" in text


def test_importance_is_measured_within_a_method_and_ignores_unsearched_params() -> None:
    """Only ``ties.density.a`` drives the score; a baseline's sampler-filled params and
    the other method's params stay out of the ties panel."""
    dists = {"method": CategoricalDistribution(["ties", "linear"]),
             "ties.density.a": FloatDistribution(0, 1), "ties.lambda": FloatDistribution(0, 2)}
    trials = {}
    for i in range(24):
        d, lam = (i * 0.37) % 1.0, (i * 0.61) % 2.0
        trials[i] = create_trial(value=d, params={"method": "ties", "ties.density.a": d,
                                                  "ties.lambda": lam}, distributions=dists)
    trials[24] = create_trial(value=0.99, params={"method": "ties", "ties.density.a": 0.0,
                                                  "ties.lambda": 0.0}, distributions=dists,
                              system_attrs={"fixed_params": {}})
    rows = [{"trial": n, "objective": t.value, "method": "ties"} for n, t in trials.items()]
    for i, t in trials.items():
        t.number = i
    result = rd.importances(rows, trials)
    assert [title for title, _ in result.panels] == ["ties (n=24)"]
    shares = result.panels[0][1]
    assert set(shares) == {"density.a", "lambda"}
    assert shares["density.a"] > shares["lambda"]
    assert abs(sum(shares.values()) - 1) < 1e-9
