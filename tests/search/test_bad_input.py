"""Bad input to `soup search` / `soup resume`: one line, exit 2, nothing written, no Ray.

Every rejected config leaves no run folder (so no config.yaml, search.log or study), and
the corrected command then runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file

from search import cli

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


class RenamedCma(optuna.samplers.CmaEsSampler):
    """CMA-ES under another class name: still recognised (by type, not by name)."""


def _overrides(family: dict[str, Path], run: Path, *extra: str) -> list[str]:
    experts = ",".join(str(family[f"expert_{i}"]) for i in range(2))
    return [f"run_dir={run}", f"models.base={family['base']}", f"models.experts=[{experts}]",
            "models.build_demo=false", "study_name=bad", "n_trials=2", "parallel=serial",
            "evaluator.tasks=[{name:soup_add,limit:8}]", "evaluator.heldout=[]", *extra]


def _soup(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _pickle_only(family: dict[str, Path], tmp: Path) -> str:
    out = tmp / "pickled"
    shutil.copytree(family["expert_1"], out)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return str(out)


# case -> (extra overrides, the expected message: exact, or its start when it ends in "…")
CASES: dict[str, Callable[[dict[str, Path], dict[str, Path], Path], tuple[list[str], str]]] = {
    "missing base": lambda f, q, t: ([f"models.base={t / 'nope'}"],
                                     f"error: model '{t / 'nope'}' not found: not a local "
                                     "folder and not in the Hugging Face cache; …"),
    "missing expert": lambda f, q, t: ([f"models.experts=[{f['expert_0']},{t / 'gone'}]"],
                                       f"error: model '{t / 'gone'}' not found: …"),
    "other architecture": lambda f, q, t: (
        [f"models.experts=[{f['expert_0']},{q['expert_0']}]"],
        f"error: model '{q['expert_0']}' is a qwen2 but '{f['base']}' is a llama; merge only "
        "models fine-tuned from the same base"),
    "density range": lambda f, q, t: (
        ["space.methods=[ties]", "+space.params.density=[0.5,2]"],
        "error: space.params.density: range [0.5, 2] must be increasing inside (0, 1]"),
    "cmaes with space=all": lambda f, q, t: (
        ["sampler=cmaes", "space=all"],
        "error: sampler=cmaes cannot sample categorical choices (the merge method, model "
        "subsets, booleans); fix one method, e.g. space=ties, or use sampler=tpe"),
    "cmaes by type": lambda f, q, t: (
        ["sampler=cmaes", f"sampler._target_={__name__}.RenamedCma", "space=all"],
        "error: sampler=cmaes cannot sample categorical choices …"),
    "malformed storage": lambda f, q, t: (
        ["storage.url=sqlite//nowhere"],
        "error: storage.url 'sqlite//nowhere' is not a valid URL (Could not parse SQLAlchemy "
        "URL from given URL string); use sqlite:///PATH, "
        "postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB or journal:///PATH"),
    "unreachable storage": lambda f, q, t: (
        ["storage.url=postgresql+psycopg2://soup:pw@127.0.0.1:9/soup"],
        "error: storage postgresql+psycopg2://soup:***@127.0.0.1:9/soup cannot be opened: "
        "(psycopg2.OperationalError) connection to server at \"127.0.0.1\", port 9 failed: …"),
    "pickle-only parent": lambda f, q, t: (
        [f"models.experts=[{f['expert_0']},{_pickle_only(f, t)}]"],
        f"error: model '{t / 'pickled'}' only has pickle weights (pytorch_model.bin), which "
        "can run code when loaded; convert it to safetensors or pass --allow-pickle if you "
        "trust it"),
    "same expert twice": lambda f, q, t: (
        [f"models.experts=[{f['expert_0']},{f['expert_0']}]"],
        f"error: models.experts lists '{f['expert_0']}' twice; list each model once"),
    "unknown task": lambda f, q, t: (
        ["evaluator.tasks=[soup_nosuch]"],
        "error: unknown lm-eval task 'soup_nosuch'; …"),
    "unknown held-out task": lambda f, q, t: (
        ["evaluator.heldout=[soup_nosuch_test]"],
        "error: unknown lm-eval task 'soup_nosuch_test'; …"),
    "bad metric": lambda f, q, t: (
        ["evaluator.tasks=[{name:soup_add,metric:nope}]"],
        "error: task soup_add has no metric 'nope'; available: exact_match,none"),
    "missing seed file": lambda f, q, t: (
        [f"seeds=[{t / 'seed.yaml'}]"],
        f"error: seeds[0] {t / 'seed.yaml'}: …"),
    "missing include path": lambda f, q, t: (
        [f"evaluator.include_path=[{t / 'tasks'}]"],
        f"error: evaluator.include_path: '{t / 'tasks'}' is not a folder; give folders of "
        "lm-eval task YAMLs, or leave it out"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rejected_before_anything_is_written(case: str, family: dict[str, Path],
                                             tied_family: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2, one line, no run folder (so no config, log or study)."""
    extra, expected = CASES[case](family, tied_family, tmp_path)
    run = tmp_path / "run"
    code, err = _soup(capsys, "search", *_overrides(family, run, *extra), "--no-progress")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    if expected.endswith("…"):
        assert lines[0].startswith(expected[:-1]), lines[0]
    else:
        assert lines[0] == expected
    assert not run.exists()


