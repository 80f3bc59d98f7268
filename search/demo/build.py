"""Builds the demo model family offline: a tiny Llama base and one expert per skill.

    python -m search.demo [--out DIR] [--seed N] [--force] [--no-table]
                                       [--adapters]

Into ``--out`` (default ``.cache/demo/models``): ``base/`` (a 2-layer, 64-wide Llama
pretrained from random init on a mixture of the skills in ``evaluators/skills.py``,
rebalanced toward the weaker skills as it learns and stopped once every skill reaches
0.2 exact match on a probe set, i.e. while it is still weak at all of them) and
``expert_add/``, ``expert_reverse/``, ``expert_dup/`` (the base fine-tuned on one skill,
with replay of the mixture distilled from the base, so the other skills stay where the
base had them and the experts' task vectors add up).
With ``--adapters``, also ``lora_add/``, ``lora_reverse/``, ``lora_dup/``: PEFT LoRA
adapters (rank 8 on every attention and MLP projection) trained on the base the same
way as the experts, for searches over adapter parents (``models=demo_lora``).
Each folder is a ``save_pretrained`` model or adapter (safetensors) with the byte-level
tokenizer and a ``demo_build.json`` marker; a folder whose marker matches the current settings is
kept unless ``--force``. Training runs in two spawned worker processes with one torch
thread each, so a seed gives identical weights. Then, unless ``--no-table``, it scores
the parents and a few merges (computed by the resident merge engine) on the val and test
splits with the lm-eval adapter, prints the table and writes ``table.json``.
"""

from __future__ import annotations

import argparse
import hashlib
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

DEFAULT_OUT = Path(".cache/demo/models")
MODEL = {"hidden": 64, "layers": 2}
EXPERTS = tuple(f"expert_{s}" for s in SKILLS)
PARENTS = ("base", *EXPERTS)
ADAPTERS = tuple(f"lora_{s}" for s in SKILLS)
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}
TA_LAMBDA = 1.0
TIES_DENSITY, TIES_LAMBDA = 0.5, 1.0


def base_config(seed: int) -> TrainConfig:
    """Pretraining: mostly addition (the slowest skill) at first, then rebalanced toward
    whichever skill lags; constant lr; stopped once every skill has 0.2 on the probe."""
    return TrainConfig(skills=SKILLS, mix=(0.7, 0.25, 0.05), steps=2000, lr=1e-3, batch=64,
                       seed=1000 * seed + 1, warmup=50, final_frac=1.0, stop_floor=0.2,
                       probe_every=25, balance=True)


def expert_config(skill: str, seed: int) -> TrainConfig:
    """Fine-tuning on one skill: low lr, few steps, 30% replay distilled from the base."""
    return TrainConfig(skills=(skill,), steps=600, lr=1e-4, batch=64,
                       seed=1000 * seed + 2 + SKILLS.index(skill), replay=0.3, distill=True,
                       warmup=20, final_frac=0.1)


def adapter_config(skill: str, seed: int) -> TrainConfig:
    """LoRA training on one skill: as for an expert, with the higher lr LoRA needs."""
    return TrainConfig(skills=(skill,), steps=600, lr=2e-3, batch=64,
                       seed=1000 * seed + 5 + SKILLS.index(skill), replay=0.3, distill=True,
                       warmup=20, final_frac=0.1)


def plan(out: Path, seed: int, adapters: bool = False) -> dict[str, dict[str, Any]]:
    """Every model's job: folder, spec (what its marker must say) and training config;
    with ``adapters``, the LoRA adapters' jobs too."""
    model = {"seed": seed, **MODEL}
    base_spec = {"name": "base", "model": model, "train": base_config(seed).to_dict()}
    jobs = {"base": {"folder": str(out / "base"), "spec": base_spec, "model": model,
                     "train": base_config(seed)}}
    for skill, name in zip(SKILLS, EXPERTS, strict=True):
        cfg = expert_config(skill, seed)
        spec = {"name": name, "base": base_spec, "train": cfg.to_dict()}
        jobs[name] = {"folder": str(out / name), "spec": spec, "init": str(out / "base"),
                      "train": cfg}
    for skill, name in zip(SKILLS, ADAPTERS, strict=True) if adapters else ():
        cfg = adapter_config(skill, seed)
        spec = {"name": name, "base": base_spec, "train": cfg.to_dict(), "lora": LORA}
        jobs[name] = {"folder": str(out / name), "spec": spec, "init": str(out / "base"),
                      "train": cfg, "lora": LORA}
    return jobs


