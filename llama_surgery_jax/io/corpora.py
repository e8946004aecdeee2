"""The text a model is scored or trained on: WikiText-2 (the default everywhere) or the user's own files.

WikiText-2 comes from local files (the raw or the tokenized release) or, with a network, from `datasets`.
The directory comes from `--data-dir` or `$WIKITEXT2_DIR`; it holds any of `wiki.{train,valid,test}.raw`
(the `wikitext-2-raw-v1` text) and `wiki.{...}.tokens` (`wikitext-2-v1`, detokenized here the usual way).

The user's own text (`--text`, `data=`, `eval_data=`) is one UTF-8 file, or a folder whose `*.txt` files
(its own, not those of sub-folders) are read in name order and joined with a blank line between files.
Decoding is strict: a byte that is not UTF-8 is an error, never silently replaced.

Every corpus carries a `source`: the fields each result's protocol states about where its tokens came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "WIKITEXT2_DIR"
SPLITS = ("train", "valid", "test")
WIKITEXT_DATASETS = {"raw": "wikitext-2-raw-v1", "tokens": "wikitext-2-v1"}
TEXT_SUFFIX = ".txt"
FILE_SEPARATOR = "\n\n"  # a blank line between the files of a folder, so none runs into the next
BYTE_ORDER_MARK = "\ufeff"


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


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A whole text and where it came from.

    source: what every result's protocol states about the text, `dataset` first. WikiText-2:
    {dataset: "wikitext-2-raw-v1" | "wikitext-2-v1", split, file, data_dir}; the user's text:
    {dataset: "text", path, files, bytes, sha256} (bytes and sha256 of the UTF-8 text as tokenized).
    """

    text: str
    source: dict


def wikitext(split: str, data_dir: str | Path | None = None, release: str = "raw") -> Corpus:
    """One WikiText-2 split (see `load_text`) with its source."""
    text = load_text(split, data_dir, release)
    folder = resolve_data_dir(data_dir)
    return Corpus(text, {"dataset": WIKITEXT_DATASETS[release], "split": split, "file": f"wiki.{split}.{release}",
                         "data_dir": str(folder) if folder else "datasets.load_dataset"})


def read_text(path: str | Path) -> Corpus:
    """A UTF-8 text file, or a folder's `*.txt` files (not its sub-folders') in name order joined by a blank
    line; a folder's empty files are skipped. A leading byte-order mark is dropped; bytes are otherwise kept
    as they are (no newline translation)."""
    path = Path(path)
    if path.is_dir():
        files = sorted((f for f in path.iterdir() if f.suffix.lower() == TEXT_SUFFIX and f.is_file()),
                       key=lambda f: f.name)
        if not files:
            raise DataError(f"{path} holds no {TEXT_SUFFIX} files (only the folder's own files are read, not "
                            f"sub-folders): put the text in UTF-8 {TEXT_SUFFIX} files there, or pass one file")
        texts = [(f, decode_utf8(f)) for f in files]
        kept = [text for _, text in texts if text.strip()]
        if not kept:
            raise DataError(f"{path}: its {len(files)} {TEXT_SUFFIX} file(s) are all empty: no text to score "
                            "or train on")
        text = FILE_SEPARATOR.join(t.rstrip("\r\n") for t in kept)
    elif path.is_file():
        text = decode_utf8(path)
        if not text.strip():
            raise DataError(f"{path} is empty (or only whitespace): no text to score or train on")
        kept = [text]
    else:
        raise DataError(f"{path} does not exist: pass a UTF-8 text file or a folder of {TEXT_SUFFIX} files")
    encoded = text.encode("utf-8")
    return Corpus(text, {"dataset": "text", "path": str(path.absolute()), "files": len(kept),
                         "bytes": len(encoded), "sha256": hashlib.sha256(encoded).hexdigest()})


def decode_utf8(file: Path) -> str:
    """The file's text, strictly UTF-8; a DataError names the file and the first bad byte's offset."""
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason}); "
                        "re-encode the file as UTF-8, e.g. `iconv -f ITS_ENCODING -t UTF-8 FILE > NEW_FILE`") from None
    return text.removeprefix(BYTE_ORDER_MARK)


def load_corpus(text_path: str | Path | None, split: str, data_dir: str | Path | None = None,
                release: str = "raw") -> Corpus:
    """The user's text at `text_path` (file or folder) when given, else the WikiText-2 split."""
    return read_text(text_path) if text_path else wikitext(split, data_dir, release)


def describe(source: dict) -> str:
    """A corpus source in a few words, for messages and reports: `WikiText-2 wiki.test.raw`, `PATH (N files)`."""
    if source["dataset"] != "text":
        return f"WikiText-2 {source['file']}"
    files = source["files"]
    return f"{source['path']} ({files} file{'' if files == 1 else 's'})"


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


def windows(ids: np.ndarray, length: int, count: int | None = None, *, source: str = "the text",
            setting: str = "--context") -> np.ndarray:
    """ids: [tokens] → the first `count` (default: all) non-overlapping windows: [windows, length] int32.

    source and setting only word the error of a text too short for one window: what the text is, and
    which option sets `length` (`--context`, `eval_context`, `seq_len`)."""
    if length < 2:
        raise DataError(f"window length must be at least 2, got {length}")
    available = len(ids) // length
    if available == 0:
        raise DataError(f"{source}: {len(ids)} tokens make no window of {length} tokens; give a longer text "
                        f"or a smaller {setting}")
    count = available if count is None else min(count, available)
    return ids[: count * length].reshape(count, length)
