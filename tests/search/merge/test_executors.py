"""The streaming (disk) and resident (in-memory) executors agree bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from search.merge.methods import REGISTRY
from search.merge.resident import ResidentModel, ResidentParents
from search.merge.streaming import MergeOptions, merge_to_disk
from search.recipe import Recipe


def recipe_for(method: str, fam: dict[str, Path], **global_params: Any) -> Recipe:
    """A non-trivial recipe of ``method`` over the family, with per-layer values."""
    m = REGISTRY[method]
    n = max(m.min_models, min(3, m.max_models or 3))
    experts = [str(fam[f"expert_{i}"]) for i in range(n)]
    per_model: list[dict[str, Any]] = []
    for i in range(n):
        p: dict[str, Any] = {}
        if m.spec("weight"):
            p["weight"] = [0.3 + 0.2 * i, 0.9 - 0.1 * i]  # gradient across depth
        if m.spec("density"):
            p["density"] = [{"filter": "self_attn", "value": 0.4}, {"value": 0.6}]
        if m.spec("epsilon"):
            p["epsilon"] = 0.1
        per_model.append(p)
    params: dict[str, Any] = dict(global_params)
    if m.spec("t"):
        params["t"] = [0.2, 0.7]
    if m.spec("lambda"):
        params["lambda"] = 0.9
    data = {"merge_method": method, "models": [
        {"model": e, "parameters": p} for e, p in zip(experts, per_model, strict=False)]}
    if m.base != "ignored":
        data["base_model"] = str(fam["base"])
    if params:
        data["parameters"] = params
    data["seed"] = 5
    return Recipe.from_dict(data)


def disk_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / f))
    assert set(out) == set(index["weight_map"])
    return out


@pytest.fixture(scope="module")
def resident(family: dict[str, Path]) -> ResidentModel:
    models = [str(family["base"])] + [str(family[f"expert_{i}"]) for i in range(3)]
    return ResidentModel(ResidentParents(models, device="cpu"))


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_streaming_equals_resident(method: str, family: dict[str, Path], resident: ResidentModel,
                                   tmp_path: Path) -> None:
    recipe = recipe_for(method, family)
    out = merge_to_disk(recipe, tmp_path / "merged", MergeOptions(device="cpu"))
    on_disk = disk_tensors(out)
    model = resident.materialize(recipe)
    state = model.state_dict()
    assert set(on_disk) <= set(state)
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), f"{method}: {name} differs"
    # and the merge did something: not equal to the base
    base = load_file(family["base"] / "model.safetensors")
    assert any(not torch.equal(base[n], on_disk[n]) for n in base)


def test_output_folder_is_a_loadable_model(family: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe_for("ties", family).with_changes(dtype="bfloat16")
    out = merge_to_disk(recipe, tmp_path / "m", MergeOptions(device="cpu",
                                                             max_shard_bytes=20_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    for name, t in disk_tensors(out).items():
        assert torch.equal(model.state_dict()[name], t)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("12+34=")["input_ids"]) == "12+34="
    assert Recipe.load(out / "recipe.yaml").hash() == recipe.hash()
    card = (out / "README.md").read_text()
    assert "ties" in card and recipe.hash() in card and str(family["expert_0"]) in card
    assert (out / "generation_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tied_embeddings_round_trip(tied_family: dict[str, Path], tmp_path: Path) -> None:
    models = [str(tied_family["base"]), str(tied_family["expert_0"]), str(tied_family["expert_1"])]
    recipe = Recipe.from_dict({
        "merge_method": "dare_ties", "base_model": models[0], "seed": 1,
        "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}}
                   for m in models[1:]]})
    out = merge_to_disk(recipe, tmp_path / "m", MergeOptions(device="cpu"))
    on_disk = disk_tensors(out)
    assert "lm_head.weight" not in on_disk
    model = ResidentModel(ResidentParents(models, device="cpu")).materialize(recipe)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for name, t in on_disk.items():
        assert torch.equal(model.state_dict()[name], t)


def test_resident_reuses_buffers_without_growth(family: dict[str, Path],
                                                resident: ResidentModel) -> None:
    ptrs = {n: t.data_ptr() for n, t in resident.targets.items()}
    recipes = [recipe_for(m, family) for m in ("linear", "ties", "dare_ties", "slerp")]
    import gc

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096

    for r in recipes * 5:  # warm up allocator caches
        resident.materialize(r)
    gc.collect()
    before = rss()
    for r in recipes * 50:
        resident.materialize(r)
    gc.collect()
    assert rss() - before < 8 * 1024 * 1024
    assert {n: t.data_ptr() for n, t in resident.targets.items()} == ptrs


def test_resident_rejects_unknown_parent(family: dict[str, Path], resident: ResidentModel) -> None:
    from search.errors import SoupError

    recipe = recipe_for("linear", family).with_changes(
        models=(*recipe_for("linear", family).models[:1],
                *Recipe.from_yaml("merge_method: linear\nmodels: [{model: /elsewhere, "
                                      "parameters: {weight: 1}}]").models))
    with pytest.raises(SoupError, match="not a resident parent"):
        resident.materialize(recipe)


def test_resident_dtype_cast_matches_streaming(family: dict[str, Path],
                                               tmp_path: Path) -> None:
    """A recipe asking for bfloat16 output gives the same tensors both ways."""
    models = [str(family["base"])] + [str(family[f"expert_{i}"]) for i in range(3)]
    res = ResidentModel(ResidentParents(models, device="cpu"), dtype="bfloat16")
    recipe = recipe_for("task_arithmetic", family).with_changes(out_dtype="bfloat16")
    on_disk = disk_tensors(merge_to_disk(recipe, tmp_path / "m", MergeOptions(device="cpu")))
    state = res.materialize(recipe).state_dict()
    for name, t in on_disk.items():
        assert t.dtype == torch.bfloat16 and torch.equal(state[name], t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_cuda_streaming_equals_resident(method: str, family: dict[str, Path],
                                        tmp_path: Path) -> None:
    models = [str(family["base"])] + [str(family[f"expert_{i}"]) for i in range(3)]
    res = ResidentModel(ResidentParents(models, device="cuda"))
    recipe = recipe_for(method, family)
    on_disk = disk_tensors(merge_to_disk(recipe, tmp_path / "m", MergeOptions(device="cuda")))
    state = res.materialize(recipe).state_dict()
    for name, t in on_disk.items():
        assert torch.equal(state[name].cpu(), t), f"{method}: {name}"
    cpu = disk_tensors(merge_to_disk(recipe, tmp_path / "c", MergeOptions(device="cpu")))
    for name, t in on_disk.items():
        if not REGISTRY[method].random:  # RNG streams differ across devices
            torch.testing.assert_close(t, cpu[name], rtol=1e-5, atol=1e-6)


def test_device_names_resolve_or_fail_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto falls back to the CPU without CUDA; asking for CUDA then says how to fix it,
    for both the search's config key and the merge/export flag."""
    from search.errors import SoupError
    from search.merge.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SoupError, match=r"'cuda:1' requested but CUDA is not available.*"
                                        r"models\.device=auto.*--device auto"):
        resolve_device("cuda:1")