def spec_hash(jobs: dict[str, dict[str, Any]]) -> str:
    """A digest of every model's spec (the table is reused only for the same one)."""
    blob = json.dumps({n: j["spec"] for n, j in jobs.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _report(name: str, stats: dict[str, Any]) -> None:
    probe = " ".join(f"{k} {v:.2f}" for k, v in stats.get("probe", {}).items())
    print(f"  {name}: {stats['steps']} steps in {stats['seconds']:.1f} s, "
          f"loss {stats['loss']:.3f}{'  probe: ' + probe if probe else ''}", flush=True)


def _clean_temporaries(out: Path) -> None:
    """Removes leftovers of interrupted builds (``.NAME.tmp-PID``, ``.NAME.old-PID``)."""
    for name in (*PARENTS, *ADAPTERS):
        for stale in [*out.glob(f".{name}.tmp-*"), *out.glob(f".{name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)


def build(out: Path, seed: int, force: bool, adapters: bool = False) -> list[str]:
    """Trains whatever is missing or stale; returns the names of the models it built."""
    out.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out)
    jobs = plan(out, seed, adapters)
    todo = [n for n in jobs if force or not is_complete(Path(jobs[n]["folder"]),
                                                        jobs[n]["spec"])]
    if "base" in todo:
        todo = list(jobs)  # experts and adapters trained on an old base are stale
    if not todo:
        print(f"== all models in {out} are complete (use --force to rebuild)")
        return []
    print(f"== training {', '.join(todo)} into {out} (seed {seed}, 2 workers)", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=min(2, len(todo))) as pool:
        if "base" in todo:
            _report("base", pool.apply(build_model, (jobs["base"],)))
        names = [n for n in todo if n != "base"]
        for name, stats in zip(names, pool.imap(build_model, [jobs[n] for n in names]),
                               strict=True):
            _report(name, stats)
        pool.close()
        pool.join()
    return todo


def merge_recipes() -> dict[str, dict[str, Any]]:
    """The table's merges, as recipe dicts whose models are folder names under ``--out``."""

    def models(**params: float) -> list[dict[str, Any]]:
        return [{"model": e, "parameters": dict(params)} for e in EXPERTS]

    return {
        "soup": {"merge_method": "linear", "models": models(weight=1.0)},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                            "models": models(weight=1.0), "parameters": {"lambda": TA_LAMBDA}},
        "ties": {"merge_method": "ties", "base_model": "base",
                 "models": models(weight=1.0, density=TIES_DENSITY),
                 "parameters": {"lambda": TIES_LAMBDA}},
    }


def _resolve(recipe: dict[str, Any], out: Path) -> dict[str, Any]:
    """The recipe with folder names (``base+lora_add`` too) replaced by paths under ``out``."""
    def path(ref: str) -> str:
        return "+".join(str(out / part) for part in ref.split("+"))

    data = {**recipe, "models": [{**m, "model": path(m["model"])} for m in recipe["models"]]}
    if "base_model" in data:
        data["base_model"] = str(out / data["base_model"])
    return data


def _quiet() -> None:
    """Silences per-model progress bars and lm-eval's notes about in-memory models."""
    import logging

    import datasets
    import transformers

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _scorer() -> Any:
    """A function scoring a model on val and test with the lm-eval adapter."""
    from evaluators.base import TaskSpec
    from evaluators.lm_eval import LmEvalEvaluator

    suffix = {"val": "", "test": "_test"}
    evaluators = {split: LmEvalEvaluator([TaskSpec(f"soup_{s}{x}") for s in SKILLS])
                  for split, x in suffix.items()}

    def score(model: Any, tokenizer: Any) -> dict[str, dict[str, float]]:
        out = {}
        for split, ev in evaluators.items():
            metrics = ev.evaluate(model, tokenizer).metrics
            row = {s: round(metrics[f"soup_{s}{suffix[split]}"], 4) for s in SKILLS}
            out[split] = {**row, "mean": round(sum(row.values()) / len(row), 4)}
        return out

    return score


def adapter_recipes() -> dict[str, dict[str, Any]]:
    """Rows for the adapters: each alone on the base, and their task arithmetic."""
    def ref(name: str) -> str:
        return f"base+{name}"

    rows: dict[str, dict[str, Any]] = {
        name: {"merge_method": "linear", "models": [{"model": ref(name),
                                                     "parameters": {"weight": 1.0}}]}
        for name in ADAPTERS}
    rows["lora_task_arithmetic"] = {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": ref(a), "parameters": {"weight": 1.0}} for a in ADAPTERS],
        "parameters": {"lambda": TA_LAMBDA}}
    return rows


def score_table(out: Path, adapters: bool = False) -> list[dict[str, Any]]:
    """Rows of the table: each parent from disk, each merge (and, with ``adapters``, each
    adapter on the base) from the resident engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from search.merge.resident import ResidentModel, ResidentParents
    from search.recipe import Recipe

    _quiet()
    score = _scorer()
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    rows = []
    for name in PARENTS:
        model = AutoModelForCausalLM.from_pretrained(out / name).eval()
        rows.append({"name": name, "recipe": None, **score(model, tokenizer)})
    refs = [str(out / n) for n in PARENTS]
    refs += [f"{out / 'base'}+{out / a}" for a in ADAPTERS] if adapters else []
    resident = ResidentModel(ResidentParents(refs, device="cpu"))
    recipes = {**merge_recipes(), **(adapter_recipes() if adapters else {})}
    for name, recipe in recipes.items():
        model = resident.materialize(Recipe.from_dict(_resolve(recipe, out)))
        rows.append({"name": name, "recipe": recipe, **score(model, tokenizer)})
    return rows


def _label(row: dict[str, Any]) -> str:
    params = (row["recipe"] or {}).get("parameters", {})
    density = (row["recipe"] or {"models": [{}]})["models"][0].get("parameters", {})
    extra = [f"d={density['density']:g}"] if "density" in density else []
    extra += [f"λ={params['lambda']:g}"] if "lambda" in params else []
    return f"{row['name']} {' '.join(extra)}".strip()


def print_table(rows: list[dict[str, Any]]) -> None:
    """Exact match per skill and split, with the mean over skills."""
    cols = [*SKILLS, "mean"]
    head = " ".join(f"{c:>7}" for c in cols)
    print(f"{'exact match':26} {'val':^31} | {'test':^31}")
    print(f"{'model':26} {head} | {head}")
    for row in rows:
        cells = [" ".join(f"{row[sp][c]:7.3f}" for c in cols) for sp in ("val", "test")]
        print(f"{_label(row):26} {cells[0]} | {cells[1]}")


def checks(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per split: is each expert best at its skill, which parent is good at every
    skill (>= 0.9), the best parent mean, and the merges that beat it."""
    parents = [r for r in rows if r["name"] in PARENTS]
    out = {}
    for sp in ("val", "test"):
        own = all(r[sp][s] > max(o[sp][s] for o in parents if o is not r)
                  for s, r in zip(SKILLS, parents[1:], strict=True))
        best = max(p[sp]["mean"] for p in parents)
        out[sp] = {"experts_best_at_own_skill": own,
                   "parents_good_at_all": [p["name"] for p in parents
                                           if min(p[sp][s] for s in SKILLS) >= 0.9],
                   "best_parent_mean": best,
                   "merges_beating_every_parent": [
                       r["name"] for r in rows if r not in parents
                       and r["name"] not in ADAPTERS and r[sp]["mean"] > best]}
    return out


def table(out: Path, digest: str, refresh: bool, adapters: bool = False) -> None:
    """Prints the table, computing it (and ``table.json``) unless a current one exists."""
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
        print(f"{sp}: experts best at own skill: {c['experts_best_at_own_skill']}; "
              f"good at all: {c['parents_good_at_all'] or 'none'}; best parent mean "
              f"{c['best_parent_mean']:.3f}, beaten by: "
              f"{', '.join(c['merges_beating_every_parent']) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="seed of every model and stream")
    ap.add_argument("--force", action="store_true", help="rebuild even complete models")
    ap.add_argument("--no-table", action="store_true", help="skip the evaluation table")
    ap.add_argument("--adapters", action="store_true",
                    help="also train LoRA adapters lora_<skill> on the base (needs peft)")
    args = ap.parse_args(argv)
    if args.adapters:
        try:
            import peft  # noqa: F401
        except ImportError:
            ap.error("--adapters needs peft: pip install 'soupsearch[adapters]'")
    t0 = time.perf_counter()
    jobs = plan(args.out, args.seed, args.adapters)
    built = build(args.out, args.seed, args.force, args.adapters)
    print(f"== models ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if not args.no_table:
        table(args.out, spec_hash(jobs), refresh=bool(built) or args.force,
              adapters=args.adapters)
    print(f"== done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
