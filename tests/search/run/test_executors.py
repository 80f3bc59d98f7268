"""Executors: the Ray pool's sizing and start-up messages, and the results that come back.

Workers run the simulated evaluator (tests/search/simulated.py), selected by its
``_target_``: no models, a score computed from the recipe.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from search.config import EvaluatorConfig, ModelsConfig, ParallelConfig, TaskConfig
from search.errors import SoupError
from search.run.executors import Outcome, RayExecutor, SerialExecutor, _ray_temp_dir
from search.run.worker import Worker, WorkerInfo, WorkerResult, WorkerSetup
from tests.search.simulated import simulated

SETUP = simulated(WorkerSetup(
    ModelsConfig("/m/base", ("/m/a", "/m/b")),
    EvaluatorConfig((TaskConfig("add"), TaskConfig("dup", weight=3.0)), stages=(0.5, 1.0))))
RECIPE = {"merge_method": "linear", "models": [
    {"model": "/m/a", "parameters": {"weight": 0.5}},
    {"model": "/m/b", "parameters": {"weight": 0.1}}]}


@pytest.fixture
def local_ray(tmp_path: Path) -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=_ray_temp_dir(tmp_path))  # short: socket paths
    yield ray
    ray.shutdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_one_worker_per_gpu_without_gpus_is_refused(local_ray: Any, tmp_path: Path) -> None:
    """workers=0 with a GPU per worker on a CPU-only cluster: one line, no endless wait
    (Ray would keep the actor pending forever)."""
    cfg = ParallelConfig(kind="ray", workers=0, cpus_per_worker=1.0, gpus_per_worker=1.0)
    with pytest.raises(SoupError, match=r"which has 2 CPU, 0 GPU: no worker fits .*"
                                        r"parallel\.gpus_per_worker=null"):
        RayExecutor(None, cfg, tmp_path)  # type: ignore[arg-type]
    two = ParallelConfig(kind="ray", workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0)
    with pytest.raises(SoupError, match=r"needs 2 GPUs; this machine has 0"):
        RayExecutor(None, two, tmp_path)  # type: ignore[arg-type]
    cpus = ParallelConfig(kind="ray", workers=0, cpus_per_worker=4.0, gpus_per_worker=None)
    with pytest.raises(SoupError, match=r"each needs 4 CPU, 0 GPU"):
        RayExecutor(None, cpus, tmp_path)  # type: ignore[arg-type]


def _poll(ex: Any, timeout: float = 60.0) -> Outcome:
    for _ in range(int(timeout / 0.5)):
        out = ex.poll(0.5)
        if out:
            assert len(out) == 1
            return out[0]
    raise AssertionError("no result")


def test_worker_result_is_a_frozen_dataclass_that_pickles() -> None:
    """A stage's result has attributes, not string keys, and crosses processes intact."""
    worker = Worker(SETUP)
    assert worker.ready() == WorkerInfo(worker.ready().pid, None)
    first = worker.start(RECIPE)
    assert isinstance(first, WorkerResult) and first.ok and not first.final
    assert first.metrics == pytest.approx({"add": 0.92, "dup": 0.92}) and first.stage == 0
    assert first.objective == pytest.approx(0.92) and set(first.timings) >= {"merge", "total"}
    assert pickle.loads(pickle.dumps(first)) == first
    with pytest.raises(AttributeError):
        first.error = "x"  # type: ignore[misc]
    last = worker.advance()
    assert (last.ok, last.stage, last.final) == (True, 1, True)
    assert worker.advance() == WorkerResult.failed("protocol", "no candidate in progress")


def test_bad_candidate_and_bad_evaluator_are_one_line_errors() -> None:
    """A recipe that cannot be read fails the candidate; an evaluator target that does not
    import fails set-up with one line naming it."""
    bad = Worker(SETUP).start({"merge_method": "linear", "models": "a"})
    assert (bad.ok, bad.kind) == (False, "candidate")
    assert bad.error == "RecipeError: recipe: 'models' must be a non-empty list of {model: ...}"
    with pytest.raises(SoupError, match=r"^worker set-up failed: EvaluatorError: cannot import "
                                        r"evaluator 'nowhere\.Evaluator' \(No module named"):
        SerialExecutor(simulated(SETUP, target="nowhere.Evaluator"))


def test_serial_executor_returns_worker_results() -> None:
    """Stages come back in order as Outcomes carrying WorkerResults."""
    ex = SerialExecutor(SETUP)
    ex.submit(7, RECIPE)
    first = _poll(ex)
    assert first.key == 7 and first.result is not None and not first.result.final
    ex.advance(7, go_on=True)
    last = _poll(ex)
    assert last.result is not None and last.result.final and last.result.stage == 1
    ex.close()


