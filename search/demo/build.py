"""Builds the demo model family offline: a tiny Llama base and one expert per skill.

    python -m search.demo [--out DIR] [--seed N] [--force] [--no-table] [--adapters]

Into ``--out`` (default ``.cache/demo/models``): ``base/``, a 2-layer, 64-wide Llama
pretrained from random init on the skills of ``evaluators/skills.py`` until it is weak at
all of them, and ``expert_<skill>/``, the base fine-tuned on one skill; with ``--adapters``
also ``lora_<skill>/``, LoRA adapters trained like the experts (for ``models=demo_lora``).
Each folder has a ``demo_build.json`` marker; one whose marker matches the current settings
is kept unless ``--force``. Training runs in two spawned workers with one torch thread
each, so a seed gives identical weights. Then, unless ``--no-table``, the parents and a few
merges (by the resident merge engine) are scored on val and test with the lm-eval adapter,
printed and saved as ``table.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm at import; workers inherit it

from evaluators.skills import SKILLS
from search.demo.train import TrainConfig, build_model, is_complete

EXPERTS = tuple(f"expert_{s}" for s in SKILLS)
PARENTS = ("base", *EXPERTS)
ADAPTERS = tuple(f"lora_{s}" for s in SKILLS)
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def base_config(seed: int) -> TrainConfig:
    """Pretraining: mostly addition (the slowest skill) at first, then rebalanced toward
    whichever skill lags; constant lr; stopped once every skill has 0.2 on the probe."""
    return TrainConfig(skills=SKILLS, mix=(0.7, 0.25, 0.05), steps=2000, lr=1e-3, batch=64,
                       seed=1000 * seed + 1, warmup=50, final_frac=1.0, stop_floor=0.2,
                       probe_every=25, balance=True)


def finetune_config(skill: str, seed: int, lora: bool = False) -> TrainConfig:
    """Fine-tuning on one skill: few steps, 30% replay distilled from the base (so the other
    skills stay where the base had them and the task vectors add up), and a low lr (an
    expert) or the higher one LoRA needs (an adapter)."""
    return TrainConfig(skills=(skill,), steps=600, lr=2e-3 if lora else 1e-4, batch=64,
                       seed=1000 * seed + (5 if lora else 2) + SKILLS.index(skill),
                       replay=0.3, distill=True, warmup=20, final_frac=0.1)


def plan(out: Path, seed: int, adapters: bool = False) -> dict[str, dict[str, Any]]:
    """Every model's job for :func:`.train.build_model`; its ``spec`` is what the marker
    must say. With ``adapters``, the LoRA adapters' jobs too."""
    model = {"seed": seed, "hidden": 64, "layers": 2}
    base_spec = {"name": "base", "model": model, "train": base_config(seed).to_dict()}
    jobs = {"base": {"folder": str(out / "base"), "spec": base_spec, "model": model,
                     "train": base_config(seed)}}
    for names, lora in [(EXPERTS, None), (ADAPTERS, LORA)][:1 + adapters]:
        extra = {"lora": lora} if lora else {}
        for skill, name in zip(SKILLS, names, strict=True):
            cfg = finetune_config(skill, seed, lora=bool(lora))
            spec = {"name": name, "base": base_spec, "train": cfg.to_dict(), **extra}
            jobs[name] = {"folder": str(out / name), "spec": spec, "init": str(out / "base"),
                          "train": cfg, **extra}
    return jobs


def _report(name: str, stats: dict[str, Any]) -> None:
    probe = " ".join(f"{k} {v:.2f}" for k, v in stats.get("probe", {}).items())
    print(f"  {name}: {stats['steps']} steps in {stats['seconds']:.1f} s, "
          f"loss {stats['loss']:.3f}{'  probe: ' + probe if probe else ''}", flush=True)


