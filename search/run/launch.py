"""From a validated config to a finished search: run folder, study, workers, driver.

Example:
    >>> summary = run_search(compose(["experiment=demo"]), raw_cfg)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from search.config import ComponentConfig, ConfigError, SearchConfig, save
from search.errors import SoupError, one_line
from search.run.baselines import load_seeds
from search.run.driver import Driver, Summary
from search.run.space import Space
from search.run.worker import WorkerSetup
from search.study import open_study, redact
from search.study.storage import check_storage, check_writable

if TYPE_CHECKING:
    from search.run.executors import Executor

log = logging.getLogger(__name__)


def instantiate(comp: ComponentConfig, where: str) -> Any:
    """Builds ``comp.target(**comp.kwargs)``; ``None`` when there is no target."""
    if not comp.target:
        return None
    module, _, name = comp.target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{where}._target_: cannot import {comp.target!r}; check the "
                          "class path") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**comp.kwargs)
    except (TypeError, ValueError, ImportError) as exc:
        raise ConfigError(f"{where}: {comp.target}({', '.join(comp.kwargs)}) failed: "
                          f"{one_line(exc)}") from None


def _built(ref: str) -> bool:
    """Whether a demo parent (a model folder, or ``MODEL+ADAPTER``) exists on disk."""
    model, _, adapter = ref.partition("+") if not Path(ref).exists() else (ref, "", "")
    return Path(model, "config.json").is_file() and (
        not adapter or Path(adapter, "adapter_config.json").is_file())


def ensure_demo_models(cfg: SearchConfig) -> None:
    """Builds the demo family if the config asks for it and a parent is missing."""
    models = [cfg.models.base, *cfg.models.experts]
    if not cfg.models.build_demo or all(_built(m) for m in models):
        return
    out = Path(cfg.models.base).parent
    adapters = any("+" in m and not Path(m).exists() for m in models)
    print(f"building the demo models{' and adapters' if adapters else ''} into {out} "
          "(about 2 minutes, once)", file=sys.stderr)
    cmd = [sys.executable, "-m", "search.demo", "--out", str(out), "--no-table"]
    done = subprocess.run(cmd + (["--adapters"] if adapters else []), check=False)
    if done.returncode != 0:
        raise SoupError(f"building the demo models failed (exit {done.returncode}); "
                        f"run python -m search.demo --out {out} to see why")


def worker_setup(cfg: SearchConfig) -> WorkerSetup:
    """What each worker loads, from the config."""
    return WorkerSetup(cfg.models, cfg.evaluator, cfg.parallel.threads_per_worker)


def _check_parents(cfg: SearchConfig) -> None:
    """Opens every parent's headers (cheap) so a bad path fails before Ray starts."""
    from search.merge.sources import check_compatible, open_model

    sources = [open_model(p, allow_pickle=cfg.models.allow_pickle)
               for p in (cfg.models.base, *cfg.models.experts)]
    try:
        check_compatible(sources, False)
    finally:
        for s in sources:
            s.close()
    if cfg.evaluator.quantize and cfg.parallel.address is None:  # workers on this machine
        from search.merge.devices import resolve_device
        from search.merge.quant import check_backend

        check_backend(cfg.evaluator.quantize, resolve_device(cfg.models.device))


def _logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "search.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in ("search", "optuna"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    optuna.logging.disable_default_handler()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return handler


def _check_sampler(sampler: Any, space: Space) -> None:
    if space.has_categorical and isinstance(sampler, optuna.samplers.CmaEsSampler):
        raise ConfigError("sampler=cmaes cannot sample categorical choices (the merge "
                          "method, model subsets, booleans); fix one method, e.g. "
                          "space=ties, or use sampler=tpe")


def _check_tasks(cfg: SearchConfig) -> None:
    """The evaluator's own check of tasks, metrics and include paths, if it has one."""
    from evaluators.base import TaskSpec, evaluator_class

    ev = cfg.evaluator
    check = getattr(evaluator_class(ev.target), "check_tasks", None)
    if check is not None:
        specs = [TaskSpec(t.name, t.metric, t.weight, t.limit, t.seed) for t in ev.tasks]
        check(specs, ev.include_path, [t.name for t in ev.heldout])


def check_inputs(cfg: SearchConfig) -> Space:
    """Checks what a search reads (parents, space, sampler, tasks, metrics, include paths,
    seed recipes, storage) before anything is written and before any worker starts;
    returns the space."""
    ensure_demo_models(cfg)
    _check_parents(cfg)
    space = Space.build(cfg.space, cfg.models.base, cfg.models.experts, cfg.seed)
    _check_sampler(instantiate(cfg.sampler, "sampler"), space)
    instantiate(cfg.pruner, "pruner")
    _check_tasks(cfg)
    load_seeds(cfg.seeds, (cfg.models.base, *cfg.models.experts))  # read again on resume
    check_storage(cfg.storage.url)
    return space


def open_search_study(cfg: SearchConfig) -> optuna.Study:
    """The config's study with its sampler and pruner (created when new), checked to be
    writable (:func:`check_inputs` has checked the sampler against the space)."""
    sampler = instantiate(cfg.sampler, "sampler")
    pruner = instantiate(cfg.pruner, "pruner")
    n = len(cfg.evaluator.tasks) if cfg.multi_objective else 1
    study = open_study(cfg.storage.url, cfg.study_name, ["maximize"] * n, sampler, pruner)
    meta = {"tasks": [t.name for t in cfg.evaluator.tasks], "objective": cfg.objective,
            "base": cfg.models.base, "experts": list(cfg.models.experts)}
    stored = study.user_attrs.get("search")
    if stored is not None and (stored.get("tasks") != meta["tasks"]
                               or stored.get("experts") != meta["experts"]):
        raise ConfigError(f"study {cfg.study_name!r} was started with other tasks or experts "
                          f"({stored.get('tasks')}, {stored.get('experts')}); use a new "
                          "study_name or the original models/evaluator")
    check_writable(study, cfg.storage.url)
    if stored is None:
        study.set_user_attr("search", meta)
    return study


def run_search(cfg: SearchConfig, raw: Any | None = None, show_progress: bool = True,
               executor: Executor | None = None) -> tuple[optuna.Study, Summary]:
    """Runs (or resumes) the search ``cfg`` describes until its budget is spent.

    A bad input fails before the run folder, its files or the study are written.
    """
    optuna.logging.disable_default_handler()  # Optuna's lines go to search.log only
    space = check_inputs(cfg)
    study = open_search_study(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        save(raw, cfg.run_dir / "config.yaml")
    handler = _logging(cfg.run_dir)
    try:
        return _run(cfg, study, space, show_progress, executor)
    finally:
        for name in ("search", "optuna"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()


def _run(cfg: SearchConfig, study: optuna.Study, space: Space, show_progress: bool,
         executor: Executor | None) -> tuple[optuna.Study, Summary]:
    log.info("study %s in %s", cfg.study_name, redact(cfg.storage.url))
    if executor is None:
        from search.run.executors import make_executor

        executor = make_executor(worker_setup(cfg), cfg.parallel, cfg.run_dir)
    try:
        summary = Driver(cfg, study, space, executor, show_progress).run()
    finally:
        executor.close()
    return study, summary
