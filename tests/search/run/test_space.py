"""The search space: names, sampling, overrides and recipe round trips (no models needed)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from search.config import ConfigError, SpaceConfig
from search.errors import InvalidRecipeError
from search.merge.methods import REGISTRY, validate_recipe
from search.merge.plan import MergePlan
from search.names import short_names
from search.recipe import ModelEntry, Recipe
from search.run.baselines import soup
from search.run.space import METHOD_KEY, Space

BASE = "/models/base"
EXPERTS = ("/models/e1", "/models/e2", "/models/e3")
SHORT = ("e1", "e2", "e3")
NAME = re.compile(r"^(?P<method>[a-z_]+)\.(?:(?P<models>models)|(?P<param>[a-z0-9_]+)"
                  r"(?:\.(?P<model>e1|e2|e3))?(?:@(?P<anchor>\d+))?)$")
TENSORS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight",
           "model.embed_tokens.weight")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(methods: tuple[str, ...], experts: tuple[str, ...] = EXPERTS,
           **kwargs: Any) -> Space:
    return Space.build(SpaceConfig(methods=methods, **kwargs), BASE, experts)


def _study() -> optuna.Study:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))


def _sample(space: Space, n: int) -> list[tuple[dict[str, Any], Recipe]]:
    study = _study()
    out = []
    for _ in range(n):
        trial = study.ask()
        recipe = space.suggest(trial)
        out.append((dict(trial.params), recipe))
        study.tell(trial, 0.0)
    return out


def _replay(space: Space, params: dict[str, Any]) -> Recipe:
    """Enqueues ``params`` into a fresh study and suggests from the trial it asks."""
    study = _study()
    study.enqueue_trial(params)
    return space.suggest(study.ask())


def _resolve(recipe: Recipe) -> None:
    """The per-tensor parameter checks the executors run (method cross-checks included)."""
    MergePlan.build(recipe).resolve_all(list(TENSORS), num_layers=4)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_samples_valid_recipes(method: str) -> None:
    """20 random trials of a one-method space give recipes the merge code accepts."""
    m = REGISTRY[method]
    space = _space((method,))
    specs = {p.name: p for p in m.params}
    for params, recipe in _sample(space, 20):
        assert METHOD_KEY not in params  # one method: no categorical method choice
        assert set(params) == {k for k, _ in space.distributions(method)}
        for key in params:
            match = NAME.match(key)
            assert match, key
            assert match["method"] == method
            assert match["anchor"] is None  # per_layer_anchors=0
            if match["models"]:
                continue
            spec = specs[match["param"]]
            assert spec.search is not None and spec.kind == "float"
            assert (match["model"] is not None) == spec.per_model, key
        assert recipe.merge_method == method
        assert set(recipe.model_names) <= set(EXPERTS)
        assert m.min_models <= len(recipe.models) <= (m.max_models or len(EXPERTS))
        assert recipe.base_model == (None if m.base == "ignored" else BASE)
        assert recipe.seed == (0 if m.random else None)
        validate_recipe(recipe)
        try:
            _resolve(recipe)
        except InvalidRecipeError as exc:
            assert method.startswith("della"), exc
            assert "density ± epsilon" in str(exc)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_params_for_round_trips_sampled_recipes(method: str) -> None:
    """params_for(suggested recipe), enqueued and suggested again, gives the same recipe."""
    space = _space((method,))
    for params, recipe in _sample(space, 5):
        back = space.params_for(recipe)
        assert back is not None
        assert set(back) <= set(params)
        assert all(back[k] == params[k] for k in back)
        assert _replay(space, back).hash() == recipe.hash()


def test_multi_method_space_names_the_method() -> None:
    """With several methods, 'method' is a categorical and only its parameters appear."""
    space = _space(("linear", "ties", "slerp"))
    assert space.has_categorical
    seen = set()
    for params, recipe in _sample(space, 30):
        method = params[METHOD_KEY]
        seen.add(method)
        assert recipe.merge_method == method
        assert all(k.startswith(f"{method}.") for k in params if k != METHOD_KEY)
        back = space.params_for(recipe)
        assert back is not None and back[METHOD_KEY] == method
        assert _replay(space, back).hash() == recipe.hash()
    assert seen == {"linear", "ties", "slerp"}


def test_shared_space_names_what_methods_share_once() -> None:
    """space.shared: weight, lambda and density are one parameter for every method that
    samples them from the same range; della's other density range and slerp's t stay its
    own; every sampled recipe round-trips through params_for."""
    methods = ("linear", "task_arithmetic", "ties", "dare_ties", "della", "slerp")
    space = _space(methods, shared=True)
    names = {m: [n for n, _ in space.distributions(m)] for m in methods}
    assert names["linear"] == ["weight.e1", "weight.e2", "weight.e3"]
    assert names["task_arithmetic"] == [*names["linear"], "lambda"]
    assert names["ties"] == [*names["linear"], "density.e1", "density.e2", "density.e3",
                             "lambda"]
    assert names["dare_ties"] == names["ties"]
    assert "della.density.e1" in names["della"] and "lambda" in names["della"]
    assert names["slerp"] == ["slerp.models", "slerp.t"]
    assert next(n for n, _ in _space(("ties",)).distributions("ties")) == "ties.weight.e1"
    seen = set()
    for _params, recipe in _sample(space, 40):
        seen.add(recipe.merge_method)
        back = space.params_for(recipe)
        assert back is not None and back[METHOD_KEY] == recipe.merge_method
        assert _replay(space, back).hash() == recipe.hash()
    assert len(seen) >= 4


def test_per_layer_anchors() -> None:
    """per_layer_anchors=3: every per-layer float is a list of 3 anchors."""
    space = _space(("ties",), per_layer_anchors=3)
    names = [k for k, _ in space.distributions("ties")]
    assert "ties.weight.e1@0" in names and "ties.weight.e1@2" in names
    assert "ties.lambda@1" in names and "ties.weight.e1" not in names
    assert len(names) == 3 * (3 + 3 + 1)
    for params, recipe in _sample(space, 5):
        anchors = [NAME.match(k) for k in params]
        assert all(m is not None and m["anchor"] in ("0", "1", "2") for m in anchors)
        for entry in recipe.models:
            for key in ("weight", "density"):
                value = entry.parameters[key]
                assert isinstance(value, list) and len(value) == 3
                assert all(isinstance(v, float) for v in value)
        assert len(recipe.parameters["lambda"]) == 3
        validate_recipe(recipe)
        _resolve(recipe)
        back = space.params_for(recipe)
        assert back == params
        assert _replay(space, back).hash() == recipe.hash()


def test_per_layer_params_for_expands_a_scalar() -> None:
    """A scalar value of a seed recipe fills every anchor; a list of another length fails."""
    space = _space(("ties",), per_layer_anchors=3)
    entries = tuple(ModelEntry(e, {"weight": 0.5, "density": 0.5}) for e in EXPERTS)
    recipe = Recipe("ties", entries, BASE, {"lambda": 1.0})
    params = space.params_for(recipe)
    assert params is not None
    assert params["ties.weight.e2@0"] == params["ties.weight.e2@2"] == 0.5
    assert params["ties.lambda@1"] == 1.0
    two = Recipe("ties", entries, BASE, {"lambda": [0.5, 1.0]})
    assert space.params_for(two) is None


@pytest.mark.parametrize("anchors", [0, 1])
def test_one_anchor_is_no_anchor(anchors: int) -> None:
    """per_layer_anchors 0 and 1 both mean one scalar per parameter."""
    space = _space(("ties",), per_layer_anchors=anchors)
    assert all("@" not in k for k, _ in space.distributions("ties"))


def _dists(space: Space, method: str) -> dict[str, Any]:
    return dict(space.distributions(method))


def test_override_narrows_a_range() -> None:
    """params: {density: [0.3, 0.6]} narrows every method's density."""
    space = _space(("ties", "dare_ties"), params={"density": [0.3, 0.6]})
    for method in ("ties", "dare_ties"):
        dist = _dists(space, method)[f"{method}.density.e1"]
        assert isinstance(dist, FloatDistribution)
        assert (dist.low, dist.high) == (0.3, 0.6)
    for _, recipe in _sample(space, 10):
        assert all(0.3 <= e.parameters["density"] <= 0.6 for e in recipe.models)


