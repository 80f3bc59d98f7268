"""The composed Hydra config: every experiment and group option, errors, paths, resume."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from search import config
from search.config import CONF_DIR, ConfigError, SearchConfig, compose, compose_raw, model_ref
from search.run.launch import instantiate

GROUPS = ("models", "space", "sampler", "pruner", "evaluator", "storage", "parallel")
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
PG_VARS = ("SOUP_PG_PASSWORD", "SOUP_PG_HOST", "SOUP_PG_PORT", "SOUP_PG_DB")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No environment variable read by the shipped config leaks in from the host."""
    for name in (*PG_VARS, "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def _option(group: str, name: str) -> dict[str, Any]:
    data = yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_discovery_finds_the_shipped_files() -> None:
    """The globs see the experiments and options the README documents."""
    assert {"demo", "demo_cmaes", "demo_pareto", "demo_pruned", "demo_lora"} <= set(EXPERIMENTS)
    assert ("sampler", "tpe") in OPTIONS and ("storage", "postgresql") in OPTIONS
    assert len(OPTIONS) >= 20


def test_defaults(composed: dict[str, Any]) -> None:
    """``conf/search.yaml`` alone: the documented defaults."""
    cfg = config.from_container(composed)
    assert isinstance(cfg, SearchConfig)
    assert (cfg.study_name, cfg.n_trials, cfg.seed, cfg.objective) == ("soup", 100, 0, "mean")
    assert cfg.sampler.target == "search.study.sampler.ConditionalTPESampler"
    assert cfg.pruner.target is None
    assert cfg.parallel.kind == "ray"
    assert cfg.storage.url == f"sqlite:///{cfg.run_dir}/study.db"
    assert cfg.evaluator.stages == (1.0,)
    assert not cfg.multi_objective


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name: str) -> None:
    """Every preset composes, converts and sets what its file says."""
    cfg = compose([f"experiment={name}"])
    data = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text())
    assert cfg.study_name == data["study_name"] == name
    assert cfg.n_trials == data["n_trials"]
    assert cfg.run_dir.name == name  # run_dir interpolates study_name
    assert cfg.parallel.workers == data["parallel"]["workers"]
    expected: dict[str, tuple[Any, ...]] = {
        "demo": ("mean", "search.study.sampler.ConditionalTPESampler", None, (1.0,)),
        "demo_cmaes": ("mean", "search.study.params_only.CmaEsSampler", None, (1.0,)),
        "demo_pareto": ("per_task", "search.study.params_only.NSGAIISampler", None, (1.0,)),
        "demo_pruned": ("mean", "search.study.sampler.ConditionalTPESampler",
                        "optuna.pruners.MedianPruner", (0.25, 1.0)),
    }
    if name in expected:
        assert (cfg.objective, cfg.sampler.target, cfg.pruner.target,
                cfg.evaluator.stages) == expected[name]
    if name == "demo_cmaes":
        assert cfg.space.methods == ("ties",)
    if name == "demo_pareto":
        assert cfg.multi_objective
    if name == "demo_pruned":
        assert len(cfg.evaluator.stages) == 2
        assert isinstance(instantiate(cfg.pruner, "pruner"), optuna.pruners.MedianPruner)


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_group_option_composes(group: str, option: str) -> None:
    """Every option of every group composes and converts; its values arrive."""
    cfg = compose([f"{group}={option}"])
    data = _option(group, option)
    if group == "models":
        assert cfg.models.base == model_ref(data["base"])
        assert cfg.models.experts == tuple(model_ref(e) for e in data["experts"])
        assert cfg.models.dtype == data["dtype"]
    elif group == "space":
        assert cfg.space.methods == tuple(data["methods"])
        assert cfg.space.per_layer_anchors == data["per_layer_anchors"]
        assert dict(cfg.space.params) == data["params"]
    elif group == "sampler":
        assert cfg.sampler.target == data["_target_"]
        assert cfg.sampler.kwargs["seed"] == cfg.seed
        sampler = instantiate(cfg.sampler, "sampler")
        assert isinstance(sampler, optuna.samplers.BaseSampler)
        assert type(sampler).__name__ == data["_target_"].rsplit(".", 1)[1]
    elif group == "pruner":
        assert cfg.pruner.target == data["_target_"]
        pruner = instantiate(cfg.pruner, "pruner")
        if data["_target_"] is None:
            assert pruner is None
        else:
            assert isinstance(pruner, optuna.pruners.BasePruner)
            assert type(pruner).__name__ == data["_target_"].rsplit(".", 1)[1]
    elif group == "evaluator":
        assert [t.name for t in cfg.evaluator.tasks] == [t["name"] for t in data["tasks"]]
        assert cfg.evaluator.batch_size == data["batch_size"]
    elif group == "storage":
        assert cfg.storage.url.split(":", 1)[0] == data["url"].split(":", 1)[0]
        assert "${" not in cfg.storage.url
    elif group == "parallel":
        assert cfg.parallel.kind == data["kind"]
        assert cfg.parallel.workers == data["workers"]
        assert cfg.parallel.threads_per_worker == data["threads_per_worker"]
        address = data["address"]
        if isinstance(address, str) and address.startswith("${oc.env:RAY_ADDRESS,"):
            address = "auto"  # the default when RAY_ADDRESS is unset
        assert cfg.parallel.address == address


