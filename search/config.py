"""The search's configuration: frozen dataclasses, built once from the composed Hydra config.

This is the only module that imports omegaconf or hydra. Everything below it takes a
:class:`SearchConfig`, validated here, so a bad value fails at the edge with one line.

Example:
    >>> cfg = compose(["experiment=demo", "n_trials=20"])   # doctest: +SKIP
    >>> cfg.n_trials, cfg.sampler.target                     # doctest: +SKIP
    (20, 'search.study.sampler.ConditionalTPESampler')
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from search.errors import SoupError, one_line

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_EVALUATOR = "evaluators.lm_eval.LmEvalEvaluator"


class ConfigError(SoupError):
    """A config value or override that cannot be used."""


@dataclass(frozen=True)
class ModelsConfig:
    """The parents: a shared base and the fine-tuned experts (paths or hub ids).

    An expert may be a PEFT LoRA adapter folder (applied to ``base``) or, in mergekit's
    syntax, ``MODEL+ADAPTER``.
    """

    base: str
    experts: tuple[str, ...]
    build_demo: bool = False
    device: str = "auto"
    dtype: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class SpaceConfig:
    """What the sampler may choose.

    Attributes:
        methods: merge methods to choose among (one = a fixed method).
        per_layer_anchors: 0 or 1 = one value per parameter; k >= 2 = k values across
            depth, interpolated per layer.
        params: parameter name -> ``[low, high]`` range, a fixed value, or (for bools)
            ``[false, true]`` to search; a method name -> such a mapping for that method.
        dtype: the recipes' ``dtype``.
    """

    methods: tuple[str, ...]
    per_layer_anchors: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None


@dataclass(frozen=True)
class ComponentConfig:
    """A swappable Optuna component: ``_target_`` class path and its keyword arguments."""

    target: str | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskConfig:
    """One lm-eval task of the objective (see :class:`evaluators.base.TaskSpec`)."""

    name: str
    metric: str | None = None
    weight: float = 1.0
    limit: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class EvaluatorConfig:
    """How candidates are scored: search tasks, held-out tasks, stages, batch size, and
    ``quantize`` (``nf4``/``fp4``: evaluate each candidate with 4-bit linear layers).

    ``target`` (``_target_`` in YAML) is the evaluator class, built in each worker as
    ``target(tasks, include_path=, batch_size=, stages=, **options)`` (the contract of
    :class:`evaluators.base.Evaluator`).
    """

    tasks: tuple[TaskConfig, ...]
    heldout: tuple[TaskConfig, ...] = ()
    include_path: tuple[str, ...] = ()
    batch_size: int = 64
    stages: tuple[float, ...] = (1.0,)
    quantize: str | None = None
    target: str = DEFAULT_EVALUATOR
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageConfig:
    """Where the study lives: ``sqlite:///…``, ``postgresql://…`` or ``journal:///path``."""

    url: str


@dataclass(frozen=True)
class ParallelConfig:
    """How candidates run: ``serial`` in-process, or ``ray`` actors.

    Attributes:
        kind: ``serial`` or ``ray``.
        address: Ray address (``None`` = start a local instance; ``auto`` = join the
            cluster this node belongs to; ``ray://host:port`` or ``host:port``).
        workers: number of actors; ``0`` = one per GPU, or per CPU slot without GPUs.
        cpus_per_worker, gpus_per_worker: Ray resources of each actor;
            ``gpus_per_worker: None`` = 1 when the cluster has GPUs, else 0.
        threads_per_worker: torch threads in each worker.
    """

    kind: str = "serial"
    address: str | None = None
    workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    threads_per_worker: int = 1


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search needs, validated."""

    study_name: str
    run_dir: Path
    n_trials: int
    seed: int
    objective: str
    baselines: bool
    dedup: bool
    max_retries: int
    stale_after_s: float
    seeds: tuple[str, ...]
    models: ModelsConfig
    space: SpaceConfig
    sampler: ComponentConfig
    pruner: ComponentConfig
    evaluator: EvaluatorConfig
    storage: StorageConfig
    parallel: ParallelConfig

    @property
    def multi_objective(self) -> bool:
        """One objective per task (Pareto front) instead of one weighted score."""
        return self.objective == "per_task"


def _build(cls: type, data: Any, where: str, convert: Mapping[str, Any] | None = None) -> Any:
    """Instantiates dataclass ``cls`` from a mapping, with did-you-mean for unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    names = [f.name for f in fields(cls)]
    types = {f.name: str(f.type) for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}.{key}: unknown option; {hint}options: {', '.join(names)}")
        fn = (convert or {}).get(key)
        kwargs[key] = fn(value, f"{where}.{key}") if fn else _typed(value, types[key],
                                                                      f"{where}.{key}")
    missing = [f.name for f in fields(cls) if f.name not in kwargs
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required option {missing[0]!r}")
    return cls(**kwargs)


_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,),
                                         "str": (str,)}


