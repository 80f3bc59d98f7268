"""Exporting a trial: the evaluated candidate as a model folder with a model card.

The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and holds
sharded safetensors, config, tokenizer, generation config, ``recipe.yaml``
(mergekit's format) and ``README.md`` (scores, parents, recipe, how it was found).

Its weights are the ones the worker evaluated. A worker holds every parent of the run
on a device (in ``models.dtype``) and merges into one resident model; ``soup merge``
streams the same :class:`~search.merge.plan.MergePlan` from disk with bounded memory
and gives bit-identical tensors when the parents share one float dtype that the
worker kept and the recipe writes (the usual case, checked per export). Otherwise the
export rebuilds the worker's resident merge itself. Both run on the run's
``models.device`` unless told otherwise.

Example:
    >>> from search.config import load_saved
    >>> from search.study import open_study
    >>> _, cfg = load_saved("runs/demo")                                # doctest: +SKIP
    >>> study = open_study(cfg.storage.url, cfg.study_name, [], create=False)  # doctest: +SKIP
    >>> export_trial(study, "out/best", ExportOptions(), cfg).summary()  # doctest: +SKIP
    'exported trial 41 (ties, objective 0.8125) to out/best'
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import study as st
from search.atomic import replace_folder
from search.errors import OutputExistsError, SoupError
from search.merge.devices import resolve_device
from search.recipe import Recipe
from search.results.card import CardFacts, model_card
from search.settings import ModelsConfig

if TYPE_CHECKING:
    from search.config import SearchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how.

    Attributes:
        trial: the trial number; ``None`` = the best completed trial (single objective).
        force: replace an existing output folder.
        max_shard_bytes: largest safetensors shard.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``None`` = the run's
            ``models.device`` (the device the worker merged on).
    """

    trial: int | None = None
    force: bool = False
    max_shard_bytes: int = 2 * 1024**3
    device: str | None = None


@dataclass(frozen=True)
class Exported:
    """The result: folder, trial, recipe, its search objective and the executor used."""

    path: Path
    trial: int
    recipe: Recipe
    objective: float | None
    executor: str  # "streaming" or "resident"

    def summary(self) -> str:
        """One line for the CLI."""
        score = "" if self.objective is None else f", objective {self.objective:.4f}"
        return (f"exported trial {self.trial} ({self.recipe.merge_method}{score}) to "
                f"{self.path}")


def select_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """Trial ``number`` (it must be COMPLETE), or the best completed one when ``None``."""
    trials = study.get_trials(deepcopy=False)
    if number is None:
        if len(study.directions) > 1:
            raise SoupError(f"study {study.study_name!r} has {len(study.directions)} "
                            "objectives, so no single best; pick one with --trial N "
                            "(see soup leaderboard)")
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
        if not done:
            raise SoupError(f"study {study.study_name!r} has no completed trial yet; "
                            "run or resume the search first")
        return min(done, key=lambda t: (-float(t.values[0]), t.number))
    by_number = {t.number: t for t in trials}
    if number not in by_number:
        top = f"0..{len(trials) - 1}" if trials else "none"
        raise SoupError(f"--trial {number}: study {study.study_name!r} has no such trial "
                        f"(trials: {top}); see soup leaderboard")
    t = by_number[number]
    if t.state != TrialState.COMPLETE:
        why = t.user_attrs.get(st.ATTR_ERROR)
        raise SoupError(f"--trial {number}: the trial is {t.state.name}, not COMPLETE"
                        f"{f' ({why})' if why else ''}; export a completed trial")
    return t


def run_models(study: optuna.Study, cfg: SearchConfig | None, fallback: Sequence[str] = (),
               device: str | None = None) -> ModelsConfig:
    """The parents as the run's workers held them: from the run's config, else the
    study's record, else ``fallback`` (storage without a run folder); ``device``, when
    given, replaces the run's."""
    if cfg is not None:
        m = cfg.models
    else:
        meta = study.user_attrs.get("search") or {}
        names = [str(n) for n in (meta.get("base"), *meta.get("experts", [])) if n]
        names = list(dict.fromkeys(names if len(names) > 1 else fallback))
        if not names:
            raise SoupError("the study records no parents; pass the run's folder")
        m = ModelsConfig(names[0], tuple(names[1:]))
    return dataclasses.replace(m, device=device or m.device)


def check_recipe(recipe: Recipe, parents: ModelsConfig, number: int) -> None:
    """The driver's validation, plus: every model the merge reads is a run parent."""
    from search.merge.plan import MergePlan

    try:
        plan = MergePlan.build(recipe)
    except SoupError as exc:
        raise SoupError(f"trial {number}'s recipe is not valid: {exc}") from None
    unknown = [m for m in plan.models if m not in parents.paths]
    if unknown:
        raise SoupError(f"trial {number}'s recipe reads {unknown[0]!r}, which is not a parent "
                        f"of the run {list(parents.paths)}; export with the run's folder")


