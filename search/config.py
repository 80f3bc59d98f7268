"""The search's configuration: the composed Hydra config, converted once into the frozen
dataclasses of :mod:`search.settings` (field converters in :mod:`search.config_fields`).

This is the only module that imports omegaconf or hydra. Everything below it takes a
:class:`SearchConfig`, validated here, so a bad value fails at the edge with one line.

Example:
    >>> cfg = compose(["experiment=demo", "n_trials=20"])
    >>> cfg.n_trials, cfg.sampler.target
    (20, 'search.study.sampler.ConditionalTPESampler')
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from search.atomic import write_text
from search.config_fields import (
    build,
    expert_ref,
    mapping,
    model_ref,
    stages,
    tuple_of_str,
)
from search.errors import ConfigError, SoupError, one_line
from search.settings import (
    DEFAULT_EVALUATOR,
    ComponentConfig,
    EvaluatorConfig,
    ModelsConfig,
    ParallelConfig,
    SearchConfig,
    SpaceConfig,
    StorageConfig,
    TaskConfig,
)

# search/conf links to the top-level conf/ in a checkout; a wheel holds a copy of it
CONF_DIR = Path(__file__).parent / "conf"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _models(value: Any, where: str) -> ModelsConfig:
    base = model_ref(str(value.get("base"))) if isinstance(value, Mapping) else ""

    def experts(v: Any, w: str) -> tuple[str, ...]:
        return tuple(expert_ref(e, base) for e in tuple_of_str(v, w))

    return build(ModelsConfig, value, where, {
        "experts": experts, "base": lambda v, w: model_ref(str(v))})


def _task(value: Any, where: str) -> TaskConfig:
    if isinstance(value, str):
        return TaskConfig(value)
    return build(TaskConfig, value, where)


def _tasks(value: Any, where: str) -> tuple[TaskConfig, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{where}: expected a list of tasks, got {value!r}")
    return tuple(_task(v, f"{where}[{i}]") for i, v in enumerate(value))


def _evaluator(value: Any, where: str) -> EvaluatorConfig:
    """The evaluator config; its ``_target_`` must import and take ``options``."""
    import inspect

    from evaluators.base import evaluator_class

    data = dict(mapping(value, where))
    target = data.pop("_target_", DEFAULT_EVALUATOR)
    if "target" in data:
        raise ConfigError(f"{where}.target: unknown option; did you mean '_target_'?")
    ev = build(EvaluatorConfig, data, where, {
        "tasks": _tasks, "heldout": _tasks, "include_path": tuple_of_str, "stages": stages,
        "options": lambda v, w: dict(mapping(v, w))})
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{where}._target_: expected a class path like "
                          f"{DEFAULT_EVALUATOR}, got {target!r}")
    try:
        cls = evaluator_class(target)
    except SoupError as exc:
        raise ConfigError(f"{where}._target_: {exc}") from None
    try:
        inspect.signature(cls).bind((), include_path=(), batch_size=1, stages=(1.0,),
                                    **ev.options)
    except TypeError as exc:
        raise ConfigError(f"{where}.options: {target} does not take them ({exc}); see its "
                          "constructor for the options it accepts") from None
    return dataclasses.replace(ev, target=target)


def _component(value: Any, where: str) -> ComponentConfig:
    if value is None:
        return ComponentConfig(None)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping with _target_, got {value!r}")
    kwargs = {k: v for k, v in value.items() if k != "_target_"}
    return ComponentConfig(value.get("_target_"), kwargs)


def _check(cfg: SearchConfig) -> SearchConfig:
    from search.merge.methods import get_method

    if not _NAME.match(cfg.study_name):
        raise ConfigError(f"study_name {cfg.study_name!r}: use letters, digits, '_', '-', '.'")
    if cfg.n_trials < 1:
        raise ConfigError(f"n_trials={cfg.n_trials}: must be at least 1")
    if cfg.objective not in ("mean", "per_task"):
        raise ConfigError(f"objective={cfg.objective!r}: use 'mean' (weighted mean of the "
                          "tasks) or 'per_task' (multi-objective, Pareto front)")
    if not cfg.models.experts:
        raise ConfigError("models.experts is empty; list the fine-tuned models to merge")
    if cfg.evaluator.quantize not in (None, "nf4", "fp4"):
        raise ConfigError(f"evaluator.quantize={cfg.evaluator.quantize!r}: use null (full "
                          "precision), nf4 or fp4 (4-bit evaluation with bitsandbytes)")
    if cfg.models.base in cfg.models.experts:
        raise ConfigError(f"models.base {cfg.models.base!r} is also listed in models.experts")
    twice = next((e for i, e in enumerate(cfg.models.experts) if e in cfg.models.experts[:i]),
                 None)
    if twice is not None:
        raise ConfigError(f"models.experts lists {twice!r} twice; list each model once")
    if not cfg.space.methods:
        raise ConfigError("space.methods is empty; list at least one merge method")
    for name in cfg.space.methods:
        try:
            get_method(name)
        except SoupError as exc:
            raise ConfigError(f"space.methods: {exc}") from None
    if cfg.space.per_layer_anchors < 0:
        raise ConfigError("space.per_layer_anchors must be 0 (off) or the number of anchors")
    ev = cfg.evaluator
    if not ev.tasks:
        raise ConfigError("evaluator.tasks is empty; list at least one lm-eval task")
    if not ev.stages or any(b <= a for a, b in zip(ev.stages, ev.stages[1:], strict=False)) \
            or ev.stages[-1] != 1.0 or ev.stages[0] <= 0:
        raise ConfigError(f"evaluator.stages={list(ev.stages)}: must increase from >0 to 1.0")
    if cfg.multi_objective and cfg.pruner.target:
        raise ConfigError("pruning needs a single objective; use pruner=none with "
                          "objective=per_task")
    if cfg.parallel.kind not in ("serial", "ray"):
        raise ConfigError(f"parallel.kind={cfg.parallel.kind!r}: use 'serial' or 'ray'")
    if cfg.parallel.workers < 0 or cfg.parallel.threads_per_worker < 1:
        raise ConfigError("parallel.workers must be >= 0 and threads_per_worker >= 1")
    if cfg.max_retries < 0:
        raise ConfigError("max_retries must be >= 0")
    scheme = cfg.storage.url.split(":", 1)[0]
    if not scheme.startswith(("sqlite", "postgresql", "mysql", "journal")):
        raise ConfigError(f"storage.url: scheme {scheme!r} is not supported; use sqlite:///, "
                          "postgresql://, mysql:// or journal:///path")
    return cfg


def from_container(data: Mapping[str, Any]) -> SearchConfig:
    """Builds and validates a :class:`SearchConfig` from a resolved plain mapping."""
    data = dict(data)
    data.pop("hydra", None)
    data.pop("experiment", None)
    convert = {
        "run_dir": lambda v, w: Path(os.path.expanduser(str(v))),
        "seeds": tuple_of_str,
        "models": _models,
        "space": lambda v, w: build(SpaceConfig, v, w, {
            "methods": tuple_of_str, "params": lambda x, _: dict(x or {})}),
        "sampler": _component,
        "pruner": _component,
        "evaluator": _evaluator,
        "storage": lambda v, w: build(StorageConfig, v, w),
        "parallel": lambda v, w: build(ParallelConfig, v, w),
    }
    return _check(build(SearchConfig, data, "config", convert))


def from_hydra(cfg: Any) -> SearchConfig:
    """Converts a composed ``DictConfig`` (interpolations resolved) once, at the edge."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {one_line(exc)}") from None
    if not isinstance(data, Mapping):
        raise ConfigError("config: the composed config is not a mapping")
    return from_container(data)  # type: ignore[arg-type]


