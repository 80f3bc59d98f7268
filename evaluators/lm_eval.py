"""lm-evaluation-harness on the resident candidate: the only module importing lm_eval.

Per worker, once: the task index (built-in tasks only when one is asked for), the task
objects, the chosen documents and their requests (prompts rendered once). Per
candidate: the model answers the same request objects, lm-eval's filters and
``process_results`` score them, and each task's own aggregation gives the metric, the
same numbers ``lm_eval.evaluator.evaluate`` reports for those documents. There is no
environment-info collection per candidate and no response cache: every candidate's
answers come from its own forward passes.

Example:
    >>> ev = LmEvalEvaluator([TaskSpec("soup_add", limit=50)])       # doctest: +SKIP
    >>> ev.evaluate(model, tokenizer).metrics                        # doctest: +SKIP
    {'soup_add': 0.62}
"""

from __future__ import annotations

import difflib
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluators.base import EvaluatorError, Scores, TaskSpec

SHIPPED_TASKS = Path(__file__).parent / "tasks"
log = logging.getLogger(__name__)


class _QuietCustomDataset(logging.Filter):
    """Drops lm-eval's per-load hint about ``custom_dataset`` kwargs (our own tasks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _quiet() -> None:
    quiet = _QuietCustomDataset()
    logging.getLogger("lm_eval").addFilter(quiet)
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)


def task_manager(names: Sequence[str], include_path: Sequence[str | Path] = ()) -> Any:
    """A TaskManager that knows ``names``; the built-in index is read only if needed."""
    from lm_eval.tasks import TaskManager

    for path in include_path:
        if not Path(path).is_dir():
            raise EvaluatorError(f"evaluator.include_path: {str(path)!r} is not a folder; give "
                                 "folders of lm-eval task YAMLs, or leave it out")
    paths = [str(SHIPPED_TASKS), *(str(p) for p in include_path)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not all(n in manager.all_tasks for n in names):
        manager = TaskManager(include_path=paths, include_defaults=True)
    for n in names:
        if n not in manager.all_tasks:
            close = difflib.get_close_matches(n, manager.all_tasks, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise EvaluatorError(f"unknown lm-eval task {n!r}; {hint}add its YAML folder to "
                                 "the include path or check the name")
    return manager


def check_tasks(tasks: Sequence[TaskSpec], include_path: Sequence[str | Path] = (),
                heldout: Sequence[str] = ()) -> None:
    """Checks, before any worker starts, that the include paths are folders, that every
    task (and held-out task) exists, and that each search task has its metric.

    Raises:
        EvaluatorError: naming the path, task or metric, and how to fix it.
    """
    _quiet()
    manager = task_manager([*(t.name for t in tasks), *heldout], include_path)
    loaded = manager.load([t.name for t in tasks])["tasks"]
    for spec in tasks:
        _metric_of(spec, loaded[spec.name])


def _doc_ids(spec: TaskSpec, n_docs: int) -> list[int]:
    if spec.doc_ids is not None:
        bad = [i for i in spec.doc_ids if not 0 <= i < n_docs]
        if bad:
            raise EvaluatorError(f"task {spec.name}: doc id {bad[0]} outside 0..{n_docs - 1}")
        return sorted(set(spec.doc_ids))
    ids = list(range(n_docs))
    if spec.limit is None or spec.limit >= n_docs:
        return ids
    if spec.limit < 1:
        raise EvaluatorError(f"task {spec.name}: limit must be at least 1, got {spec.limit}")
    if spec.seed is None:
        return ids[: spec.limit]
    return sorted(random.Random(spec.seed).sample(ids, spec.limit))


@dataclass
class _Part:
    """One task's documents in one stage, with requests built once."""

    spec: TaskSpec
    task: Any
    metric: str
    filter_key: str
    docs: list[tuple[int, Any]]
    by_doc: dict[int, list[Any]]

    def reset(self) -> None:
        for inst in self.task.instances:
            inst.resps = []
            inst.filtered_resps = {}

    def raw_metric(self) -> list[Any]:
        """Per-document values of the metric after the model answered."""
        self.task.apply_filters()
        out = []
        for doc_id, doc in self.docs:
            reqs = self.by_doc[doc_id]
            values = self.task.process_results(doc, [r.filtered_resps[self.filter_key]
                                                     for r in reqs])
            out.append(values[self.metric])
        return out


def _metric_of(spec: TaskSpec, task: Any) -> tuple[str, str]:
    available = list(task.aggregation())
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    if spec.metric is None:
        return available[0], filters[0]
    metric, _, flt = spec.metric.partition(",")
    flt = flt or "none"
    if metric not in available or flt not in filters:
        keys = [f"{m},{f}" for m in available for f in filters]
        raise EvaluatorError(f"task {spec.name} has no metric {spec.metric!r}; "
                             f"available: {', '.join(keys)}")
    return metric, flt