def test_sampler_seed_follows_the_global_seed() -> None:
    """``seed: ${seed}`` in the sampler options follows ``seed=``."""
    cfg = compose(["sampler=random", "seed=5"])
    assert cfg.sampler.kwargs == {"seed": 5}
    sampler = instantiate(cfg.sampler, "sampler")
    assert isinstance(sampler, optuna.samplers.RandomSampler)


def test_instantiate_bad_target_is_a_config_error() -> None:
    """A class path that does not import, or bad kwargs, fail with one line."""
    with pytest.raises(ConfigError, match=r"cannot import 'optuna\.samplers\.NoSuch'"):
        instantiate(config.ComponentConfig("optuna.samplers.NoSuch"), "sampler")
    with pytest.raises(ConfigError, match=r"^sampler: optuna\.samplers\.RandomSampler\(bogus\)"):
        instantiate(config.ComponentConfig("optuna.samplers.RandomSampler", {"bogus": 1}),
                    "sampler")


def test_postgresql_defaults_without_env() -> None:
    """storage=postgresql composes with the defaults when no variable is set."""
    cfg = compose(["storage=postgresql"])
    assert cfg.storage.url == "postgresql+psycopg2://soup:soup@127.0.0.1:5432/soup"


def test_postgresql_password_never_printed(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    """The password is resolved for the storage URL but not written by to_yaml or save."""
    secret = "s3cr3t-pw-XYZ"
    monkeypatch.setenv("SOUP_PG_PASSWORD", secret)
    monkeypatch.setenv("SOUP_PG_HOST", "db.example")
    raw = compose_raw(["storage=postgresql", f"run_dir={tmp_path}"])
    text = config.to_yaml(raw)
    assert secret not in text
    assert "${oc.env:SOUP_PG_PASSWORD,soup}" in text
    cfg = config.from_hydra(raw)
    assert cfg.storage.url == f"postgresql+psycopg2://soup:{secret}@db.example:5432/soup"
    config.save(raw, tmp_path / "config.yaml")
    assert secret not in (tmp_path / "config.yaml").read_text(encoding="utf-8")
    _, again = config.load_saved(tmp_path)
    assert again.storage.url == cfg.storage.url


def _one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    assert len(message) < 400, message
    return message


@pytest.fixture(scope="module")
def composed() -> dict[str, Any]:
    """The default config as a resolved plain mapping (composed once)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(compose_raw(), resolve=True)
    assert isinstance(data, dict)
    return data


def _convert(data: dict[str, Any], overrides: Sequence[str]) -> SearchConfig:
    """``from_container`` of ``data`` with ``key.path=yaml`` overrides applied."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node[name]
        node[leaf] = yaml.safe_load(value)
    return config.from_container(out)


@pytest.mark.parametrize(("overrides", "needles"), [
    (["sampler=foo"], ["sampler/foo", "cmaes", "gp", "nsga2", "random", "tpe"]),
    (["n_trial=3"], ["n_trial"]),
    (["+n_trial=3"], ["n_trial", "did you mean 'n_trials'"]),
    (["n_trials=0"], ["n_trials=0", "at least 1"]),
    (["objective=bogus"], ["'bogus'", "mean", "per_task"]),
    (["space.methods=[tie]"], ["space.methods", "'tie'", "did you mean 'ties'"]),
    (["evaluator.stages=[0.5]"], ["evaluator.stages=[0.5]", "1.0"]),
    (["objective=per_task", "pruner=median"], ["pruner=none", "objective=per_task"]),
    (["parallel.kind=gpu"], ["'gpu'", "serial", "ray"]),
])
def test_bad_overrides_give_one_line_config_errors(overrides: list[str],
                                                   needles: list[str]) -> None:
    """Each bad command-line override fails with one ConfigError line that names it."""
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    message = _one_line(info)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(("overrides", "needles"), [
    (["evaluator.stages=[0.5, 0.25, 1.0]"], ["evaluator.stages", "increase"]),
    (["evaluator.stages=[0.0, 1.0]"], ["evaluator.stages", ">0"]),
    (["evaluator.stages=[]"], ["evaluator.stages"]),
    (["parallel.workers=-1"], ["parallel.workers"]),
    (["parallel.threads_per_worker=0"], ["threads_per_worker"]),
    (["max_retries=-1"], ["max_retries"]),
    (["space.per_layer_anchors=-1"], ["per_layer_anchors"]),
    (["space.methods=[]"], ["space.methods"]),
    (["space.methods=ties"], ["space.methods", "'ties'"]),
    (["study_name=a b"], ["'a b'"]),
    (["models.experts=[]"], ["models.experts"]),
    (["models.experts=x"], ["models.experts", "'x'"]),
    (["models.revision=main"], ["models.revision", "options: base, experts"]),
    (["evaluator.tasks=[]"], ["evaluator.tasks"]),
    (["storage.url=http://db/x"], ["storage.url", "'http'"]),
    (["evaluator.tasks=[{name: a, wieght: 2}]"], ["evaluator.tasks[0].wieght",
                                                  "did you mean 'weight'"]),
    (["sampler=3"], ["sampler", "_target_"]),
    (["storage=sqlite"], ["storage", "mapping"]),
])
def test_bad_values_give_one_line_config_errors(composed: dict[str, Any], overrides: list[str],
                                                needles: list[str]) -> None:
    """Each invalid value fails conversion with one ConfigError line that names it."""
    with pytest.raises(ConfigError) as info:
        _convert(composed, overrides)
    message = _one_line(info)
    for needle in needles:
        assert needle in message, (needle, message)


def test_conversion_of_the_untouched_mapping(composed: dict[str, Any]) -> None:
    """The helper itself converts the default mapping (the cases above fail for a reason)."""
    assert _convert(composed, []) == config.from_container(composed)
    assert _convert(composed, []).models.experts == tuple(
        model_ref(e) for e in composed["models"]["experts"])
    assert _convert(composed, ["n_trials=3"]).n_trials == 3


def test_missing_required_option(composed: dict[str, Any]) -> None:
    """A missing required key names it."""
    data = copy.deepcopy(composed)
    del data["n_trials"]
    with pytest.raises(ConfigError, match="missing required option 'n_trials'"):
        config.from_container(data)


def test_base_listed_as_expert_is_rejected(composed: dict[str, Any]) -> None:
    """A base that is also an expert is an error naming the path."""
    expert = composed["models"]["experts"][0]
    with pytest.raises(ConfigError) as info:
        _convert(composed, [f"models.base={expert}"])
    message = _one_line(info)
    assert "models.base" in message and "expert_add" in message


@pytest.mark.parametrize("override", [
    "n_trials=abc",
    "max_retries=abc",
    "parallel.workers=abc",
    "space.per_layer_anchors=abc",
    "evaluator.stages=[a, 1.0]",
    "evaluator.stages=0.5",
    "n_trials=3.5",
    "n_trials=true",
    "evaluator.batch_size=abc",
    "baselines=maybe",
    "evaluator.stages=[0.5, 0.5, 1.0]",
])
def test_badly_typed_values_give_config_errors(composed: dict[str, Any], override: str) -> None:
    """A value of the wrong type fails at the edge with a ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        _convert(composed, [override])
    assert override.split("=")[0].split(".")[-1] in _one_line(info)


def test_run_dir_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative run_dir is made absolute, in the raw config (saved) and the dataclass."""
    monkeypatch.chdir(tmp_path)
    raw = compose_raw(["run_dir=rel/run"])
    assert raw.run_dir == str(Path.cwd() / "rel" / "run")
    cfg = config.from_hydra(raw)
    assert cfg.run_dir == Path.cwd() / "rel" / "run"
    assert cfg.run_dir.is_absolute()
    assert cfg.storage.url == f"sqlite:///{Path.cwd() / 'rel' / 'run'}/study.db"
    home = compose(["run_dir='~/soup-runs/x'"]).run_dir
    assert home == Path(os.path.expanduser("~/soup-runs/x"))


def test_default_run_dir_follows_study_name(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``runs/${study_name}`` under the launch folder."""
    monkeypatch.chdir(tmp_path)
    cfg = compose(["study_name=abc"])
    assert cfg.run_dir == Path.cwd() / "runs" / "abc"


def test_model_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'.'-relative paths become absolute; hub ids and absolute paths stay as given."""
    monkeypatch.chdir(tmp_path)
    cfg = compose(["models.base=./parents/base",
                   "models.experts=[./parents/a,org/hub-model,/abs/expert]"])
    assert cfg.models.base == str(Path.cwd() / "parents" / "base")
    assert cfg.models.experts == (str(Path.cwd() / "parents" / "a"), "org/hub-model",
                                  "/abs/expert")
    hub = compose(["models=example_hub"]).models
    assert hub.base == "HuggingFaceTB/SmolLM2-135M"
    assert hub.experts[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_existing_relative_folder_becomes_absolute(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative name that exists on disk is a path, not a hub id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "expert").mkdir(parents=True)
    assert model_ref("local/expert") == str(Path.cwd() / "local" / "expert")
    assert model_ref("other/expert") == "other/expert"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SearchConfig]:
    """A run folder holding the saved ``experiment=demo`` config, and that config."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    raw = compose_raw([f"run_dir={run_dir}", "experiment=demo"])
    config.save(raw, run_dir / "config.yaml")
    return run_dir, config.from_hydra(raw)


def test_load_saved_with_override(saved: tuple[Path, SearchConfig]) -> None:
    """A saved config reloads, and key=value overrides are parsed as YAML values."""
    run_dir, original = saved
    raw, cfg = config.load_saved(run_dir, ["n_trials=7"])
    assert cfg.n_trials == 7 and type(cfg.n_trials) is int
    assert raw.n_trials == 7
    assert cfg.study_name == "demo"
    assert cfg.run_dir == run_dir
    assert cfg.storage.url == f"sqlite:///{run_dir}/study.db"
    _, same = config.load_saved(run_dir)
    assert same == original
    _, nested = config.load_saved(run_dir, ["parallel.workers=3", "sampler.seed=9"])
    assert nested.parallel.workers == 3 and nested.sampler.kwargs["seed"] == 9
    _, cleared = config.load_saved(run_dir, ["models.dtype="])
    assert cleared.models.dtype is None


def test_load_saved_follows_a_moved_run_folder(saved: tuple[Path, SearchConfig],
                                               tmp_path: Path) -> None:
    """A copied run folder reads its own study, not the one where it was started."""
    moved = tmp_path / "moved"
    shutil.copytree(saved[0], moved)
    _, cfg = config.load_saved(moved)
    assert cfg.run_dir == moved
    assert cfg.storage.url == f"sqlite:///{moved}/study.db"
    _, pinned = config.load_saved(moved, [f"run_dir={saved[0]}"])
    assert pinned.storage.url == f"sqlite:///{saved[0]}/study.db"


@pytest.mark.parametrize(("override", "needle"), [
    ("n_trial=3", "n_trial"),
    ("+n_trials=3", "+n_trials=3"),
    ("n_trials", "n_trials"),
    ("sampler=random", "sampler"),
    ("n_trials=0", "n_trials=0"),
])
def test_load_saved_bad_override(saved: tuple[Path, SearchConfig], override: str,
                                 needle: str) -> None:
    """Unknown keys, group switches and bad values on resume are ConfigErrors."""
    with pytest.raises(ConfigError) as info:
        config.load_saved(saved[0], [override])
    assert needle in _one_line(info)


def test_load_saved_missing_folder(tmp_path: Path) -> None:
    """A folder without config.yaml is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=r"config\.yaml not found"):
        config.load_saved(tmp_path / "nowhere")


def test_resume_from_another_folder_keeps_model_paths(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The saved config resumes from any folder with the same parents."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    raw = compose_raw([f"run_dir={tmp_path / 'run'}"])
    first = config.from_hydra(raw)
    config.save(raw, tmp_path / "run" / "config.yaml")
    monkeypatch.chdir(tmp_path / "b")
    _, resumed = config.load_saved(tmp_path / "run")
    assert resumed.run_dir == first.run_dir
    assert resumed.models == first.models


def test_evaluator_target_defaults_to_lm_eval(composed: dict[str, Any]) -> None:
    """The shipped evaluator is lm-eval's adapter; a saved config without ``_target_``
    (run folders from before it existed) gets the same default."""
    cfg = config.from_container(composed)
    assert cfg.evaluator.target == config.DEFAULT_EVALUATOR == \
        "evaluators.lm_eval.LmEvalEvaluator"
    assert cfg.evaluator.options == {}
    old = copy.deepcopy(composed)
    del old["evaluator"]["_target_"], old["evaluator"]["options"]
    assert config.from_container(old).evaluator == cfg.evaluator


def test_evaluator_target_and_options_from_overrides() -> None:
    """``evaluator._target_`` picks the class and ``+evaluator.options.X`` its arguments;
    the worker set-up carries both."""
    from search.run.launch import worker_setup
    from tests.search.simulated import OVERRIDES, TARGET

    cfg = compose([*OVERRIDES, "+evaluator.options.sleep_s=0.5"])
    assert (cfg.evaluator.target, dict(cfg.evaluator.options)) == (TARGET, {"sleep_s": 0.5})
    setup = worker_setup(cfg)
    assert (setup.evaluator.target, dict(setup.evaluator.options)) == (TARGET, {"sleep_s": 0.5})


@pytest.mark.parametrize(("overrides", "needles"), [
    (["evaluator._target_=nowhere.Evaluator"],
     ["evaluator._target_", "cannot import evaluator 'nowhere.Evaluator'", "No module named"]),
    (["evaluator._target_=evaluators.lm_eval.NoSuchEvaluator"],
     ["evaluator._target_", "'evaluators.lm_eval.NoSuchEvaluator'"]),
    (["evaluator._target_=evaluators.lm_eval.task_manager"],
     ["evaluator._target_", "is not an evaluator class"]),
    (["evaluator._target_=''"], ["evaluator._target_", "class path"]),
    (["evaluator.options={seed: 1}"],
     ["evaluator.options", "LmEvalEvaluator does not take them", "'seed'"]),
    (["evaluator.options=3"], ["evaluator.options", "mapping"]),
    (["evaluator.target=x.Y"], ["evaluator.target", "did you mean '_target_'"]),
])
def test_bad_evaluator_gives_one_line_config_error(composed: dict[str, Any],
                                                    overrides: list[str],
                                                    needles: list[str]) -> None:
    """A bad evaluator class or option fails conversion (before anything starts) with one
    ConfigError line that names the option."""
    with pytest.raises(ConfigError) as info:
        _convert(composed, overrides)
    message = _one_line(info)
    for needle in needles:
        assert needle in message, (needle, message)
