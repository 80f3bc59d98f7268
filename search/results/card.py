"""The model card (README.md) of an exported trial: a pure read of the study.

Search scores (the fitness data the sampler saw) and held-out scores (``soup
evaluate``) are separate tables, never mixed.

Example:
    >>> facts = CardFacts.gather(study, trial, recipe, cfg, ("streaming", "cpu"))  # doctest: +SKIP
    >>> print(model_card(facts))                                                  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import FrozenTrial

from search import study as st
from search.names import name_map
from search.recipe import Recipe
from search.results.leaderboard import Leaderboard

if TYPE_CHECKING:
    from search.config import SearchConfig


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, read once from the study and the run's config."""

    study_name: str
    trial: int
    recipe: Recipe
    scores: dict[str, Any]
    objective_kind: str
    heldout: dict[str, Any] | None
    roles: list[str] = field(default_factory=list)
    sampler: str | None = None
    budget: int | None = None
    finished: int = 0
    completed_at: str | None = None
    executor: str = "streaming"
    device: str = "auto"
    run_device: str | None = None
    names: dict[str, str] = field(default_factory=dict)  # short names, as the leaderboard's

    @property
    def objective(self) -> float | None:
        """The trial's search objective (the weighted mean of its tasks)."""
        obj = self.scores.get("objective")
        return None if obj is None else float(obj)

    @classmethod
    def gather(cls, study: optuna.Study, trial: FrozenTrial, recipe: Recipe,
               cfg: SearchConfig | None, how: tuple[str, str]) -> CardFacts:
        """Reads the trial's scores, its baseline role and the run's settings; ``how`` is the
        executor that wrote the weights and the device it ran on."""
        attrs = study.user_attrs
        scores = dict(trial.user_attrs.get(st.ATTR_SCORES) or {})
        if "objective" not in scores and trial.values:
            scores["objective"] = trial.values[0]
        kind = cfg.objective if cfg is not None else str(
            (attrs.get("search") or {}).get("objective", "mean"))
        done = trial.datetime_complete
        return cls(
            study_name=study.study_name, trial=trial.number, recipe=recipe, scores=scores,
            objective_kind=kind, heldout=st.heldout_scores(attrs).get(trial.number),
            roles=_roles(attrs, trial), sampler=_sampler(cfg),
            budget=cfg.n_trials if cfg is not None else None,
            finished=st.counts(study.get_trials(deepcopy=False))["done"],
            completed_at=done.isoformat(timespec="seconds") if done else None,
            executor=how[0], device=how[1], names=Leaderboard.from_study(study).names,
            run_device=cfg.models.device if cfg is not None else None)


_ROLE_TEXT = {"base": "the base model alone", "parent": "one parent alone",
              "uniform_soup": "the uniform soup of the experts",
              "greedy_soup": "the greedy soup (Wortsman et al., 2022)",
              "greedy_step": "a step of the greedy soup", "seed": "a seed recipe of the config"}


def _roles(study_attrs: dict[str, Any], trial: FrozenTrial) -> list[str]:
    """The trial's baseline kinds: ``parent``, ``uniform_soup``, ``greedy_soup``, ``seed``…"""
    tag = trial.user_attrs.get(st.ATTR_BASELINE)
    roles = [str(tag)] if tag else []
    for role, number in (("greedy_soup", (study_attrs.get("baselines.greedy") or {}).get("trial")),
                         ("uniform_soup", study_attrs.get("baselines.uniform"))):
        if number == trial.number and role not in roles:
            roles.append(role)
    return roles


def _sampler(cfg: SearchConfig | None) -> str | None:
    if cfg is None or not cfg.sampler.target:
        return None
    name = cfg.sampler.target.rsplit(".", 1)[-1]
    args = ", ".join(f"{k}={v}" for k, v in cfg.sampler.kwargs.items() if v is not None)
    return f"{name}({args})"


def _score_table(scores: dict[str, Any]) -> str:
    """A task/score/documents table of a scores record (the search's or the held-out)."""
    n_docs = scores.get("n_docs") or {}
    rows = [f"| {task} | {float(value):.4f} | {n_docs.get(task, '?')} |"
            for task, value in (scores.get("metrics") or {}).items()]
    return "| task | score | documents |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def _scores(f: CardFacts) -> str:
    obj = "n/a" if f.objective is None else f"{f.objective:.4f}"
    kind = ("the weighted mean of the tasks" if f.objective_kind == "mean"
            else "one objective per task, a Pareto front; shown: the weighted mean")
    text = ("## Search scores\n\nThe fitness data the search optimized (its validation "
            "documents).\n\n" + _score_table(f.scores)
            + f"\nObjective ({kind}): **{obj}**\n\n## Held-out scores\n\n")
    if not f.heldout:
        return text + "Not evaluated yet (`soup evaluate` scores a trial on held-out tasks).\n"
    if f.heldout.get("error"):
        return text + f"`soup evaluate` failed on this trial: {f.heldout['error']}\n"
    mean = f.heldout.get("objective")
    when = f", {f.heldout['at']}" if f.heldout.get("at") else ""
    return (text + f"Test documents the search never saw (`soup evaluate`{when}).\n\n"
            + _score_table(f.heldout)
            + ("" if mean is None else f"\nMean: **{float(mean):.4f}**\n"))


def _found(f: CardFacts) -> str:
    lines = [f"- study `{f.study_name}`, trial **{f.trial}**"
             + (f", completed {f.completed_at}" if f.completed_at else "")]
    if f.sampler:
        lines.append(f"- sampler: `{f.sampler}`")
    budget = f" of a budget of {f.budget}" if f.budget else ""
    lines.append(f"- finished trials at export: {f.finished}{budget}")
    if f.roles:
        kinds = "; ".join(f"{r}: {_ROLE_TEXT.get(r, r)}" for r in f.roles)
        lines.append(f"- a baseline, enqueued before sampling ({kinds})")
    else:
        lines.append("- proposed by the sampler")
    same = f.run_device is None or f.device == f.run_device
    lines.append(f"- weights written by the {f.executor} executor on device `{f.device}`"
                 + (", equal to the merge the search evaluated" if same else
                    f"; the search merged on `{f.run_device}`, so values may differ in the "
                    "last bits"))
    return "## How it was found\n\n" + "\n".join(lines) + "\n"


def model_card(f: CardFacts) -> str:
    """The README.md text: front matter, parents, recipe, scores, provenance."""
    r = f.recipe
    models = list(dict.fromkeys([*([r.base_model] if r.base_model else []), *r.model_names]))
    names = f.names if all(m in f.names for m in models) else name_map(r.model_names, models)
    parents = [f"- `{m}` ({'base' if m == r.base_model else 'expert'}; `{names[m]}`)"
               for m in models]
    front = yaml.safe_dump({"base_model": models, "library_name": "transformers",
                            "tags": ["merge", "soupsearch", r.merge_method]}, sort_keys=False)
    return (
        f"---\n{front}---\n\n# {f.study_name}, trial {f.trial}: {r.merge_method} merge\n\n"
        "A merge of the models below, found by a [soupsearch](https://pypi.org/project/"
        "soupsearch/) search.\n\n## Parents\n\n" + "\n".join(parents) + "\n\n"
        f"## Merge\n\nMethod `{r.merge_method}`; canonical recipe hash `{r.hash()}`. The "
        "recipe, also saved as `recipe.yaml` in mergekit's format (`soup merge recipe.yaml "
        "OUT` merges it again; `seeds=[recipe.yaml]` starts a search from it):\n\n"
        f"```yaml\n{r.to_yaml()}```\n\n" + _scores(f) + "\n" + _found(f)
    )
