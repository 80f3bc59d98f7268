"""Merge problems with a known good recipe, for judging the search (``bench_quality``).

Each problem is a tiny base of one architecture, pretrained like the demo's until it is
weak at every skill, and experts trained from it *jointly*: each expert's own loss (its
skill, with replay of the mixture distilled from the base, as the demo's experts) plus a
loss on the scored skills of one chosen merge, ``base + sum_i c_i(depth) * tau_i``. That
merge (task arithmetic with coefficients ``c_i``, per layer when an expert gives several
anchors) is therefore a known good point, and the problem decides which recipes win:
unequal weights, a coefficient well below or above 1, an expert to leave out (trained on
a skill that breaks a scored one), sparse task vectors under dense noise (where trimming
wins), or coefficients that change with depth. The scored tasks are always the demo's
three skills (val for the search, test held out).

    python -m tests.problems [--out DIR] [NAME ...]

Example:
    >>> sorted(PROBLEMS)[:2]
    ['drop', 'high_lambda']
    >>> PROBLEMS["drop"].experts[-1].skill
    'add_wrong'
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm at import; workers inherit it

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluators.skills import SKILLS, held_out_prompts, make_example
from search.demo.tiny import byte_tokenizer
from search.demo.train import IGNORE, TrainConfig, encode, is_complete, new_model, save_atomic
from search.demo.train import train as train_module
from search.merge.layers import depth, evaluate

DEFAULT_OUT = Path(".cache/quality")
EXTRA_SKILLS = ("add_wrong",)  # trained by an expert, never scored


@dataclass(frozen=True)
class Expert:
    """One expert: the skill it is trained on and its coefficient in the target merge
    (one value, or anchors across depth as a per-layer recipe value takes them)."""

    skill: str
    coef: tuple[float, ...]


@dataclass(frozen=True)
class Problem:
    """A base architecture, its experts and how they are trained.

    ``avoid``: coefficient vectors (one number per expert) whose task-arithmetic merge is
    trained to be bad (a hinge keeps its loss on the scored skills above ``margin``), so
    that the landscape has a clear optimum rather than a plateau of good merges.
    ``density``: each expert's task vector is trained on a fixed random mask of this
    density (``None``: dense); ``noise``: then each gets dense Gaussian noise of this many
    times the RMS of its trained entries, which merges that keep only the largest entries
    remove. ``story`` says which recipes should win.
    """

    name: str
    arch: str
    experts: tuple[Expert, ...]
    story: str
    layers: int = 2
    tie: bool = False
    steps: int = 300
    merge_weight: float = 1.0
    avoid: tuple[tuple[float, ...], ...] = ()
    margin: float = 0.8
    density: float | None = None
    noise: float = 0.0
    seed: int = 0

    def names(self) -> list[str]:
        """The experts' folder names: ``e<i>_<skill>``."""
        return [f"e{i}_{e.skill}" for i, e in enumerate(self.experts)]


PROBLEMS: dict[str, Problem] = {p.name: p for p in (
    Problem("weights", "llama", (Expert("add", (1.2,)), Expert("reverse", (0.3,)),
                                 Expert("dup", (0.7,))),
            "task arithmetic with unequal weights (1.2, 0.3, 0.7)",
            avoid=((0.7, 0.7, 0.7), (1.0, 1.0, 1.0), (0.3, 1.2, 0.7))),
    Problem("low_lambda", "qwen2", (Expert("add", (0.15,)), Expert("reverse", (0.15,)),
                                    Expert("dup", (0.15,))),
            "every coefficient 0.15: lambda well below 1, and below what a linear soup "
            "(coefficients summing to 1) can reach", tie=True,
            avoid=((0.45, 0.45, 0.45), (1.0, 1.0, 1.0))),
    Problem("high_lambda", "gpt2", (Expert("add", (1.4,)), Expert("reverse", (1.4,))),
            "both coefficients 1.4: lambda well above 1 (linear soups cannot reach it)",
            avoid=((0.5, 0.5), (0.9, 0.9))),
    Problem("drop", "llama", (Expert("add", (1.0,)), Expert("reverse", (1.0,)),
                              Expert("dup", (1.0,)), Expert("add_wrong", (0.0,))),
            "the fourth expert (trained to answer additions wrong) must be left out",
            seed=1),
    Problem("sparse", "qwen2", (Expert("add", (1.0,)), Expert("reverse", (1.0,)),
                                Expert("dup", (1.0,)), Expert("add", (1.0,)),
                                Expert("reverse", (1.0,))),
            "five sparse task vectors under dense noise: trimming (TIES, Breadcrumbs, DELLA)"
            " beats plain task arithmetic", density=0.1, noise=0.2, seed=2),
    Problem("layers", "llama", (Expert("add", (0.2, 1.4)), Expert("reverse", (1.4, 0.2)),
                                Expert("dup", (0.8, 0.8))),
            "coefficients that change with depth (add late, reverse early): per-layer values",
            layers=4, seed=3, avoid=((0.8, 0.8, 0.8), (1.4, 1.4, 0.8))),
)}


