"""LoRA adapters as parents: the same tensors as PEFT's own merge, for every method,
and one clear error for every adapter that cannot be a parent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from search import config
from search.cli import main
from search.errors import AdapterError, SoupError
from search.merge.methods import REGISTRY
from search.merge.resident import ResidentModel, ResidentParents
from search.merge.sources import open_model
from search.merge.streaming import MergeOptions, merge_to_disk
from search.recipe import Recipe
from tests.search.merge.test_executors import disk_tensors, recipe_for

pytest.importorskip("peft")
PARENTS = ("base", "expert_0", "expert_1", "expert_2")


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base, a full expert, and LoRA / DoRA+rsLoRA / embedding adapters, each
    also merged into a full checkpoint by PEFT."""
    from tests.families import save_lora_family

    return save_lora_family(tmp_path_factory.mktemp("lora"))


def _families(lora: dict[str, Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same parents twice: as adapters on the base, and as PEFT-merged checkpoints."""
    base = str(lora["base"])
    adapters = {"base": lora["base"], "expert_0": f"{base}+{lora['lora']}",
                "expert_1": f"{base}+{lora['dora']}", "expert_2": lora["expert_0"]}
    full = {"base": lora["base"], "expert_0": lora["lora_full"],
            "expert_1": lora["dora_full"], "expert_2": lora["expert_0"]}
    return adapters, full


@pytest.fixture(scope="module")
def residents(lora: dict[str, Path]) -> tuple[ResidentModel, ResidentModel]:
    adapters, full = _families(lora)
    return (ResidentModel(ResidentParents([str(adapters[k]) for k in PARENTS], device="cpu")),
            ResidentModel(ResidentParents([str(full[k]) for k in PARENTS], device="cpu")))


@pytest.mark.parametrize("variant", ["lora", "dora", "embed"])
def test_adapter_parent_reads_exactly_like_peft_merge(variant: str,
                                                      lora: dict[str, Path]) -> None:
    adapted = open_model(f"{lora['base']}+{lora[variant]}")
    full = open_model(str(lora[f"{variant}_full"]))
    base = open_model(str(lora["base"]))
    assert set(adapted.shapes) == set(full.shapes)
    changed = 0
    for name in full.shapes:
        assert torch.equal(adapted.read(name), full.read(name)), name
        changed += not torch.equal(base.read(name), full.read(name))
    assert changed >= 3  # the adapter really changes tensors


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_gives_the_tensors_of_the_merged_checkpoints(
        method: str, lora: dict[str, Path], residents: tuple[ResidentModel, ResidentModel],
        tmp_path: Path) -> None:
    """Adapters mixed with a full expert: resident and streaming merges equal the same
    recipe over PEFT-merged full checkpoints, tensor for tensor."""
    adapters, full = _families(lora)
    with_adapters, with_full = residents
    expected = {k: v.clone() for k, v in
                with_full.materialize(recipe_for(method, full)).state_dict().items()}
    got = with_adapters.materialize(recipe_for(method, adapters)).state_dict()
    on_disk = disk_tensors(merge_to_disk(recipe_for(method, adapters), tmp_path / "m",
                                         MergeOptions(device="cpu")))
    for name, tensor in on_disk.items():
        assert torch.equal(tensor, expected[name]), f"{method} streaming: {name}"
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{method} resident: {name}"
    base = load_file(lora["base"] / "model.safetensors")
    assert any(not torch.equal(base[n], on_disk[n]) for n in base)


def test_resident_adapters_hold_factors_not_full_copies(
        residents: tuple[ResidentModel, ResidentModel]) -> None:
    with_adapters, with_full = residents
    stack = with_adapters.parents.stacks["model.layers.0.self_attn.q_proj.weight"]
    assert stack.shape[0] == 2  # base and the full expert; adapters are factors only
    assert with_adapters.parents.nbytes < 0.6 * with_full.parents.nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fan_in_fan_out_biases_and_half_precision(dtype: torch.dtype, tmp_path: Path) -> None:
    """GPT-2 (Conv1D, fan_in_fan_out) with trained biases and lora_bias, in bf16 too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from search.demo.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2")).to(dtype)
    model.save_pretrained(tmp_path / "base")
    for name, kw in {"bias_all": {"bias": "all"}, "lora_bias": {"lora_bias": True}}.items():
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype),
            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                       fan_in_fan_out=True, init_lora_weights=False, **kw))
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if p.requires_grad and pname.endswith("bias"):
                    p.add_(0.05)
        peft_model.save_pretrained(tmp_path / name)
        peft_model.merge_and_unload().save_pretrained(tmp_path / f"{name}_full")
        adapted = open_model(f"{tmp_path / 'base'}+{tmp_path / name}")
        full = open_model(str(tmp_path / f"{name}_full"))
        for t in full.shapes:
            assert torch.equal(adapted.read(t), full.read(t)), f"{name}: {t}"
        bias = "transformer.h.0.attn.c_attn.bias"
        assert not torch.equal(full.read(bias), open_model(str(tmp_path / "base")).read(bias))


# --------------------------------------------------------------------------- bad input


