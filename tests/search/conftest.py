"""Fixtures for the search tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pg_server import MISSING_MESSAGE, find_bin_dir, start_postgres


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLAlchemy URL of a throwaway PostgreSQL server, shared by the whole session.

    Skips when PostgreSQL's server binaries are missing, unless
    ``SOUP_REQUIRE_POSTGRES=1`` is set (CI), in which case the test fails.
    """
    if find_bin_dir() is None:
        if os.environ.get("SOUP_REQUIRE_POSTGRES") == "1":
            pytest.fail(MISSING_MESSAGE, pytrace=False)
        pytest.skip(MISSING_MESSAGE)
    server = start_postgres(tmp_path_factory.mktemp("pg"))
    try:
        yield server.url
    finally:
        server.stop()


def _memorize(model: Any, tok: Any, docs: list[dict[str, str]], steps: int, lr: float) -> None:
    import torch

    texts = [d["prompt"] + d["target"] + "\n" for d in docs]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="session")
def skilled_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama base and three experts that score differently on soup_add / soup_dup.

    The experts memorize the first 16 val and test documents of one skill (add, dup) or
    of both at half the steps, from a shared base, in about 20 s: merges of them get
    real, distinct lm-eval scores between 0 and 1.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from evaluators.skills import load_split
    from search.demo.tiny import byte_tokenizer, tiny_config

    folder = tmp_path_factory.mktemp("skilled")
    torch.manual_seed(0)
    tok = byte_tokenizer()
    cfg = tiny_config("llama", hidden=64, layers=2)
    docs = {s: load_split(s, "val")[:16] + load_split(s, "test")[:16] for s in ("add", "dup")}
    base = AutoModelForCausalLM.from_config(cfg)
    _memorize(base, tok, docs["add"][16:24] + docs["dup"][16:24], 100, 3e-3)
    plan = {"expert_add": (docs["add"], 250), "expert_dup": (docs["dup"], 250),
            "expert_both": (docs["add"] + docs["dup"], 80)}
    paths = {"base": folder / "base"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for name, (texts, steps) in plan.items():
        expert = AutoModelForCausalLM.from_config(cfg)
        expert.load_state_dict(base.state_dict())
        _memorize(expert, tok, texts, steps, 1e-3)
        paths[name] = folder / name
        expert.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="session")
def small_study(skilled_family: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a real finished search over ``skilled_family``: 10 trials (the
    baselines and a few TPE proposals), serial, SQLite, two tasks with held-out splits.

    Session-scoped and shared: tests that change the study must work on a copy
    (``shutil.copytree(small_study, tmp_path / "run")``; the run folder holds
    ``config.yaml`` and ``study.db``).
    """
    from search import config
    from search.run.launch import run_search

    run_dir = tmp_path_factory.mktemp("small-study") / "run"
    experts = ",".join(str(skilled_family[k]) for k in ("expert_add", "expert_dup",
                                                          "expert_both"))
    raw = config.compose_raw([
        f"run_dir={run_dir}", f"models.base={skilled_family['base']}",
        f"models.experts=[{experts}]",
        "models.build_demo=false", "study_name=small", "n_trials=10", "parallel=serial",
        "evaluator.tasks=[{name:soup_add,limit:16},{name:soup_dup,limit:16}]",
        "evaluator.heldout=[{name:soup_add_test,limit:16},{name:soup_dup_test,limit:16}]",
        "space.methods=[linear,task_arithmetic,ties]", "sampler.n_startup_trials=2",
    ])
    run_search(config.from_hydra(raw), raw, show_progress=False)
    return run_dir
