"""Search benchmark: driver overhead, parallel throughput and sampler efficiency.

Measures three things and (with ``--doc``) writes them to the ``search`` section of
docs/benchmarks.md:

(a) driver overhead per trial (ask + tell + bookkeeping) with 1,000 finished trials
    already stored, for TPE and CMA-ES on SQLite and journal storage, as a share of a
    5 s candidate, and the driver's start-up on that study; the workers are simulated
    (no models, no evaluation), so the wall time per trial is the driver's.
(b) throughput with 16 simulated Ray workers (each candidate sleeps 5 s) as a fraction
    of the ideal ``workers / sleep`` trials per second.
(c) search efficiency on the demo problem (real demo models, real evaluation): trials
    the sampler needs to beat the greedy soup, and the best val score after N trials,
    for TPE, CMA-ES and random search over several seeds.

    python scripts/bench_search.py --doc                       # full run
    python scripts/bench_search.py --quick --parts a,b         # smoke test
    python scripts/bench_search.py --quick --parts c --trials 10 --doc --doc-path /tmp/b.md

Parts (a) and (b) need no models. Part (c) needs the demo models
(``python -m search.demo``). Each part owns a sub-block of the section, so
``--parts c --doc`` replaces only part (c)'s tables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import optuna
from bench_common import DOC, ROOT, machine, simulated_setup, table, update_section
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from search import study as st
from search.config import SearchConfig, compose
from search.run.driver import Driver, _scores
from search.run.executors import SerialExecutor
from search.run.launch import instantiate, open_search_study, run_search, worker_setup
from search.run.space import Space
from search.run.worker import Worker

optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("search").setLevel(logging.WARNING)

TARGET_A = 0.02  # median driver cost per trial, 1,000 trials stored, per candidate second
TARGET_START_S = 3.0  # driver start-up (open the study, first submit), 1,000 trials stored
TARGET_B = 0.97  # fraction of ideal throughput at 16 workers, 5 s candidates
FAKE_MODELS = ["models.base=/m/base", "models.experts=[/m/a,/m/b,/m/c]"]
MAX_BASELINE_TRIALS = 7  # base, 3 parents, uniform soup, at most 2 greedy steps
# Every method of space=all except model_stock: it has no parameters, so the simulated
# score (best at weight 0.5) rates it perfect and TPE re-proposes it every other trial,
# which the driver answers from its dedup table: not a representative trial.
SIM_ALL = ["space=all", "space.methods=[linear,task_arithmetic,ties,dare_ties,dare_linear,"
           "breadcrumbs_ties,della,slerp]"]
SPACES = {"all": SIM_ALL, "ties": ["space=ties"]}
# (label, sampler option, space option, extra overrides). The stock row is Optuna's own
# TPESampler with the same settings as sampler=tpe, for reference (same machine, same run).
A_CONFIGS = [("TPE", "tpe", "all", ()),
             ("TPE, Optuna's stock class", "tpe", "all",
              ("sampler._target_=optuna.samplers.TPESampler",)),
             ("CMA-ES", "cmaes", "ties", ())]
C_CONFIGS = [("TPE", "tpe", "ties"), ("CMA-ES", "cmaes", "ties"),
             ("random", "random", "ties"), ("TPE", "tpe", "all")]


# -- instrumentation ------------------------------------------------------------------

class Clock:
    """Accumulates time spent in the sampler and in storage calls (outside the sampler)."""

    def __init__(self) -> None:
        self.sampler = 0.0
        self.storage = 0.0
        self.calls: Counter[str] = Counter()  # storage calls outside the sampler
        self.call_s: dict[str, float] = {}
        self._in_sampler = 0

    @contextlib.contextmanager
    def in_sampler(self) -> Iterator[None]:
        self._in_sampler += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._in_sampler -= 1
            if not self._in_sampler:
                self.sampler += time.perf_counter() - t0

    def storage_call(self, name: str, dt: float) -> None:
        if self._in_sampler:
            return
        self.storage += dt
        self.calls[name] += 1
        self.call_s[name] = self.call_s.get(name, 0.0) + dt


class TimedSampler(BaseSampler):
    """Delegates to ``inner``, timing every call the study and trials make."""

    def __init__(self, inner: BaseSampler, clock: Clock) -> None:
        self.inner = inner
        self.clock = clock

    def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
        with self.clock.in_sampler():
            return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
        with self.clock.in_sampler():
            return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
        with self.clock.in_sampler():
            return self.inner.sample_independent(study, trial, name, dist)

    def before_trial(self, study: Any, trial: Any) -> None:
        with self.clock.in_sampler():
            self.inner.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        with self.clock.in_sampler():
            self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TimedStorage:
    """Delegates every attribute to ``inner``; times the method calls."""

    def __init__(self, inner: Any, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr
        clock = self._clock

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*a, **k)
            finally:
                clock.storage_call(name, time.perf_counter() - t0)

        return timed


class TimedExecutor:
    """Wraps an executor: when each trial was submitted and when results came back."""

    def __init__(self, inner: Any, clock: Clock | None = None) -> None:
        self.inner = inner
        self.clock = clock
        self.submits: list[float] = []
        # (time poll returned, seconds inside poll, results, clock.sampler, clock.storage)
        self.results: list[tuple[float, float, int, float, float]] = []
        self.polls: list[tuple[float, float]] = []  # (start, end) of every poll

    @property
    def slots(self) -> int:
        return int(self.inner.slots)

    def submit(self, key: int, recipe: dict[str, Any]) -> None:
        self.submits.append(time.perf_counter())
        self.inner.submit(key, recipe)

    def advance(self, key: int, go_on: bool) -> None:
        self.inner.advance(key, go_on)

    def poll(self, timeout: float) -> list[Any]:
        t0 = time.perf_counter()
        out = self.inner.poll(timeout)
        t1 = time.perf_counter()
        self.polls.append((t0, t1))
        if out:
            c = self.clock
            self.results.append((t1, t1 - t0, len(out), c.sampler if c else 0.0,
                                 c.storage if c else 0.0))
        return out

    def close(self) -> None:
        self.inner.close()


# -- helpers --------------------------------------------------------------------------

def have(sampler: str) -> bool:
    """CMA-ES needs the ``cmaes`` package, which soupsearch does not install."""
    if sampler != "cmaes":
        return True
    import importlib.util

    if importlib.util.find_spec("cmaes") is None:
        print("warning: sampler=cmaes needs the 'cmaes' package (pip install cmaes); "
              "its rows are skipped", file=sys.stderr)
        return False
    return True


SKIPPED_NOTE = ("CMA-ES rows are missing: the `cmaes` package is not installed "
                "(`pip install cmaes`; soupsearch does not depend on it).\n\n")

def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def config(run_dir: Path, *extra: str) -> SearchConfig:
    return compose([f"run_dir={run_dir}", "study_name=bench", "pruner=none",
                    "evaluator.stages=[1.0]", *extra])


def _drop_log_handlers(run_dir: Path) -> None:
    """run_search adds a file handler per call; drop this run's so they do not pile up."""
    for name in ("search", "optuna"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).is_relative_to(run_dir):
                logger.removeHandler(h)
                h.close()
        logger.setLevel(logging.WARNING)


