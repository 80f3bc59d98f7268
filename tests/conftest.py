"""Shared fixtures: tiny model families built locally, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama base and three experts (base + small seeded deltas), float32."""
    from tests.families import save_family

    return save_family(tmp_path_factory.mktemp("llama"), n_experts=3, arch="llama", seed=0)


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Qwen2 family with tied embeddings (no lm_head tensor on disk)."""
    from tests.families import save_family

    return save_family(tmp_path_factory.mktemp("qwen2"), n_experts=2, arch="qwen2", seed=1,
                       tie=True)
