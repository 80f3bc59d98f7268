"""The benchmark's merge problems: every one trains, deterministically, on every architecture."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from search.demo.tiny import byte_tokenizer
from search.demo.train import new_model
from search.merge.layers import depth, evaluate
from tests.problems import PROBLEMS, Problem, train_experts


def _taus(problem: Problem) -> list[dict[str, torch.Tensor]]:
    model = new_model(seed=0, hidden=32, layers=problem.layers, arch=problem.arch,
                      tie=problem.tie).requires_grad_(False)
    return train_experts(model, byte_tokenizer(), dataclasses.replace(problem, steps=2))[0]


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_problem_trains_one_task_vector_per_expert_deterministically(name: str) -> None:
    problem = PROBLEMS[name]
    first, again = _taus(problem), _taus(problem)
    assert len(first) == len(problem.experts) == len(problem.names())
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert any(t.abs().sum() > 0 for t in a.values())  # the experts moved


def test_sparse_task_vectors_are_masked_before_the_noise() -> None:
    problem = dataclasses.replace(PROBLEMS["sparse"], noise=0.0)
    for tau in _taus(problem):
        live = sum(int((t != 0).sum()) for t in tau.values())
        total = sum(t.numel() for t in tau.values())
        assert 0 < live / total < 2 * problem.density  # type: ignore[operator]


def test_per_layer_coefficients_follow_depth() -> None:
    add = PROBLEMS["layers"].experts[0]
    first, last = "model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"
    assert evaluate(list(add.coef), first, depth(first, 4)) == pytest.approx(0.2)
    assert evaluate(list(add.coef), last, depth(last, 4)) == pytest.approx(1.4)
