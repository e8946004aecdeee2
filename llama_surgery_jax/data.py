"""WikiText-2 from local files (the raw or the tokenized release) or, with a network, from `datasets`.

The directory comes from `--data-dir` or `$WIKITEXT2_DIR`; it holds any of `wiki.{train,valid,test}.raw`
(the `wikitext-2-raw-v1` text) and `wiki.{...}.tokens` (`wikitext-2-v1`, detokenized here the usual way).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "WIKITEXT2_DIR"
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """Data that cannot be found or read; the message says where to put it."""


def detokenize(text: str) -> str:
    """Undoes the tokenized release's spacing: ` @-@ ` → `-`, ` , ` → `, `, `( x )` → `(x)`, ..."""
    text = re.sub(r" @(.)@ ", r"\1", text)
    text = re.sub(r" ([.,;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{$]) ", r"\1", text)
    text = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)
    text = re.sub(r'" ([^"\n]*?) "', r'"\1"', text)
    return text


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The WikiText-2 folder named by the flag or the environment, or None (then `datasets` is tried)."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        return None
    path = Path(chosen)
    if not path.is_dir():
        raise DataError(f"WikiText-2 folder {path} does not exist (set --data-dir or ${DATA_DIR_ENV})")
    if not any(path.glob("wiki.*.raw")) and not any(path.glob("wiki.*.tokens")):
        raise DataError(f"{path} holds no wiki.<split>.raw or wiki.<split>.tokens files: "
                        "point --data-dir at the WikiText-2 release")
    return path


def load_text(split: str, data_dir: str | Path | None = None, release: str = "raw") -> str:
    """The whole text of one split. release: 'raw' (wiki.SPLIT.raw) or 'tokens' (detokenized)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    if release not in ("raw", "tokens"):
        raise DataError(f"unknown release {release!r}; choose 'raw' or 'tokens'")
    path = resolve_data_dir(data_dir)
    if path is None:
        return load_from_hub(split, release)
    file = path / f"wiki.{split}.{release}"
    if not file.is_file():
        raise DataError(f"{file} is missing; present: {sorted(p.name for p in path.glob('wiki.*'))}")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{file} is empty")
    return detokenize(text) if release == "tokens" else text


def load_from_hub(split: str, release: str) -> str:
    try:
        import datasets
    except ImportError:
        raise DataError(f"no WikiText-2 folder given: pass --data-dir or set ${DATA_DIR_ENV} "
                        "(or install `datasets` and have a network)") from None
    name = "wikitext-2-raw-v1" if release == "raw" else "wikitext-2-v1"
    hub_split = {"valid": "validation"}.get(split, split)
    try:
        rows = datasets.load_dataset("wikitext", name, split=hub_split)["text"]
    except Exception as e:
        raise DataError(f"could not load {name} with `datasets` ({e}); pass --data-dir instead") from None
    text = "".join(rows)
    return detokenize(text) if release == "tokens" else text


def tokenize(tokenizer, text: str) -> np.ndarray:
    """The text as one stream of token ids, no BOS (int32)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def windows(ids: np.ndarray, length: int, count: int | None = None) -> np.ndarray:
    """The first `count` (default: all) non-overlapping windows: [windows, length] int32."""
    if length < 2:
        raise DataError(f"window length must be at least 2, got {length}")
    available = len(ids) // length
    if available == 0:
        raise DataError(f"{len(ids)} tokens make no window of {length}")
    count = available if count is None else min(count, available)
    return ids[: count * length].reshape(count, length)
