"""Executors: where workers run. The only module that imports Ray.

An executor owns a fixed number of worker slots and speaks three verbs: ``submit`` a
recipe as a new trial, ``advance`` (or stop) a trial that reported a stage, and ``poll``
for what came back. A worker process that dies mid-trial comes back as an
:class:`Outcome` with ``died=True``; the executor replaces the worker by itself.

Example:
    >>> ex = SerialExecutor(setup)                                      # doctest: +SKIP
    >>> ex.submit(7, recipe.to_dict()); ex.poll(1.0)[0].result.objective  # doctest: +SKIP
    0.83
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from search.atomic import write_text
from search.config import ParallelConfig
from search.errors import SoupError, one_line
from search.run.worker import Worker, WorkerInfo, WorkerResult, WorkerSetup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one worker call gave back for trial ``key`` (``result`` is None if it died)."""

    key: int
    result: WorkerResult | None = None
    died: bool = False
    reason: str = ""


class Executor(Protocol):
    """Runs trials on worker slots; ``slots`` is the number of workers up right now."""

    @property
    def slots(self) -> int: ...

    def submit(self, key: int, recipe: dict[str, Any]) -> None:
        """Starts trial ``key`` on a free slot (the caller keeps ``slots`` in mind)."""

    def advance(self, key: int, go_on: bool) -> None:
        """Scores the next stage of ``key``, or drops it (``go_on=False``)."""

    def poll(self, timeout: float) -> list[Outcome]:
        """Results that arrived within ``timeout`` seconds (maybe none)."""

    def close(self) -> None:
        """Stops the workers; trials in flight are dropped (storage keeps them RUNNING)."""


def _write_pids(run_dir: Path | None, pids: list[int]) -> None:
    if run_dir is None:
        return
    write_text(run_dir / "workers.json", json.dumps({"driver": os.getpid(), "workers": pids}))


class SerialExecutor:
    """One in-process worker: results come back from ``poll`` in submission order."""

    def __init__(self, setup: WorkerSetup, run_dir: Path | None = None) -> None:
        self.worker = Worker(setup)
        if self.worker.init_error:
            raise SoupError(f"worker set-up failed: {self.worker.init_error}")
        self.slots = 1
        self._queue: list[tuple[int, dict[str, Any] | None]] = []  # None: advance
        _write_pids(run_dir, [os.getpid()])

    def submit(self, key: int, recipe: dict[str, Any]) -> None:
        self._queue.append((key, recipe))

    def advance(self, key: int, go_on: bool) -> None:
        if go_on:
            self._queue.append((key, None))
        else:
            self.worker.abandon()

    def poll(self, timeout: float) -> list[Outcome]:
        if not self._queue:
            time.sleep(min(timeout, 0.05))
            return []
        key, recipe = self._queue.pop(0)
        result = self.worker.advance() if recipe is None else self.worker.start(recipe)
        return [Outcome(key, result)]

    def close(self) -> None:
        self._queue.clear()


def _ray_temp_dir(run_dir: Path) -> str:
    """A temp dir under the run folder, or a short link to one (socket paths <= 107 bytes)."""
    wanted = run_dir / "ray"
    if len(str(wanted.resolve())) <= 40:
        wanted.mkdir(parents=True, exist_ok=True)
        return str(wanted.resolve())
    short = Path("/tmp") / f"soup-ray-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"
    short.mkdir(exist_ok=True)
    if not wanted.exists() and not wanted.is_symlink():
        wanted.symlink_to(short)
    return str(short)


