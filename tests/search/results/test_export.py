"""``soup export``: the evaluated candidate as a model folder, and ``seeds=`` recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from search import cli, config
from search.recipe import Recipe
from search.study import heldout_key, open_study

HELDOUT = {"metrics": {"soup_add_test": 0.6875, "soup_dup_test": 0.1875}, "objective": 0.4375,
           "tasks": ["soup_add_test", "soup_dup_test"],
           "n_docs": {"soup_add_test": 16, "soup_dup_test": 16}, "time_s": 1.5,
           "at": "2026-01-02T03:04:05"}


@pytest.fixture(scope="module")
def run(small_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the finished small study (config.yaml + study.db)."""
    return Path(shutil.copytree(small_study, tmp_path_factory.mktemp("export") / "run"))


def _cfg(run_dir: Path) -> Any:
    """The run folder's config, reading its own study.db (as the CLI does)."""
    return config.load_saved(run_dir, [f"run_dir={run_dir}"])[1]


def _study(run_dir: Path) -> Any:
    cfg = _cfg(run_dir)
    return open_study(cfg.storage.url, cfg.study_name, [], create=False)


def _trial(run_dir: Path) -> Any:
    """The best completed TIES / task-arithmetic trial the sampler proposed."""
    trials = [t for t in _study(run_dir).trials if t.state.name == "COMPLETE"
              and t.user_attrs["recipe"]["merge_method"] in ("ties", "task_arithmetic")
              and not t.user_attrs.get("baseline")]
    return max(trials, key=lambda t: (t.values[0], -t.number))


