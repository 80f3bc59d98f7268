"""Recipes (YAML, canonical hash, plan resolution) and per-layer values."""

from __future__ import annotations

import pytest

from search.errors import InvalidRecipeError
from search.merge import layers
from search.merge.plan import MergePlan, tensor_seed
from search.recipe import Recipe, RecipeError

TIES = """
merge_method: ties
base_model: base
models:
  - model: base
  - model: a
    parameters:
      weight: [0.0, 1.0]
      density: [{filter: self_attn, value: 0.3}, {value: 0.7}]
  - model: b
    parameters: {weight: 1}
parameters: {lambda: 0.8, density: 0.5}
dtype: float32
seed: 11
"""


def test_yaml_round_trip_and_hash() -> None:
    r = Recipe.from_yaml(TIES)
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r
    assert again.hash() == r.hash()
    assert r.models[2].parameters == {"weight": 1.0}  # ints become floats


def test_hash_ignores_key_order_and_int_float() -> None:
    a = Recipe.from_yaml("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}},"
                         " {model: y, parameters: {weight: 2}}]\nparameters: {normalize: true}\n")
    b = Recipe.from_yaml("parameters: {normalize: true}\nmodels: [{parameters: {weight: 1.0},"
                         " model: x}, {model: y, parameters: {weight: 2.0}}]\n"
                         "merge_method: linear\n")
    assert a.hash() == b.hash()
    c = a.with_changes(models=tuple(reversed(a.models)))
    assert c.hash() != a.hash()  # order matters (slerp, nuslerp)


@pytest.mark.parametrize("text,msg", [
    ("merge_method: ties\n", "'models' must be a non-empty list"),
    ("models: [{model: a}]\n", "'merge_method' is missing"),
    ("merge_method: ties\nslices: []\nmodels: [{model: a}]\n", "'slices:'"),
    ("merge_method: ties\nmodels: [{model: a}]\nfoo: 1\n", "unknown key(s) ['foo']"),
    ("merge_method: ties\nmodels: [{model: a}]\ndtype: int3\n", "dtype 'int3'"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: [1, {x: 1}]}}]\n",
     "a list must hold only numbers"),
    ("merge_method: ties\nmodels: [{model: a}]\nparameters: {weight: .nan}\n", "not finite"),
    ("merge_method: [\n", "not valid YAML"),
])
def test_malformed_recipes(text: str, msg: str) -> None:
    with pytest.raises(RecipeError, match=None) as info:
        Recipe.from_yaml(text)
    assert msg in str(info.value)


def test_depth_and_layer_index() -> None:
    assert layers.layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layers.layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layers.layer_index("model.embed_tokens.weight") is None
    assert layers.depth("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layers.depth("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layers.depth("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    # embeddings, final norm and head take the first value (mergekit 0.1.5)
    assert layers.depth("model.norm.weight", 5) == 0.0
    assert layers.depth("lm_head.weight", 5) == 0.0


def test_gradient_interpolation_and_filters() -> None:
    grad = [0.0, 1.0, 0.0]
    assert layers.evaluate(grad, "x", 0.0) == 0.0
    assert layers.evaluate(grad, "x", 0.25) == 0.5
    assert layers.evaluate(grad, "x", 0.5) == 1.0
    assert layers.evaluate(grad, "x", 1.0) == 0.0
    conds = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.4}]
    assert layers.evaluate(conds, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert layers.evaluate(conds, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.4
    assert layers.evaluate(conds, "model.norm.weight", 0.5) is None
    assert layers.evaluate([{"filter": "*", "value": 3.0}], "anything", 0.0) == 3.0


def test_plan_resolves_per_model_global_and_layers() -> None:
    plan = MergePlan.build(Recipe.from_yaml(TIES))
    assert plan.inputs == ("a", "b") and plan.base == "base"
    p = plan.params_for("model.layers.1.self_attn.q_proj.weight", 1.0)
    assert p["weight"] == (1.0, 1.0)
    assert p["density"] == (0.3, 0.5)  # model filter, then global fallback
    assert p["lambda"] == 0.8 and p["normalize"] is True
    p = plan.params_for("model.layers.0.mlp.up_proj.weight", 0.0)
    assert p["weight"] == (0.0, 1.0) and p["density"] == (0.7, 0.5)


def test_linear_averages_an_unlisted_base_last() -> None:
    r = Recipe.from_yaml("merge_method: linear\nbase_model: base\nmodels: [{model: a}]\n"
                         "parameters: {weight: 1}\n")
    plan = MergePlan.build(r)
    assert plan.inputs == ("a", "base") and plan.base is None


@pytest.mark.parametrize("text,msg", [
    ("merge_method: tie\nbase_model: b\nmodels: [{model: a}]\n", "did you mean 'ties'"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n", "needs 'base_model'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, "
     "density: 0}}]\n", "0 is outside (0, 1]"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, "
     "density: 1.5}}]\n", "1.5 is outside (0, 1]"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, "
     "density: [0.5, 1.2]}}]\n", "1.2 is outside"),
    ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}]\nparameters: {t: 1.5}\n",
     "1.5 is outside [0, 1]"),
    ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}]\n", "needs parameter 't'"),
    ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: c}]\nparameters: {t: 0.5}\n",
     "exactly 1 model"),
    ("merge_method: slerp\nbase_model: b\nmodels: [{model: a, parameters: {t: 0.5}}]\n",
     "t is global for slerp"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\n", "needs parameter 'weight'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, "
     "densty: 0.5}}]\n", "did you mean 'density'"),
    ("merge_method: linear\nmodels: [{model: a}, {model: a}]\nparameters: {weight: 1}\n",
     "listed twice"),
    ("merge_method: model_stock\nbase_model: b\nmodels: [{model: a}]\n", "at least 2"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\n"
     "parameters: {normalize: [true, false]}\n", "cannot vary per layer"),
])
def test_invalid_recipes(text: str, msg: str) -> None:
    with pytest.raises(InvalidRecipeError) as info:
        MergePlan.build(Recipe.from_yaml(text))
    assert msg in str(info.value)


@pytest.mark.parametrize("text,msg", [
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, "
     "{model: b, parameters: {weight: -1}}]\n", "weights sum to 0"),
    ("merge_method: della\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, "
     "density: 0.9, epsilon: 0.2}}]\n", "density ± epsilon must lie inside (0, 1)"),
])
def test_invalid_per_tensor_values(text: str, msg: str) -> None:
    plan = MergePlan.build(Recipe.from_yaml(text))
    with pytest.raises(InvalidRecipeError) as info:
        plan.resolve_all(["model.layers.0.mlp.up_proj.weight"], 2)
    assert msg in str(info.value)


def test_tensor_seed_is_stable_and_distinct() -> None:
    assert tensor_seed(0, "a") == tensor_seed(0, "a")
    assert len({tensor_seed(0, "a"), tensor_seed(1, "a"), tensor_seed(0, "b")}) == 3