def build(out: Path, jobs: dict[str, dict[str, Any]], force: bool) -> list[str]:
    """Trains whatever is missing or stale; returns the names of the models it built."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*PARENTS, *ADAPTERS):  # leftovers of interrupted builds
        for stale in [*out.glob(f".{name}.tmp-*"), *out.glob(f".{name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    todo = [n for n, job in jobs.items()
            if force or not is_complete(Path(job["folder"]), job["spec"])]
    if "base" in todo:
        todo = list(jobs)  # experts and adapters trained on an old base are stale
    if not todo:
        print(f"== all models in {out} are complete (use --force to rebuild)")
        return []
    print(f"== training {', '.join(todo)} into {out} (seed {jobs['base']['model']['seed']}, "
          "2 workers)", flush=True)
    with multiprocessing.get_context("spawn").Pool(processes=min(2, len(todo))) as pool:
        if "base" in todo:
            _report("base", pool.apply(build_model, (jobs["base"],)))
        names = [n for n in todo if n != "base"]
        for name, stats in zip(names, pool.imap(build_model, [jobs[n] for n in names]),
                               strict=True):
            _report(name, stats)
        pool.close()
        pool.join()
    return todo


def merge_recipes(adapters: bool = False) -> dict[str, dict[str, Any]]:
    """The table's merges, as recipe dicts whose models are folder names under ``--out``;
    with ``adapters``, also each adapter alone on the base and their task arithmetic."""

    def recipe(method: str, names: tuple[str, ...], **params: float) -> dict[str, Any]:
        models = [{"model": n, "parameters": {"weight": 1.0, **params}} for n in names]
        if method == "linear":
            return {"merge_method": method, "models": models}
        return {"merge_method": method, "base_model": "base", "models": models,
                "parameters": {"lambda": 1.0}}

    recipes = {"soup": recipe("linear", EXPERTS),
               "task_arithmetic": recipe("task_arithmetic", EXPERTS),
               "ties": recipe("ties", EXPERTS, density=0.5)}
    if adapters:
        refs = tuple(f"base+{a}" for a in ADAPTERS)
        recipes.update({a: recipe("linear", (r,)) for a, r in zip(ADAPTERS, refs, strict=True)})
        recipes["lora_task_arithmetic"] = recipe("task_arithmetic", refs)
    return recipes


def score_table(out: Path, adapters: bool = False) -> list[dict[str, Any]]:
    """Rows of the table: each parent from disk, each merge (and, with ``adapters``, each
    adapter on the base) from the resident engine, scored on val and test."""
    import logging

    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.base import TaskSpec
    from evaluators.lm_eval import LmEvalEvaluator
    from search.merge.resident import ResidentModel, ResidentParents
    from search.recipe import Recipe

    # no per-model progress bars, nor lm-eval's notes about in-memory models
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    suffix = {"val": "", "test": "_test"}
    evaluators = {split: LmEvalEvaluator([TaskSpec(f"soup_{s}{x}") for s in SKILLS])
                  for split, x in suffix.items()}
    tokenizer = AutoTokenizer.from_pretrained(out / "base")

    def path(ref: str) -> str:  # a folder name under ``out`` (``base+lora_add`` too)
        return "+".join(str(out / part) for part in ref.split("+"))

    def row(name: str, recipe: dict[str, Any] | None, model: Any) -> dict[str, Any]:
        scores: dict[str, Any] = {"name": name, "recipe": recipe}
        for split, ev in evaluators.items():
            metrics = ev.evaluate(model, tokenizer).metrics
            skill = {s: round(metrics[f"soup_{s}{suffix[split]}"], 4) for s in SKILLS}
            scores[split] = {**skill, "mean": round(sum(skill.values()) / len(skill), 4)}
        return scores

    rows = [row(n, None, AutoModelForCausalLM.from_pretrained(out / n).eval()) for n in PARENTS]
    refs = [*PARENTS, *(f"base+{a}" for a in ADAPTERS if adapters)]
    resident = ResidentModel(ResidentParents([path(r) for r in refs], device="cpu"))
    for name, recipe in merge_recipes(adapters).items():
        data = {**recipe, "models": [{**m, "model": path(m["model"])} for m in recipe["models"]]}
        if "base_model" in data:
            data["base_model"] = path(data["base_model"])
        rows.append(row(name, recipe, resident.materialize(Recipe.from_dict(data))))
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """Exact match per skill and split, with the mean over skills; a merge's label has its
    density and lambda."""
    cols = [*SKILLS, "mean"]
    head = " ".join(f"{c:>7}" for c in cols)
    print(f"{'exact match':26} {'val':^31} | {'test':^31}")
    print(f"{'model':26} {head} | {head}")
    for row in rows:
        recipe = row["recipe"] or {"models": [{}]}
        density = recipe["models"][0].get("parameters", {}).get("density")
        lam = recipe.get("parameters", {}).get("lambda")
        label = " ".join([row["name"], *([f"d={density:g}"] if density is not None else []),
                          *([f"λ={lam:g}"] if lam is not None else [])])
        cells = [" ".join(f"{row[sp][c]:7.3f}" for c in cols) for sp in ("val", "test")]
        print(f"{label:26} {cells[0]} | {cells[1]}")


def checks(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per split: is each expert best at its skill, which parent is good at every
    skill (>= 0.9), the best parent mean, and the merges that beat it."""
    parents = [r for r in rows if r["name"] in PARENTS]
    merges = [r for r in rows if r not in parents and r["name"] not in ADAPTERS]
    out = {}
    for sp in ("val", "test"):
        own = all(r[sp][s] > max(o[sp][s] for o in parents if o is not r)
                  for s, r in zip(SKILLS, parents[1:], strict=True))
        best = max(p[sp]["mean"] for p in parents)
        out[sp] = {"experts_best_at_own_skill": own,
                   "parents_good_at_all": [p["name"] for p in parents
                                           if min(p[sp][s] for s in SKILLS) >= 0.9],
                   "best_parent_mean": best,
                   "merges_beating_every_parent": [r["name"] for r in merges
                                                   if r[sp]["mean"] > best]}
    return out


