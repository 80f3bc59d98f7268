"""The search's settings: frozen dataclasses, one per config group, validated by
:mod:`search.config` at the edge (core code reads only these).

Example:
    >>> ModelsConfig("base", ("a", "b")).device
    'auto'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_EVALUATOR = "evaluators.lm_eval.LmEvalEvaluator"


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

    @property
    def paths(self) -> tuple[str, ...]:
        """The base, then the experts."""
        return (self.base, *self.experts)


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
        shared: a parameter that several methods have with the same range is one trial
            parameter (``weight.MODEL``, ``lambda``, ``density.MODEL``), so what a trial
            of one method shows about it informs the others; else each method has its own
            (``ties.weight.MODEL``).
        probes: with the baselines, each method is first tried once at its probe point
            (every weight 1, each other parameter at its default or mid-range).
    """

    methods: tuple[str, ...]
    per_layer_anchors: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    shared: bool = False
    probes: bool = False


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