def test_override_fixes_a_value() -> None:
    """params: {lambda: 1.2} fixes lambda: not sampled, set in the recipe's parameters."""
    space = _space(("ties",), params={"lambda": 1.2})
    assert "ties.lambda" not in _dists(space, "ties")
    for params, recipe in _sample(space, 3):
        assert "ties.lambda" not in params
        assert recipe.parameters["lambda"] == 1.2
        validate_recipe(recipe)


def test_override_per_method() -> None:
    """params: {ties: {density: 0.5}} fixes density for ties only."""
    space = _space(("ties", "dare_ties"), params={"ties": {"density": 0.5}})
    assert not any(".density" in k for k in _dists(space, "ties"))
    assert "dare_ties.density.e1" in _dists(space, "dare_ties")
    for _, recipe in _sample(space, 20):
        if recipe.merge_method == "ties":
            assert recipe.parameters["density"] == 0.5
            assert all("density" not in e.parameters for e in recipe.models)
        else:
            assert "density" not in recipe.parameters
            assert all("density" in e.parameters for e in recipe.models)
        validate_recipe(recipe)


def test_per_method_override_wins_over_global() -> None:
    """A method's own value takes precedence over the global one."""
    space = _space(("ties", "dare_ties"),
                   params={"density": [0.3, 0.6], "ties": {"density": [0.7, 0.8]}})
    ties = _dists(space, "ties")["ties.density.e3"]
    dare = _dists(space, "dare_ties")["dare_ties.density.e3"]
    assert (ties.low, ties.high) == (0.7, 0.8)
    assert (dare.low, dare.high) == (0.3, 0.6)


