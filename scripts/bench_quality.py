"""Search quality on merge problems the default was not tuned on (``tests/problems.py``).

    python scripts/bench_quality.py [--seeds 5] [--trials 50] [--problems NAME,...]
                                    [--out .cache/quality] [--processes 2]

For each problem (built once into the ignored cache, a few minutes each):
- anchors, scored in memory on val (the search's fitness data) and test (held out): the
  parents, the uniform soup, the greedy soup, the known good recipe the experts were
  trained for, and the best of a small grid per method family (picked on val);
- searches at ``--trials`` trials (baselines included), ``--seeds`` seeds each: the
  default config (``conf/search.yaml``), random search over the same space, and TPE and
  CMA-ES within the family whose grid point scored best. For each: the best val at half and
  at the whole budget, and the held-out score of the pick (medians over seeds).

Writes the ``quality`` section of docs/benchmarks.md and ``<out>/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")

from bench_common import ROOT, machine, table, update_section

from tests.problems import DEFAULT_OUT, PROBLEMS, Problem, build_all

SKILLS = ("add", "reverse", "dup")
# family -> its grid: (method, global parameters, per-model parameters) at uniform weights
GRID: dict[str, list[tuple[str, dict[str, float], dict[str, float]]]] = {
    "linear": [("linear", {}, {"weight": 1.0})],
    "task_arithmetic": [("task_arithmetic", {"lambda": lam}, {"weight": 1.0})
                        for lam in (0.3, 0.5, 0.7, 1.0, 1.3)],
    "ties": [("ties", {"lambda": lam}, {"weight": 1.0, "density": d})
             for d in (0.2, 0.5, 0.8) for lam in (0.5, 1.0, 1.5)],
    "dare_ties": [("dare_ties", {"lambda": lam}, {"weight": 1.0, "density": d})
                  for d in (0.3, 0.6) for lam in (0.7, 1.0, 1.3)],
    "breadcrumbs_ties": [("breadcrumbs_ties", {"lambda": lam}, {"weight": 1.0, "density": d})
                         for d in (0.2, 0.5) for lam in (0.7, 1.0, 1.3)],
}


class Scorer:
    """Parents resident in memory, one lm-eval evaluator per split; scores recipes."""

    def __init__(self, folder: Path, problem: Problem) -> None:
        import logging

        import datasets
        import transformers
        from transformers import AutoTokenizer

        from evaluators.base import TaskSpec
        from evaluators.lm_eval import LmEvalEvaluator
        from search.merge.resident import ResidentModel, ResidentParents

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        self.base = str(folder / "base")
        self.experts = [str(folder / n) for n in problem.names()]
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.ev = {sp: LmEvalEvaluator([TaskSpec(f"soup_{s}{x}") for s in SKILLS])
                   for sp, x in (("val", ""), ("test", "_test"))}
        self.resident = ResidentModel(ResidentParents([self.base, *self.experts], device="cpu"))
        self._cache: dict[str, dict[str, float]] = {}

    def recipe(self, method: str, glob: dict[str, Any], per: list[dict[str, Any]],
               models: list[str] | None = None) -> dict[str, Any]:
        models = models or self.experts
        data: dict[str, Any] = {"merge_method": method, "models": [
            {"model": m, "parameters": p} for m, p in zip(models, per, strict=True)]}
        if method != "linear":
            data["base_model"] = self.base
        if glob:
            data["parameters"] = glob
        return data

    def score(self, recipe: dict[str, Any]) -> dict[str, float]:
        """Mean exact match over the skills on val and on test."""
        from search.recipe import Recipe

        r = Recipe.from_dict(recipe)
        key = r.hash()
        if key not in self._cache:
            model = self.resident.materialize(r)
            out = {}
            for sp, ev in self.ev.items():
                m = ev.evaluate(model, self.tokenizer).metrics
                out[sp] = sum(m.values()) / len(m)
            self._cache[key] = out
        return self._cache[key]

    def soup(self, models: list[str]) -> dict[str, Any]:
        return self.recipe("linear", {}, [{"weight": 1.0}] * len(models), models)


def anchors(sc: Scorer, problem: Problem) -> dict[str, Any]:
    """Parents, soups, the trained-for recipe and the per-family grid."""
    rows: dict[str, Any] = {"base": sc.score(sc.soup([sc.base]))}
    for name, path in zip(problem.names(), sc.experts, strict=True):
        rows[name] = sc.score(sc.soup([path]))
    rows["uniform soup"] = sc.score(sc.soup(sc.experts))
    ranked = sorted(sc.experts, key=lambda e: -sc.score(sc.soup([e]))["val"])
    chosen = [ranked[0]]
    for e in ranked[1:]:
        if sc.score(sc.soup([*chosen, e]))["val"] > sc.score(sc.soup(chosen))["val"]:
            chosen.append(e)
    rows["greedy soup"] = sc.score(sc.soup(chosen))
    anchors_n = max(len(e.coef) for e in problem.experts)
    target = sc.recipe("task_arithmetic", {"lambda": 1.0}, [
        {"weight": list(e.coef) if anchors_n > 1 else e.coef[0]} for e in problem.experts])
    rows["trained-for recipe"] = sc.score(target)
    grid = {}
    for family, points in GRID.items():
        scored = [sc.score(sc.recipe(m, g, [dict(p) for _ in sc.experts]))
                  for m, g, p in points]
        grid[family] = max(scored, key=lambda s: s["val"])
    return {"rows": rows, "grid": grid, "best_family": max(grid, key=lambda f: grid[f]["val"])}


def _finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return sorted((t for t in study.get_trials(deepcopy=False)
                   if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
                   and not t.user_attrs.get("surplus") and not t.user_attrs.get("requeued")),
                  key=lambda t: t.number)


def search_run(sc: Scorer, folder: Path, run_dir: Path, overrides: list[str], seed: int,
               trials: int) -> dict[str, Any]:
    """One search; best val at half and all of the budget, and the picks' test scores."""
    from bench_search import _drop_log_handlers

    from search.config import compose
    from search.run.launch import run_search

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = compose([f"run_dir={run_dir}", "study_name=q", f"models.base={sc.base}",
                   f"models.experts=[{','.join(sc.experts)}]", "models.build_demo=false",
                   "parallel=serial", "storage=sqlite", f"seed={seed}", f"n_trials={trials}",
                   *overrides])
    t0 = time.perf_counter()
    try:
        study, _ = run_search(cfg, None, show_progress=False)
    finally:
        _drop_log_handlers(run_dir)
    wall = time.perf_counter() - t0
    done = _finished(study)
    out: dict[str, Any] = {"wall": wall}
    for k in (trials // 2, trials):
        complete = [t for t in done[:k] if t.value is not None]
        best = max(complete, key=lambda t: t.value)
        out[f"val@{k}"] = best.value
        out[f"test@{k}"] = sc.score(best.user_attrs["recipe"])["test"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


SHARED = "TPE, space=all, shared"
PROBES = "TPE, space=all, shared + probes"
RANDOM = "random, space=all"
RANDOM_PROBES = "random, space=all + probes"
# the candidate defaults and the random search each is judged against
CANDIDATES = {SHARED: RANDOM, PROBES: RANDOM_PROBES}


def configs(best_family: str) -> list[tuple[str, list[str]]]:
    fam = f"space.methods=[{best_family}]"
    return [(SHARED, ["space.shared=true", "space.probes=false"]),
            (PROBES, ["space.shared=true", "space.probes=true"]),
            ("TPE, space=all, per-method parameters (the previous default)",
             ["space.shared=false", "space.probes=false"]),
            (RANDOM, ["sampler=random", "space.probes=false"]),
            (RANDOM_PROBES, ["sampler=random", "space.probes=true"]),
            (f"TPE ({best_family})", [fam, "space.probes=false"]),
            (f"CMA-ES ({best_family})", [fam, "sampler=cmaes", "space.probes=false"])]


def run_problem(job: tuple[str, str, int, int, tuple[str, ...]]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    name, out, seeds, trials, rows = job
    problem = PROBLEMS[name]
    folder = Path(out) / name
    t0 = time.perf_counter()
    sc = Scorer(folder, problem)
    result: dict[str, Any] = {"name": name, "story": problem.story, "arch": problem.arch,
                              "experts": len(problem.experts), **anchors(sc, problem)}
    print(f"[{name}] anchors done in {time.perf_counter() - t0:.0f} s; best family "
          f"{result['best_family']}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, overrides in configs(result["best_family"]):
        if ("cmaes" in " ".join(overrides) and no_cmaes()) or \
                (rows and not any(label.startswith(r) for r in rows)):
            continue
        runs[label] = []
        for seed in range(seeds):
            r = search_run(sc, folder, Path(out) / "runs" / f"{name}-{len(runs)}-{seed}",
                           overrides, seed, trials)
            runs[label].append(r)
            print(f"[{name}] {label} seed {seed}: val@{trials} {r[f'val@{trials}']:.3f} "
                  f"test {r[f'test@{trials}']:.3f} ({r['wall']:.0f} s)", flush=True)
    result["runs"] = runs
    result["seconds"] = time.perf_counter() - t0
    return result


def no_cmaes() -> bool:
    import importlib.util

    return importlib.util.find_spec("cmaes") is None


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def render(results: list[dict[str, Any]], seeds: int, trials: int, wall: float) -> str:
    half = trials // 2
    lines = [
        "## Search quality on unseen merge problems",
        "",
        "Problems from `tests/problems.py` (`python -m tests.problems`): a tiny "
        "base pretrained until weak at the demo's three skills, and experts trained jointly "
        "so that one chosen merge (the trained-for recipe) works. Scores: mean exact match "
        "over soup_add, soup_reverse, soup_dup, on val (the search's fitness data, 200 "
        "documents per task) and on test (held out, 200 per task). Searches: serial, "
        f"{trials} trials with the baselines included, {seeds} seeds, medians over seeds; "
        "the pick is the best val trial and its test score is the held-out column. The "
        "family grid is at uniform weights (see `GRID` in the script); the best family is "
        "the one whose grid point scores best on val, and TPE and CMA-ES then search "
        "only that family.",
        ""]
    verdicts = []
    for res in results:
        a, g = res["rows"], res["grid"]
        lines += [f"### {res['name']}: {res['arch']}, {res['experts']} experts", "",
                  f"What should win: {res['story']}.", ""]
        anchor_rows = [[k, f"{v['val']:.3f}", f"{v['test']:.3f}"] for k, v in a.items()]
        anchor_rows += [[f"grid: {f}", f"{v['val']:.3f}", f"{v['test']:.3f}"]
                        for f, v in g.items()]
        lines += [table(["anchor", "val", "test"], anchor_rows), ""]
        srows = []
        for label, runs in res["runs"].items():
            srows.append([label, f"{_med(runs, f'val@{half}'):.3f}",
                          f"{_med(runs, f'val@{trials}'):.3f}",
                          f"{_med(runs, f'test@{trials}'):.3f}",
                          " ".join(f"{r[f'val@{trials}']:.3f}" for r in runs),
                          f"{statistics.mean(r['wall'] for r in runs):.0f} s"])
        lines += [table(["search", f"best val @{half}", f"best val @{trials}",
                         f"test of the pick @{trials}", f"val @{trials} per seed", "wall/run"],
                        srows), ""]
        runs = res["runs"]
        best = g[res["best_family"]]
        for cand, rnd in CANDIDATES.items():
            if cand not in runs or rnd not in runs:
                continue
            d, r = runs[cand], runs[rnd]
            checks = {
                "random search (val)": _med(d, f"val@{trials}") >= _med(r, f"val@{trials}"),
                "random search (test)": _med(d, f"test@{trials}") >= _med(r, f"test@{trials}"),
                "best family grid (val)": _med(d, f"val@{trials}") >= best["val"],
                "best family grid (test)": _med(d, f"test@{trials}") >= best["test"],
            }
            lost = [k for k, ok in checks.items() if not ok]
            verdicts.append(f"- {res['name']}, {cand}: "
                            + ("at least as good as random search and the best family "
                               "grid, on val and on test" if not lost else
                               "**worse** than " + ", ".join(lost)))
    lines += ["### Verdict (each candidate default at the full budget vs random search with "
              "the same baselines, and vs the best single-family grid)", "", *verdicts, "",
              f"Measured on {machine()}; this section ran in "
              f"{wall / 60:.0f} min."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--out", type=Path, default=ROOT / DEFAULT_OUT)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--no-doc", action="store_true", help="print, do not write the doc")
    parser.add_argument("--rows", default="", help="run only the searches whose label starts "
                        "with one of these (comma-separated); the others come from --previous")
    parser.add_argument("--previous", type=Path, default=None,
                        help="a quality.json of an earlier run, for the rows not run now")
    args = parser.parse_args()
    names = [n for n in args.problems.split(",") if n]
    unknown = [n for n in names if n not in PROBLEMS]
    if unknown:
        sys.exit(f"error: --problems: unknown problem {unknown[0]!r}; choose from "
                 f"{', '.join(PROBLEMS)}")
    t0 = time.perf_counter()
    print(f"building {', '.join(names)} into {args.out} (once)", flush=True)
    for stats in build_all(names, args.out, processes=args.processes):
        print(f"  {stats}", flush=True)
    rows = tuple(r for r in args.rows.split(",") if r)
    jobs = [(n, str(args.out), args.seeds, args.trials, rows) for n in names]
    with multiprocessing.get_context("spawn").Pool(min(args.processes, len(jobs))) as pool:
        results = []
        for res in pool.imap(run_problem, jobs):
            results.append(res)
            (args.out / "quality.partial.json").write_text(json.dumps(results, indent=1))
    if args.previous is not None:
        before = {r["name"]: r for r in json.loads(args.previous.read_text())}
        for res in results:
            old = before.get(res["name"], {}).get("runs", {})
            merged = {**{k: v for k, v in old.items() if k not in res["runs"]}, **res["runs"]}
            order = [label for label, _ in configs(res["best_family"])]
            res["runs"] = dict(sorted(merged.items(), key=lambda kv: order.index(kv[0])
                                      if kv[0] in order else len(order)))
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    body = render(results, args.seeds, args.trials, time.perf_counter() - t0)
    if args.previous is not None:
        body += (f"\n\nRows starting with {', '.join(rows)} were run in this invocation; the "
                 f"other rows come from {args.previous.name} of an earlier invocation on the "
                 "same problems (their configs did not change in between).")
    print(body)
    if not args.no_doc:
        update_section("quality", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
