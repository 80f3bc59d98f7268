"""The driver: an asynchronous ask -> submit -> tell loop over the executor's slots.

The driver alone talks to storage, through Optuna's ask/tell API: a trial is the
``optuna.trial.Trial`` that ``study.ask()`` returns (an enqueued trial first, atomically:
two drivers never get the same one), and its number is its only identity. The driver
keeps every worker busy plus one trial proposed ahead (no generation barrier); the
leader enqueues the baselines first and the greedy soup step by step
(:mod:`search.run.seeding`). A recipe already scored (same canonical hash) completes as
a duplicate, and one a trial ahead is evaluating waits for it; a bad candidate fails with
its reason; stages go to the pruner; the trials of dead workers are failed and
re-enqueued. The budget is counted from storage, so a resumed or second driver
continues the same count, and exactly (:mod:`search.run.ledger`).

Example:
    >>> summary = Driver(cfg, study, space, executor).run()      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from search import study as st
from search.config import SearchConfig
from search.recipe import Recipe
from search.run import ledger as lg
from search.run.executors import Executor, Outcome
from search.run.progress import Progress
from search.run.seeding import Seeding
from search.run.space import Space
from search.run.worker import WorkerResult
from search.study import liveness as lv

log = logging.getLogger(__name__)
SYNC_S = 1.0  # re-read the study at most this often while results arrive
RECHECK_S = 0.25  # how often trials waiting for the same recipe ahead look again
SPARE = 1  # trials proposed ahead of a free worker


@dataclass
class _Running:
    trial: Trial
    recipe: Recipe


@dataclass
class Summary:
    """What a run did (this driver) and where the study stands (all drivers)."""

    evaluated: int = 0
    reused: int = 0
    failed: int = 0
    pruned: int = 0
    died: int = 0
    recovered: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class Driver:
    """Runs one search against a study until the budget is spent."""

    def __init__(self, cfg: SearchConfig, study: optuna.Study, space: Space,
                 executor: Executor, show_progress: bool = True) -> None:
        self.cfg, self.study, self.space, self.ex = cfg, study, space, executor
        self.me = lv.driver_id()
        self._start = time.time()
        self.tasks = [t.name for t in cfg.evaluator.tasks]
        self.running: dict[int, _Running] = {}  # trial number -> submitted trial
        self.ready: list[_Running] = []  # asked and checked, for the next free worker
        self.held: dict[int, _Running] = {}  # waiting for the same recipe ahead of them
        self.ledger = lg.Ledger()
        self.seeding = Seeding(cfg, study, space, self.ledger, self.me)
        self.summary = Summary()
        self.progress = Progress(cfg.n_trials, enabled=show_progress,
                                 multi=cfg.multi_objective)
        self._trials: list[FrozenTrial] = []  # the last read of the study
        self._last_beat = self._last_sync = self._last_check = 0.0
        self._last_recover = time.time()
        self._reports = not cfg.multi_objective and (
            len(cfg.evaluator.stages) > 1 or cfg.pruner.target is not None)

    def _sync(self) -> dict[str, int]:
        """Re-reads every trial: budget counts, dedup table, progress."""
        self._trials = self.study.get_trials(deepcopy=False)
        c = self.ledger.take(self._trials)
        self.progress.update(c, self.ledger.best())
        self._last_sync = time.time()
        return c

    def _beat(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self._last_beat > lv.HEARTBEAT_S:
            lv.heartbeat(self.study, self.me, self._start)
            self._last_beat = now
            if now - self._last_recover > 3 * lv.HEARTBEAT_S:
                self._last_recover = now
                self._recover()
                self._sync()

    def _recover(self) -> None:
        self.summary.recovered += lv.recover_stale(self.study, self.cfg.stale_after_s,
                                                   self.cfg.max_retries, self.me)

    def _ask(self) -> bool:
        """Asks one trial and places it (ready, held or settled); False if none was.

        Alone on the study, this driver's own count is exact. Beside another live driver
        it re-reads the study once its trial and recipe are stored: a driver that
        registers later creates its trials later (higher numbers), so it sees ours."""
        if self.ledger.used() >= self.cfg.n_trials or not self.seeding.may_sample():
            return False
        trial = self.study.ask()
        self.ledger.asked += 1
        enqueued = dict(trial.user_attrs)  # an enqueued trial's attributes (else empty)
        trial.set_user_attr(st.ATTR_DRIVER, self.me)
        recipe, error = self.space.recipe_of(trial)
        if st.ATTR_RECIPE not in enqueued:
            trial.set_user_attr(st.ATTR_RECIPE, recipe.to_dict() if recipe else None)
        trials = None
        if lv.others_alive(self.study.user_attrs, self.me, self.cfg.stale_after_s):
            self._sync()
            trials = self._trials
            if lg.surplus(trials, trial.number, self.cfg.n_trials):
                # over the budget: failed as surplus, never evaluated; an enqueued trial
                # goes back to the queue
                trial.set_user_attr("surplus", True)
                lv.tell(self.study, trial, None, TrialState.FAIL)
                if st.ATTR_RECIPE in enqueued:
                    self.study.enqueue_trial(dict(trial.params), user_attrs=enqueued,
                                             skip_if_exists=False)
                return False
        if recipe is None:
            self._fail(trial, error)
            return True
        run = _Running(trial, recipe)
        if not self._dup(run):
            if self.cfg.dedup and self._blocked(run, trials):
                self.held[trial.number] = run
            else:
                self.ready.append(run)
        return True

    def _dup(self, run: _Running) -> bool:
        """Completes ``run`` as the duplicate of a trial that scored its recipe, if any."""
        dup = self.ledger.scored.get(run.recipe.hash()) if self.cfg.dedup else None
        if dup is None:
            return False
        run.trial.set_user_attr("duplicate_of", dup[0])
        lv.tell(self.study, run.trial, dup[1])
        self.summary.reused += 1
        return True

    def _blocked(self, run: _Running, trials: list[FrozenTrial] | None) -> bool:
        """Whether another trial evaluates (or may be evaluating) the same recipe:
        one of this driver's, or, from a read of the study, a running trial ahead."""
        h = run.recipe.hash()
        if any(r.recipe.hash() == h for r in [*self.running.values(), *self.ready]):
            return True
        return trials is not None and lg.blocked(trials, run.trial.number, h)

    def _recheck(self) -> None:
        """Held trials: a duplicate once the recipe is scored, evaluated when nothing
        ahead evaluates it any more (that trial failed or its driver died)."""
        if time.time() - self._last_check < RECHECK_S:
            return
        self._last_check = time.time()
        self._sync()
        for number, run in sorted(self.held.items()):
            if self._dup(run):
                del self.held[number]
            elif not self._blocked(run, self._trials):
                del self.held[number]
                self.ready.append(run)

    def _fail(self, trial: Trial, reason: str) -> None:
        trial.set_user_attr(st.ATTR_ERROR, reason)
        lv.tell(self.study, trial, None, TrialState.FAIL)
        self.summary.failed += 1
        h = lg.recipe_hash(trial)
        if h is not None:
            self.ledger.failed.add(h)
        log.info("trial %d failed: %s", trial.number, reason)

    def _handle(self, o: Outcome) -> None:
        key, result = o.key, o.result
        run = self.running.pop(key)
        trial = run.trial
        if o.died or result is None:
            self.summary.died += 1
            frozen = self.study._storage.get_trial(trial._trial_id)
            lv.fail_and_requeue(self.study, frozen, o.reason, self.cfg.max_retries)
            log.warning("trial %d: %s", key, o.reason)
            return
        if not result.ok:
            self._fail(trial, str(result.error))
            return
        values = [float(result.metrics[t]) for t in self.tasks] if self.cfg.multi_objective \
            else [float(result.objective)]
        if not all(math.isfinite(v) for v in values):
            self._fail(trial, f"ValueError: the scores are not finite: {values}")
            return
        prune = False
        if self._reports:
            trial.report(values[0], step=result.stage)
            prune = not result.final and trial.should_prune()
        if not result.final:
            self.ex.advance(key, go_on=not prune)
            if not prune:
                self.running[key] = run
                return
        trial.set_user_attr(st.ATTR_SCORES, _scores(result, values))
        if result.per_doc:  # for intervals and paired comparisons
            trial.set_user_attr(st.ATTR_PER_DOC, {t: [round(v, 6) for v in vs]
                                                  for t, vs in result.per_doc.items()})
        if prune:
            lv.tell(self.study, trial, None, TrialState.PRUNED)
            self.summary.pruned += 1
            return
        lv.tell(self.study, trial, values)
        self.summary.evaluated += 1
        self.ledger.add(run.recipe.hash(), trial.number, values, float(result.objective))

    def run(self) -> Summary:
        """Runs until this study's budget is spent; returns the summary."""
        try:
            self._loop()
        finally:
            self.progress.close()
        self.summary.counts = self._sync()
        return self.summary

    def _submit(self, n: int) -> None:
        for run in self.ready[:max(0, n)]:
            self.running[run.trial.number] = run
            self.ex.submit(run.trial.number, run.recipe.to_dict())
        del self.ready[:max(0, n)]

    def _refill(self) -> None:
        """Hands ready trials to free workers, asking new ones while there is room."""
        while True:
            self._submit(min(len(self.ready), self.ex.slots - len(self.running)))
            room = len(self.running) + len(self.ready) < self.ex.slots + SPARE
            if not room or len(self.held) >= max(1, self.ex.slots) or not self._ask():
                return

    def _loop(self) -> None:
        self._beat(force=True)
        lv.reseed_if_shared(self.study, self.me, self.cfg.stale_after_s)
        self._recover()
        self.seeding.seed_study()
        self._sync()
        while True:
            self.seeding.advance()
            self._refill()
            if not (self.running or self.ready or self.held):
                c = self._sync()
                if c["done"] >= self.cfg.n_trials:
                    break
                stuck = c["running"] == 0 and c["waiting"] == 0 and not self.seeding.may_sample()
                if stuck:
                    self.seeding.advance()
                    if not self.seeding.may_sample() and self.seeding.leader():
                        log.warning("greedy soup cannot proceed; sampling without it")
                        self.seeding.done = True
                time.sleep(0.2 if stuck else 0.5)  # else others finish the last trials
                self._beat()
                continue
            outcomes = self.ex.poll(timeout=RECHECK_S if self.held else 1.0)
            # the workers these results freed take the trials proposed ahead at once
            freed = sum(1 for o in outcomes if o.result is not None and not o.died
                        and (not o.result.ok or o.result.final))
            self._submit(min(freed, len(self.ready)))
            for o in outcomes:
                self._handle(o)
            if self.held:
                self._recheck()
            elif outcomes and time.time() - self._last_sync > SYNC_S:
                self._sync()
            self._beat()


def _scores(result: WorkerResult, values: list[float]) -> dict[str, Any]:
    return {"metrics": result.metrics, "weights": result.weights, "n_docs": result.n_docs,
            "objective": result.objective, "values": values,
            "stage": result.stage, "final": result.final,
            "timings": {k: round(float(v), 4) for k, v in result.timings.items()}}
