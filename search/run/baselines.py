"""Baselines: each parent alone, the uniform soup, and the greedy soup.

The greedy soup (Wortsman et al., 2022) sorts the experts by their score alone and adds
each, in that order, to a running uniform average only if the average's score strictly
improves. Here it is a pure function of the scores already stored: :func:`greedy_step`
returns the next soup to evaluate, or the finished soup, so a resumed driver (or a
second one) continues it from storage.

Example:
    >>> soup(["a", "b"]).to_dict()
    {'merge_method': 'linear', 'models': [{'model': 'a', 'parameters': {'weight': 1.0}}, \
{'model': 'b', 'parameters': {'weight': 1.0}}]}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from search.errors import SoupError
from search.recipe import ModelEntry, Recipe

PARENT, BASE, UNIFORM, GREEDY, GREEDY_STEP, SEED, PROBE = (
    "parent", "base", "uniform_soup", "greedy_soup", "greedy_step", "seed", "probe")


def soup(models: Sequence[str], dtype: str | None = None) -> Recipe:
    """The uniform average of ``models`` (a plain model soup)."""
    return Recipe("linear", tuple(ModelEntry(m, {"weight": 1.0}) for m in models), dtype=dtype)


def initial(base: str, experts: Sequence[str], dtype: str | None = None
            ) -> list[tuple[str, Recipe]]:
    """The baselines that need no other score: the base, each expert, the uniform soup."""
    uniform = [(UNIFORM, soup(experts, dtype))] if len(experts) > 1 else []
    return [(BASE, soup([base], dtype)), *((PARENT, soup([e], dtype)) for e in experts), *uniform]


@dataclass(frozen=True)
class GreedyState:
    """Where the greedy soup stands.

    Attributes:
        next: the soup to evaluate next, or ``None``.
        done: the greedy soup is final.
        ingredients: the experts in the soup so far.
        recipe: the soup of ``ingredients``.
        score: its score (``None`` while the parents are not all scored).
    """

    next: Recipe | None
    done: bool
    ingredients: tuple[str, ...]
    recipe: Recipe | None
    score: float | None


def greedy_step(experts: Sequence[str], score_of: Callable[[Recipe], float | None],
                dtype: str | None = None) -> GreedyState:
    """Advances the greedy soup as far as stored scores allow.

    ``score_of(recipe)`` gives a finished evaluation's objective, or ``None`` if the
    recipe has not been scored (or failed).
    """
    alone = {e: score_of(soup([e], dtype)) for e in experts}
    if any(v is None for v in alone.values()):
        return GreedyState(None, False, (), None, None)
    ranked = sorted(experts, key=lambda e: (-float(alone[e]), experts.index(e)))  # type: ignore[arg-type]
    ingredients = [ranked[0]]
    best = float(alone[ranked[0]])  # type: ignore[arg-type]
    for cand in ranked[1:]:
        trial = soup([e for e in experts if e in (*ingredients, cand)], dtype)
        value = score_of(trial)
        if value is None:
            return GreedyState(trial, False, tuple(ingredients), None, best)
        if value > best:
            ingredients.append(cand)
            best = value
    ordered = [e for e in experts if e in ingredients]
    return GreedyState(None, True, tuple(ordered), soup(ordered, dtype), best)


def load_seeds(paths: Sequence[str], parents: Sequence[str]) -> list[tuple[str, Recipe]]:
    """The user's seed recipe files (config ``seeds``), read and checked, in order.

    Model paths are resolved as ``models.*`` are (relative to the working folder), so a
    recipe over the parents' folders names them exactly. Each recipe must pass the
    driver's validation and merge only ``parents`` (the workers hold no other model);
    otherwise :class:`SoupError` names the seed, before the search starts.
    """
    from search.config import model_ref
    from search.merge.plan import MergePlan

    out = []
    for i, path in enumerate(paths):
        where = f"seeds[{i}] {path}"
        try:
            raw = Recipe.load(path)
            recipe = raw.with_changes(
                models=tuple(ModelEntry(model_ref(m.model), m.parameters) for m in raw.models),
                base_model=model_ref(raw.base_model) if raw.base_model else None)
            plan = MergePlan.build(recipe)
        except SoupError as exc:
            raise SoupError(f"{where}: {exc}") from None
        strangers = [m for m in plan.models if m not in parents]
        if strangers:
            raise SoupError(f"{where}: model {strangers[0]!r} is not a parent of this run; "
                            "a seed may merge only models.base and models.experts, named by "
                            f"their paths ({', '.join(parents)})")
        out.append((str(path), recipe))
    return out