class RayExecutor:
    """One Ray actor per slot, each holding a :class:`Worker`; dead actors are replaced."""

    def __init__(self, setup: WorkerSetup, cfg: ParallelConfig, run_dir: Path) -> None:
        import ray

        self.ray = ray
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.WARNING, "configure_logging": False}
            if cfg.address:
                ray.init(address=cfg.address, **kwargs)
            else:
                local_cpus = max(os.cpu_count() or 1, int(cfg.workers * cfg.cpus_per_worker))
                ray.init(num_cpus=local_cpus, _temp_dir=_ray_temp_dir(run_dir), **kwargs)
        resources = ray.cluster_resources()
        self.where = f"the Ray cluster at {cfg.address}" if cfg.address else "local Ray"
        gpus = cfg.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        n = cfg.workers
        if n == 0:
            n = int(resources.get("GPU", 0) // gpus) if gpus else \
                int(resources.get("CPU", 1) // cfg.cpus_per_worker)
            if n == 0:  # one worker per GPU, and not one fits: it would wait forever
                have = ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
                raise SoupError(
                    f"parallel.workers=0 sizes the pool from {self.where}, which has {have}: "
                    f"no worker fits (each needs {cfg.cpus_per_worker:g} CPU, {gpus:g} GPU); "
                    "set parallel.gpus_per_worker=null (GPUs only if the cluster has them) "
                    "or lower parallel.cpus_per_worker, or add nodes")
        self.size = max(1, n)
        self.need = (cfg.cpus_per_worker, gpus)
        if not cfg.address and gpus and self.size * gpus > resources.get("GPU", 0):
            # a local instance gains no nodes: the rest would wait forever
            raise SoupError(
                f"parallel.workers={self.size} x parallel.gpus_per_worker={gpus:g} needs "
                f"{self.size * gpus:g} GPUs; this machine has {resources.get('GPU', 0):g}: "
                "lower parallel.workers (0 = one per GPU) or parallel.gpus_per_worker")
        self._actor_cls = ray.remote(Worker).options(
            num_cpus=cfg.cpus_per_worker, num_gpus=gpus, max_restarts=0, max_task_retries=0)
        self.setup = setup
        self.run_dir = run_dir
        self.free: list[Any] = []
        self.pids: dict[Any, int] = {}
        self.starting: dict[Any, Any] = {}  # ready ref -> actor
        self.busy: dict[Any, tuple[int, Any]] = {}  # result ref -> (key, actor)
        self.held: dict[int, Any] = {}  # trial key -> actor, while it has stages to go
        for _ in range(self.size):
            self._spawn()
        self._await_start()

    @property
    def slots(self) -> int:
        """Workers that are up (a replacement counts once it has started)."""
        return len(self.free) + len(self.busy) + len(self.held)

    def _capacity(self, resources: dict[str, float]) -> float:
        """How many workers ``resources`` hold at once (``inf`` if they need none)."""
        fits = [math.floor(resources.get(k, 0.0) / need + 1e-9)
                for k, need in zip(("CPU", "GPU"), self.need, strict=True) if need > 0]
        return min(fits, default=math.inf)

    def _waiting_line(self, elapsed: float) -> str:
        """What the workers still starting wait for: their set-up, or room in the cluster.

        Ray places an actor as soon as free resources fit it, so when one more worker
        fits in the free resources, or the cluster's total holds all of them, every
        worker is placed and only its set-up (models, tasks) is slow.
        """
        free = self.ray.available_resources()
        wanted = len(self.pids) + len(self.starting)
        unplaced = 0 if self._capacity(free) >= 1 else \
            max(0, wanted - self._capacity(self.ray.cluster_resources()))
        if not unplaced:
            return (f"waiting {elapsed:.0f} s for {len(self.starting)} of {self.size} "
                    "workers: placed but still starting (loading the parents and tasks)")
        return (f"waiting {elapsed:.0f} s for {self.where} to place {unplaced:g} of "
                f"{self.size} workers (each needs {self.need[0]:g} CPU, {self.need[1]:g} GPU; "
                f"free now: {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU); lower "
                "parallel.workers or add nodes if this does not resolve")

    def _spawn(self) -> None:
        actor = self._actor_cls.remote(self.setup)
        self.starting[actor.ready.remote()] = actor  # type: ignore[union-attr]

    def _await_start(self, report_every: float = 30.0) -> None:
        """Waits for the first workers; a set-up error is the user's, so it is raised.

        Workers Ray cannot place yet (the cluster lacks the resources; an autoscaler may
        add them) or that are placed but slow to set up are waited for, with a line every
        ``report_every`` seconds saying which.
        """
        t0 = time.monotonic()
        while self.starting:
            done, _ = self.ray.wait(list(self.starting), num_returns=len(self.starting),
                                    timeout=report_every)
            if done:
                self._collect_ready(done, raise_errors=True)
                continue
            print(self._waiting_line(time.monotonic() - t0), file=sys.stderr, flush=True)

    def _collect_ready(self, refs: list[Any], raise_errors: bool) -> None:
        for ref in refs:
            actor = self.starting.pop(ref)
            try:
                info: WorkerInfo = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                if raise_errors:
                    raise SoupError(f"a Ray worker could not start: {exc}") from None
                log.warning("a replacement worker died while starting: %s", exc)
                self._spawn()
                continue
            if info.error:
                raise SoupError(f"worker set-up failed: {info.error}")
            self.pids[actor] = info.pid
            self.free.append(actor)
        _write_pids(self.run_dir, sorted(self.pids.values()))

    def submit(self, key: int, recipe: dict[str, Any]) -> None:
        if not self.free:
            raise RuntimeError("submit() with no free worker; wait for poll() first")
        actor = self.free.pop()
        self.busy[actor.start.remote(recipe)] = (key, actor)

    def advance(self, key: int, go_on: bool) -> None:
        actor = self.held.pop(key)
        if go_on:
            self.busy[actor.advance.remote()] = (key, actor)
        else:
            actor.abandon.remote()
            self.free.append(actor)

    def poll(self, timeout: float) -> list[Outcome]:
        waiting = [*self.busy, *self.starting]
        if not waiting:
            time.sleep(min(timeout, 0.05))
            return []
        done, _ = self.ray.wait(waiting, num_returns=1, timeout=timeout)
        if done:
            done, _ = self.ray.wait(waiting, num_returns=len(waiting), timeout=0)
        out = []
        for ref in done:
            if ref in self.starting:
                self._collect_ready([ref], raise_errors=False)
                continue
            key, actor = self.busy.pop(ref)
            try:
                result: WorkerResult = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                pid = self.pids.pop(actor, None)
                reason = f"worker process {pid} died: {one_line(exc)}"
                out.append(Outcome(key, None, died=True, reason=reason))
                _write_pids(self.run_dir, sorted(self.pids.values()))
                self._spawn()
                continue
            if result.ok and not result.final:
                self.held[key] = actor
            else:
                self.free.append(actor)
            out.append(Outcome(key, result))
        return out

    def close(self) -> None:
        for actor in [*self.free, *self.held.values(), *(a for _, a in self.busy.values())]:
            self.ray.kill(actor)
        self.free, self.busy, self.held = [], {}, {}


def make_executor(setup: WorkerSetup, cfg: ParallelConfig, run_dir: Path) -> Executor:
    if cfg.kind == "serial":
        return SerialExecutor(setup, run_dir)
    return RayExecutor(setup, cfg, run_dir)