def test_ray_workers_import_the_evaluator_target(local_ray: Any, tmp_path: Path) -> None:
    """A Ray actor builds the evaluator ``_target_`` names, here a class in tests/ (the
    actors get the driver's folder on their path), and its results arrive as
    WorkerResults; the executor holds the worker between stages."""
    cfg = ParallelConfig(kind="ray", workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0)
    ex = RayExecutor(SETUP, cfg, tmp_path)
    try:
        assert ex.slots == 1
        ex.submit(3, RECIPE)
        first = _poll(ex)
        assert isinstance(first.result, WorkerResult) and first.result.ok, first
        assert (first.key, first.result.stage, first.result.final) == (3, 0, False)
        assert ex.held and not ex.free
        ex.advance(3, go_on=True)
        last = _poll(ex)
        assert last.result is not None and last.result.final and last.result.metrics == \
            first.result.metrics
        assert ex.free and not ex.held
    finally:
        ex.close()


class _FakeRay:
    """Just enough of the ray module for RayExecutor's start-up wait."""

    def __init__(self, total: dict[str, float], free: dict[str, float], waits: int) -> None:
        self.total, self.free, self.waits = total, free, waits

    def cluster_resources(self) -> dict[str, float]:
        return self.total

    def available_resources(self) -> dict[str, float]:
        return self.free

    def wait(self, refs: list[Any], num_returns: int, timeout: float) -> tuple[list, list]:
        self.waits -= 1
        return ([], refs) if self.waits >= 0 else (refs, [])

    def get(self, ref: Any) -> WorkerInfo:
        return WorkerInfo(100 + ref)


def _starting(ray: _FakeRay, tmp_path: Path, size: int, need: tuple[float, float],
              up: int = 0) -> RayExecutor:
    ex = object.__new__(RayExecutor)
    ex.ray = ray  # type: ignore[assignment]
    ex.where, ex.size, ex.need, ex.run_dir = "local Ray", size, need, tmp_path
    ex.free, ex.busy, ex.held = [], {}, {}
    ex.pids = {f"up{i}": i for i in range(up)}
    ex.starting = {i: f"actor{i}" for i in range(size - up)}
    return ex


def test_slow_workers_are_placed_but_still_starting(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Workers whose resources are reserved (0 CPU free because they hold them) are said
    to be starting, without the advice for workers Ray cannot place."""
    ray = _FakeRay({"CPU": 2.0}, {"CPU": 0.0}, waits=1)
    ex = _starting(ray, tmp_path, size=2, need=(1.0, 0.0))
    ex._await_start(report_every=0.0)
    err = capsys.readouterr().err.splitlines()
    assert err == ["waiting 0 s for 2 of 2 workers: placed but still starting (loading the "
                   "parents and tasks)"]
    assert sorted(ex.pids.values()) == [100, 101] and not ex.starting
    free_left = _starting(_FakeRay({"CPU": 4.0}, {"CPU": 1.0}, 0), tmp_path, 3, (1.0, 0.0))
    assert free_left._waiting_line(30.0) == ("waiting 30 s for 3 of 3 workers: placed but "
                                             "still starting (loading the parents and tasks)")


@pytest.mark.parametrize(("total", "free", "size", "need", "up", "line"), [
    ({"CPU": 2.0}, {"CPU": 0.0}, 3, (1.0, 0.0), 0,
     "waiting 30 s for local Ray to place 1 of 3 workers (each needs 1 CPU, 0 GPU; free now: "
     "0 CPU, 0 GPU); lower parallel.workers or add nodes if this does not resolve"),
    ({"CPU": 8.0, "GPU": 1.0}, {"CPU": 7.0, "GPU": 0.0}, 2, (1.0, 1.0), 1,
     "waiting 30 s for local Ray to place 1 of 2 workers (each needs 1 CPU, 1 GPU; free now: "
     "7 CPU, 0 GPU); lower parallel.workers or add nodes if this does not resolve"),
])
def test_workers_ray_cannot_place_get_the_advice(tmp_path: Path, total: dict[str, float],
                                                 free: dict[str, float], size: int,
                                                 need: tuple[float, float], up: int,
                                                 line: str) -> None:
    """More workers than the cluster holds: the line counts those that cannot be placed
    and says how to resolve it."""
    ex = _starting(_FakeRay(total, free, 0), tmp_path, size, need, up)
    assert ex._waiting_line(30.0) == line
