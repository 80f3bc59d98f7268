"""Short model names: one rule, known answers."""

from __future__ import annotations

import pytest

from search.names import folder_name, name_map, short_names


@pytest.mark.parametrize(("models", "names"), [
    (["/a/x/", "/b/y"], ["x", "y"]),                                  # trailing slash
    (["org/expert_a", "/m/expert_b"], ["expert_a", "expert_b"]),      # hub id and path
    (["/m/base+/m/lora_add", "/m/base+/m/lora_dup"], ["lora_add", "lora_dup"]),  # adapters
    (["org/base+org/lora_a", "/m/e"], ["lora_a", "e"]),               # hub adapter
    (["/a/checkpoint", "/b/checkpoint"], ["m0", "m1"]),               # clash
    (["/m/a+b", "/m/c"], ["m0", "m1"]),                               # '+' in a folder name
    (["base+lora", "/m/c"], ["m0", "m1"]),                            # adapter without folders
    (["/m/e"], ["e"]),
    ([], []),
])
def test_short_names(models: list[str], names: list[str]) -> None:
    assert short_names(models) == names


def test_folder_name() -> None:
    assert folder_name("/m/x//") == "x"
    assert folder_name("/") == "/"
    assert folder_name("x") == "x"


def test_name_map_keeps_the_space_names_and_names_the_rest_uniquely() -> None:
    experts = ["/a/model", "/b/model"]
    names = name_map(experts, ["/m/base", "/a/model", "/s/model", "/t/m2", "/u/m3"])
    assert names == {"/a/model": "m0", "/b/model": "m1", "/m/base": "base",
                     "/s/model": "m3", "/t/m2": "m2", "/u/m3": "m5"}
    assert [names[e] for e in experts] == short_names(experts)
    assert len(set(names.values())) == len(names)


def test_name_map_without_experts() -> None:
    """Models named only from recipes (a study without search metadata) stay unique."""
    assert name_map([], ["/x/e", "/y/e", "/m/base+/m/lora"]) == {
        "/x/e": "e", "/y/e": "m1", "/m/base+/m/lora": "lora"}
    assert name_map(["/x/e"], ["/m/a+b"]) == {"/x/e": "e", "/m/a+b": "m1"}
