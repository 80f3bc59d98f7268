"""Display symbols and left-out values are declared by the methods' parameter specs."""

from __future__ import annotations

from search.merge.methods import REGISTRY, param_spec
from search.merge.spec import ParamSpec


def test_same_name_same_symbol_and_left_out() -> None:
    """Methods that share a parameter name show it alike and leave a model out alike."""
    seen: dict[str, ParamSpec] = {}
    for method in REGISTRY.values():
        for spec in method.params:
            first = seen.setdefault(spec.name, spec)
            assert (spec.label, spec.left_out) == (first.label, first.left_out), \
                (method.name, spec.name)


def test_known_symbols() -> None:
    labels = {name: param_spec("ties", name) for name in ("weight", "density", "lambda")}
    assert {k: s.label for k, s in labels.items() if s} == {
        "weight": "w", "density": "d", "lambda": "λ"}
    assert param_spec("della", "epsilon").label == "ε"  # type: ignore[union-attr]
    assert param_spec("breadcrumbs", "gamma").label == "γ"  # type: ignore[union-attr]
    assert param_spec("slerp", "t").label == "t"  # type: ignore[union-attr]
    assert param_spec("ties", "normalize").label == "normalize"  # type: ignore[union-attr]


def test_left_out_only_where_a_value_drops_a_model() -> None:
    """weight 0 leaves a model out; no value of density, gamma or epsilon does."""
    left = {(m.name, s.name): s.left_out for m in REGISTRY.values() for s in m.params
            if s.left_out is not None}
    assert set(left.values()) == {0.0}
    assert {name for _, name in left} == {"weight"}
    assert all(REGISTRY[m].spec(n).per_model for m, n in left)  # type: ignore[union-attr]


def test_param_spec_falls_back_to_any_method() -> None:
    """A parameter the recipe's method ignores, or an unknown method, still has a label."""
    assert param_spec("ties", "epsilon") is not None  # ties has no epsilon
    assert param_spec("gone_method", "lambda").label == "λ"  # type: ignore[union-attr]
    assert param_spec("ties", "nothing") is None


def test_normalizes() -> None:
    """The methods that divide by the sum of the weights, with normalize on."""
    assert REGISTRY["linear"].normalizes({})
    assert not REGISTRY["linear"].normalizes({"normalize": False})
    assert not REGISTRY["task_arithmetic"].normalizes({})
    assert REGISTRY["task_arithmetic"].normalizes({"normalize": True})
    assert not REGISTRY["ties"].normalizes({"normalize": True})  # divides by agreeing ones
    assert not REGISTRY["model_stock"].normalizes({})