def test_corrected_command_then_runs(family: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The same expert twice is refused; the corrected command then runs in that folder."""
    run = tmp_path / "run"
    twice = f"models.experts=[{family['expert_0']},{family['expert_0']}]"
    code, _ = _soup(capsys, "search", *_overrides(family, run, twice), "--no-progress")
    assert code == 2 and not run.exists()
    code, err = _soup(capsys, "search", *_overrides(family, run, "space.methods=[linear]"),
                      "--no-progress")
    assert code == 0, err
    study = optuna.load_study(study_name="bad", storage=f"sqlite:///{run}/study.db")
    assert study.user_attrs["search"]["experts"] == [str(family[f"expert_{i}"]) for i in (0, 1)]
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2


@pytest.fixture(scope="module")
def finished_run(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished serial search of two trials."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["search", *_overrides(family, run, "space.methods=[linear]"),
                     "--no-progress"]) == 0
    return run


def _complete(run: Path) -> int:
    study = optuna.load_study(study_name="bad", storage=f"sqlite:///{run}/study.db")
    return sum(t.state == TrialState.COMPLETE for t in study.trials)


def test_resume_takes_overrides_after_flags(finished_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`soup resume RUN --no-progress n_trials=N`: the override after the flag counts."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, err = _soup(capsys, "resume", str(run), "--no-progress", "n_trials=3")
    assert code == 0, err
    assert _complete(run) == 3
    with pytest.raises(SystemExit) as usage:  # a real unknown flag is still a usage error
        cli.main(["resume", str(run), "--no-progress", "n_trials=4", "--bogus"])
    assert usage.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_read_only_study_fails_before_workers_start(finished_run: Path, tmp_path: Path) -> None:
    """A study that cannot be written: one line, exit 2, before Ray or any worker starts.

    Root writes through chmod, so the copy is opened through SQLite's read-only URI (what
    a read-only mount or file gives a non-root user).
    """
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()
              and not p.name.startswith("study.db")}
    url = f"sqlite:///file:{run}/study.db?mode=ro&uri=true"
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", "resume", str(run), "--no-progress", "n_trials=4",
         f"storage.url={url}", "parallel.kind=ray"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"error: storage {url} cannot be written (attempt to write a readonly database); "
        "make the study file and its folder writable, or copy the run folder to a writable "
        "place and resume the copy"]
    assert not (run / "ray").exists()  # Ray never started
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()
                      and not p.name.startswith("study.db")}
    assert _complete(run) == 2
    assert time.time() - t0 < 100
