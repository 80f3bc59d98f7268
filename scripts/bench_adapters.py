"""Adapter parents and 4-bit evaluation benchmark.

Writes the ``adapters`` section of docs/benchmarks.md:

1. A search step (merge a candidate into the resident model, then score it) with LoRA
   adapter parents (``BASE+ADAPTER``) versus the same parents merged by PEFT into full
   checkpoints: set-up time, parent memory, peak process memory, disk, merge time per
   method. On SmolLM2-135M with three rank-16 adapters on every projection (random
   factors; the cost does not depend on what they learned), each measured in a fresh
   process.
2. 4-bit evaluation (``evaluator.quantize``) versus full precision, where bitsandbytes
   runs here: evaluation-model memory, peak process memory, merge + quantize time,
   scoring time and score. On SmolLM2-135M (a task-arithmetic merge of the adapters;
   score = perplexity on a fixed English text) and on the demo family (parents and a
   merge scored by the lm-eval suite the search uses, ``val`` exact match).

    python scripts/bench_adapters.py [--smollm2 .cache/smollm2-135m-f32]

Run it alone on the machine: the figures are wall-clock times and process peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import ROOT, machine, table, update_section

CACHE = ROOT / ".cache" / "bench" / "adapters"
DEMO = ROOT / ".cache" / "demo" / "models"
TEXT = Path("/usr/share/common-licenses/Apache-2.0")
RANK, N_ADAPTERS = 16, 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "linear": {"weight": 1 / 3},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
}
MARKER = "bench_build.json"


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_parents(smollm2: Path, seed: int = 0) -> dict[str, list[str]]:
    """Rank-16 LoRA adapters on ``smollm2`` and their PEFT-merged full checkpoints, cached
    under .cache/bench/adapters (rebuilt when the base or the settings change)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = {"base": str(smollm2.resolve()), "rank": RANK, "targets": TARGETS,
            "n": N_ADAPTERS, "seed": seed}
    names = [f"lora_{i}" for i in range(N_ADAPTERS)]
    marker = CACHE / MARKER
    if not (marker.is_file() and json.loads(marker.read_text()) == spec):
        import shutil

        shutil.rmtree(CACHE, ignore_errors=True)
        CACHE.mkdir(parents=True)
        tok = AutoTokenizer.from_pretrained(smollm2)
        gen = torch.Generator().manual_seed(seed)
        for name in names:
            model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
            peft_model = get_peft_model(model, LoraConfig(
                r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False))
            with torch.no_grad():
                for pname, p in peft_model.named_parameters():
                    if "lora_" in pname:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            peft_model.peft_config["default"].base_model_name_or_path = str(smollm2)
            peft_model.save_pretrained(str(CACHE / name))
            merged: Any = peft_model.merge_and_unload()
            merged.save_pretrained(CACHE / f"{name}_full")
            tok.save_pretrained(CACHE / f"{name}_full")
            print(f"  built {name} and {name}_full", flush=True)
        marker.write_text(json.dumps(spec))
    base = str(smollm2.resolve())
    return {"adapters": [base, *(f"{base}+{CACHE / n}" for n in names)],
            "full": [base, *(str(CACHE / f"{n}_full") for n in names)]}


def _recipe(method: str, refs: list[str]) -> Any:
    from search.recipe import Recipe

    base, experts = refs[0], refs[1:]
    if method == "base":
        return Recipe.from_dict({"merge_method": "linear",
                                 "models": [{"model": base, "parameters": {"weight": 1.0}}]})
    data: dict[str, Any] = {"merge_method": method,
                            "models": [{"model": e, "parameters": METHODS[method]}
                                       for e in experts]}
    if method != "linear":
        data["base_model"] = base
        data["parameters"] = {"lambda": 1.0}
    return Recipe.from_dict(data)


def _text_ids(tok: Any, n: int = 1024) -> Any:
    text = TEXT.read_text() if TEXT.is_file() else (ROOT / "README.md").read_text()
    return tok(text, return_tensors="pt")["input_ids"][:, :n]