def _absolute_paths(cfg: Any) -> None:
    """Local paths in a composed config made absolute, so a saved config resumes anywhere."""
    models = cfg.get("models")
    if models is not None:
        if isinstance(models.get("base"), str):
            models.base = model_ref(models.base)
        if models.get("experts") is not None:
            models.experts = [model_ref(str(e)) for e in models.experts]
    if cfg.get("seeds"):
        cfg.seeds = [str(Path(os.path.expanduser(str(s))).absolute()) for s in cfg.seeds]
    ev = cfg.get("evaluator")
    if ev is not None and ev.get("include_path"):
        ev.include_path = [str(Path(os.path.expanduser(str(s))).absolute())
                           for s in ev.include_path]


def compose_raw(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> Any:
    """Composes ``conf/search.yaml`` with Hydra overrides; returns the ``DictConfig``.

    ``run_dir`` is made absolute (so the saved config resumes from any folder); other
    interpolations, such as passwords read from the environment, stay unresolved.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    directory = Path(config_dir or CONF_DIR).resolve()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            cfg = compose(config_name="search", overrides=list(overrides))
        cfg.run_dir = str(Path(os.path.expanduser(str(cfg.run_dir))).absolute())
        _absolute_paths(cfg)
        return cfg
    except (HydraException, OmegaConfBaseException) as exc:
        text = str(exc).split("Config search path")[0]
        raise ConfigError(f"bad override: {' '.join(text.split())}") from None
    finally:
        GlobalHydra.instance().clear()


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> SearchConfig:
    """Composes and converts: the one call the CLI makes."""
    return from_hydra(compose_raw(overrides, config_dir))


def save(cfg: Any, path: Path) -> None:
    """Writes a composed ``DictConfig`` as YAML, unresolved (no secrets), atomically."""
    write_text(path, to_yaml(cfg))


def to_yaml(cfg: Any) -> str:
    """The composed config as YAML, interpolations (and so secrets) unresolved."""
    from omegaconf import OmegaConf

    return str(OmegaConf.to_yaml(cfg))


def load_saved(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, SearchConfig]:
    """The config a run folder was started with, plus ``key=value`` overrides.

    ``run_dir`` becomes the folder given (unless overridden), so a run folder that was
    moved or copied reads and writes its own study, not the one at its old place.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found; give the run folder of a `soup search`")
    try:
        cfg = OmegaConf.load(path)
        bad = [o for o in overrides if "=" not in o or o.startswith(("+", "~"))]
        if bad:
            raise ConfigError(f"resume override {bad[0]!r}: use key=value (groups are fixed "
                              "when a study starts)")
        if OmegaConf.select(cfg, "run_dir", default=None) is not None:
            OmegaConf.update(cfg, "run_dir", str(Path(run_dir).absolute()), merge=False)
        for item in overrides:
            key, value = item.split("=", 1)
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
                raise ConfigError(f"resume override {item!r}: no option {key!r}")
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {one_line(exc)}") from None
    return cfg, from_hydra(cfg)
