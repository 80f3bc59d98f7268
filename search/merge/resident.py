"""Merging in memory: parents held once on a device, candidates written in place.

:class:`ResidentParents` loads every parent once, each tensor stacked over models
(``[n_models, ...]``) on the device. :class:`ResidentModel` owns ONE preallocated
transformers model; :meth:`ResidentModel.materialize` writes a recipe's merge into its
parameters in place, so thousands of candidates cost no disk I/O and no memory growth.
Both executors call the same :class:`~search.merge.plan.MergePlan`, so a recipe gives
the same tensors here as ``soup merge`` writes to disk.

Example:
    >>> import tempfile
    >>> from tests.families import save_family
    >>> from search.recipe import Recipe
    >>> tmp = tempfile.TemporaryDirectory()
    >>> base, a, b = (str(p) for p in save_family(tmp.name, n_experts=2).values())
    >>> resident = ResidentModel(ResidentParents([base, a, b], device="cpu"))
    >>> recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": base,
    ...                            "models": [{"model": a}, {"model": b}],
    ...                            "parameters": {"weight": 0.5}})
    >>> model = resident.materialize(recipe)  # a torch.nn.Module, ready to evaluate
    >>> model is resident.materialize(recipe.with_changes(parameters={"weight": 1.0}))
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from search.errors import IncompatibleModelsError, SoupError
from search.merge import ops
from search.merge.devices import (
    DTYPE_BY_NAME,
    check_cast,
    keep_freed_memory,
    promoted_dtype,
    resolve_device,
)
from search.merge.plan import MergePlan
from search.merge.sources import (
    HEAD,
    AdapterSource,
    check_compatible,
    logical_tensors,
    open_model,
    read_for_merge,
)
from search.recipe import Recipe


class ResidentParents:
    """Every parent's tensors, stacked over models and held on ``device``.

    Args:
        models: model paths or hub ids; the first is the reference for the config.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        dtype: store the parents in this dtype (default: as on disk). A precision below
            the disk's saves memory but then differs from what ``soup merge`` computes.
        allow_pickle: accept pickle checkpoints.
        truncate_vocab: crop vocab tensors to the smallest vocabulary.
        cache_ranks: keep, per parent and tensor, the magnitude order of its task
            vector (4 bytes per parameter and kind, computed on first use), so
            TIES/Breadcrumbs/DELLA candidates skip selection and sorting. Results are
            identical either way.
    """

    def __init__(self, models: Sequence[str], *, device: str = "auto", dtype: str | None = None,
                 allow_pickle: bool = False, truncate_vocab: bool = False,
                 cache_ranks: bool = True) -> None:
        if len(set(models)) != len(models):
            raise SoupError("a parent is listed twice; list each model once")
        self.models = tuple(models)
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        sources = [open_model(m, allow_pickle=allow_pickle) for m in self.models]
        self.shapes = check_compatible(sources, truncate_vocab)
        self.num_layers = sources[0].num_layers
        self.config: dict[str, Any] = dict(sources[0].config)
        self.folder = sources[0].folder
        self.dtypes = {m: {n: t[1] for n, t in logical_tensors(s).items()}
                       for m, s in zip(self.models, sources, strict=True)}
        # Full models are stacked; an adapter parent keeps only its factors and reads
        # the stacked row of the model it applies to (loaded hidden if not a parent).
        dense = [s for s in sources if not isinstance(s, AdapterSource)]
        for s in sources:
            if isinstance(s, AdapterSource) and s.model.ref not in [d.ref for d in dense]:
                dense.append(s.model)
        self.row = {s.ref: i for i, s in enumerate(dense)}
        # adapter parent -> (the stacked model it applies to, its factors)
        self.adapters = {s.ref: (s.model.ref, s.adapter.to(self.device))
                         for s in sources if isinstance(s, AdapterSource)}
        self.stacks: dict[str, Tensor] = {}
        for name, shape in self.shapes.items():
            stacked = torch.stack([read_for_merge(s, name, shape) for s in dense])
            dt = DTYPE_BY_NAME[dtype] if dtype and stacked.is_floating_point() else stacked.dtype
            self.stacks[name] = stacked.to(device=self.device, dtype=dt)
        for s in sources:
            s.close()
        self.cache_ranks = cache_ranks
        self._ranks: dict[tuple[str, str, str, str, str], Tensor] = {}

    def tensor(self, model: str, name: str) -> Tensor:
        """Parent ``model``'s tensor ``name`` (a view for full models; computed from the
        factors for adapter parents)."""
        if model in self.adapters:
            under, adapter = self.adapters[model]
            return adapter.apply(name, self.stacks[name][self.row[under]])
        return self.stacks[name][self.row[model]]

    def gather(self, name: str, models: Sequence[str]) -> Tensor:
        """Tensor ``name`` of ``models``, stacked (``[len(models), ...]``); a view of the
        resident stack unless an adapter parent changes this tensor."""
        if any(m in self.adapters and self.adapters[m][1].touches(name) for m in models):
            return torch.stack([self.tensor(m, name) for m in models])
        return _select(self.stacks[name], [self.row[self.adapters[m][0] if m in self.adapters
                                                    else m] for m in models])

    def ranks(self, kind: str, models: Sequence[str], base: str, name: str,
              dtype: torch.dtype) -> list[Tensor]:
        """Orders (``ops.RANKERS[kind]``) of ``model - base`` for tensor ``name``, cached."""
        out = []
        for m in models:
            key = (kind, m, base, name, str(dtype))
            if key not in self._ranks:
                delta = self.tensor(m, name).to(dtype) - self.tensor(base, name).to(dtype)
                self._ranks[key] = ops.RANKERS[kind](delta)
            out.append(self._ranks[key])
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (stacked tensors and adapter factors)."""
        return (sum(t.numel() * t.element_size() for t in self.stacks.values())
                + sum(a.nbytes for _, a in self.adapters.values()))

    def work_dtype(self, recipe: Recipe, models: Sequence[str], name: str) -> torch.dtype:
        """The dtype a merge of ``models`` computes ``name`` in (as ``soup merge`` does)."""
        return promoted_dtype(recipe, [self.dtypes[m][name] for m in models])