def _export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(["export", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    trial = _trial(run)
    _study(run).set_user_attr(heldout_key(trial.number), HELDOUT)  # as soup evaluate stores
    out = tmp_path_factory.mktemp("out") / f"trial-{trial.number}"
    assert cli.main(["export", str(run), str(out), "--trial", str(trial.number)]) == 0
    return out, trial


def _resident_state(run_dir: Path, recipe: Recipe) -> dict[str, torch.Tensor]:
    """The worker's merge: its parents resident as it holds them, the recipe materialized."""
    from search.merge.resident import ResidentModel, ResidentParents
    from search.run.launch import worker_setup

    m = worker_setup(_cfg(run_dir)).models
    parents = ResidentParents(list(m.paths), device=m.device, dtype=m.dtype,
                              allow_pickle=m.allow_pickle)
    resident = ResidentModel(parents)
    resident.materialize(recipe)
    return {n: t.detach().cpu().clone() for n, t in resident.targets.items()}


def test_export_is_the_resident_merge(run: Path, exported: tuple[Path, Any]) -> None:
    from transformers import AutoModelForCausalLM

    out, trial = exported
    recipe = Recipe.from_dict(trial.user_attrs["recipe"])
    loaded_info: Any = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    model, info = loaded_info
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded = model.state_dict()
    expected = _resident_state(run, recipe)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    base = load_file(next(Path(_cfg(run).models.base).glob("*.safetensors")))
    assert any(not torch.equal(base[n], expected[n]) for n in base)  # a real merge

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "recipe.yaml",
            "README.md", "model.safetensors.index.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert Recipe.load(out / "recipe.yaml").hash() == recipe.hash()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and "merge" in front["tags"]
    assert recipe.base_model in front["base_model"]
    assert f"trial {trial.number}" in card and recipe.hash() in card
    assert f"**{trial.user_attrs['scores']['objective']:.4f}**" in card
    assert "TPESampler" in card and "proposed by the sampler" in card
    search, held = card.split("## Search scores")[1].split("## Held-out scores")
    assert "| soup_add |" in search and "soup_add_test" not in search
    assert "| soup_add_test | 0.6875 | 16 |" in held and "**0.4375**" in held


def test_exported_model_scores_what_the_search_stored(run: Path,
                                                      exported: tuple[Path, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.base import TaskSpec
    from evaluators.lm_eval import LmEvalEvaluator
    from search.merge.devices import resolve_device

    out, trial = exported
    cfg = _cfg(run)
    ev = cfg.evaluator
    evaluator = LmEvalEvaluator([TaskSpec(t.name, t.metric, t.weight, t.limit, t.seed)
                                 for t in ev.tasks], include_path=ev.include_path,
                                batch_size=ev.batch_size)
    device = resolve_device(cfg.models.device)  # where the worker evaluated it
    model = AutoModelForCausalLM.from_pretrained(out).to(device).eval()
    scores = evaluator.evaluate(model, AutoTokenizer.from_pretrained(out))
    assert scores.metrics == trial.user_attrs["scores"]["metrics"]
    assert 0.0 < scores.objective < 1.0  # a score that tells merges apart


def _search_overrides(run_dir: Path, new_dir: Path, *extra: str) -> list[str]:
    cfg = _cfg(run_dir)
    tasks = ",".join(f"{{name:{t.name},limit:{t.limit}}}" for t in cfg.evaluator.tasks)
    return ["search", "--no-progress", f"run_dir={new_dir}", f"models.base={cfg.models.base}",
            f"models.experts=[{','.join(cfg.models.experts)}]", "models.build_demo=false",
            "study_name=seeded", "parallel=serial", "baselines=false",
            f"evaluator.tasks=[{tasks}]", "evaluator.heldout=[]",
            f"space.methods=[{','.join(cfg.space.methods)}]", *extra]


def test_exported_recipe_round_trips_as_a_seed(run: Path, exported: tuple[Path, Any],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The exported recipe.yaml as a seed gives the same recipe (and scores) as trial 0;
    a relative-path seed outside the searched methods is evaluated as a reference."""
    out, trial = exported
    cfg = _cfg(run)
    parents = Path(cfg.models.base).parent
    other = tmp_path / "stock.yaml"  # model_stock is not among the searched methods
    other.write_text("merge_method: model_stock\nbase_model: ./base\n"
                     "models: [{model: ./expert_add}, {model: ./expert_dup}]\n")
    monkeypatch.chdir(parents)  # seed paths resolve like models.* paths
    rc = cli.main(_search_overrides(run, tmp_path / "new", "n_trials=2",
                                    f"seeds=[{out / 'recipe.yaml'},{other}]"))
    assert rc == 0, capsys.readouterr().err
    first, second = _study(tmp_path / "new").trials
    assert first.state.name == "COMPLETE" and first.user_attrs["baseline"] == "seed"
    assert Recipe.from_dict(first.user_attrs["recipe"]).hash() == \
        Recipe.from_dict(trial.user_attrs["recipe"]).hash()
    assert first.user_attrs["scores"]["metrics"] == trial.user_attrs["scores"]["metrics"]
    assert second.state.name == "COMPLETE" and second.user_attrs["baseline"] == "seed"
    assert second.user_attrs["recipe"]["base_model"] == str(parents / "base")
    assert [m["model"] for m in second.user_attrs["recipe"]["models"]] == \
        [str(parents / "expert_add"), str(parents / "expert_dup")]


def test_a_seed_over_other_models_fails_at_start_up(run: Path, exported: tuple[Path, Any],
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = exported
    seed = tmp_path / "stranger.yaml"
    seed.write_text(f"merge_method: linear\nmodels: [{{model: {out}}}]\n"
                    "parameters: {weight: 1.0}\n")
    rc = cli.main(_search_overrides(run, tmp_path / "new", "n_trials=1", f"seeds=[{seed}]"))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "seeds[0]" in err and "not a parent of this run" in err and str(out) in err
    assert not (tmp_path / "new").exists()  # rejected before the run folder or study


def test_resident_path_when_the_worker_held_another_dtype(run: Path, tmp_path: Path) -> None:
    """models.dtype=bfloat16 over float32 parents: streaming would differ, so the export
    rebuilds the worker's resident merge (bfloat16 weights, equal to the worker's)."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    data = yaml.safe_load((copy / "config.yaml").read_text())
    data["models"]["dtype"] = "bfloat16"
    (copy / "config.yaml").write_text(yaml.safe_dump(data))
    trial = _trial(copy)
    assert cli.main(["export", str(copy), str(tmp_path / "m"), "--trial",
                     str(trial.number)]) == 0
    recipe = Recipe.from_dict(trial.user_attrs["recipe"])
    expected = _resident_state(copy, recipe)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    on_disk: dict[str, torch.Tensor] = {}
    for f in set(index["weight_map"].values()):
        on_disk.update(load_file(tmp_path / "m" / f))
    assert set(on_disk) == set(expected)
    for name, tensor in expected.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(on_disk[name], tensor), name


def test_refuses_an_existing_folder_and_force_replaces_it(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "best"
    rc, text, _ = _export(capsys, str(run), str(out), "--best")
    best = max((t for t in _study(run).trials if t.state.name == "COMPLETE"),
               key=lambda t: (t.values[0], -t.number))
    assert rc == 0 and f"exported trial {best.number}" in text
    card = (out / "README.md").read_text()
    assert "greedy_soup" in card and "Not evaluated yet" in card  # the small study's best

    rc, _, err = _export(capsys, str(run), str(out), "--trial", str(_trial(run).number))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert str(out) in err and "--force" in err
    assert Recipe.load(out / "recipe.yaml").hash() == \
        Recipe.from_dict(best.user_attrs["recipe"]).hash()  # untouched

    cfg = _cfg(run)  # --storage: parents from the study's record
    rc, _, err = _export(capsys, "--storage", cfg.storage.url, "--study", cfg.study_name,
                         str(out), "--trial", str(_trial(run).number), "--force")
    assert rc == 0, err
    assert Recipe.load(out / "recipe.yaml").hash() == \
        Recipe.from_dict(_trial(run).user_attrs["recipe"]).hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_crash_leaves_no_folder(run: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import search.results.export

    def boom(*_: Any) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(search.results.export, "model_card", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["export", str(run), str(tmp_path / "out"), "--trial",
                  str(_trial(run).number)])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def broken_run(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy with one failed trial and one still running, plus a 2-objective study."""
    copy = Path(shutil.copytree(run, tmp_path_factory.mktemp("broken") / "run"))
    study = _study(copy)
    failed = study.ask()
    failed.set_user_attr("error", "NonFiniteMergeError: NaN")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    study.ask()
    open_study(f"sqlite:///{copy}/study.db", "pareto", ["maximize", "maximize"])
    return copy


@pytest.mark.parametrize(("args", "words"), [
    (["--trial", "99"], ["--trial 99", "no such trial"]),
    (["--trial", "10"], ["--trial 10", "FAIL, not COMPLETE", "NonFiniteMergeError"]),
    (["--trial", "11"], ["--trial 11", "RUNNING, not COMPLETE"]),
    (["--best", "--storage", "STORAGE", "--study", "pareto"], ["2 objectives", "--trial N"]),
    (["--trial", "1", "--device", "gpu"], ["unknown device 'gpu'"]),
])
def test_bad_requests_exit_2_with_one_line(broken_run: Path, tmp_path: Path, args: list[str],
                                           words: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{broken_run}/study.db"
    args = [url if a == "STORAGE" else a for a in args]
    where = [] if "--storage" in args else [str(broken_run)]
    rc, _, err = _export(capsys, *where, str(tmp_path / "out"), *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_missing_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _export(capsys, str(tmp_path / "nope"), str(tmp_path / "out"))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "config.yaml not found" in err and str(tmp_path / "nope") in err
