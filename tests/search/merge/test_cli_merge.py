"""``soup merge``: every bad input gives one clear line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from search.cli import main


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory,
               family: dict[str, Path]) -> dict[str, Path]:
    """Parents that cannot be merged with the Llama family, each for one reason."""
    from transformers import AutoModelForCausalLM

    from search.demo.tiny import tiny_config

    root = tmp_path_factory.mktemp("odd")
    out: dict[str, Path] = {}

    def save(name: str, cfg: object, safe: bool = True) -> None:
        torch.manual_seed(3)
        m = AutoModelForCausalLM.from_config(cfg)
        out[name] = root / name
        m.save_pretrained(out[name], safe_serialization=safe)

    save("gpt2", tiny_config("gpt2"))
    wide = tiny_config("llama")
    wide.intermediate_size = 80
    save("wide_mlp", wide)
    save("big_vocab", tiny_config("llama", vocab=300))
    # pickle-only copy of an expert
    pk = root / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text((family["expert_0"] / "config.json").read_text())
    torch.save(load_file(family["expert_0"] / "model.safetensors"), pk / "pytorch_model.bin")
    out["pickled"] = pk
    # an expert whose weights hold an infinity
    inf = root / "inf"
    inf.mkdir()
    (inf / "config.json").write_text((family["expert_1"] / "config.json").read_text())
    state = load_file(family["expert_1"] / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(state, inf / "model.safetensors", metadata={"format": "pt"})
    out["inf"] = inf
    return out


def write_recipe(path: Path, method: str, base: Path | str | None, models: list[object],
                 params: dict[str, object] | None = None) -> Path:
    import yaml

    data: dict[str, object] = {"merge_method": method}
    if base is not None:
        data["base_model"] = str(base)
    data["models"] = [m if isinstance(m, dict) else {"model": str(m),
                                                     "parameters": {"weight": 1.0}}
                      for m in models]
    if params:
        data["parameters"] = params
    path.write_text(yaml.safe_dump(data))
    return path


def soup(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def expect_error(capsys: pytest.CaptureFixture[str], args: list[object], *needles: str) -> None:
    code, err = soup(capsys, *args)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in err, err


def test_merge_ok_then_refuses_to_overwrite(capsys: pytest.CaptureFixture[str],
                                            family: dict[str, Path], tmp_path: Path) -> None:
    r = write_recipe(tmp_path / "r.yaml", "ties", family["base"],
                     [family["expert_0"], family["expert_1"]], {"density": 0.5})
    code, _ = soup(capsys, "merge", r, tmp_path / "out", "--device", "cpu")
    assert code == 0 and (tmp_path / "out" / "config.json").is_file()
    expect_error(capsys, ["merge", r, tmp_path / "out"], "exists", "--force")
    code, _ = soup(capsys, "merge", r, tmp_path / "out", "--force")
    assert code == 0


@pytest.mark.parametrize("case", [
    "missing_model", "pickle", "arch", "shape", "vocab", "density", "t", "zero_sum",
    "unknown_method", "non_finite", "missing_recipe", "bad_device",
])
def test_bad_inputs(case: str, capsys: pytest.CaptureFixture[str], family: dict[str, Path],
                    odd_models: dict[str, Path], tmp_path: Path) -> None:
    base, e0, e1 = family["base"], family["expert_0"], family["expert_1"]
    out = tmp_path / "out"
    r = tmp_path / "r.yaml"
    extra: list[object] = []
    if case == "missing_model":
        write_recipe(r, "ties", base, [e0, tmp_path / "nope"])
        needles: tuple[str, ...] = ("nope", "not found")
    elif case == "pickle":
        write_recipe(r, "ties", base, [e0, odd_models["pickled"]])
        needles = ("pickle", "--allow-pickle")
    elif case == "arch":
        write_recipe(r, "ties", base, [e0, odd_models["gpt2"]])
        needles = ("gpt2", "llama")
    elif case == "shape":
        write_recipe(r, "ties", base, [e0, odd_models["wide_mlp"]])
        needles = ("model.layers.0.mlp.down_proj.weight", "shape [32, 80]")
    elif case == "vocab":
        write_recipe(r, "ties", base, [e0, odd_models["big_vocab"]])
        needles = ("vocabulary size 300", "--truncate-vocab")
    elif case == "density":
        write_recipe(r, "ties", base, [e0, {"model": str(e1),
                                            "parameters": {"weight": 1, "density": 0}}])
        needles = ("density", "outside (0, 1]")
    elif case == "t":
        write_recipe(r, "slerp", base, [{"model": str(e0)}], {"t": 1.2})
        needles = ("t: 1.2 is outside [0, 1]",)
    elif case == "zero_sum":
        write_recipe(r, "linear", None, [{"model": str(e0), "parameters": {"weight": 1}},
                                         {"model": str(e1), "parameters": {"weight": -1}}])
        needles = ("weights sum to 0", "normalize")
    elif case == "unknown_method":
        write_recipe(r, "dare_tie", base, [e0, e1])
        needles = ("unknown merge_method 'dare_tie'", "did you mean 'dare_ties'")
    elif case == "non_finite":
        write_recipe(r, "linear", None, [e0, odd_models["inf"]])
        needles = ("model.layers.1.mlp.up_proj.weight", "NaN or infinite")
    elif case == "missing_recipe":
        r = tmp_path / "none.yaml"
        needles = ("none.yaml", "does not exist")
    else:
        write_recipe(r, "linear", None, [e0, e1])
        extra = ["--device", "tpu"]
        needles = ("tpu",)
    expect_error(capsys, ["merge", r, out, *extra], *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "partial output left"


def test_allow_pickle_and_truncate_vocab(capsys: pytest.CaptureFixture[str],
                                         family: dict[str, Path], odd_models: dict[str, Path],
                                         tmp_path: Path) -> None:
    r = write_recipe(tmp_path / "p.yaml", "ties", family["base"],
                     [family["expert_0"], odd_models["pickled"]])
    assert soup(capsys, "merge", r, tmp_path / "p", "--allow-pickle")[0] == 0
    r = write_recipe(tmp_path / "v.yaml", "ties", family["base"],
                     [family["expert_0"], odd_models["big_vocab"]])
    assert soup(capsys, "merge", r, tmp_path / "v", "--truncate-vocab")[0] == 0
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["vocab_size"] == 259
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "v")
    assert model.model.embed_tokens.weight.shape[0] == 259


def test_console_script_exit_code(family: dict[str, Path], tmp_path: Path) -> None:
    r = write_recipe(tmp_path / "r.yaml", "tie", family["base"], [family["expert_0"]])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "search.cli", "merge", str(r),
                           str(tmp_path / "o")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown merge_method 'tie'; did you mean 'ties'? available: breadcrumbs, "
        "breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, linear, model_stock, "
        "nuslerp, slerp, task_arithmetic, ties"
    ]