def _select(stack: Tensor, rows: list[int]) -> Tensor:
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return stack[rows[0]: rows[0] + len(rows)]
    return stack[rows]


class ResidentModel:
    """One preallocated model on the parents' device, rewritten per candidate.

    Args:
        parents: the resident parents.
        dtype: the model's dtype (default: the reference parent's).
        quantize: ``nf4`` or ``fp4``: hold the model's linear layers in 4 bits
            (bitsandbytes). Each candidate is still merged in full precision, tensor by
            tensor, then quantized into the layer; embeddings, norms and the LM head stay
            in ``dtype``. Fails with a clear error where bitsandbytes cannot run.
    """

    def __init__(self, parents: ResidentParents, dtype: str | None = None,
                 quantize: str | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.parents = parents
        config = AutoConfig.from_pretrained(parents.folder)
        embed = next((s for n, s in parents.shapes.items() if "embed_tokens" in n), None)
        if embed is not None:
            config.vocab_size = embed[0]
        config.tie_word_embeddings = HEAD not in parents.shapes
        first = next(iter(parents.stacks.values()))
        torch_dtype = DTYPE_BY_NAME[dtype] if dtype else first.dtype
        with torch.device(parents.device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        self.model.eval().requires_grad_(False)
        self.quant = None
        if quantize:
            from search.merge.quant import quantize_model

            self.quant = quantize_model(self.model, quantize, compute_dtype=torch_dtype)
        quantized = self.quant.names if self.quant else frozenset()
        state = self.model.state_dict()
        missing = [n for n in parents.shapes if n not in state and n not in quantized]
        if missing:
            raise IncompatibleModelsError(
                f"tensor {missing[0]} of the parents has no place in a "
                f"{config.model_type} model built from their config; the checkpoint and "
                "config disagree"
            )
        self.targets = {n: state[n] for n in parents.shapes if n not in quantized}
        self.quantized = sorted(n for n in parents.shapes if n in quantized)

    def materialize(self, recipe: Recipe, check_finite: bool = True) -> torch.nn.Module:
        """Writes ``recipe``'s merge into the model's parameters and returns the model.

        Raises :class:`SoupError` subclasses for bad recipes (before touching weights)
        and :class:`~search.errors.NonFiniteMergeError` for NaN/inf results.
        """
        p = self.parents
        plan = MergePlan.build(recipe)
        unknown = [m for m in plan.models if m not in p.models]
        if unknown:
            raise SoupError(f"recipe uses model {unknown[0]!r}, which is not a resident "
                            f"parent; parents are {list(p.models)}")
        params = plan.resolve_all(list(p.shapes), p.num_layers)
        with torch.no_grad():
            for name, target in self.targets.items():
                self._merge_one(plan, name, params[name], target, check_finite)
            for name in self.quantized:
                self._merge_one(plan, name, params[name], None, check_finite)
        return self.model

    def _merge_one(self, plan: MergePlan, name: str, params: dict[str, Any],
                   target: Tensor | None, check_finite: bool) -> None:
        """Merges tensor ``name`` into ``target`` (``None``: into its 4-bit layer)."""
        p = self.parents
        wd = p.work_dtype(plan.recipe, plan.models, name)
        x = p.gather(name, plan.inputs)
        base = p.tensor(plan.base, name) if plan.base else None
        if x.dtype != wd:
            x = x.to(wd)
            base = None if base is None else base.to(wd)
        out_dt = DTYPE_BY_NAME[plan.recipe.out_dtype] if plan.recipe.out_dtype else wd
        ranks = None
        kind = plan.method.ranks
        if kind and p.cache_ranks and plan.base and x.is_floating_point():
            ranks = p.ranks(kind, plan.inputs, plan.base, name, wd)
        if target is not None and target.dtype == wd == out_dt:
            plan.run(name, params, x, base, out=target, check_finite=check_finite, ranks=ranks)
            return
        res = plan.run(name, params, x, base, check_finite=check_finite, ranks=ranks)
        if target is None:  # a 4-bit layer: only names in self.quantized come here
            assert self.quant is not None
            self.quant.write(name, res.to(out_dt))
            return
        if not res.is_floating_point():
            target.copy_(res)
            return
        out = res.to(out_dt)
        if check_finite and out.dtype != res.dtype:
            check_cast(plan, name, out)
        target.copy_(out)
