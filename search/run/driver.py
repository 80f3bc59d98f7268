"""The driver: an asynchronous ask -> submit -> tell loop over the executor's slots.

The driver alone talks to storage. It keeps as many trials in flight as there are
workers (no generation barrier), seeds the study with the baselines first, skips
recipes that were already scored (same canonical hash), reports stages to the pruner,
fails bad candidates with their reason, re-enqueues the trials of dead workers, and
counts the budget from storage, so a resumed or second driver continues the same count.

Example:
    >>> summary = Driver(cfg, study, space, executor).run()      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import study as st
from search.config import SearchConfig
from search.errors import SoupError
from search.merge.methods import validate_recipe
from search.recipe import Recipe
from search.run import baselines as bl
from search.run.progress import Progress
from search.run.space import Space
from search.study.mirror import Mirror, Ticket
from search.study.writer import open_writer

log = logging.getLogger(__name__)
SYNC_S = 1.0  # re-read the study at most this often while results arrive


@dataclass
class _Running:
    ticket: Ticket
    recipe: Recipe
    started: float


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


def _values(result: dict[str, Any], tasks: Sequence[str], multi: bool) -> list[float]:
    if multi:
        return [float(result["metrics"][t]) for t in tasks]
    return [float(result["objective"])]


class Driver:
    """Runs one search against a study until the budget is spent."""

    def __init__(self, cfg: SearchConfig, study: optuna.Study, space: Space, executor: Any,
                 show_progress: bool = True) -> None:
        self.cfg = cfg
        self.study = study
        self.space = space
        self.ex = executor
        self.me = st.driver_id()
        self._start = time.time()
        self.tasks = [t.name for t in cfg.evaluator.tasks]
        self.running: dict[int, _Running] = {}
        # recipe hash -> (trial number, or the ticket until its number is needed; values;
        # objective)
        self.scored: dict[str, tuple[int | Ticket, list[float], float]] = {}
        self.failed_hashes: set[str] = set()
        self.summary = Summary()
        self.progress = Progress(cfg.n_trials, enabled=show_progress,
                                 multi=cfg.multi_objective)
        self._last_beat = 0.0
        self._last_sync = 0.0
        self._arrived = False  # results arrived since the last pass: sync if due
        self._last_recover = time.time()
        self._baselines_done = not cfg.baselines
        self._seen: set[int] = set()
        self._counts: dict[str, int] = st.counts([])
        self._asked = 0  # trials this driver asked since the last sync
        self._waiting = True  # enqueued trials may wait in storage
        self.mirror = Mirror(study)
        self._reports = not cfg.multi_objective and (
            len(cfg.evaluator.stages) > 1 or cfg.pruner.target is not None)

    # -- storage views ---------------------------------------------------------------

    def _number(self, ref: int | Ticket) -> int:
        return ref if isinstance(ref, int) else self.mirror.number(ref)

    def _number_of(self, recipe_hash: str) -> int | None:
        entry = self.scored.get(recipe_hash)
        return None if entry is None else self._number(entry[0])

    def _sync(self, wait: bool = True) -> dict[str, int]:
        """Re-reads the trials: budget counts, dedup table, best so far.

        With ``wait`` it first waits for the writer to store this driver's writes.
        Without, this driver's trials that the read missed (sent to the writer, not yet
        created) count as asked, so the counts are exact either way."""
        unwritten: set[int] = set()
        if wait:
            self.mirror.sync()
        else:
            unwritten = self.mirror.unwritten()
        trials = self.study.get_trials(deepcopy=False)
        # also before take_in: a trial finished in storage has its id by now
        missed = self.mirror.missing(unwritten, trials, self._is_mine)
        for t in trials:
            if t.number in self._seen or not t.state.is_finished():
                continue
            self._seen.add(t.number)
            recipe = t.user_attrs.get(st.ATTR_RECIPE)
            if recipe is None:
                continue
            h = Recipe.from_dict(recipe).hash()
            if t.state == TrialState.COMPLETE and t.values is not None:
                if h not in self.scored:
                    obj = (t.user_attrs.get(st.ATTR_SCORES) or {}).get("objective",
                                                                      t.values[0])
                    self.scored[h] = (t.number, list(t.values), float(obj))
            elif t.state == TrialState.FAIL and not t.user_attrs.get(st.ATTR_REQUEUED) \
                    and not t.user_attrs.get("surplus"):
                self.failed_hashes.add(h)
        self.mirror.take_in(trials, self._is_mine)
        c = st.counts(trials)
        self._waiting = self._waiting or c["waiting"] > 0
        self.progress.update(c, self._best())
        self._last_sync = time.time()
        self._counts, self._asked = c, missed
        return c

    def _is_mine(self, t: FrozenTrial) -> bool:
        return bool(t.user_attrs.get(st.ATTR_DRIVER) == self.me)

    def _best(self) -> float | None:
        objs = [o for _, _, o in self.scored.values()]
        return max(objs) if objs else None

    def _score_of(self, recipe: Recipe) -> float | None:
        h = recipe.hash()
        if h in self.scored:
            return self.scored[h][2]
        return -math.inf if h in self.failed_hashes else None

    def _beat(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self._last_beat > st.HEARTBEAT_S:
            st.heartbeat(self.study, self.me, self._start)
            self._last_beat = now
            if now - self._last_recover > 3 * st.HEARTBEAT_S:
                self._last_recover = now
                got = st.recover_stale(self.study, self.cfg.stale_after_s,
                                       self.cfg.max_retries, self.me)
                self.summary.recovered += got
                self._sync()

    # -- baselines -----------------------------------------------------------------

    def _enqueue(self, recipe: Recipe, tag: str, **extra: Any) -> None:
        self._waiting = True
        params = self.space.params_for(recipe) or {}
        self.study.enqueue_trial(params, user_attrs={st.ATTR_RECIPE: recipe.to_dict(),
                                                     st.ATTR_BASELINE: tag, **extra},
                                 skip_if_exists=False)

    def _seed_study(self) -> None:
        """Enqueues the baselines and the user's seed recipes, once per study."""
        if not self.cfg.baselines and not self.cfg.seeds:
            return
        if self.study.user_attrs.get("baselines.enqueued"):
            return
        if not self._leader():
            return  # the first live driver seeds the study
        m = self.cfg.models
        seeds = bl.load_seeds(self.cfg.seeds, (m.base, *m.experts))  # a bad seed: no write
        self.study.set_user_attr("baselines.enqueued", True)
        if self.cfg.baselines:
            for tag, recipe in bl.initial(m.base, m.experts, self.space.cfg.dtype):
                self._enqueue(recipe, tag)
        for path, recipe in seeds:
            if self.space.params_for(recipe) is None:
                log.warning("seed %s: %s with these values is outside the searched space; it "
                            "is evaluated as a reference point (like a baseline), but the "
                            "sampler cannot build on its values", path, recipe.merge_method)
            self._enqueue(recipe, bl.SEED, seed_file=path)

    def _advance_baselines(self) -> None:
        """Enqueues the next greedy-soup step, or records the finished greedy soup."""
        if self._baselines_done:
            return
        if self.study.user_attrs.get("baselines.greedy") is not None:
            self._baselines_done = True
            return
        if not self._leader():
            return
        m = self.cfg.models
        state = bl.greedy_step(list(m.experts), self._score_of, self.space.cfg.dtype)
        if state.done and state.recipe is not None:
            n = self._number_of(state.recipe.hash())
            self.study.set_user_attr("baselines.greedy", {
                "trial": n, "recipe_hash": state.recipe.hash(), "score": state.score,
                "ingredients": list(state.ingredients)})
            uniform = bl.soup(list(m.experts), self.space.cfg.dtype).hash()
            self.study.set_user_attr("baselines.uniform", self._number_of(uniform))
            self._baselines_done = True
            return
        if state.next is None:
            return  # parents still running
        h = state.next.hash()
        # COMPLETE too: another driver may have scored this step since our last sync.
        queued = self.study.get_trials(deepcopy=False, states=(
            TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE))
        if not any(st.ATTR_RECIPE in t.user_attrs
                   and Recipe.from_dict(t.user_attrs[st.ATTR_RECIPE]).hash() == h
                   for t in queued):
            self._enqueue(state.next, bl.GREEDY_STEP)

    def _leader(self) -> bool:
        return st.leader(self.study.user_attrs, self.cfg.stale_after_s) == self.me

    def _may_sample(self) -> bool:
        """The sampler may propose once the baselines are done (or none is waiting)."""
        if self._baselines_done:
            return True
        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    # -- trials --------------------------------------------------------------------

    def _claim(self) -> FrozenTrial | None:
        """An enqueued trial (baseline, seed, retry) claimed from storage, if any wait."""
        if self._baselines_done and not self._waiting:
            return None
        claimed = self.mirror.pop_waiting()
        self._waiting = claimed is not None
        return claimed

    def _ask(self) -> bool:
        """Asks one trial and submits it (or settles it at once); False if none was asked."""
        c = self._counts
        used = c["done"] + c["running"] + self._asked
        if used >= self.cfg.n_trials or not self._may_sample():
            return False
        claimed = self._claim()
        mem = self.mirror.ask(claimed)
        self._asked += 1
        fixed = claimed.user_attrs.get(st.ATTR_RECIPE) if claimed is not None else None
        attrs: dict[str, Any] = {st.ATTR_DRIVER: self.me}
        recipe: Recipe | None = None
        try:
            recipe = self.space.suggest(mem) if mem is not None else None
            if fixed is not None:
                recipe = Recipe.from_dict(fixed)
            if recipe is None:
                raise SoupError("an enqueued trial has neither parameters nor a recipe")
            validate_recipe(recipe)
        except SoupError as exc:
            attrs[st.ATTR_RECIPE] = fixed or (recipe.to_dict() if recipe else None)
            attrs[st.ATTR_ERROR] = f"{type(exc).__name__}: {exc}"
            ticket = self.mirror.settle(mem, attrs, claimed, TrialState.FAIL, None)
            self._failed(ticket, attrs[st.ATTR_ERROR])
            return True
        attrs[st.ATTR_RECIPE] = recipe.to_dict()
        if claimed is not None and self.cfg.dedup:
            self._refresh_scored(recipe.hash())
        dup = self.scored.get(recipe.hash()) if self.cfg.dedup else None
        near_end = used + self.ex.slots >= self.cfg.n_trials
        if dup is not None and not near_end:
            attrs["duplicate_of"] = self._number(dup[0])
            self.mirror.settle(mem, attrs, claimed, TrialState.COMPLETE, dup[1])
            self.summary.reused += 1
            return True
        ticket = self.mirror.start(mem, attrs, claimed)
        if near_end and self._surplus(ticket, claimed):
            return False
        if dup is not None:
            self.mirror.finish(ticket, TrialState.COMPLETE, dup[1],
                               {"duplicate_of": self._number(dup[0])})
            self.summary.reused += 1
            return True
        self.running[ticket.key] = _Running(ticket, recipe, time.time())
        self.ex.submit(ticket.key, recipe.to_dict())
        return True

    def _reseed_if_shared(self) -> None:
        """Reseeds the sampler at random when another driver is live on this study or the
        study already has trials. Drivers built from the same config share ``seed``, so
        their samplers would otherwise propose the same candidates at the same time (both
        evaluated: neither is finished yet when the other asks), and a resumed driver would
        replay its first proposals. A fresh study with one driver keeps the seed, so that
        search is reproducible. Runs after this driver's first heartbeat: of two drivers
        starting together, at least the later one sees the other."""
        others = self._others_alive()
        if others or self.study.get_trials(deepcopy=False):
            self.study.sampler.reseed_rng()
            log.info("sampler reseeded: %s", "another driver is live on this study"
                     if others else "the study already has trials")

    def _refresh_scored(self, h: str) -> None:
        """Looks ``h`` up among the stored COMPLETE trials before an enqueued trial is
        evaluated: with several drivers, another may have scored the same recipe since
        this one's last sync (enqueued trials are few, so the read is cheap)."""
        if h in self.scored:
            return
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            recipe = t.user_attrs.get(st.ATTR_RECIPE)
            if recipe is None or t.values is None or "duplicate_of" in t.user_attrs:
                continue
            if Recipe.from_dict(recipe).hash() == h:
                obj = (t.user_attrs.get(st.ATTR_SCORES) or {}).get("objective", t.values[0])
                self.scored[h] = (t.number, list(t.values), float(obj))
                return

    def _others_alive(self) -> bool:
        """Whether another live driver is registered on the study (one attribute read)."""
        attrs = self.study.user_attrs
        return any(k.startswith("driver.") and k != f"driver.{self.me}"
                   and st.driver_alive(attrs, k[len("driver."):], self.cfg.stale_after_s)
                   for k in attrs)

    def _surplus(self, ticket: Ticket, claimed: FrozenTrial | None) -> bool:
        """Over budget because another driver asked at the same moment: give it back.

        Alone on the study, this driver's own count is exact, so there is nothing to
        check (the check waits for the writer and re-reads every trial). A driver that
        registers after this look creates its first trial only after its start-up (its
        writer alone takes about a second to start), by when this trial is stored, so
        that driver's own check counts it and gives its trial back if one is too many.
        """
        if not self._others_alive():
            return False
        self.mirror.sync()
        trials = self.study.get_trials(deepcopy=False)
        c = st.counts(trials)
        number = self.mirror.number(ticket)
        ahead = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < number)
        if c["done"] + ahead < self.cfg.n_trials:
            return False
        self.mirror.finish(ticket, TrialState.FAIL, None, {"surplus": True})
        if claimed is not None:
            params = claimed.system_attrs.get("fixed_params") or dict(claimed.params)
            self.study.enqueue_trial(dict(params), user_attrs={
                k: v for k, v in claimed.user_attrs.items() if k not in ("surplus", "driver")})
            self._waiting = True
        return True

    def _failed(self, ticket: Ticket, reason: str) -> None:
        self.summary.failed += 1
        recipe = ticket.user_attrs.get(st.ATTR_RECIPE)
        if recipe:
            self.failed_hashes.add(Recipe.from_dict(recipe).hash())
        log.info("trial %d failed: %s", self.mirror.number(ticket), reason)

    def _fail(self, ticket: Ticket, reason: str) -> None:
        self.mirror.finish(ticket, TrialState.FAIL, None, {st.ATTR_ERROR: reason})
        self._failed(ticket, reason)

    def _handle(self, key: int, result: dict[str, Any] | None, died: bool, reason: str) -> None:
        run = self.running.pop(key)
        ticket = run.ticket
        if died or result is None:
            self.summary.died += 1
            frozen = self.study._storage.get_trial(self.mirror.trial_id(ticket))
            st.fail_and_requeue(self.study, frozen, reason, self.cfg.max_retries)
            self.mirror.forget(ticket)
            self._waiting = True
            log.warning("trial %d: %s", frozen.number, reason)
            return
        if not result.get("ok"):
            self._fail(ticket, str(result.get("error")))
            return
        values = _values(result, self.tasks, self.cfg.multi_objective)
        if not all(math.isfinite(v) for v in values):
            self._fail(ticket, f"ValueError: the scores are not finite: {values}")
            return
        prune = False
        if self._reports:
            prune = self.mirror.report(ticket, values[0], int(result["stage"]),
                                       ask=not result["final"])
        if not result["final"]:
            self.ex.advance(key, go_on=not prune)
            if not prune:
                self.running[key] = run
                return
            self.mirror.finish(ticket, TrialState.PRUNED, None,
                               {st.ATTR_SCORES: _scores(result, values)}, defer=True)
            self.summary.pruned += 1
            return
        self.mirror.finish(ticket, TrialState.COMPLETE, values,
                           {st.ATTR_SCORES: _scores(result, values)}, defer=True)
        self.summary.evaluated += 1
        self.scored.setdefault(run.recipe.hash(), (ticket, values, float(result["objective"])))

    # -- the loop ------------------------------------------------------------------

    def run(self) -> Summary:
        """Runs until this study's budget is spent; returns the summary."""
        self.mirror.writer = open_writer(self.cfg.storage.url, self.study._storage)
        done = False
        try:
            self._loop()
            self.summary.counts = self._sync()
            done = True
        finally:
            self.progress.close()
            try:
                self.mirror.close()  # what is left reaches storage, also after an error
            except st.StorageError:
                if done:
                    raise
                log.warning("storage writes failed while the search stopped",
                            exc_info=True)  # the error that stopped it is raised
        return self.summary

    def _loop(self) -> None:
        self._beat(force=True)
        self._reseed_if_shared()
        self.summary.recovered = st.recover_stale(self.study, self.cfg.stale_after_s,
                                                  self.cfg.max_retries, self.me)
        self._seed_study()
        # The writer has started (about a second, meanwhile) before the first read: a
        # driver that joins late counts every trial the others' writers had queued.
        self.mirror.sync(force=True)
        self._sync()
        while True:
            self._advance_baselines()
            while len(self.running) < self.ex.slots and self._ask():
                pass
            self.mirror.flush()  # the results that freed those workers
            if self._arrived and time.time() - self._last_sync > SYNC_S:
                self._sync(wait=False)  # after the refill, not waiting for the writer
            self._arrived = False
            if not self.running:
                c = self._sync()
                if c["done"] >= self.cfg.n_trials:
                    break
                if c["running"] == 0 and c["waiting"] == 0 and not self._may_sample():
                    self._advance_baselines()
                    if not self._may_sample() and self._leader():
                        log.warning("greedy soup cannot proceed; sampling without it")
                        self._baselines_done = True
                    time.sleep(0.2)
                    self._beat()
                    continue
                time.sleep(0.5)  # other drivers are finishing the last trials
                self._beat()
                continue
            outcomes = self.ex.poll(timeout=1.0)
            for o in outcomes:
                self._handle(o.key, o.result, o.died, o.reason)
            # re-read the study once the freed workers have their next trials (the budget
            # is safe meanwhile: this driver's own results are already counted)
            self._arrived = bool(outcomes)
            self._beat()


def _scores(result: dict[str, Any], values: list[float]) -> dict[str, Any]:
    return {"metrics": result["metrics"], "n_docs": result["n_docs"],
            "objective": result["objective"], "values": values,
            "stage": result["stage"], "final": result["final"],
            "timings": {k: round(float(v), 4) for k, v in result["timings"].items()}}

