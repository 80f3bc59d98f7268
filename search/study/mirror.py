"""The sampler's in-memory mirror of the study: fast proposals, few storage round trips.

Optuna's RDB storage re-reads every unfinished trial on each read, and a sampler reads
the study several times per proposal; each suggested parameter is one more write. With
16 trials in flight on SQLite that cost about 120 ms per proposal, which starved the
workers. The driver therefore runs the sampler on an in-memory copy of the study and
writes each trial to storage in one call (parameters, distributions, owner and recipe
together), then its scores and final state. Those writes go through a writer
(search/study/writer.py): on SQLite and PostgreSQL a process beside the driver applies them in
order, so a trial's storage id is known only once it is needed (:meth:`Mirror.trial_id`).
Storage stays the single source of truth: the mirror is rebuilt from it at start and
takes in the other drivers' finished trials at every sync, so a driver that dies loses
nothing that storage had. Enqueued trials (baselines, seeds, retries) are still claimed
from storage, atomically, so two drivers never run the same one.

Example:
    >>> mirror = Mirror(study)                                   # doctest: +SKIP
    >>> ticket = mirror.start(mirror.ask(None), {"driver": me}, None)
    >>> mirror.finish(ticket, TrialState.COMPLETE, [0.71], {"scores": {...}})
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, Trial, TrialState

from search.study.sampler import RELATIVE_PARAMS_KEY
from search.study.writer import InlineWriter, ProcessWriter

log = logging.getLogger(__name__)


def _mirror_only(key: str) -> bool:
    """System attributes that matter only while the mirror trial runs: TPE's shared
    relative parameters (constant_liar). Other drivers learn from finished trials only,
    so storage does not need them (one row less per trial). Samplers' own state (CMA-ES
    keeps it in trials) is stored."""
    return RELATIVE_PARAMS_KEY is not None and key.startswith(RELATIVE_PARAMS_KEY)


@dataclass
class Ticket:
    """A trial in flight: the driver's key for it, its storage id and number, and its
    mirror trial.

    ``mem`` is None for an enqueued recipe the search space cannot express: the sampler
    does not learn from it (its values would belong to parameters it never had).
    """

    key: int  # unique within this driver; the executor's key too
    trial_id: int | None  # resolved on demand: see Mirror.trial_id
    number: int | None  # resolved on demand (one storage read): see Mirror.number
    mem: Trial | None
    user_attrs: dict[str, Any]


class Mirror:
    """An in-memory study that proposes trials for a stored study and learns its outcomes."""

    def __init__(self, study: optuna.Study,
                 writer: InlineWriter | ProcessWriter | None = None) -> None:
        self.study = study
        self.writer = writer if writer is not None else InlineWriter(study._storage)
        self._keys = 0
        self.mem = optuna.create_study(directions=study.directions, sampler=study.sampler,
                                       pruner=optuna.pruners.NopPruner())
        self._mine: set[int] = set()  # storage trial ids whose outcome reaches mem by tell
        self._taken: set[int] = set()  # storage trial ids copied into mem
        self._pending: list[tuple[Ticket, TrialState, list[float] | None, dict[str, Any]]] = []

    @property
    def _storage(self) -> Any:
        return self.study._storage

    # -- reading storage -------------------------------------------------------------

    def take_in(self, trials: Sequence[FrozenTrial],
                is_mine: Callable[[FrozenTrial], bool] | None = None) -> None:
        """Copies finished trials from storage (earlier runs, other drivers) once each;
        ``is_mine`` recognises this driver's own trials whose id has not come back yet
        (their outcome reached the sampler by tell)."""
        for t in trials:
            if t._trial_id in self._mine or t._trial_id in self._taken or not t.params or \
                    t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or \
                    (is_mine is not None and is_mine(t)):
                continue  # no parameters (a recipe outside the space): nothing to learn
            self._taken.add(t._trial_id)
            try:
                self.mem.add_trial(t)
            except ValueError as exc:  # e.g. a categorical whose choices changed on resume
                log.debug("trial %d not given to the sampler: %s", t.number, exc)

    def pop_waiting(self) -> FrozenTrial | None:
        """Claims an enqueued trial in storage (atomic: one driver wins), or None."""
        waiting = self._storage.get_all_trials(self.study._study_id, deepcopy=False,
                                               states=(TrialState.WAITING,))
        for t in waiting:
            try:
                if self._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    return self._storage.get_trial(t._trial_id)
            except UpdateFinishedTrialError:
                continue  # claimed and finished by another driver meanwhile
        return None

    # -- proposing -------------------------------------------------------------------

    def ask(self, claimed: FrozenTrial | None) -> Trial | None:
        """A mirror trial: a fresh proposal, or one fixed to a claimed trial's parameters."""
        if claimed is None:
            return self.mem.ask()
        params = claimed.system_attrs.get("fixed_params") or dict(claimed.params)
        if not params:
            return None
        self.mem.enqueue_trial(params, skip_if_exists=False)
        return self.mem.ask()

    def start(self, mem: Trial | None, user_attrs: dict[str, Any],
              claimed: FrozenTrial | None) -> Ticket:
        """Stores a RUNNING trial for ``mem`` (one write), or completes a claimed one."""
        if claimed is not None:
            return self._adopt(mem, user_attrs, claimed)
        return self._create(mem, TrialState.RUNNING, user_attrs, None)

    def settle(self, mem: Trial | None, user_attrs: dict[str, Any],
               claimed: FrozenTrial | None, state: TrialState,
               values: Sequence[float] | None) -> Ticket:
        """Stores a trial that is finished at once (a duplicate, an invalid recipe)."""
        if claimed is not None:
            ticket = self._adopt(mem, user_attrs, claimed)
            self.finish(ticket, state, values, {})
            return ticket
        ticket = self._create(mem, state, user_attrs, values)
        self._tell_mem(ticket, state, values)
        return ticket

    def trial_id(self, ticket: Ticket) -> int:
        """The trial's storage id (waits for the writer to create it, when it has not)."""
        if ticket.trial_id is None:
            ticket.trial_id = self.writer.trial_id(ticket.key)
            self._mine.add(ticket.trial_id)
        return ticket.trial_id

    def number(self, ticket: Ticket) -> int:
        """The trial's number in storage (read once, when first needed)."""
        if ticket.number is None:
            ticket.number = int(self._storage.get_trial_number_from_id(self.trial_id(ticket)))
        return ticket.number

    def _key(self) -> int:
        self._keys += 1
        return self._keys

    def _create(self, mem: Trial | None, state: TrialState, user_attrs: dict[str, Any],
                values: Sequence[float] | None) -> Ticket:
        frozen = self.mem._storage.get_trial(mem._trial_id) if mem is not None else None
        system = {k: v for k, v in frozen.system_attrs.items() if not _mirror_only(k)} \
            if frozen else {}
        now = datetime.datetime.now()
        template = FrozenTrial(
            number=-1, state=state, value=None, values=values, datetime_start=now,
            datetime_complete=now if state.is_finished() else None,
            params=dict(frozen.params) if frozen else {},
            distributions=dict(frozen.distributions) if frozen else {},
            user_attrs=dict(user_attrs), system_attrs=system,
            intermediate_values={}, trial_id=-1)
        key = self._key()
        self.writer.create(key, self.study._study_id, template)
        return Ticket(key, None, None, mem, user_attrs)

    def _adopt(self, mem: Trial | None, user_attrs: dict[str, Any],
               claimed: FrozenTrial) -> Ticket:
        """Writes the mirror trial's parameters and ``user_attrs`` onto a claimed trial."""
        tid = claimed._trial_id
        if mem is not None:
            for name, dist in mem.distributions.items():
                self._storage.set_trial_param(tid, name, dist.to_internal_repr(mem.params[name]),
                                              dist)
        for key, value in user_attrs.items():
            if claimed.user_attrs.get(key) != value:
                self._storage.set_trial_user_attr(tid, key, value)
        self._mine.add(tid)
        return Ticket(self._key(), tid, claimed.number, mem, {**claimed.user_attrs, **user_attrs})

    # -- outcomes --------------------------------------------------------------------

    def report(self, ticket: Ticket, value: float, step: int, ask: bool = True) -> bool:
        """Reports a stage's value to storage (and the mirror); with ``ask``, True if the
        study's pruner stops the trial there."""
        trial = Trial(self.study, self.trial_id(ticket))
        trial.report(value, step)
        if ticket.mem is not None:
            ticket.mem.report(value, step)
        return ask and trial.should_prune()

    def finish(self, ticket: Ticket, state: TrialState, values: Sequence[float] | None,
               user_attrs: dict[str, Any], defer: bool = False) -> None:
        """Tells the mirror the outcome and stores it (attributes first, then the state).

        With ``defer`` the storage writes wait for :meth:`flush`, so the driver can hand
        the freed worker its next trial first. Until then (and until the writer has
        applied them) the trial reads as RUNNING; if the driver dies in between, resume
        re-runs it (nothing is corrupted).
        """
        self._tell_mem(ticket, state, values)
        vals = list(values) if values is not None else None
        if defer:
            self._pending.append((ticket, state, vals, user_attrs))
            return
        self._write(ticket, state, vals, user_attrs)

    def flush(self) -> None:
        """Hands the deferred outcomes to the writer, oldest first."""
        while self._pending:
            self._write(*self._pending.pop(0))

    def sync(self, force: bool = False) -> None:
        """Flushes and waits until storage holds every write of this mirror (``force``:
        also until a writer that is still starting is ready)."""
        self.flush()
        self._mine.update(self.writer.sync(force))

    def unwritten(self) -> set[int]:
        """Flushes; the keys of the trials this mirror created that may not be in
        storage yet."""
        self.flush()
        return self.writer.unwritten()

    def missing(self, keys: set[int], trials: Sequence[FrozenTrial],
                is_mine: Callable[[FrozenTrial], bool]) -> int:
        """How many of the trials ``keys`` (from :meth:`unwritten`, taken before
        ``trials`` were read) are not among ``trials``. Takes in the storage ids the
        writer has reported meanwhile, without waiting; a trial the read has but whose
        id has not come back yet is recognised by ``is_mine`` (its owner attribute)."""
        self._mine.update(self.writer.ids())
        read = {t._trial_id for t in trials}
        found = sum(1 for k in keys if self.writer.known_id(k) in read)
        found += sum(1 for t in trials if t._trial_id not in self._mine and is_mine(t))
        return max(0, len(keys) - found)

    def close(self) -> None:
        """Applies what is left and stops the writer."""
        try:
            self.flush()
        finally:
            self.writer.close()

    def _write(self, ticket: Ticket, state: TrialState, values: list[float] | None,
               user_attrs: dict[str, Any]) -> None:
        self.writer.finish(ticket.key, ticket.trial_id, user_attrs, state, values)

    def forget(self, ticket: Ticket) -> None:
        """Ends the mirror trial of a ticket settled elsewhere (a dead worker's trial)."""
        self._tell_mem(ticket, TrialState.FAIL, None)

    def _tell_mem(self, ticket: Ticket, state: TrialState,
                  values: Sequence[float] | None) -> None:
        if ticket.mem is None:
            return
        if state == TrialState.COMPLETE:
            self.mem.tell(ticket.mem, list(values or ()))
        else:
            self.mem.tell(ticket.mem, state=state)