def _copy(lora: dict[str, Path], tmp_path: Path, variant: str = "lora", **changes: Any) -> Path:
    folder = tmp_path / f"{variant}_copy"
    shutil.copytree(lora[variant], folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(("changes", "message"), [
    ({"peft_type": "PROMPT_TUNING"}, "virtual prompt tokens, not a change of the model's"),
    ({"peft_type": "P_TUNING"}, "has no task vector to merge"),
    ({"peft_type": "PREFIX_TUNING"}, "virtual prompt tokens"),
    ({"peft_type": "IA3"}, "multiplicative scaling vectors"),
    ({"peft_type": "LOHA"}, "peft_type LOHA; soupsearch reads LoRA adapters"),
    ({"use_qalora": True}, "sets use_qalora: QA-LoRA"),
    ({"base_model_name_or_path": "someone/other-model"},
     "was trained on 'someone/other-model'"),
])
def test_unsupported_or_foreign_adapters(changes: dict[str, Any], message: str,
                                         lora: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(lora, tmp_path, **changes)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(")) as err:
        open_model(f"{lora['base']}+{folder}")
    assert "\n" not in str(err.value)


def test_same_base_under_another_name_is_accepted(lora: dict[str, Path],
                                                  tmp_path: Path) -> None:
    folder = _copy(lora, tmp_path, base_model_name_or_path="someorg/base")
    assert open_model(f"{lora['base']}+{folder}").adapter.updates


def test_adapter_of_another_architecture_or_size(lora: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from search.demo.tiny import tiny_config

    for name, cfg, target, message in [
        ("wide", tiny_config("llama", hidden=64), ["q_proj"], "shape \\[64, 64\\] but it is"),
        ("gpt2", tiny_config("gpt2"), ["c_attn"], "which .* does not have"),
    ]:
        torch.manual_seed(1)
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                                    LoraConfig(r=2, target_modules=target,
                                               fan_in_fan_out=name == "gpt2"))
        peft_model.save_pretrained(tmp_path / name)
        with pytest.raises(AdapterError, match=message):
            open_model(f"{lora['base']}+{tmp_path / name}")


def test_adapter_folder_alone_pickle_and_syntax(lora: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"is a PEFT adapter .* BASE\+ADAPTER"):
        open_model(str(lora["lora"]))
    with pytest.raises(AdapterError, match="both parts non-empty"):
        open_model(f"{lora['base']}+")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(lora["lora"] / "adapter_config.json", pickled)
    torch.save(load_file(lora["lora"] / "adapter_model.safetensors"),
               pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"only has pickle weights .*--allow-pickle"):
        open_model(f"{lora['base']}+{pickled}")
    allowed = open_model(f"{lora['base']}+{pickled}", allow_pickle=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(allowed.read(name), open_model(str(lora["lora_full"])).read(name))


# --------------------------------------------------------------------------- recipes, CLI, config


def test_mergekit_plus_syntax_through_soup_merge(lora: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A recipe YAML with ``model: BASE+ADAPTER`` reads, writes back unchanged, and
    ``soup merge`` produces the merge of the PEFT-merged checkpoints."""
    ref = f"{lora['base']}+{lora['embed']}"
    text = yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(lora["base"]),
                           "models": [{"model": ref, "parameters": {"weight": 0.7}},
                                      {"model": str(lora["expert_0"]),
                                       "parameters": {"weight": 0.5}}]})
    recipe = Recipe.from_yaml(text)
    assert recipe.models[0].model == ref
    assert Recipe.from_yaml(recipe.to_yaml()).hash() == recipe.hash()
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--device",
                 "cpu"]) == 0
    data = Recipe.from_yaml(text).to_dict()
    data["models"][0]["model"] = str(lora["embed_full"])
    expected = disk_tensors(merge_to_disk(Recipe.from_dict(data), tmp_path / "ref",
                                          MergeOptions(device="cpu")))
    got = disk_tensors(tmp_path / "out")
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], expected[n]) for n in got)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert ref in (tmp_path / "out" / "recipe.yaml").read_text()
    capsys.readouterr()


def test_config_applies_adapter_folders_to_the_base(lora: dict[str, Path]) -> None:
    from omegaconf import OmegaConf

    composed = OmegaConf.to_container(config.compose_raw(), resolve=True)
    assert isinstance(composed, dict)
    data = dict(composed)
    data["models"] = {**composed["models"], "base": str(lora["base"]),
                      "experts": [str(lora["lora"]), str(lora["expert_0"]),
                                  f"{lora['base']}+{lora['dora']}"], "build_demo": False}
    cfg = config.from_container(data)
    assert cfg.models.experts == (f"{lora['base']}+{lora['lora']}", str(lora["expert_0"]),
                                  f"{lora['base']}+{lora['dora']}")


def test_resident_parent_errors_name_the_adapter(lora: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(lora, tmp_path, base_model_name_or_path="x/y")
    with pytest.raises(SoupError, match=str(folder)):
        ResidentParents([str(lora["base"]), f"{lora['base']}+{folder}"], device="cpu")