class LmEvalEvaluator:
    """Scores in-memory models on lm-eval tasks, with setup paid once.

    Args:
        tasks: what to score (:class:`~evaluators.base.TaskSpec`).
        include_path: folders of extra task YAMLs (the shipped demo tasks are always in).
        batch_size: requests per model call.
        stages: cumulative fractions of each task's documents, e.g. ``(0.25, 1.0)``.
    """

    check_tasks = staticmethod(check_tasks)  # the driver's check before workers start

    def __init__(self, tasks: Sequence[TaskSpec], *, include_path: Sequence[str | Path] = (),
                 batch_size: int = 64, stages: Sequence[float] = (1.0,)) -> None:
        if not tasks:
            raise EvaluatorError("no tasks to evaluate; list at least one task")
        if not stages or list(stages) != sorted(stages) or stages[-1] != 1.0 or stages[0] <= 0:
            raise EvaluatorError(f"stages {list(stages)} must increase from >0 to 1.0")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise EvaluatorError("a task is listed twice; list each task once")
        self.specs = list(tasks)
        self.batch_size = batch_size
        _quiet()
        t0 = time.perf_counter()
        self.manager = task_manager(names, include_path)
        self.stages = [self._build_stage(i, len(stages), stages) for i in range(len(stages))]
        self.setup_seconds = time.perf_counter() - t0
        self._lm: Any = None
        self._bound: tuple[int, int] | None = None

    def _build_stage(self, index: int, total: int, fractions: Sequence[float]) -> list[_Part]:
        loaded = self.manager.load([s.name for s in self.specs])["tasks"]
        parts = []
        for spec in self.specs:
            task = loaded[spec.name]
            ids = _doc_ids(spec, len(task.eval_docs))
            lo = 0 if index == 0 else math.ceil(fractions[index - 1] * len(ids))
            hi = math.ceil(fractions[index] * len(ids))
            chosen = ids[lo:hi]
            metric, flt = _metric_of(spec, task)
            if not chosen:
                continue
            task.build_all_requests(samples=chosen, rank=0, world_size=1)
            by_doc: dict[int, list[Any]] = defaultdict(list)
            for inst in task.instances:
                by_doc[inst.doc_id].append(inst)
            for reqs in by_doc.values():
                reqs.sort(key=lambda r: r.idx)
            docs = list(task.doc_iterator(samples=chosen))
            parts.append(_Part(spec, task, metric, flt, docs, dict(by_doc)))
        return parts

    def _bind(self, model: Any, tokenizer: Any) -> Any:
        key = (id(model), id(tokenizer))
        if self._bound != key:
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            self._bound = key
        return self._lm

    def _run_stage(self, lm: Any, parts: list[_Part]) -> float:
        """Answers every request of one stage; returns the seconds spent in the model."""
        by_type: dict[str, list[Any]] = defaultdict(list)
        for part in parts:
            part.reset()
            for inst in part.task.instances:
                by_type[inst.request_type].append(inst)
        compute = 0.0
        for reqtype, reqs in by_type.items():
            cloned = [r for r in reqs for _ in range(r.repeats)]
            t0 = time.perf_counter()
            answers = getattr(lm, reqtype)(cloned, disable_tqdm=True)
            compute += time.perf_counter() - t0
            for answer, req in zip(answers, cloned, strict=True):
                req.resps.append(answer)
        return compute

    def evaluate_stages(self, model: Any, tokenizer: Any) -> Iterator[Scores]:
        """Cumulative scores after each stage (the last covers every document)."""
        import torch

        lm = self._bind(model, tokenizer)
        raw: dict[str, list[Any]] = defaultdict(list)
        compute = total = 0.0
        for index, parts in enumerate(self.stages):
            t0 = time.perf_counter()
            with torch.no_grad():
                compute += self._run_stage(lm, parts)
            for part in parts:
                raw[part.spec.name].extend(part.raw_metric())
            total += time.perf_counter() - t0
            yield self._scores(raw, index, compute, total)

    def evaluate(self, model: Any, tokenizer: Any) -> Scores:
        """Scores every document of every task."""
        *_, last = self.evaluate_stages(model, tokenizer)
        return last

    def _scores(self, raw: dict[str, list[Any]], index: int, compute: float,
                total: float) -> Scores:
        metrics, n_docs, per_doc = {}, {}, {}
        first = {p.spec.name: p for parts in self.stages for p in reversed(parts)}
        for spec in self.specs:
            values = raw[spec.name]
            part = first[spec.name]
            metrics[spec.name] = float(part.task.aggregation()[part.metric](values))
            n_docs[spec.name] = len(values)
            if all(isinstance(v, (int, float)) for v in values):  # not e.g. BLEU's pairs
                per_doc[spec.name] = [float(v) for v in values]
        return Scores(metrics, {s.name: s.weight for s in self.specs}, n_docs,
                      {"compute": compute, "overhead": total - compute, "total": total},
                      stage=index, final=index == len(self.stages) - 1, per_doc=per_doc)