def example(skill: str, rng: random.Random) -> tuple[str, str]:
    """A training pair of a demo skill, or of ``add_wrong`` (sums off by 11)."""
    if skill == "add_wrong":
        prompt, target = make_example("add", rng)
        return prompt, str(int(target) + 11)
    return make_example(skill, rng)


def stream(skills: Sequence[str], seed: int) -> Iterator[tuple[str, str]]:
    """Endless training pairs of ``skills``, never a val or test prompt."""
    rng, exclude = random.Random(seed), held_out_prompts()
    while True:
        pair = example(rng.choice(list(skills)), rng)
        if pair[0] not in exclude:
            yield pair


def base_config(seed: int) -> TrainConfig:
    """As the demo's base: weak at every skill (0.2 on the probe) when it stops."""
    return TrainConfig(skills=SKILLS, mix=(0.7, 0.25, 0.05), steps=2000, lr=1e-3, batch=64,
                       seed=1000 * seed + 11, warmup=50, final_frac=1.0, stop_floor=0.2,
                       probe_every=25, balance=True)


def _coefs(problem: Problem, names: Sequence[str], layers: int) -> list[dict[str, float]]:
    """Each expert's target coefficient per tensor."""
    return [{n: float(evaluate(list(e.coef), n, depth(n, layers))) for n in names}
            for e in problem.experts]


def _ce(model: Any, params: dict[str, Tensor], batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    inp, att, lab = batch
    logits = torch.func.functional_call(model, params, (inp,), {"attention_mask": att}).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), lab[:, 1:],
                           ignore_index=IGNORE)