def streaming_is_exact(recipe: Recipe, parents: ModelsConfig) -> bool:
    """Whether ``soup merge``'s streaming executor writes what the worker computed.

    True when every float tensor of every parent has one dtype on disk, the worker held
    the parents in it (``models.dtype`` unset or equal) and the recipe writes it
    (``out_dtype``, else ``dtype``, unset or equal). Then both executors read the same
    values, run the same plan and store the same dtype.
    """
    from search.merge.devices import DTYPE_BY_NAME
    from search.merge.sources import logical_tensors, open_model

    dtypes = set()
    for ref in parents.paths:
        src = open_model(ref, allow_pickle=parents.allow_pickle)
        try:
            dtypes |= {dt for _, dt in logical_tensors(src).values() if dt.is_floating_point}
        finally:
            src.close()
    if len(dtypes) != 1:
        return False
    disk = dtypes.pop()
    held = DTYPE_BY_NAME[parents.dtype] if parents.dtype else disk
    wanted = recipe.out_dtype or recipe.dtype
    written = DTYPE_BY_NAME[wanted] if wanted else disk
    return held == disk and written == disk


def _write_resident(recipe: Recipe, parents: ModelsConfig, folder: Path, max_shard: int) -> None:
    """The worker's own path: every parent resident, the recipe materialized in place."""
    from search.merge.model_files import write_model_files
    from search.merge.resident import ResidentModel, ResidentParents
    from search.merge.safetensors_io import ShardedWriter
    from search.merge.streaming import MergeOptions, prepare

    prep = prepare(recipe, MergeOptions(allow_pickle=parents.allow_pickle))
    writer = None
    try:
        resident = ResidentModel(ResidentParents(
            list(parents.paths), device=parents.device, dtype=parents.dtype,
            allow_pickle=parents.allow_pickle))
        resident.materialize(recipe)
        targets = resident.targets
        specs = [(n, targets[n].dtype, tuple(targets[n].shape)) for n in prep.shapes]
        folder.mkdir(parents=True)
        writer = ShardedWriter(folder, specs, max_shard)
        for name, _, _ in specs:
            writer.write(name, targets[name].detach().cpu())
        writer.close()
        write_model_files(prep, folder, specs)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        prep.close()


def _write_weights(recipe: Recipe, parents: ModelsConfig, folder: Path, max_shard: int) -> str:
    """Writes the merged model into the new ``folder``; returns the executor used."""
    if streaming_is_exact(recipe, parents):
        from search.merge.streaming import MergeOptions, merge_to_disk

        merge_to_disk(recipe, folder, MergeOptions(
            device=parents.device, allow_pickle=parents.allow_pickle,
            max_shard_bytes=max_shard))
        return "streaming"
    _write_resident(recipe, parents, folder, max_shard)
    return "resident"


def _check_output(out: Path, parents: ModelsConfig, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"output folder {str(out)!r} exists; choose another or "
                                "pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {str(out)!r} is a file, not a folder; choose "
                                "another path")
    for ref in parents.paths:
        folder = Path(ref).resolve()
        if folder == out.resolve() or out.resolve() in folder.parents:
            raise OutputExistsError(f"output folder {str(out)!r} holds parent {ref!r}; "
                                    "export somewhere else")



def export_trial(study: optuna.Study, out_dir: str | os.PathLike[str],
                 options: ExportOptions | None = None,
                 cfg: SearchConfig | None = None) -> Exported:
    """Writes trial ``options.trial`` (default: the best) of ``study`` to ``out_dir``.

    ``cfg`` is the run's config (``search.config.load_saved``): it names the parents and
    the device and dtype the workers used. Everything is written into a hidden sibling
    folder that is renamed into place at the end. Raises :class:`SoupError` for bad input.

    Example:
        >>> export_trial(study, "out/trial-9", ExportOptions(trial=9), cfg)  # doctest: +SKIP
        Exported(path=PosixPath('out/trial-9'), trial=9, ...)
    """
    opts = options or ExportOptions()
    trial = select_trial(study, opts.trial)
    data = trial.user_attrs.get(st.ATTR_RECIPE)
    if data is None:
        raise SoupError(f"trial {trial.number} has no stored recipe; it was not made by "
                        "soup search")
    recipe = Recipe.from_dict(data, where=f"trial {trial.number}'s recipe")
    parents = run_models(study, cfg, [*filter(None, [recipe.base_model]), *recipe.model_names],
                         opts.device)
    check_recipe(recipe, parents, trial.number)
    resolve_device(parents.device)  # a bad --device fails before any work
    if cfg is not None and parents.device != cfg.models.device:
        log.warning("exporting on device %s while the search merged on %s: the weights may "
                    "differ in the last bits from the evaluated ones", parents.device,
                    cfg.models.device)
    out = Path(out_dir)
    _check_output(out, parents, opts.force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    try:
        executor = _write_weights(recipe, parents, tmp, opts.max_shard_bytes)
        facts = CardFacts.gather(study, trial, recipe, cfg, (executor, parents.device))
        (tmp / "README.md").write_text(model_card(facts), encoding="utf-8")
        recipe.save(tmp / "recipe.yaml")
        replace_folder(tmp, out, opts.force, "output folder")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported trial %d (%s) to %s via the %s executor", trial.number,
             recipe.merge_method, out, executor)
    return Exported(out, trial.number, recipe, facts.objective, executor)