def table(out: Path, jobs: dict[str, dict[str, Any]], refresh: bool,
          adapters: bool = False) -> None:
    """Prints the table, computing it (and ``table.json``) unless one exists for the same
    model specs."""
    blob = json.dumps({n: j["spec"] for n, j in jobs.items()}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    path = out / "table.json"
    try:
        saved = json.loads(path.read_text()) if path.is_file() and not refresh else None
    except ValueError:
        saved = None
    if saved is None or saved.get("spec") != digest:
        t0 = time.perf_counter()
        rows = score_table(out, adapters)
        saved = {"spec": digest, "skills": list(SKILLS), "metric": "exact_match",
                 "rows": rows, "checks": checks(rows),
                 "seconds": round(time.perf_counter() - t0, 1)}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        print(f"== scored {len(rows)} models in {saved['seconds']} s -> {path}")
    print_table(saved["rows"])
    for sp, c in saved["checks"].items():
        print(f"{sp}: experts best at own skill: {c['experts_best_at_own_skill']}; good at all:"
              f" {c['parents_good_at_all'] or 'none'}; best parent mean {c['best_parent_mean']:.3f}"
              f", beaten by: {', '.join(c['merges_beating_every_parent']) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".cache/demo/models"), help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="seed of every model and stream")
    ap.add_argument("--force", action="store_true", help="rebuild even complete models")
    ap.add_argument("--no-table", action="store_true", help="skip the evaluation table")
    ap.add_argument("--adapters", action="store_true",
                    help="also train LoRA adapters lora_<skill> on the base (needs peft)")
    args = ap.parse_args(argv)
    if args.adapters and importlib.util.find_spec("peft") is None:
        ap.error("--adapters needs peft: pip install 'soupsearch[adapters]'")
    t0 = time.perf_counter()
    jobs = plan(args.out, args.seed, args.adapters)
    built = build(args.out, jobs, args.force)
    print(f"== models ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if not args.no_table:
        table(args.out, jobs, refresh=bool(built), adapters=args.adapters)
    print(f"== done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