# -- (a) driver overhead ----------------------------------------------------------------

def prefill(cfg: SearchConfig, space: Space, n: int) -> list[FrozenTrial]:
    """``n`` finished trials as the driver would have stored them (recipe and scores
    attributes, simulated score). CMA-ES proposes its own (so its generation state is in
    the trials); TPE keeps no state in trials, so random proposals stand in for it."""
    cmaes = (cfg.sampler.target or "").endswith("CmaEsSampler")
    sampler = instantiate(cfg.sampler, "sampler") if cmaes else \
        optuna.samplers.RandomSampler(seed=cfg.seed)
    mem = optuna.create_study(direction="maximize", sampler=sampler)
    worker = Worker(simulated_setup(worker_setup(cfg)))
    for _ in range(n):
        trial = mem.ask()
        recipe = space.suggest(trial)
        result = worker.start(recipe.to_dict())
        trial.set_user_attr(st.ATTR_RECIPE, recipe.to_dict())
        trial.set_user_attr(st.ATTR_SCORES, _scores(result, [result.objective]))
        mem.tell(trial, result.objective)
    return mem.get_trials(deepcopy=True)


def part_a(args: argparse.Namespace, tmp: Path) -> str:
    rows, verdicts, calls_out = [], [], []
    print(f"\n(a) driver overhead: {args.stored} trials stored, {args.timed} timed",
          flush=True)
    skipped = False
    for i, (label, sampler, space_name, extra) in enumerate(A_CONFIGS):
        if not have(sampler):
            skipped = True
            continue
        base = [*FAKE_MODELS, "models.build_demo=false", f"sampler={sampler}", *extra,
                *SPACES[space_name], "parallel=serial", "baselines=false",
                f"n_trials={args.stored + args.timed}"]
        cfg0 = config(tmp / "a-prefill", *base)
        space = Space.build(cfg0.space, cfg0.models.base, cfg0.models.experts, cfg0.seed)
        t0 = time.perf_counter()
        trials = prefill(cfg0, space, args.stored)
        t_gen = time.perf_counter() - t0
        for storage in ("sqlite", "journal"):
            run_dir = tmp / f"a-{i}-{sampler}-{storage}"
            cfg = config(run_dir, *base, f"storage={storage}")
            t0 = time.perf_counter()
            open_search_study(cfg).add_trials(trials)
            t_fill = time.perf_counter() - t0
            t0 = time.perf_counter()  # start-up: a driver opens the stored study
            study = open_search_study(cfg)
            clock = Clock()
            study.sampler = TimedSampler(study.sampler, clock)
            study._storage = TimedStorage(study._storage, clock)  # type: ignore[assignment]
            ex = TimedExecutor(SerialExecutor(
                simulated_setup(worker_setup(cfg))), clock)
            summary = Driver(cfg, study, space, ex, show_progress=False).run()
            t_end = time.perf_counter()
            ex.close()
            startup = ex.submits[0] - t0
            sustained = (t_end - ex.submits[0]) / len(ex.submits)
            res = ex.results
            per, samp, stor = [], [], []
            for prev, cur in itertools.pairwise(res):
                per.append(cur[0] - prev[0] - cur[1])  # minus the worker's time in poll
                samp.append(cur[3] - prev[3])
                stor.append(cur[4] - prev[4])
            n_calls = sum(clock.calls.values())
            top = ", ".join(f"{k} {clock.calls[k] / len(res):.1f}x "
                            f"{s / len(res) * 1e3:.2f} ms"
                            for k, s in sorted(clock.call_s.items(), key=lambda kv: -kv[1])[:5])
            calls_out.append(f"{label} / {storage}: {n_calls / len(res):.1f} storage calls "
                             f"per trial outside the sampler; top by time: {top}")
            if summary.reused:
                print(f"warning: {label}/{storage}: {summary.reused} proposals were "
                      "duplicates, answered from the dedup table", file=sys.stderr)
            done = summary.counts.get("complete", 0)
            if done != args.stored + args.timed:
                print(f"warning: {label}/{storage}: {done} complete trials, expected "
                      f"{args.stored + args.timed}", file=sys.stderr)
            med = statistics.median(per) * 1e3
            share = med / 1e3 / args.sleep
            other = [p - a - b for p, a, b in zip(per, samp, stor, strict=True)]
            rows.append([f"{label} (space={space_name})", storage, f"{args.stored}",
                         f"{med:.1f} ms", f"{pct(per, 90) * 1e3:.1f} ms",
                         f"{statistics.median(samp) * 1e3:.1f} ms",
                         f"{statistics.median(stor) * 1e3:.1f} ms",
                         f"{statistics.median(other) * 1e3:.1f} ms", f"{share:.2%}",
                         f"{sustained * 1e3:.1f} ms",
                         f"{startup:.2f} s", f"{t_gen:.1f} s + {t_fill:.1f} s"])
            if not extra:  # the stock row is a reference, not a soupsearch setting
                verdicts.append(
                    f"- {label} / {storage}: median {med:.1f} ms per trial = {share:.2%} of a "
                    f"{args.sleep:g} s candidate (target under {TARGET_A:.0%}): "
                    f"{'met' if share < TARGET_A else 'NOT MET'}; start-up {startup:.2f} s "
                    f"(target under {TARGET_START_S:g} s): "
                    f"{'met' if startup < TARGET_START_S else 'NOT MET'}")
            print(f"  {label:6s} {storage:7s} median {med:6.1f} ms  p90 "
                  f"{pct(per, 90) * 1e3:6.1f} ms  sampler {statistics.median(samp) * 1e3:.1f} "
                  f"storage {statistics.median(stor) * 1e3:.1f}  = {share:.2%} of "
                  f"{args.sleep:g} s  start-up {startup:.2f} s  sustained "
                  f"{sustained * 1e3:.1f} ms  ({calls_out[-1]})", flush=True)
    headers = ["sampler", "storage", "stored trials", "median per trial", "p90",
               "sampler (median)", "storage calls (median)", "other (median)",
               f"median per {args.sleep:g} s candidate", "first submit to all stored, per trial",
               "driver start-up", "pre-fill (propose + store)"]
    return (
        f"### (a) Driver overhead per trial\n\n"
        f"Wall time the driver spends per trial (ask, tell, bookkeeping: counts, dedup "
        f"table, recipe attributes, heartbeat) with {args.stored} finished trials already "
        f"stored, over the next {args.timed} trials (median and 90th percentile of "
        f"{args.timed - 1} intervals between consecutive results, minus the worker's time). "
        "Serial executor, simulated worker (no models, ~0 s per candidate), one objective, "
        "no pruner, no baselines. sampler=tpe is search.study.sampler.ConditionalTPESampler; the "
        "stock row runs Optuna's TPESampler with the same arguments, for reference. "
        "TPE searches every method (space=all, the default) but "
        "model_stock (no parameters: the simulated score rates it perfect, so TPE would "
        "re-propose it every other trial, answered from the dedup table); "
        "CMA-ES cannot sample categorical choices, so it searches TIES only (space=ties). "
        "The stored trials carry the recipe and scores attributes a real run stores; "
        "CMA-ES proposed its own (so its state is in them), TPE's are random proposals "
        "(TPE keeps no state in trials). The driver asks and tells through Optuna's API on "
        "the stored study itself: the sampler column is the sampler's time (its own "
        "reads of the study included); the storage column is every storage call the "
        "driver makes itself (creating the trial, its recipe, scores and state, the "
        "re-reads); other is the rest (recipes, hashing, counting). The share column puts "
        f"the median against a {args.sleep:g} s candidate, as in (b). Driver start-up = "
        "from opening the stored study (a fresh storage connection) to the first "
        "submit.\n\n"
        f"Targets: the driver's time per trial under {TARGET_A:.0%} of a candidate's "
        f"({args.sleep:g} s); start-up under {TARGET_START_S:g} s.\n\n"
        + (SKIPPED_NOTE if skipped else "") + table(headers, rows)
        + "\n\nStorage calls per trial (driver's, outside the sampler):\n"
        + "".join(f"- {c}\n" for c in calls_out)
        + "\nVerdict:\n" + "\n".join(verdicts) + "\n"
    )


