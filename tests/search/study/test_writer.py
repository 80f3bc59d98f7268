"""The storage writer process: writes applied in order, none lost when the driver dies,
failures reported to the driver in one line."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from search.study import StorageError, open_study, redact
from search.study.writer import ProcessWriter, open_writer

ROOT = Path(__file__).resolve().parents[3]


def _template(x: float, attrs: dict[str, object]) -> FrozenTrial:
    now = datetime.datetime.now()
    return FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                       datetime_start=now, datetime_complete=None, params={"x": x},
                       distributions={"x": FloatDistribution(0.0, 1.0)},
                       user_attrs=attrs, system_attrs={}, intermediate_values={},
                       trial_id=-1)


@pytest.mark.parametrize("scheme", ["sqlite", "journal"])
def test_writes_are_applied_in_order_and_ids_come_back(tmp_path: Path, scheme: str) -> None:
    url = f"sqlite:///{tmp_path}/s.db" if scheme == "sqlite" else f"journal:///{tmp_path}/j.log"
    study = open_study(url, "w", ["maximize"])
    writer = open_writer(url, study._storage)
    assert isinstance(writer, ProcessWriter)
    try:
        for key in range(1, 6):
            writer.create(key, study._study_id, _template(key / 10, {"driver": "me"}))
        tid = writer.trial_id(3)  # waits for the child to have created it
        assert study._storage.get_trial(tid).params == {"x": 0.3}
        for key in range(1, 6):  # outcome of each right after its creation was sent
            writer.finish(key, None, {"scores": {"objective": key}}, TrialState.COMPLETE,
                          [float(key)])
        os.kill(writer.pid, signal.SIGINT)  # a SIGINT sent to it directly is ignored too
        created = writer.sync()
        assert len(created) == 5
        trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
        assert [t.params["x"] for t in trials] == [0.1, 0.2, 0.3, 0.4, 0.5]
        assert [t.value for t in trials] == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert all(t.user_attrs == {"driver": "me", "scores": {"objective": i + 1}}
                   for i, t in enumerate(trials))
        assert writer.stats["create"][0] == 5 and writer.stats["finish"][0] == 5
        # an outcome for a trial another driver finished meanwhile is dropped, not fatal
        writer.finish(0, trials[0]._trial_id, {}, TrialState.FAIL, None)
        writer.sync()
        assert study.get_trials(deepcopy=False)[0].state == TrialState.COMPLETE
    finally:
        writer.close()
    assert not writer.alive()


def test_writes_sent_before_the_driver_is_killed_still_land(tmp_path: Path) -> None:
    """SIGKILL right after sending: the child drains the pipe, then exits on its own."""
    url = f"sqlite:///{tmp_path}/s.db"
    open_study(url, "w", ["maximize"])
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_writer import _template
        from optuna.trial import TrialState
        from search.study import open_study
        from search.study.writer import ProcessWriter
        if __name__ == "__main__":
            study = open_study({url!r}, "w", ["maximize"])
            w = ProcessWriter({url!r})
            for key in range(1, 41):
                w.create(key, study._study_id, _template(0.5, {{"k": key}}))
                w.finish(key, None, {{}}, TrialState.COMPLETE, [float(key)])
            print(w.pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    path = tmp_path / "driver.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    child = int(out.stdout.split()[0])
    deadline = time.time() + 60
    while time.time() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the writer did not exit after the driver died"
    study = optuna.load_study(study_name="w", storage=url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 40
    assert [t.value for t in trials] == [float(k) for k in range(1, 41)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_failed_write_stops_the_driver_with_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    open_study(url, "w", ["maximize"])
    writer = ProcessWriter(url)
    try:
        writer.finish(1, 12345, {}, TrialState.COMPLETE, [1.0])  # no such trial
        with pytest.raises(StorageError, match=r"writing a trial failed: KeyError") as err:
            writer.sync()
        assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    finally:
        writer.close()
    # an error still unread when the driver stops: close() raises it, promptly, and the
    # writes sent after the failed one are still applied
    study = optuna.load_study(study_name="w", storage=url)
    writer = ProcessWriter(url)
    writer.finish(1, 12345, {}, TrialState.COMPLETE, [1.0])
    writer.create(2, study._study_id, _template(0.5, {}))
    t0 = time.time()
    with pytest.raises(StorageError, match="KeyError"):
        writer.close()
    assert time.time() - t0 < 10 and not writer.alive()
    assert [t.params for t in study.get_trials(deepcopy=False)] == [{"x": 0.5}]


def test_a_dead_writer_and_an_unreachable_database_are_one_line_without_password(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    open_study(url, "w", ["maximize"])
    writer = ProcessWriter(url)
    os.kill(writer.pid, signal.SIGKILL)
    writer._proc.wait(10)
    with pytest.raises(StorageError, match=r"writer process .* exited \(exit code -9\)"):
        writer.create(1, 0, _template(0.5, {}))
        writer.sync()
    secret = ProcessWriter("postgresql+psycopg2://soup:hunter2@127.0.0.1:9/soup")
    with pytest.raises(StorageError) as err:
        secret.create(1, 0, _template(0.5, {}))
        secret.sync()
    assert "hunter2" not in str(err.value) and "soup:***@" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("password", ["hunter2", "p/ss", "p@ss:w/rd"])
def test_passwords_are_hidden_whatever_they_contain(password: str) -> None:
    """SQLAlchemy takes a raw "/" or "@" in a password: it is hidden whole, in a URL
    alone or inside a message."""
    url = f"postgresql+psycopg2://soup:{password}@db.example:5432/soup"
    for text in (url, f"storage {url} cannot be opened: connection refused"):
        shown = redact(text)
        assert password not in shown and "soup:***@db.example:5432/soup" in shown
    assert redact("sqlite:////tmp/a/study.db") == "sqlite:////tmp/a/study.db"
    assert redact("postgresql://soup@db/soup") == "postgresql://soup@db/soup"