def _kl(model: Any, params: dict[str, Tensor], ref: Tensor,
        batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    inp, att, lab = batch
    logits = torch.func.functional_call(model, params, (inp,), {"attention_mask": att}).logits
    keep = lab[:, 1:] != IGNORE
    return F.kl_div(logits[:, :-1][keep].float().log_softmax(-1), ref, log_target=True,
                    reduction="batchmean")


def train_experts(model: Any, tokenizer: Any, problem: Problem) -> tuple[list[dict[str, Tensor]],
                                                                          dict[str, Any]]:
    """The experts' task vectors, trained jointly from ``model`` (the base)."""
    gen = torch.Generator().manual_seed(problem.seed + 17)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = [{n: (torch.rand(p.shape, generator=gen) < problem.density).float()
              for n, p in base.items()} if problem.density else None for _ in problem.experts]
    taus = [{n: torch.zeros_like(p, requires_grad=True) for n, p in base.items()}
            for _ in problem.experts]
    coefs = _coefs(problem, list(base), model.config.num_hidden_layers)
    opt = torch.optim.AdamW([t for tau in taus for t in tau.values()], lr=3e-4 / (
        problem.density or 1.0) ** 0.5, weight_decay=0.0, betas=(0.9, 0.98))
    own = [stream((e.skill,), 1000 * problem.seed + 101 * i) for i, e in enumerate(problem.experts)]
    replay, mixed = stream(SKILLS, problem.seed + 7), stream(SKILLS, problem.seed + 13)

    def delta(i: int, n: str) -> Tensor:
        return taus[i][n] * masks[i][n] if masks[i] is not None else taus[i][n]  # type: ignore[index]

    t0, losses = time.perf_counter(), []
    for step in range(problem.steps):
        lr_scale = min(1.0, (step + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * lr_scale
        loss = torch.zeros(())
        rb = encode(tokenizer, [next(replay) for _ in range(16)])
        with torch.no_grad():
            ref = torch.func.functional_call(model, base, (rb[0],), {"attention_mask": rb[1]})
            ref = ref.logits[:, :-1][rb[2][:, 1:] != IGNORE].float().log_softmax(-1)
        for i in range(len(problem.experts)):
            params = {n: base[n] + delta(i, n) for n in base}
            loss = loss + _ce(model, params, encode(tokenizer, [next(own[i]) for _ in range(48)]))
            loss = loss + 0.5 * _kl(model, params, ref, rb)
        merged = {n: base[n] + sum(c[n] * delta(i, n) for i, c in enumerate(coefs)) for n in base}
        loss = loss + problem.merge_weight * len(problem.experts) * _ce(
            model, merged, encode(tokenizer, [next(mixed) for _ in range(64)]))
        for point in problem.avoid:  # merges that must stay bad
            bad = {n: base[n] + sum(a * delta(i, n) for i, a in enumerate(point)) for n in base}
            ce = _ce(model, bad, encode(tokenizer, [next(mixed) for _ in range(32)]))
            loss = loss + len(problem.experts) * torch.relu(problem.margin - ce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([t for tau in taus for t in tau.values()], 1.0)
        opt.step()
        losses.append(loss.item() / len(problem.experts))
    out = []
    for i in range(len(problem.experts)):
        tau = {n: delta(i, n).detach() for n in base}
        if problem.noise:
            live = torch.cat([t[t != 0] for t in tau.values()])
            rms = float(live.pow(2).mean().sqrt()) if live.numel() else 0.0
            tau = {n: t + torch.randn(t.shape, generator=gen) * problem.noise * rms
                   for n, t in tau.items()}
        out.append(tau)
    stats = {"steps": problem.steps, "loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
             "seconds": round(time.perf_counter() - t0, 1)}
    return out, stats


def spec(problem: Problem) -> dict[str, Any]:
    """What a problem's build marker must say."""
    return {"problem": asdict(problem), "base": base_config(problem.seed).to_dict(),
            "version": 2}


def build_problem(problem: Problem, out: Path, force: bool = False) -> dict[str, Any]:
    """Builds ``out/<name>/{base, e0_<skill>, ...}`` unless complete; returns stats."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    folder = out / problem.name
    want = spec(problem)
    if not force and all(is_complete(folder / n, want) for n in ["base", *problem.names()]):
        return {"name": problem.name, "built": False}
    tokenizer = byte_tokenizer()
    torch.manual_seed(problem.seed)
    model = new_model(seed=problem.seed, hidden=64, layers=problem.layers, arch=problem.arch,
                      tie=problem.tie)
    base_stats = train_module(model, tokenizer, base_config(problem.seed))
    model.requires_grad_(False)
    taus, stats = train_experts(model, tokenizer, problem)
    save_atomic(model, tokenizer, folder / "base", {"spec": want, "stats": base_stats})
    for name, tau in zip(problem.names(), taus, strict=True):
        expert = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)
        with torch.no_grad():
            for n, p in expert.named_parameters():
                p.add_(tau[n])
        save_atomic(expert, tokenizer, folder / name, {"spec": want, "stats": stats})
    return {"name": problem.name, "built": True, "base": base_stats, "experts": stats}


def _build_one(args: tuple[str, str, bool]) -> dict[str, Any]:
    return build_problem(PROBLEMS[args[0]], Path(args[1]), args[2])


def build_all(names: Sequence[str], out: Path, force: bool = False,
              processes: int = 2) -> list[dict[str, Any]]:
    """Builds the named problems, ``processes`` at a time (one torch thread each)."""
    jobs = [(n, str(out), force) for n in names]
    with multiprocessing.get_context("spawn").Pool(min(processes, len(jobs))) as pool:
        return list(pool.imap(_build_one, jobs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.problems",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"problems (default: all of {list(PROBLEMS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild complete problems")
    parser.add_argument("--processes", type=int, default=2, help="builds at a time")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in PROBLEMS]
    if unknown:
        parser.error(f"unknown problem {unknown[0]!r}; choose from {', '.join(PROBLEMS)}")
    for stats in build_all(args.names or list(PROBLEMS), args.out, args.force,
                           args.processes):
        print(stats, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