# -- (b) throughput ----------------------------------------------------------------------

def _window(ex: TimedExecutor, t0: float) -> tuple[float, int, float, float]:
    """(first submit to last result, trials, driver busy share, driver start-up)."""
    first, last = ex.submits[0], ex.results[-1][0]
    window = last - first
    in_poll = sum(min(b, last) - max(a, first) for a, b in ex.polls if b > first and a < last)
    return window, sum(r[2] for r in ex.results), max(0.0, 1 - in_poll / window), first - t0


def part_b(args: argparse.Namespace, tmp: Path) -> str:
    import ray

    from search.run.executors import RayExecutor

    sizes = args.workers
    cpw = args.cpus_per_worker
    ray_tmp = Path(tempfile.mkdtemp(prefix="bench-ray-", dir="/tmp"))
    print(f"\n(b) throughput: workers {sizes}, {args.sleep:g} s per candidate, "
          f"{args.per_worker} trials per worker", flush=True)
    t0 = time.perf_counter()
    # the same arguments RayExecutor uses, sized for the largest pool, started once
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(max(sizes) * cpw)),
             _temp_dir=str(ray_tmp), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=False)
    t_ray = time.perf_counter() - t0
    rows, effs = [], {}
    runs = [(n, storage) for storage in args.storages for n in sizes]
    try:
        for n, storage in runs:
            run_dir = tmp / f"b-{n}-{storage}"
            cfg = config(run_dir, *FAKE_MODELS, "models.build_demo=false", "sampler=tpe",
                         *SIM_ALL, f"storage={storage}", "parallel=ray_local",
                         f"parallel.workers={n}", f"parallel.cpus_per_worker={cpw}",
                         "parallel.gpus_per_worker=0", "baselines=false",
                         f"n_trials={n * args.per_worker}")
            space = Space.build(cfg.space, cfg.models.base, cfg.models.experts, cfg.seed)
            setup = simulated_setup(worker_setup(cfg), args.sleep)
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            pool = RayExecutor(setup, cfg.parallel, cfg.run_dir)
            t_actors = time.perf_counter() - t0
            reps = []  # (window, trials, busy, driver start-up) per repetition
            try:
                for r in range(args.repeats):  # a fresh study each time, the same actors
                    rcfg = dataclasses.replace(cfg, study_name=f"bench-{r}")
                    study = open_search_study(rcfg)
                    ex = TimedExecutor(pool)
                    t0 = time.perf_counter()
                    summary = Driver(rcfg, study, space, ex, show_progress=False).run()
                    reps.append(_window(ex, t0))
                    done = summary.counts.get("complete", 0)
                    print(f"  {n:2d} workers, {storage:7s}, run {r + 1}: {reps[-1][1]} trials "
                          f"({done} complete) in {reps[-1][0]:.2f} s = "
                          f"{reps[-1][1] / reps[-1][0] / (n / args.sleep):.1%} of ideal; "
                          f"driver busy {reps[-1][2]:.0%}", flush=True)
            finally:
                pool.close()
            ideal = n / args.sleep
            shares = [tr / w / ideal for w, tr, _, _ in reps]
            mid = sorted(range(len(reps)), key=lambda i: shares[i])[len(reps) // 2]
            window, trials, busy, startup = reps[mid]
            effs[(n, storage)] = shares[mid]
            spread = f" ({min(shares):.1%}-{max(shares):.1%})" if len(reps) > 1 else ""
            rows.append([str(n), storage, str(trials), f"{window:.2f} s",
                         f"{trials / window:.2f}", f"{ideal:.2f}",
                         f"{shares[mid]:.1%}{spread}", f"{busy:.0%}", f"{startup:.2f} s",
                         f"{t_actors:.1f} s"])
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    top = max(sizes)
    lines = []
    for storage in args.storages:
        eff = effs[(top, storage)]
        if top == 16:
            lines.append(f"- 16 workers, {storage}: {eff:.1%} of ideal (target "
                         f"{TARGET_B:.0%} or more): {'met' if eff >= TARGET_B else 'NOT MET'}")
        else:
            lines.append(f"- {storage}: 16 workers not measured (largest pool {top}: "
                         f"{eff:.1%} of ideal); the target is not judged")
    verdict = "\n".join(lines)
    headers = ["workers", "storage", "trials", "first submit to last result", "trials/s",
               "ideal trials/s", "of ideal", "driver busy", "driver start-up",
               "actor set-up"]
    return (
        f"### (b) Throughput with simulated workers\n\n"
        f"Ray actors on this machine (one local Ray instance, started once in "
        f"{t_ray:.1f} s; {cpw:g} CPU per actor so 16 fit), each candidate sleeping "
        f"{args.sleep:g} s and returning a score computed from its weights (no models). "
        "TPE over every method but model_stock (as in (a)), SQLite and journal storage, "
        f"{args.per_worker} trials per worker, each pool measured {args.repeats} times "
        "(a fresh study each time, the same actors); the row is the median run, the "
        "range in brackets (this 2-core machine shares its cores with Ray's own "
        "processes and 16 actors, so single runs vary by several percent). "
        "Throughput = trials / (first submit to last result); ideal = workers / sleep. "
        "Ray start-up, actor set-up (each actor imports torch) and the driver's start-up "
        "(study read, first ask) are excluded and shown separately. Driver busy = share "
        "of the window the driver spent outside waiting for results.\n\n"
        f"Target: {TARGET_B:.0%} of ideal or more at 16 workers.\n\n"
        + table(headers, rows) + "\n\nVerdict:\n" + verdict + "\n"
    )


# -- (c) search efficiency --------------------------------------------------------------

def part_c(args: argparse.Namespace, tmp: Path) -> str:
    models = args.models.resolve()
    names = ["base", "expert_add", "expert_reverse", "expert_dup"]
    missing = [n for n in names if not (models / n / "config.json").is_file()]
    if missing:
        sys.exit(f"error: {models / missing[0]} not found; build the demo models first: "
                 "python -m search.demo")
    experts = ",".join(str(models / n) for n in names[1:])
    print(f"\n(c) search efficiency: {args.seeds} seed(s) x {args.trials} trials", flush=True)
    rows, summary_lines, results = [], [], {}
    greedy_all: list[float] = []
    skipped = False
    for label, sampler, space_name in C_CONFIGS:
        if not have(sampler):
            skipped = True
            continue
        first_beat: list[int | None] = []
        best_at: list[float] = []
        walls: list[float] = []
        for seed in range(args.seeds):
            run_dir = tmp / f"c-{sampler}-{space_name}-{seed}"
            cfg = config(run_dir, f"models.base={models / 'base'}",
                         f"models.experts=[{experts}]", "models.build_demo=false",
                         f"sampler={sampler}", f"space={space_name}", "parallel=serial",
                         "storage=sqlite", "baselines=true", f"seed={seed}",
                         f"n_trials={args.trials + MAX_BASELINE_TRIALS}")
            t0 = time.perf_counter()
            try:
                study, _ = run_search(cfg, None, show_progress=False)
            finally:
                _drop_log_handlers(run_dir)
            walls.append(time.perf_counter() - t0)
            greedy = float(study.user_attrs["baselines.greedy"]["score"])
            greedy_all.append(greedy)
            trials = sorted((t for t in study.get_trials(deepcopy=False)
                             if st.ATTR_BASELINE not in t.user_attrs
                             and t.state.is_finished()
                             and not t.user_attrs.get(st.ATTR_REQUEUED)
                             and not t.user_attrs.get("surplus")),
                            key=lambda t: t.number)[:args.trials]
            if len(trials) < args.trials:
                print(f"warning: {label}/{seed}: only {len(trials)} sampler trials",
                      file=sys.stderr)
            done = [(i, t.value) for i, t in enumerate(trials, 1)
                    if t.state == TrialState.COMPLETE and t.value is not None]
            beat = next((i for i, v in done if v > greedy), None)
            best = max((v for _, v in done), default=float("nan"))
            first_beat.append(beat)
            best_at.append(best)
            print(f"  {label:6s} space={space_name:4s} seed {seed}: greedy {greedy:.4f}, "
                  f"best@{len(trials)} {best:.4f}, beat greedy at "
                  f"{beat if beat else '-'} ({walls[-1]:.0f} s)", flush=True)
        results[(label, space_name)] = (first_beat, best_at)
        beaten = [b for b in first_beat if b is not None]
        # median over seeds, counting a miss as "more than N" (ranked last)
        ranked = sorted(b if b is not None else math.inf for b in first_beat)
        med = statistics.median_low(ranked) if ranked else math.inf
        med_s = f">{args.trials}" if med == math.inf else str(med)
        per_seed = ", ".join(str(b) if b is not None else f">{args.trials}" for b in first_beat)
        sd = statistics.stdev(best_at) if len(best_at) > 1 else 0.0
        rows.append([f"{label} (space={space_name})", med_s, per_seed,
                     f"{len(beaten)}/{len(first_beat)}",
                     f"{statistics.mean(best_at):.4f} ± {sd:.4f}",
                     f"{min(best_at):.4f}-{max(best_at):.4f}",
                     f"{statistics.mean(walls):.0f} s"])
    greedy = statistics.mean(greedy_all)
    g_spread = max(greedy_all) - min(greedy_all)

    def med_of(key: tuple[str, str]) -> float:
        ranked = sorted(b if b is not None else math.inf for b in results[key][0])
        return statistics.median_low(ranked)

    def fmt(x: float) -> str:
        return f">{args.trials}" if x == math.inf else f"{x:g}"

    rnd = med_of(("random", "ties"))
    rnd_best = statistics.mean(results[("random", "ties")][1])
    for label in ("TPE", "CMA-ES"):
        if (label, "ties") not in results:
            continue
        m = med_of((label, "ties"))
        b = statistics.mean(results[(label, "ties")][1])
        fewer = m < rnd
        summary_lines.append(
            f"- {label} (ties) vs random search: median {fmt(m)} vs {fmt(rnd)} trials to "
            f"beat the greedy soup ({'fewer' if fewer else 'not fewer'}); mean best after "
            f"{args.trials} trials {b:.4f} vs {rnd_best:.4f} "
            f"({'higher' if b > rnd_best else 'not higher'})")
    headers = ["sampler", "trials to beat greedy (median)", "per seed", "seeds that beat it",
               f"best val score at {args.trials} (mean ± sd)", "range", "wall per run"]
    return (
        f"### (c) Search efficiency on the demo problem\n\n"
        f"The demo family (a tiny Llama base, three skill experts), the demo tasks' val "
        f"split as the objective (mean exact match of soup_add, soup_reverse, soup_dup), "
        f"serial executor, real merging and evaluation. {args.seeds} seed(s) per sampler "
        f"(seed = sampler and space seed), {args.trials} sampler-proposed trials each, "
        "after the baselines (base, each expert, uniform soup, greedy soup steps), which "
        "are not counted. TPE, CMA-ES and random search all search TIES "
        "(space=ties: CMA-ES cannot sample the method choice); the last row is TPE over "
        "every method (space=all). Trials to beat greedy = 1-based number, among the "
        "sampler-proposed trials (failed and duplicate proposals count), of the first "
        "complete trial whose score is strictly above the greedy soup's; a seed that "
        f"never beats it counts as >{args.trials} (median ranks it last). Best val score "
        "= the best sampler-proposed trial within the budget.\n\n"
        f"Greedy soup score: {greedy:.4f}"
        + (f" (varies by {g_spread:.4f} across runs)" if g_spread > 1e-9 else
           " (the same in every run)") + ".\n\n"
        "No numeric target; the reference is random search.\n\n"
        + (SKIPPED_NOTE if skipped else "") + table(headers, rows)
        + "\n\nResult:\n" + "\n".join(summary_lines) + "\n"
    )


# -- document -----------------------------------------------------------------------------

def write_doc(path: Path, parts: dict[str, str], header: str) -> None:
    """Replaces the run parts' sub-blocks of the ``search`` section, keeping the others."""
    old = ""
    if path.exists():
        m = re.search(r"<!-- bench:search -->\n(.*?)<!-- /bench:search -->", path.read_text(),
                      re.DOTALL)
        old = m.group(1) if m else ""
    blocks = []
    for key in "abc":
        if key in parts:
            blocks.append(f"<!-- search:{key} -->\n{parts[key].rstrip()}\n<!-- /search:{key} -->")
            continue
        m = re.search(rf"<!-- search:{key} -->.*?<!-- /search:{key} -->", old, re.DOTALL)
        if m:
            blocks.append(m.group(0))
    update_section("search", header + "\n\n" + "\n\n".join(blocks), doc=path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="a,b,c", help="which parts to run: a,b,c")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 200 stored trials in (a), workers 2,4 in (b), "
                         "1 seed x 12 trials in (c)")
    ap.add_argument("--stored", type=int, help="(a) finished trials stored first [1000]")
    ap.add_argument("--timed", type=int, help="(a) trials timed after them [50]")
    ap.add_argument("--workers", help="(b) pool sizes, comma-separated [16]")
    ap.add_argument("--repeats", type=int, default=0,
                    help="(b) runs per pool size, the median reported [3; quick: 1]")
    ap.add_argument("--sleep", type=float, default=5.0,
                    help="(b) seconds per candidate; (a) the candidate time its share is of")
    ap.add_argument("--per-worker", type=int, help="(b) trials per worker [8]")
    ap.add_argument("--storages", default="sqlite,journal",
                    help="(b) storages to compare, comma-separated [sqlite,journal]")
    ap.add_argument("--cpus-per-worker", type=float, default=0.1,
                    help="(b) Ray CPUs per actor (small, so 16 actors fit on few cores)")
    ap.add_argument("--seeds", type=int, help="(c) seeds per sampler [5]")
    ap.add_argument("--trials", type=int, help="(c) sampler-proposed trials per run [50]")
    ap.add_argument("--models", type=Path, default=ROOT / ".cache" / "demo" / "models",
                    help="(c) the demo models folder")
    ap.add_argument("--doc", action="store_true", help="write the 'search' section")
    ap.add_argument("--doc-path", type=Path, default=DOC, help="the document --doc writes")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    args = ap.parse_args()
    q = args.quick
    args.stored = args.stored or (200 if q else 1000)
    args.timed = args.timed or (20 if q else 50)
    args.workers = [int(w) for w in (args.workers or ("2,4" if q else "16")).split(",")]
    args.per_worker = args.per_worker or (4 if q else 8)
    args.repeats = args.repeats or (1 if q else 3)
    args.storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    args.seeds = args.seeds or (1 if q else 5)
    args.trials = args.trials or (12 if q else 50)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - set("abc") or not parts:
        ap.error("--parts takes a comma-separated subset of a,b,c")
    if args.timed < 3:
        ap.error("--timed must be at least 3")
    if args.doc and q and args.doc_path.resolve() == DOC.resolve():
        ap.error("--quick numbers do not belong in docs/benchmarks.md; drop --quick or "
                 "give --doc-path")

    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    where = machine() + (" (quick mode: indicative only)" if q else "")
    out: dict[str, str] = {}
    t_all = time.perf_counter()
    try:
        for key, fn in (("a", part_a), ("b", part_b), ("c", part_c)):
            if key in parts:
                t0 = time.perf_counter()
                body = fn(args, tmp)
                out[key] = (body.rstrip() + f"\n\nMeasured on {where}; this part ran in "
                            f"{time.perf_counter() - t0:.0f} s.\n")
    finally:
        if args.keep:
            print(f"run folders kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    header = ("## Search: driver overhead, parallel throughput, sampler efficiency\n\n"
              "`python scripts/bench_search.py --doc` (each part can be rerun alone with "
              "`--parts`; it then replaces only its own block).")
    print(f"all parts run: {time.perf_counter() - t_all:.0f} s")
    print("\n" + header + "\n\n" + "\n\n".join(out[k] for k in "abc" if k in out))
    if args.doc:
        write_doc(args.doc_path, out, header)
        print(f"wrote the 'search' section of {args.doc_path}")


if __name__ == "__main__":
    main()