def test_bool_overrides() -> None:
    """Booleans: [false, true] searches them (categorical), a bool fixes them."""
    searched = _space(("ties",), params={"normalize": [False, True]})
    dist = _dists(searched, "ties")["ties.normalize"]
    assert isinstance(dist, CategoricalDistribution)
    assert searched.has_categorical
    assert {r.parameters["normalize"] for _, r in _sample(searched, 20)} == {False, True}
    fixed = _space(("ties",), params={"normalize": False})
    assert not fixed.has_categorical
    assert all(r.parameters["normalize"] is False for _, r in _sample(fixed, 2))


def test_soup_space_option() -> None:
    """conf/space/soup.yaml's ``normalize: true`` fixes it in every recipe."""
    space = _space(("linear",), params={"normalize": True})
    assert [k for k, _ in space.distributions("linear")] == [f"linear.weight.{s}" for s in SHORT]
    assert all(r.parameters == {"normalize": True} for _, r in _sample(space, 2))


@pytest.mark.parametrize(("params", "needles"), [
    ({"densty": 0.5}, ["space.params.densty", "did you mean 'density'"]),
    ({"gamma": 0.05}, ["space.params.gamma", "no searched method"]),
    ({"density": [0.0, 0.5]}, ["space.params.density", "(0, 1]"]),
    ({"density": [0.5, 1.5]}, ["space.params.density", "[0.5, 1.5]"]),
    ({"density": [0.6, 0.3]}, ["space.params.density", "increasing"]),
    ({"density": [0.3, 0.3]}, ["space.params.density", "increasing"]),
    ({"density": 1.5}, ["space.params.density", "1.5 is outside (0, 1]"]),
    ({"density": [0.2, 0.4, 0.6]}, ["space.params.density", "[low, high]"]),
    ({"density": "abc"}, ["space.params.density", "'abc'"]),
    ({"normalize": 0.5}, ["space.params.normalize", "[false, true]"]),
    ({"ties": 0.5}, ["space.params.ties", "mapping"]),
    ({"dare_ties": {"density": 0.5}}, ["space.params.dare_ties", "did you mean 'ties'"]),
])
def test_bad_overrides(params: Mapping[str, Any], needles: list[str]) -> None:
    """Bad overrides are one-line ConfigErrors that name the parameter."""
    with pytest.raises(ConfigError) as info:
        _space(("ties",), params=params)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("params", [{"ties": {"densty": 0.5}}, {"ties": {"gamma": 0.05}}])
def test_bad_per_method_override_is_rejected(params: Mapping[str, Any]) -> None:
    """A typo inside ``METHOD: {...}`` is as much an error as a top-level one."""
    with pytest.raises(ConfigError, match=r"space\.params\.ties"):
        _space(("ties",), params=params)


@pytest.mark.parametrize(("method", "n"), [("model_stock", 1), ("nuslerp", 1)])
def test_too_few_experts(method: str, n: int) -> None:
    """A method that needs more experts than configured is rejected when built."""
    with pytest.raises(ConfigError, match=f"{method} needs at least 2 experts"):
        _space((method,), experts=EXPERTS[:n])


def test_has_categorical() -> None:
    """Categorical parameters: method choice, model subsets, searched booleans."""
    assert not _space(("ties",)).has_categorical
    assert not _space(("model_stock",)).has_categorical
    assert not _space(("slerp",), experts=EXPERTS[:1]).has_categorical
    assert _space(("ties", "task_arithmetic")).has_categorical
    assert _space(("slerp",)).has_categorical


def test_subset_choices() -> None:
    """A method with max_models < experts chooses among combinations of that size."""
    slerp = _dists(_space(("slerp",)), "slerp")
    assert isinstance(slerp["slerp.models"], CategoricalDistribution)
    assert tuple(slerp["slerp.models"].choices) == SHORT
    nuslerp = _dists(_space(("nuslerp",)), "nuslerp")
    assert tuple(nuslerp["nuslerp.models"].choices) == ("e1+e2", "e1+e3", "e2+e3")
    assert "slerp.models" not in _dists(_space(("slerp",), experts=EXPERTS[:1]), "slerp")
    assert "nuslerp.models" not in _dists(_space(("nuslerp",), experts=EXPERTS[:2]),
                                          "nuslerp")