def _perplexity(model: Any, ids: Any, width: int = 256) -> float:
    """Perplexity of ``ids`` in windows of ``width`` tokens (one forward per window)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, ids.shape[1] - 1, width):
            chunk = ids[:, lo:lo + width + 1]
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + float(loss), count + chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def _eval_model_bytes(resident: Any) -> int:
    """Bytes of the evaluation model: full-precision parameters and buffers, plus the
    packed 4-bit weights with their scales."""
    model, quant = resident.model, resident.quant
    skip = {id(layer.weight) for layer in quant._layers.values()} if quant else set()
    seen: set[int] = set()
    total = quant.nbytes if quant else 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in skip or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def child_step(args: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: load the parents, then time merges (and one scoring) per method."""
    import torch
    from transformers import AutoTokenizer

    from search.merge.resident import ResidentModel, ResidentParents

    torch.manual_seed(0)
    rss0 = _rss()
    t0 = time.perf_counter()
    parents = ResidentParents(args["refs"], device="cpu")
    resident = ResidentModel(parents, quantize=args.get("quantize"))
    setup = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(args["refs"][0])
    ids = _text_ids(tok, args.get("tokens", 512))
    out: dict[str, Any] = {"setup_s": setup, "parents_bytes": parents.nbytes,
                           "eval_model_bytes": _eval_model_bytes(resident), "merge_s": {},
                           "peak_bytes": {"setup": _peak_rss() - rss0}, "perplexity": {}}
    for method in args["methods"]:
        recipe = _recipe(method, args["refs"])
        times = []
        for _ in range(args.get("repeat", 3)):
            t1 = time.perf_counter()
            model = resident.materialize(recipe)
            times.append(time.perf_counter() - t1)
        out["merge_s"][method] = statistics.median(times)
        t1 = time.perf_counter()
        out["perplexity"][method] = _perplexity(model, ids)
        out.setdefault("score_s", time.perf_counter() - t1)
        out["peak_bytes"][method] = _peak_rss() - rss0  # VmHWM: the peak so far
    return out


