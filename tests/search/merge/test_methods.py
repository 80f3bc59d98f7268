"""Contract tests over every registered merge method, and hand-computed formulas."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from search.merge import ops
from search.merge.methods import REGISTRY
from search.merge.spec import MergeMethod

S = math.sqrt(0.5)


def n_inputs(m: MergeMethod) -> int:
    return max(m.min_models, min(3, m.max_models or 3))


def params_for(m: MergeMethod, n: int, **over: Any) -> dict[str, Any]:
    """Valid, non-trivial parameters derived from the specs."""
    out: dict[str, Any] = {}
    for p in m.params:
        if p.name == "density":
            v: Any = 0.5
        elif p.name == "epsilon":
            v = 0.1
        elif p.name == "t":
            v = 0.3
        elif p.default is None:
            v = 0.7 if p.kind == "float" else True
        else:
            v = p.default
        if p.name == "weight":
            v = None
        out[p.name] = v
    if "weight" in out:
        out["weight"] = tuple(0.5 + 0.25 * i for i in range(n))
    elif any(p.per_model for p in m.params):
        pass
    for p in m.params:
        if p.per_model and p.name != "weight":
            out[p.name] = (out[p.name],) * n
    out.update(over)
    return out


def run(m: MergeMethod, x: torch.Tensor, base: torch.Tensor | None, seed: int = 0,
        **params: Any) -> torch.Tensor:
    kw: dict[str, Any] = {}
    if m.random:
        kw["generator"] = torch.Generator().manual_seed(seed)
    return m.fn(x, base=base, **kw, **params)


def inputs(m: MergeMethod, shape: tuple[int, ...] = (8, 6), dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g).to(dtype)
    x = (base + 0.1 * torch.randn((n_inputs(m), *shape), generator=g)).to(dtype)
    return x, (None if m.base == "ignored" else base)


ALL = sorted(REGISTRY)


@pytest.mark.parametrize("name", ALL)
def test_contract_shape_dtype_determinism(name: str) -> None:
    m = REGISTRY[name]
    for dtype in (torch.float32, torch.bfloat16):
        x, base = inputs(m, dtype=dtype)
        x_before = x.clone()
        p = params_for(m, x.shape[0])
        a = run(m, x, base, **p)
        b = run(m, x, base, **p)
        assert a.shape == x.shape[1:]
        assert a.dtype == dtype
        assert torch.equal(a, b), "same inputs and seed must give the same tensor"
        assert torch.equal(x, x_before), "a method must not modify its inputs"
        assert torch.isfinite(a.float()).all()


@pytest.mark.parametrize("name", ALL)
def test_contract_out_matches_return(name: str) -> None:
    m = REGISTRY[name]
    x, base = inputs(m)
    p = params_for(m, x.shape[0])
    expected = run(m, x, base, **p)
    out = torch.empty_like(expected)
    got = m.fn(x, base=base, out=out, **({"generator": torch.Generator().manual_seed(0)}
                                         if m.random else {}), **p)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", ALL)
def test_contract_identical_models_give_that_model(name: str) -> None:
    """Merging copies of one model (also equal to the base) returns it."""
    m = REGISTRY[name]
    x, base = inputs(m)
    same = x[0].clone()
    x = same.expand_as(x).clone()
    base = None if base is None else same.clone()
    got = run(m, x, base, **params_for(m, x.shape[0]))
    torch.testing.assert_close(got, same, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in ALL if REGISTRY[n].random])
def test_random_methods_depend_on_seed_only(name: str) -> None:
    m = REGISTRY[name]
    x, base = inputs(m, shape=(32, 32))
    p = params_for(m, x.shape[0])
    assert torch.equal(run(m, x, base, seed=1, **p), run(m, x, base, seed=1, **p))
    assert not torch.equal(run(m, x, base, seed=1, **p), run(m, x, base, seed=2, **p))


@pytest.mark.parametrize("sparse,dense,extra", [
    ("ties", "ties", {}),
    ("dare_linear", "task_arithmetic", {}),
    ("dare_ties", "ties", {"normalize": False}),
    ("breadcrumbs", "task_arithmetic", {}),
    ("breadcrumbs_ties", "ties", {"normalize": False}),
    ("della", "ties", {}),
    ("della_linear", "task_arithmetic", {}),
])
def test_density_one_gives_dense_form(sparse: str, dense: str, extra: dict[str, Any]) -> None:
    ms, md = REGISTRY[sparse], REGISTRY[dense]
    x, base = inputs(ms)
    n = x.shape[0]
    ps = params_for(ms, n, density=(1.0,) * n, **extra)
    pd = params_for(md, n, **extra)
    if "density" in pd:
        pd["density"] = (1.0,) * n
    ps["normalize"] = pd["normalize"] = extra.get("normalize", pd["normalize"])
    torch.testing.assert_close(run(ms, x, base, **ps), run(md, x, base, **pd), rtol=0, atol=0)


def test_linear_formula() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    lin = REGISTRY["linear"].fn
    assert torch.equal(lin(x, weight=(1.0, 3.0), normalize=True), torch.tensor([2.5, 3.5]))
    assert torch.equal(lin(x, weight=(1.0, 3.0), normalize=False), torch.tensor([10.0, 14.0]))


def test_slerp_formula_and_endpoints() -> None:
    base, other = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    fn = REGISTRY["slerp"].fn
    torch.testing.assert_close(fn(other[None], base=base, t=0.5), torch.tensor([S, S]))
    assert torch.equal(fn(other[None], base=base, t=0.0), base)
    assert torch.equal(fn(other[None], base=base, t=1.0), other)
    # nearly parallel vectors take the linear path
    near = torch.tensor([1.0, 1e-3])
    torch.testing.assert_close(fn(near[None], base=base, t=0.5), (base + near) / 2)


def test_nuslerp_formula() -> None:
    fn = REGISTRY["nuslerp"].fn
    kw = {"nuslerp_flatten": True, "nuslerp_row_wise": False}
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(fn(x, weight=(1.0, 1.0), **kw), torch.tensor([S, S]))
    base = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(fn(x + base, base=base, weight=(2.0, 2.0), **kw),
                               torch.tensor([1 + S, 1 + S]))
    # t = w1 / (w0 + w1) = 1 returns the second model
    torch.testing.assert_close(fn(x, weight=(0.0, 1.0), **kw), x[1])
    # row-wise off, not flattened: each row is interpolated on its own
    rows = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    got = fn(rows, weight=(1.0, 1.0), nuslerp_flatten=False, nuslerp_row_wise=False)
    torch.testing.assert_close(got, torch.tensor([[S, S], [1.0, 0.0]]))


def test_task_arithmetic_formula() -> None:
    fn = REGISTRY["task_arithmetic"].fn
    base = torch.tensor([1.0, 1.0])
    x = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    got = fn(x, base=base, weight=(1.0, 0.5), **{"lambda": 1.0}, normalize=False, int8_mask=False)
    assert torch.equal(got, torch.tensor([2.0, 2.0]))
    got = fn(x, base=base, weight=(1.0, 0.5), **{"lambda": 2.0}, normalize=False, int8_mask=False)
    assert torch.equal(got, torch.tensor([3.0, 3.0]))


def test_ties_formula() -> None:
    fn = REGISTRY["ties"].fn
    base = torch.zeros(4)
    x = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-1.0, -2.0, 1.0, 2.0]])
    got = fn(x, base=base, weight=(1.0, 1.0), density=(0.5, 0.5), **{"lambda": 1.0},
             normalize=True, int8_mask=False)
    # trimmed: [3,0,0,2] and [0,-2,0,2]; signs elected by sum: + - + +
    assert torch.equal(got, torch.tensor([3.0, -2.0, 0.0, 2.0]))
    got = fn(x, base=base, weight=(1.0, 1.0), density=(0.5, 0.5), **{"lambda": 1.0},
             normalize=False, int8_mask=False)
    assert torch.equal(got, torch.tensor([3.0, -2.0, 0.0, 4.0]))


def test_magnitude_keeps_exactly_k_with_ties() -> None:
    d = torch.tensor([1.0, -1.0, 1.0, 0.5, 1.0])
    mask = ops.magnitude_mask(d, 0.4)  # k = 2 of four equal magnitudes: lowest indices
    assert mask.tolist() == [True, True, False, False, False]


def test_breadcrumbs_formula() -> None:
    fn = REGISTRY["breadcrumbs"].fn
    base = torch.zeros(10)
    x = torch.arange(1.0, 11.0)[None]
    got = fn(x, base=base, weight=(1.0,), density=(0.5,), gamma=(0.2,), **{"lambda": 1.0},
             normalize=False, int8_mask=False)
    # keep 5 values just below the top 2 (9, 10): 4..8
    assert got.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]
    # gamma too large for the density: the largest outliers shrink, keep = 5 smallest
    got = fn(x, base=base, weight=(1.0,), density=(0.5,), gamma=(0.8,), **{"lambda": 1.0},
             normalize=False, int8_mask=False)
    assert got.tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 0, 0]


def test_dare_keeps_density_fraction_and_l1_norm() -> None:
    fn = REGISTRY["dare_linear"].fn
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(100_000)
    x = torch.randn((1, 100_000), generator=g)
    common = {"weight": (1.0,), "lambda": 1.0, "normalize": False, "int8_mask": False}
    got = fn(x, base=base, generator=torch.Generator().manual_seed(3), density=(0.3,),
             rescale=True, **common)
    kept = (got != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    torch.testing.assert_close(got.abs().sum(), x.abs().sum(), rtol=1e-4, atol=0)
    plain = fn(x, base=base, generator=torch.Generator().manual_seed(3), density=(0.3,),
               rescale=False, **common)
    assert torch.equal(plain != 0, got != 0)
    nz = plain != 0
    assert torch.equal(plain[nz], x[0][nz])


def test_della_probabilities_rank_magnitudes_per_row() -> None:
    probs = ops.della_probabilities(torch.tensor([[1.0, -3.0, 2.0], [0.0, 5.0, -1.0]]), 0.5, 0.1)
    torch.testing.assert_close(probs, torch.tensor([[0.4, 0.6, 0.5], [0.4, 0.6, 0.5]]))


def test_model_stock_formula() -> None:
    fn = REGISTRY["model_stock"].fn
    base = torch.zeros(2)
    # orthogonal task vectors: cos 0 -> t 0 -> the base
    assert torch.equal(fn(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), base=base, filter_wise=False),
                       base)
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(fn(x, base=base, filter_wise=False),
                               torch.tensor([t * 1.0, t * 0.5]))


def test_sign_consensus_zero_sum_elects_positive() -> None:
    from search.merge.task_arithmetic import _consensus_mix

    w = torch.tensor([[1.0, -1.0, 0.0], [-1.0, -2.0, 0.0]])
    mixed, divisor = _consensus_mix(w.clone(), [1.0, 1.0], "sum")
    # column 0 sums to 0: + is elected, only the +1 agrees; column 2: nothing agrees
    assert mixed.tolist() == [1.0, -3.0, 0.0]
    assert divisor.tolist() == [1.0, 2.0, 1.0]
    mixed, divisor = _consensus_mix(w.clone(), [1.0, 1.0], "count")
    assert mixed.tolist() == [1.0, -3.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_topk_mask_equals_rank_order_with_many_ties(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    d = (torch.randint(-4, 5, (5000,), generator=g).float() / 4).to(dtype)  # many ties
    ranks = ops.magnitude_ranks(d)
    for density in (0.01, 0.3, 0.5, 0.77, 0.999):
        k = max(1, int(density * d.numel()))
        mask = ops.topk_mask(d.abs(), k)
        assert int(mask.sum()) == k
        assert torch.equal(mask, ranks < k)
        assert torch.equal(ops.magnitude_mask(d, density), ops.magnitude_mask(d, density, ranks))
        assert torch.equal(ops.outlier_mask(d, density, 0.05),
                           ops.outlier_mask(d, density, 0.05, ranks))


def test_radix_selection_matches_kthvalue() -> None:
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(100_003, generator=g).abs().to(dtype)
        for k in (1, 17, 50_000, 100_003):
            want = torch.kthvalue(x.float(), x.numel() - k + 1).values
            assert float(ops._kth_largest(x, k)) == float(want)
