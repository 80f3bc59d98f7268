"""Edge cases: tied heads, dtypes, odd tensors, corrupt files, mergekit leniency."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from search.cli import main
from search.errors import InvalidRecipeError, NonFiniteMergeError, SoupError
from search.merge.methods import REGISTRY
from search.merge.plan import MergePlan
from search.merge.resident import ResidentModel, ResidentParents
from search.merge.streaming import MergeOptions, merge_to_disk
from search.recipe import Recipe
from tests.search.merge.test_executors import disk_tensors


@pytest.fixture(scope="module")
def untied_expert(tied_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tune of the tied Qwen2 base that stores its own (different) LM head."""
    src = tied_family["expert_1"]
    out = tmp_path_factory.mktemp("untied") / "expert"
    shutil.copytree(src, out)
    state = load_file(src / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 0.01
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_tied_base_with_an_untied_expert(tied_family: dict[str, Path], untied_expert: Path,
                                         tmp_path: Path) -> None:
    base, e0 = str(tied_family["base"]), str(tied_family["expert_0"])
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": base, "models": [
        {"model": e0, "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": str(untied_expert), "parameters": {"weight": 1.0, "density": 0.5}}]})
    out = merge_to_disk(recipe, tmp_path / "m", MergeOptions(device="cpu"))
    on_disk = disk_tensors(out)
    assert "lm_head.weight" in on_disk  # one parent has its own head: so does the merge
    assert not torch.equal(on_disk["lm_head.weight"], on_disk["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = ResidentModel(ResidentParents([base, e0, str(untied_expert)], device="cpu"))
    state = model.materialize(recipe).state_dict()
    for name, t in on_disk.items():
        assert torch.equal(state[name], t), name
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.lm_head.weight, on_disk["lm_head.weight"])


def test_all_methods_on_bf16_and_zero_dim_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    for m in REGISTRY.values():
        n = max(m.min_models, min(2, m.max_models or 2))
        params = {p.name: p.default for p in m.params}
        for p in m.params:
            if p.per_model:
                params[p.name] = (0.5 if p.name in ("weight", "density") else
                                  0.1 if p.name == "epsilon" else p.default,) * n
        if "t" in params:
            params["t"] = 0.5
        for shape in ((), (7,), (3, 5)):
            for dtype in (torch.bfloat16, torch.float16):
                x = torch.randn((n, *shape), generator=g).to(dtype)
                base = None if m.base == "ignored" else torch.randn(shape, generator=g).to(dtype)
                kw = {"generator": torch.Generator().manual_seed(1)} if m.random else {}
                out = m.fn(x, base=base, **kw, **params)
                assert out.shape == shape and out.dtype == dtype, m.name


def test_fp16_dare_rescale_does_not_overflow() -> None:
    fn = REGISTRY["dare_linear"].fn
    x = torch.full((1, 300_000), 0.5, dtype=torch.float16)
    out = fn(x, base=torch.zeros(300_000, dtype=torch.float16), weight=(1.0,), density=(0.5,),
             rescale=True, normalize=False, int8_mask=False, generator=torch.Generator(),
             **{"lambda": 1.0})
    assert torch.isfinite(out).all()
    assert abs(float(out.float().sum()) - 150_000) < 1500


def test_rescale_applies_to_ties_too() -> None:
    fn = REGISTRY["ties"].fn
    x = torch.tensor([[4.0, 1.0, -2.0, 3.0]])
    common = {"weight": (1.0,), "density": (0.5,), "normalize": False, "int8_mask": False,
              "lambda": 1.0}
    plain = fn(x, base=torch.zeros(4), rescale=False, **common)
    scaled = fn(x, base=torch.zeros(4), rescale=True, **common)
    assert plain.tolist() == [4.0, 0.0, 0.0, 3.0]
    torch.testing.assert_close(scaled, plain * (10 / 7))


def test_params_of_other_methods_are_ignored_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    r = Recipe.from_yaml("merge_method: model_stock\nbase_model: b\nmodels:\n"
                         "  - {model: a, parameters: {weight: 0.5}}\n  - {model: c}\n"
                         "dtype: torch.bfloat16\n")
    with caplog.at_level(logging.WARNING):
        MergePlan.build(r)
    assert "model_stock does not use 'weight'; ignored" in caplog.text
    assert r.dtype == "bfloat16"
    with pytest.raises(InvalidRecipeError, match="did you mean 'filter_wise'"):
        MergePlan.build(r.with_changes(parameters={"filterwise": True}))
    with pytest.raises(InvalidRecipeError, match="chat_template is not supported"):
        MergePlan.build(r.with_changes(chat_template="chatml"))


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


def test_corrupt_files_give_one_line(capsys: pytest.CaptureFixture[str],
                                     family: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(family["expert_0"], bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    recipe = tmp_path / "r.yaml"
    Recipe.from_dict({"merge_method": "ties", "base_model": str(family["base"]), "models": [
        {"model": str(bad), "parameters": {"weight": 1}}]}).save(recipe)
    code, err = _run(capsys, "merge", recipe, tmp_path / "o")
    assert code == 2 and err.count("\n") == 0 and "corrupt safetensors header" in err
    (bad / "model.safetensors").write_bytes((family["expert_0"] / "model.safetensors")
                                            .read_bytes()[:-100])
    code, err = _run(capsys, "merge", recipe, tmp_path / "o")
    assert code == 2 and err.count("\n") == 0 and "past the end of the file" in err
    shutil.copy(family["expert_0"] / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text("{oops")
    code, err = _run(capsys, "merge", recipe, tmp_path / "o")
    assert code == 2 and "config.json is not valid JSON" in err
    recipe.write_bytes(b"merge_method: \xff\xfe\n")
    code, err = _run(capsys, "merge", recipe, tmp_path / "o")
    assert code == 2 and "cannot be read as UTF-8" in err
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_a_parent(family: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "expert"
    shutil.copytree(family["expert_0"], copy)
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": str(family["base"]),
                               "models": [{"model": str(copy), "parameters": {"weight": 1}}]})
    with pytest.raises(SoupError, match="holds parent"):
        merge_to_disk(recipe, copy, MergeOptions(device="cpu", force=True))
    assert (copy / "model.safetensors").is_file()


def test_different_tokenizers_are_refused(family: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(family["expert_0"], other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": str(family["base"]),
                               "models": [{"model": str(other), "parameters": {"weight": 1}}]})
    with pytest.raises(SoupError, match="different tokenizers"):
        merge_to_disk(recipe, tmp_path / "o", MergeOptions(device="cpu"))


def test_overflow_in_out_dtype_is_caught(family: dict[str, Path], tmp_path: Path) -> None:
    recipe = Recipe.from_dict({"merge_method": "linear", "out_dtype": "float16",
                               "parameters": {"normalize": False},
                               "models": [{"model": str(family["expert_0"]),
                                           "parameters": {"weight": 1e7}}]})
    with pytest.raises(NonFiniteMergeError, match=r"overflows torch\.float16"):
        merge_to_disk(recipe, tmp_path / "o", MergeOptions(device="cpu"))