def child_demo(args: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: the demo parents and two merges scored by the lm-eval suite."""
    import logging

    import transformers

    from evaluators.base import TaskSpec
    from evaluators.lm_eval import LmEvalEvaluator
    from evaluators.skills import SKILLS
    from search.merge.resident import ResidentModel, ResidentParents
    from search.recipe import Recipe

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    base = str(DEMO / "base")
    experts = [str(DEMO / f"expert_{s}") for s in SKILLS]
    rss0 = _rss()
    resident = ResidentModel(ResidentParents([base, *experts], device="cpu"),
                             quantize=args.get("quantize"))
    tok = transformers.AutoTokenizer.from_pretrained(base)
    ev = LmEvalEvaluator([TaskSpec(f"soup_{s}") for s in SKILLS])
    recipes = {name: Recipe.from_dict({"merge_method": "linear", "models": [
        {"model": ref, "parameters": {"weight": 1.0}}]})
        for name, ref in zip(["base", *(f"expert_{s}" for s in SKILLS)], [base, *experts],
                             strict=True)}
    models = [{"model": e, "parameters": {"weight": 1.0}} for e in experts]
    recipes["task_arithmetic"] = Recipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": base, "models": models,
        "parameters": {"lambda": 1.0}})
    recipes["ties"] = Recipe.from_dict({
        "merge_method": "ties", "base_model": base,
        "models": [{**m, "parameters": {"weight": 1.0, "density": 0.5}} for m in models],
        "parameters": {"lambda": 1.0}})
    scores, seconds = {}, []
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        metrics = ev.evaluate(resident.materialize(recipe), tok).metrics
        seconds.append(time.perf_counter() - t0)
        scores[name] = sum(metrics[f"soup_{s}"] for s in SKILLS) / len(SKILLS)
    return {"scores": scores, "candidate_s": statistics.median(seconds),
            "eval_model_bytes": _eval_model_bytes(resident), "peak_bytes": _peak_rss() - rss0}


def child_hf(args: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: the base loaded by transformers' own bitsandbytes 4-bit path,
    the reference our in-place quantization must agree with."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args["quantize"],
                            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32,
                                                 quantization_config=qc, device_map="cpu")
    tok = AutoTokenizer.from_pretrained(args["model"])
    return {"perplexity": _perplexity(model, _text_ids(tok, args["tokens"]))}


def run_child(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """Runs ``child_<kind>(args)`` in a fresh Python process and returns its result."""
    done = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def part_adapters(parents: dict[str, list[str]]) -> tuple[str, dict[str, Any]]:
    res = {}
    for form, refs in parents.items():
        res[form] = run_child("step", {"refs": refs, "methods": list(METHODS)})
        print(f"  {form}: {json.dumps(res[form])}", flush=True)
    disk = {"adapters": sum(_du(Path(r.split("+")[1])) for r in parents["adapters"][1:]),
            "full": sum(_du(Path(r)) for r in parents["full"][1:])}
    rows = []
    for form, label in (("adapters", f"{N_ADAPTERS} LoRA adapters (BASE+ADAPTER)"),
                        ("full", f"{N_ADAPTERS} PEFT-merged full checkpoints")):
        r = res[form]
        rows.append([label, f"{r['setup_s']:.1f} s", _mib(r["parents_bytes"]),
                     _mib(r["peak_bytes"]["task_arithmetic"]), _mib(r["peak_bytes"]["ties"]),
                     _mib(disk[form]), *(f"{r['merge_s'][m] * 1000:.0f} ms" for m in METHODS),
                     f"{r['score_s']:.2f} s"])
    headers = ["experts given as", "set-up", "parents in memory",
               "peak: linear + TA steps", "peak: + TIES steps", "experts on disk",
               *(f"merge: {m}" for m in METHODS), "score (512 tokens)"]
    a, f = res["adapters"], res["full"]
    diff = max(abs(a["perplexity"][m] - f["perplexity"][m]) / f["perplexity"][m]
               for m in METHODS)
    ta = "task_arithmetic"
    lines = [
        table(headers, rows), "",
        f"- memory: adapter parents hold {a['parents_bytes'] / f['parents_bytes']:.0%} of "
        f"the bytes of full parents; through linear and TA steps the process peaks at "
        f"{a['peak_bytes'][ta] / f['peak_bytes'][ta]:.0%} of the full-parent run "
        f"({_mib(a['peak_bytes'][ta])} vs {_mib(f['peak_bytes'][ta])}, the float32 "
        "evaluation model included). TIES/breadcrumbs steps add the magnitude-rank cache "
        "(one rank per expert weight, the same in both forms), which then dominates.",
        f"- time: a task-arithmetic merge takes "
        f"{a['merge_s']['task_arithmetic'] / f['merge_s']['task_arithmetic']:.1f}x the "
        "full-parent time (each read computes B·A·scale for every adapted tensor); the "
        "scoring forward is the same model either way.",
        f"- same candidates: perplexity of each merge equal to {diff:.1e} (relative), "
        f"e.g. TA {a['perplexity'][ta]:.4f} vs {f['perplexity'][ta]:.4f}.",
    ]
    return "\n".join(lines), res


def part_quant(parents: dict[str, list[str]]) -> tuple[str, dict[str, Any]]:
    from search.merge.quant import QuantizationUnavailableError, check_backend

    try:
        check_backend("nf4", "cpu")
    except QuantizationUnavailableError as e:  # the section says why instead
        return f"4-bit evaluation not measured: {e}", {}
    res = {}
    for q in (None, "nf4", "fp4"):
        res[str(q)] = run_child("step", {"refs": parents["adapters"], "quantize": q,
                                         "methods": ["base", "task_arithmetic"],
                                         "tokens": 1024})
        print(f"  smollm2 quantize={q}: {json.dumps(res[str(q)])}", flush=True)
    hf = {q: run_child("hf", {"model": parents["adapters"][0], "quantize": q, "tokens": 1024})
          for q in ("nf4", "fp4")}
    print(f"  transformers 4-bit load: {json.dumps(hf)}", flush=True)
    demo = {}
    if (DEMO / "base" / "config.json").is_file():
        for q in (None, "nf4"):
            demo[str(q)] = run_child("demo", {"quantize": q})
            print(f"  demo quantize={q}: {json.dumps(demo[str(q)])}", flush=True)
    full = res["None"]
    rows = []
    for q, r in res.items():
        ppl = r["perplexity"]
        rel = [f"{(ppl[m] - full['perplexity'][m]) / full['perplexity'][m]:+.1%}"
               for m in ("base", "task_arithmetic")]
        rows.append([q if q != "None" else "null (float32)", _mib(r["eval_model_bytes"]),
                     f"{r['eval_model_bytes'] / full['eval_model_bytes']:.0%}",
                     _mib(r["peak_bytes"]["task_arithmetic"]),
                     f"{r['merge_s']['task_arithmetic']:.2f} s", f"{r['score_s']:.2f} s",
                     f"{ppl['base']:.2f}" + ("" if q == "None" else f" ({rel[0]})"),
                     f"{ppl['task_arithmetic']:.2f}" + ("" if q == "None" else f" ({rel[1]})")])
    lines = [
        "**SmolLM2-135M-Instruct** with the three adapters: the base alone and the task "
        "arithmetic of the adapters (λ=1) as candidates; score = perplexity on the first "
        "1024 tokens of the Apache-2.0 license text (lower is better). Peak memory includes "
        "the full-precision parents (base + factors), which 4 bits do not shrink; set "
        "`models.dtype=bfloat16` for those.", "",
        table(["evaluator.quantize", "evaluation model", "of float32", "peak process memory",
               "merge + write (TA)", "score (1024 tokens)", "perplexity: base",
               "perplexity: TA merge"], rows), "",
        "- the same quantization as transformers' own 4-bit loading: the base loaded with "
        "`from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` "
        "scores perplexity " + ", ".join(
            f"{hf[q]['perplexity']:.4f} ({q}; ours {res[q]['perplexity']['base']:.4f})"
            for q in hf) + ".",
        "- memory: the evaluation model holds "
        f"{res['nf4']['eval_model_bytes'] / full['eval_model_bytes']:.0%} of its float32 "
        "bytes. The process peak does not fall: the resident model is built in full "
        "precision, then quantized (a one-time spike of its full size), and resident CPU "
        "workers keep freed heap memory for speed (`SOUP_MALLOC_TUNING=0` returns it). "
        "The saving is the evaluation model's steady memory, which is what a GPU worker "
        "holds between candidates.",
        "- time: merge + write costs "
        f"{res['nf4']['merge_s']['task_arithmetic'] / full['merge_s']['task_arithmetic']:.1f}x"
        " the float32 write (quantizing every weight per candidate); scoring with "
        f"bitsandbytes' 4-bit matmuls takes {res['nf4']['score_s'] / full['score_s']:.2f}x "
        "the float32 time here.",
    ]
    if demo:
        names = list(demo["None"]["scores"])
        drows = [[n, f"{demo['None']['scores'][n]:.3f}", f"{demo['nf4']['scores'][n]:.3f}",
                  f"{demo['nf4']['scores'][n] - demo['None']['scores'][n]:+.3f}"]
                 for n in names]
        lines += [
            "", "**Demo family** (tiny Llama, 64 wide), `val` mean exact match of the lm-eval "
            "suite the search optimizes; evaluation model "
            f"{_mib(demo['None']['eval_model_bytes'])} → {_mib(demo['nf4']['eval_model_bytes'])}"
            f", median candidate (merge + score) {demo['None']['candidate_s']:.2f} s → "
            f"{demo['nf4']['candidate_s']:.2f} s.", "",
            table(["candidate", "float32", "nf4", "difference"], drows),
        ]
    return "\n".join(lines), {"smollm2": res, "demo": demo}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2", type=Path, default=ROOT / ".cache" / "smollm2-135m-f32",
                    help="SmolLM2-135M as a safetensors folder (scripts/convert_smollm2.py)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("SOUP_BENCH_THREADS", "2")))
        kind, payload = args.child
        children = {"step": child_step, "demo": child_demo, "hf": child_hf}
        print(json.dumps(children[kind](json.loads(payload))))
        return 0
    if not (args.smollm2 / "config.json").is_file():
        ap.error(f"--smollm2 {args.smollm2} is not a model folder; create it with "
                 "python scripts/convert_smollm2.py .cache/smollm2-135m-f32 --dtype float32")
    print("== building adapters and merged checkpoints", flush=True)
    parents = build_parents(args.smollm2)
    print("== adapter parents vs full checkpoints", flush=True)
    body_a, _ = part_adapters(parents)
    print("== 4-bit vs full-precision evaluation", flush=True)
    body_q, _ = part_quant(parents)
    import bitsandbytes
    import peft

    body = "\n".join([
        "## Adapter parents and 4-bit evaluation", "",
        f"{machine()}; peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}.", "",
        "### A search step with adapter parents vs the same parents as full checkpoints", "",
        f"SmolLM2-135M (float32) base plus {N_ADAPTERS} experts: rank-{RANK} LoRA adapters on "
        "every attention and MLP projection, given either as `BASE+ADAPTER` or merged by "
        "PEFT (`merge_and_unload`) into full checkpoints. Each row is a fresh process: "
        "set-up = loading the parents and building the resident model; merge = median of 3 "
        "`materialize` calls; score = perplexity forward on 512 tokens; peak = peak RSS "
        "above the process's RSS before loading.", "",
        body_a, "",
        "### 4-bit vs full-precision evaluation (`evaluator.quantize`)", "",
        "The merge is computed in float32 and quantized tensor by tensor into the resident "
        "model's bitsandbytes `Linear4bit` layers; embeddings, norms and the LM head stay "
        "in float32. Each row is a fresh process.", "",
        body_q,
    ])
    update_section("adapters", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