def _typed(value: Any, annotation: str, where: str) -> Any:
    """Checks a scalar option against its annotation (``int``, ``float | None``, …)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    for kind in kinds:
        ok = _SCALARS.get(kind)
        if ok is None:
            return value  # not a scalar option: checked by its converter or by _check
        if isinstance(value, ok) and not (kind != "bool" and isinstance(value, bool)):
            return float(value) if kind == "float" else value  # type: ignore[arg-type]
    want = " or ".join("null" if k == "None" else {"str": "a string", "int": "an integer",
                                                     "float": "a number", "bool": "true/false"
                                                     }.get(k, k) for k in kinds)
    raise ConfigError(f"{where}: expected {want}, got {value!r}")


def _stages(value: Any, where: str) -> tuple[float, ...]:
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else None
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        raise ConfigError(f"{where}: expected a list of fractions like [0.25, 1.0], got "
                          f"{value!r}")
    return tuple(float(v) for v in items)


def _tuple_of_str(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return tuple(str(v) for v in value)


def model_ref(name: str) -> str:
    """A local path made absolute (recipes then work from any folder); hub ids as given.

    ``MODEL+ADAPTER`` (a LoRA adapter applied to a model) has both parts resolved.
    """
    path = Path(os.path.expanduser(name))
    if "+" in name and not path.exists():
        model, _, adapter = name.partition("+")
        return f"{model_ref(model)}+{model_ref(adapter)}" if model and adapter else name
    if name.startswith((".", "/", "~")) or path.exists():
        return str(path.absolute())
    return name


def _expert_ref(name: str, base: str) -> str:
    """An expert as a parent reference: a PEFT adapter folder is applied to the base."""
    ref = model_ref(name)
    if "+" not in ref and Path(ref, "adapter_config.json").is_file() \
            and not Path(ref, "config.json").is_file():
        return f"{base}+{ref}"
    return ref


def _models(value: Any, where: str) -> ModelsConfig:
    base = model_ref(str(value.get("base"))) if isinstance(value, Mapping) else ""

    def experts(v: Any, w: str) -> tuple[str, ...]:
        return tuple(_expert_ref(e, base) for e in _tuple_of_str(v, w))

    return _build(ModelsConfig, value, where, {
        "experts": experts, "base": lambda v, w: model_ref(str(v))})


def _task(value: Any, where: str) -> TaskConfig:
    if isinstance(value, str):
        return TaskConfig(value)
    return _build(TaskConfig, value, where)


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

    data = dict(_mapping(value, where))
    target = data.pop("_target_", DEFAULT_EVALUATOR)
    if "target" in data:
        raise ConfigError(f"{where}.target: unknown option; did you mean '_target_'?")
    ev = _build(EvaluatorConfig, data, where, {
        "tasks": _tasks, "heldout": _tasks, "include_path": _tuple_of_str, "stages": _stages,
        "options": lambda v, w: dict(_mapping(v, w))})
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


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


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
        "seeds": _tuple_of_str,
        "models": _models,
        "space": lambda v, w: _build(SpaceConfig, v, w, {
            "methods": _tuple_of_str, "params": lambda x, _: dict(x or {})}),
        "sampler": _component,
        "pruner": _component,
        "evaluator": _evaluator,
        "storage": lambda v, w: _build(StorageConfig, v, w),
        "parallel": lambda v, w: _build(ParallelConfig, v, w),
    }
    return _check(_build(SearchConfig, data, "config", convert))


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
    import tempfile

    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(OmegaConf.to_yaml(cfg))
    os.replace(tmp, path)


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
