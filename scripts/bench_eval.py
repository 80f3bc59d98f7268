"""Evaluation benchmark: our lm-eval adapter vs a plain ``lm_eval.simple_evaluate`` call.

Writes the ``eval`` section of docs/benchmarks.md: per-candidate time on the demo suite
(the three ``val`` tasks, 200 documents each) split into fixed overhead and model
compute, next to the same candidate scored by ``simple_evaluate`` (with a prebuilt
TaskManager, the fastest plain call, and with one built in each call), and whether the
scores are identical.

    python -m search.demo && python scripts/bench_eval.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from bench_common import ROOT, machine, table, update_section

from evaluators.base import TaskSpec
from evaluators.lm_eval import LmEvalEvaluator

TASKS = ["soup_add", "soup_reverse", "soup_dup"]
BATCH = 200  # requests per model call, the same for both paths


def plain_call(model: torch.nn.Module, tok: object, manager: object | None) -> tuple[dict, float]:
    """One ``simple_evaluate`` call; ``manager=None`` builds the TaskManager in the call
    (built-in index plus the shipped tasks), as a script calling it per candidate would."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evaluators.lm_eval import SHIPPED_TASKS

    t0 = time.perf_counter()
    if manager is None:
        manager = TaskManager(include_path=str(SHIPPED_TASKS))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH)
    res = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager,
                                  log_samples=False, bootstrap_iters=0)
    dt = time.perf_counter() - t0
    return {t: res["results"][t]["exact_match,none"] for t in TASKS}, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=ROOT / ".cache" / "demo" / "models")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.models / "expert_add"
    if not folder.is_dir():
        sys.exit(f"error: {folder} not found; build the demo models first: "
                 "python -m search.demo")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ev = LmEvalEvaluator([TaskSpec(t) for t in TASKS], batch_size=BATCH)
    ours = [ev.evaluate(model, tok) for _ in range(args.repeat + 1)][1:]
    total = statistics.median(s.timings["total"] for s in ours)
    compute = statistics.median(s.timings["compute"] for s in ours)
    overhead = statistics.median(s.timings["overhead"] for s in ours)
    plain_scores, plain_t = zip(*(plain_call(model, tok, ev.manager) for _ in range(3)),
                                strict=True)
    default_scores, default_t = plain_call(model, tok, None)
    same = all(p == ours[0].metrics for p in plain_scores) and default_scores == ours[0].metrics
    t_plain = statistics.median(plain_t)
    rows = [
        ["soupsearch adapter (per candidate)", f"{total:.3f} s", f"{compute:.3f} s",
         f"{overhead:.3f} s ({overhead / total:.0%})", "1.0x"],
        ["simple_evaluate, prebuilt TaskManager", f"{t_plain:.3f} s", "-", "-",
         f"{t_plain / total:.1f}x slower"],
        ["simple_evaluate, TaskManager built per call", f"{default_t:.3f} s", "-", "-",
         f"{default_t / total:.1f}x slower"],
    ]
    scores = ", ".join(f"{t} {v:.3f}" for t, v in ours[0].metrics.items())
    body = (
        f"## Evaluation (demo suite)\n\n{machine()} (evaluation threads: {args.threads}).\n\n"
        f"Candidate: the demo `expert_add` in memory; tasks {', '.join(TASKS)} (val split, "
        f"200 documents each, greedy generation). Adapter setup, paid once per worker: "
        f"{ev.setup_seconds:.2f} s. Median of {args.repeat} candidates; simple_evaluate "
        "median of 3 calls.\n\n"
        "Targets: fixed overhead at most 10% of the per-candidate total; at least 3x faster "
        "than a plain simple_evaluate call with identical scores.\n\n"
        + table(["path", "per candidate", "model compute", "fixed overhead", "relative"], rows)
        + f"\n\nScores: {scores}. Identical to simple_evaluate: {'yes' if same else 'NO'}.\n\n"
        f"Verdict:\n- fixed overhead {overhead / total:.0%} of the total (target at most 10%): "
        f"{'met' if overhead / total <= 0.10 else 'NOT MET'}\n"
        f"- {t_plain / total:.1f}x faster than the fastest plain call (target 3x, identical "
        f"scores): {'met' if t_plain / total >= 3 and same else 'NOT MET'}\n"
    )
    update_section("eval", body)
    print(body)


if __name__ == "__main__":
    main()