def test_slerp_params_for_round_trip() -> None:
    """A one-expert slerp recipe maps to its subset choice and back."""
    recipe = Recipe("slerp", (ModelEntry(EXPERTS[1]),), BASE, {"t": 0.3})
    for methods in (("slerp",), ("slerp", "linear")):
        space = _space(methods)
        params = space.params_for(recipe)
        expected = {"slerp.models": "e2", "slerp.t": 0.3}
        if len(methods) > 1:
            expected[METHOD_KEY] = "slerp"
        assert params == expected
        assert _replay(space, params).hash() == recipe.hash()
    two = Recipe("slerp", tuple(ModelEntry(e) for e in EXPERTS[:2]), BASE, {"t": 0.3})
    assert _space(("slerp",)).params_for(two) is None


def test_params_for_single_expert_soup() -> None:
    """A parent alone is the linear space with weight 1 for it and 0 for the others."""
    space = _space(("linear",))
    params = space.params_for(soup([EXPERTS[1]]))
    assert params == {"linear.weight.e1": 0.0, "linear.weight.e2": 1.0, "linear.weight.e3": 0.0}
    again = _replay(space, params)
    assert [e.parameters["weight"] for e in again.models] == [0.0, 1.0, 0.0]
    assert space.params_for(soup(list(EXPERTS))) == {f"linear.weight.{s}": 1.0 for s in SHORT}


@pytest.mark.parametrize("recipe", [
    soup(["/models/other"]),                        # not an expert
    soup([BASE]),                                   # the base alone
    Recipe("ties", tuple(ModelEntry(e, {"weight": 0.5, "density": 0.05}) for e in EXPERTS),
           BASE),                                   # density below the searched range
    Recipe("ties", (ModelEntry(EXPERTS[0], {"weight": 0.5, "density": 0.5}),), BASE),
    Recipe("task_arithmetic", tuple(ModelEntry(e, {"weight": 0.5}) for e in EXPERTS),
           BASE),                                   # method not in the space
])
def test_params_for_inexpressible(recipe: Recipe) -> None:
    """Recipes the space cannot produce give None."""
    assert _space(("linear", "ties")).params_for(recipe) is None


def test_params_for_fixed_value_mismatch() -> None:
    """With lambda fixed at 1.2, a recipe with lambda 0.5 is not in the space."""
    space = _space(("ties",), params={"lambda": 1.2})
    entries = tuple(ModelEntry(e, {"weight": 0.5, "density": 0.5}) for e in EXPERTS)
    assert space.params_for(Recipe("ties", entries, BASE, {"lambda": 0.5})) is None


def test_short_names() -> None:
    """Folder names when unique, else m0, m1…; trailing slashes ignored."""
    assert short_names(["/a/x/", "/b/y"]) == ["x", "y"]
    assert short_names(["/a/model", "/b/model"]) == ["m0", "m1"]
    space = _space(("ties",), experts=("/a/model", "/b/model"))
    assert "ties.weight.m1" in _dists(space, "ties")


def test_plus_in_expert_name() -> None:
    """Subset choices work for any folder name (or the name is rejected up front)."""
    experts = ("/models/a+b", "/models/c", "/models/d")
    try:
        space = _space(("slerp",), experts=experts)
    except ConfigError:
        return
    for choice in _dists(space, "slerp")["slerp.models"].choices:
        recipe = _replay(space, {"slerp.models": choice, "slerp.t": 0.5})
        assert len(recipe.models) == 1


def test_probes_try_each_method_once_at_a_sensible_point() -> None:
    """One probe per method, inside the space: weights 1, lambda at its default 1, a
    density mid-range (its default 1 means no sparsification), slerp's t mid-range."""
    methods = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp", "model_stock")
    space = _space(methods, shared=True, probes=True)
    probes = space.probes()
    assert [r.merge_method for r in probes] == list(methods)
    by = {r.merge_method: r for r in probes}
    assert by["linear"].hash() == soup(EXPERTS).hash()
    assert all(m.parameters["weight"] == 1.0 for m in by["ties"].models)
    assert by["ties"].parameters["lambda"] == 1.0
    assert {m.parameters["density"] for m in by["dare_ties"].models} == {0.55}
    assert by["slerp"].parameters["t"] == 0.5 and len(by["slerp"].models) == 1  # + base
    for recipe in probes:
        validate_recipe(recipe)
        assert space.params_for(recipe) is not None
