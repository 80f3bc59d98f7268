"""Real fault tests: `soup search` in subprocesses, workers and drivers killed with SIGKILL.

Each test ends with the full budget of finished trials, no finished trial lost or run
twice, and a study that `soup leaderboard` reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.recipe import Recipe
from search.study import open_storage
from tests.search.simulated import TARGET as SIMULATED

ROOT = Path(__file__).resolve().parents[3]
N_TRIALS = 24
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT)}


def _overrides(family: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    experts = ",".join(str(family[f"expert_{i}"]) for i in range(3))
    return [
        f"run_dir={run_dir}", f"models.base={family['base']}", f"models.experts=[{experts}]",
        "models.build_demo=false", "study_name=faults", f"n_trials={N_TRIALS}",
        "evaluator.tasks=[{name:soup_add,limit:24},{name:soup_dup,limit:24}]",
        "evaluator.heldout=[]", "space.methods=[linear,task_arithmetic,ties]",
        "sampler.n_startup_trials=4", *extra,
    ]


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=ROOT, env=ENV,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(cond: object, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():  # type: ignore[operator]
            return
        if proc.poll() is not None:
            raise AssertionError(f"search exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _finished(storage: str) -> int:
    try:
        study = optuna.load_study(study_name="faults", storage=storage)
    except Exception:
        return 0
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED))


def _finished_by(storage: str, pid: int) -> bool:
    """Whether the driver process ``pid`` has completed a trial."""
    try:
        study = optuna.load_study(study_name="faults", storage=storage)
    except Exception:
        return False
    return any(t.state == TrialState.COMPLETE
               and str(t.user_attrs.get("driver", "")).split(":")[1:2] == [str(pid)]
               for t in study.get_trials(deepcopy=False))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _check_study(storage: str, run_dir: Path | None) -> optuna.Study:
    study = optuna.load_study(study_name="faults", storage=storage)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not t.user_attrs.get("requeued")
                and not t.user_attrs.get("surplus"))]
    assert len(done) == N_TRIALS, states
    assert states[TrialState.RUNNING] == 0
    evaluated = [Recipe.from_dict(t.user_attrs["recipe"]).hash() for t in trials
                 if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == len(set(evaluated)), "a finished recipe was evaluated twice"
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["scores"]["final"] is True
    if run_dir is not None:
        out = subprocess.run([sys.executable, "-m", "search.cli", "leaderboard", str(run_dir),
                              "--format", "json", "--top", "0"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        board = json.loads(out.stdout)
        assert board["counts"]["done"] == N_TRIALS
        assert len(board["rows"]) == states[TrialState.COMPLETE] - board["counts"]["duplicates"]
    return study


def test_kill_worker_then_driver_then_resume(family: dict[str, Path], tmp_path: Path) -> None:
    """Ray, two workers: SIGKILL one worker, later the driver; `soup resume` finishes."""
    run_dir = tmp_path / "run"
    storage = f"sqlite:///{run_dir}/study.db"
    log = tmp_path / "search.log"
    proc = _start(["search", "--no-progress", *_overrides(family, run_dir,
                                                          "parallel.workers=2")], log)
    try:
        pids_file = run_dir / "workers.json"
        _wait_for(lambda: _finished(storage) >= 6 and pids_file.exists(), 240,
                  "six finished trials", proc)
        victim = json.loads(pids_file.read_text())["workers"][0]
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: any(t.user_attrs.get("requeued") for t in optuna.load_study(
            study_name="faults", storage=storage).get_trials(states=(TrialState.FAIL,))),
            120, "the killed worker's trial to be failed and requeued", proc)
        _wait_for(lambda: _finished(storage) >= 12, 240, "twelve finished trials", proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-search
        proc.wait(timeout=30)
    finally:
        _kill_group(proc)
    study = optuna.load_study(study_name="faults", storage=storage)
    before = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert _finished(storage) < N_TRIALS, "the driver was killed too late to test resume"
    assert any(s == TrialState.RUNNING for s in before.values()), \
        "no trial was running when the driver was killed"
    failed = [t for t in study.get_trials(states=(TrialState.FAIL,))
              if t.user_attrs.get("requeued")]
    assert "died" in failed[0].user_attrs["error"]

    resume = subprocess.run([sys.executable, "-m", "search.cli", "resume", str(run_dir),
                             "--no-progress"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=400)
    assert resume.returncode == 0, resume.stderr[-3000:]
    study = _check_study(storage, run_dir)
    after = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number, state in before.items():
        if state in (TrialState.COMPLETE, TrialState.PRUNED):
            assert after[number].state == state  # finished trials are kept as they were
        if state == TrialState.RUNNING:  # left by the dead driver: failed and re-enqueued
            assert after[number].state == TrialState.FAIL
            assert "stopped" in after[number].user_attrs["error"]
            retry = [t for t in after.values() if t.user_attrs.get("retry_of") == number]
            assert retry, f"trial {number} was not re-enqueued"
            if after[number].params:  # killed after sampling: the retry keeps the params
                assert retry[0].params == after[number].params


def test_two_drivers_on_postgresql_with_a_driver_killed(
        family: dict[str, Path], tmp_path: Path, postgres_url: str) -> None:
    """Two serial drivers share one PostgreSQL study; one is killed, then resumed."""
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = [tmp_path / "a", tmp_path / "b"]
    common = [f"storage.url={postgres_url}", "parallel=serial"]
    procs = [_start(["search", "--no-progress", *_overrides(family, r, *common)], log)
             for r, log in zip(runs, logs, strict=True)]
    try:
        # kill the first driver once it has finished trials of its own (otherwise the
        # second, if it started sooner, may have done them all and the test proves less)
        _wait_for(lambda: _finished(postgres_url) >= 8 and _finished_by(postgres_url,
                                                                          procs[0].pid),
                  240, "eight finished trials, some by the first driver", procs[0])
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(timeout=30)
        assert procs[1].wait(timeout=400) == 0, logs[1].read_text()[-3000:]
    finally:
        for p in procs:
            _kill_group(p)
    resume = subprocess.run([sys.executable, "-m", "search.cli", "resume", str(runs[0]),
                             "--no-progress"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=400)
    assert resume.returncode == 0, resume.stderr[-3000:]
    study = _check_study(postgres_url, runs[0])
    drivers = {t.user_attrs.get("driver", "").split(":")[1] for t in study.get_trials()
               if t.state == TrialState.COMPLETE and "driver" in t.user_attrs}
    who = [(t.number, t.state.name, t.user_attrs.get("driver"), t.user_attrs.get("baseline"))
           for t in study.get_trials()]
    assert len(drivers) >= 2, f"both drivers should have finished trials: {who}"
    assert "soup:soup@" not in resume.stdout + resume.stderr  # the password is never printed


def test_two_drivers_on_a_journal_study_evaluate_each_recipe_once(
        family: dict[str, Path], tmp_path: Path) -> None:
    """Two drivers start together on one journal study. model_stock has no parameters,
    so every proposal of it is the same recipe, and candidates take half a second: a
    recipe another trial is evaluating is waited for, never evaluated twice."""
    n = 16
    url = f"journal:///{tmp_path}/study.log"
    experts = ",".join(str(family[f"expert_{i}"]) for i in range(3))
    common = [f"storage.url={url}", "parallel=serial", f"models.base={family['base']}",
              f"models.experts=[{experts}]", "models.build_demo=false", "study_name=faults",
              f"n_trials={n}", "baselines=false", "space.methods=[model_stock,linear]",
              "sampler.n_startup_trials=4", "evaluator.tasks=[{name:soup_add,limit:4}]",
              "evaluator.heldout=[]", f"evaluator._target_={SIMULATED}",
              "+evaluator.options.sleep_s=0.5"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(["search", "--no-progress", f"run_dir={tmp_path / name}", *common], log)
             for name, log in zip("ab", logs, strict=True)]
    try:
        for p, log in zip(procs, logs, strict=True):
            assert p.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for p in procs:
            _kill_group(p)
    trials = optuna.load_study(study_name="faults",
                               storage=open_storage(url)).get_trials(deepcopy=False)
    evaluated = Counter(Recipe.from_dict(t.user_attrs["recipe"]).hash() for t in trials
                        if "scores" in t.user_attrs)
    assert evaluated and max(evaluated.values()) == 1, evaluated
    stock = [t for t in trials if t.user_attrs["recipe"]["merge_method"] == "model_stock"]
    assert len(stock) >= 2, "model_stock was proposed once only: the test proves less"
    done = [t for t in trials if t.state.is_finished() and not t.user_attrs.get("surplus")
            and not t.user_attrs.get("requeued")]
    assert len(done) == n and all(t.state == TrialState.COMPLETE for t in done)
    drivers = {t.user_attrs["driver"] for t in done}
    assert len(drivers) == 2, "both drivers should have finished trials"
