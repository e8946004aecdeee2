"""The user's own text: reading files and folders strictly, and `evaluate --text`, `train data=`, `quality --text`."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest

from llama_surgery_jax.evaluate import main as evaluate_main
from llama_surgery_jax.evaluation.perplexity import protocol
from llama_surgery_jax.io import corpora

# Plain English, long enough for a few 64-token windows of the tiny model's 512-token BPE.
PROSE = ("The river rose in the night and the town woke to water in the streets. "
         "By morning the bridge was closed, and the school opened its hall to families from the lower houses. "
         "Volunteers carried bread, blankets and lamps; the mayor spoke from the steps of the church. ") * 12
NOT_UTF8 = b"abc\xff\xfe"


def write(path, content: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# ---------------------------------------------------------------------------- reading


def test_a_file_is_read_byte_for_byte(tmp_path):
    raw = "Première ligne\r\nsecond line\n".encode()
    file = write(tmp_path / "notes.md", raw)  # a single file needs no .txt suffix
    corpus = corpora.read_text(file)
    assert corpus.text == raw.decode("utf-8")  # no newline translation
    assert corpus.source == {"dataset": "text", "path": str(file), "files": 1, "bytes": len(raw),
                             "sha256": hashlib.sha256(raw).hexdigest()}
    assert corpora.describe(corpus.source) == f"{file} (1 file)"


def test_a_byte_order_mark_is_not_text(tmp_path):
    assert corpora.read_text(write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello")).text == "hello"


def test_a_folder_joins_its_txt_files_in_name_order(tmp_path):
    folder = tmp_path / "corpus"
    write(folder / "b.txt", "second\n")
    write(folder / "a.txt", "first\n")
    write(folder / "c.TXT", "third")
    write(folder / "empty.txt", " \n")  # skipped: adds nothing
    write(folder / "readme.md", "not text of the corpus")
    write(folder / "sub" / "0.txt", "a sub-folder is not read")
    corpus = corpora.read_text(folder)
    assert corpus.text == "first\n\nsecond\n\nthird"
    assert corpus.source["files"] == 3 and corpus.source["path"] == str(folder)
    assert corpus.source["sha256"] == hashlib.sha256(corpus.text.encode()).hexdigest()
    assert corpora.describe(corpus.source) == f"{folder} (3 files)"


def test_an_empty_file(tmp_path):
    file = write(tmp_path / "empty.txt", "  \n\n")
    with pytest.raises(corpora.DataError, match=r"empty\.txt is empty \(or only whitespace\): no text to score"):
        corpora.read_text(file)


def test_a_folder_without_txt_files(tmp_path):
    write(tmp_path / "corpus" / "notes.md", "text")
    write(tmp_path / "corpus" / "sub" / "a.txt", "text")
    with pytest.raises(corpora.DataError, match=r"corpus holds no \.txt files \(only the folder's own files are read"):
        corpora.read_text(tmp_path / "corpus")


def test_a_folder_of_empty_txt_files(tmp_path):
    write(tmp_path / "corpus" / "a.txt", "")
    write(tmp_path / "corpus" / "b.txt", "\n")
    with pytest.raises(corpora.DataError, match=r"corpus: its 2 \.txt file\(s\) are all empty"):
        corpora.read_text(tmp_path / "corpus")


@pytest.mark.parametrize("in_a_folder", [False, True])
def test_bytes_that_are_not_utf8(tmp_path, in_a_folder):
    write(tmp_path / "corpus" / "a.txt", "fine")
    bad = write(tmp_path / "corpus" / "latin1.txt", NOT_UTF8)
    with pytest.raises(corpora.DataError) as error:
        corpora.read_text(tmp_path / "corpus" if in_a_folder else bad)
    message = str(error.value)
    assert message.startswith(f"{bad} is not UTF-8: byte 0xff at offset 3 (invalid start byte)"), message
    assert "re-encode the file as UTF-8" in message


def test_a_missing_path(tmp_path):
    with pytest.raises(corpora.DataError, match=r"nowhere\.txt does not exist: pass a UTF-8 text file or a folder"):
        corpora.read_text(tmp_path / "nowhere.txt")
    with pytest.raises(corpora.DataError, match="does not exist"):
        corpora.load_corpus(str(tmp_path / "nowhere.txt"), "test")


def test_too_few_tokens_for_a_window_names_the_text_and_the_setting():
    with pytest.raises(corpora.DataError) as error:
        corpora.windows(np.arange(10, dtype=np.int32), 64, source="/data/mine.txt (1 file)", setting="eval_context")
    assert str(error.value) == ("/data/mine.txt (1 file): 10 tokens make no window of 64 tokens; give a longer text "
                                "or a smaller eval_context")


def test_wikitext_stays_the_default_with_the_same_protocol(wikitext_dir):
    corpus = corpora.load_corpus(None, "test", wikitext_dir, "raw")
    assert corpus.text == corpora.load_text("test", wikitext_dir, "raw")
    assert protocol(64, 2, corpus.source) == {
        "dataset": "wikitext-2-raw-v1", "split": "test", "file": "wiki.test.raw", "data_dir": str(wikitext_dir),
        "context": 64, "stride": 64, "bos": False, "windows": 2, "scored": "every token of a window after its first"}
    assert corpora.load_corpus("", "valid", wikitext_dir, "tokens").source["dataset"] == "wikitext-2-v1"


# ---------------------------------------------------------------------------- evaluate --text


def test_evaluate_text_file_and_folder(tiny_model_dir, tmp_path, capsys):
    file = write(tmp_path / "story.txt", PROSE)
    args = ["--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "no-wikitext"), "--context", "64",
            "--max-windows", "2"]
    assert evaluate_main([*args, "--text", str(file), "--json", str(tmp_path / "file.json")]) == 0
    result = json.loads((tmp_path / "file.json").read_text())
    assert result["protocol"] | {"sha256": None} == {
        "dataset": "text", "path": str(file), "files": 1, "bytes": len(PROSE.encode()), "sha256": None,
        "context": 64, "stride": 64, "bos": False, "windows": 2, "scored": "every token of a window after its first"}
    assert result["tokens"] == 2 * 63 and math.isfinite(result["ppl"])
    assert f"text {file} (1 file) perplexity" in capsys.readouterr().out

    # The same text as a folder's only file scores the same windows.
    write(tmp_path / "folder" / "story.txt", PROSE)
    assert evaluate_main([*args, "--text", str(tmp_path / "folder"), "--json", str(tmp_path / "folder.json")]) == 0
    in_folder = json.loads((tmp_path / "folder.json").read_text())
    assert in_folder["protocol"]["path"] == str(tmp_path / "folder") and in_folder["ppl"] == result["ppl"]


@pytest.mark.parametrize("content, message", [
    ("Too short.", r"short\.txt \(1 file\): \d+ tokens make no window of 64 tokens; give a longer text or a "
                   r"smaller --context"),
    ("", r"short\.txt is empty"),
    (NOT_UTF8, r"short\.txt is not UTF-8: byte 0xff at offset 3"),
])
def test_evaluate_bad_text_exits_2(tiny_model_dir, tmp_path, capsys, content, message):
    file = write(tmp_path / "short.txt", content)
    assert evaluate_main(["--model", str(tiny_model_dir), "--context", "64", "--text", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err


# ---------------------------------------------------------------------------- train data=, quality --text

# The smallest run of the tiny model (as tests/test_evaluate.py trains it).
TINY_RUN = ["seq_len=64", "batch_size=2", "steps=2", "eval_context=64", "eval_windows=2", "eval_batch=2"]


@pytest.fixture(scope="module")
def run_on_text(tiny_model_dir, tmp_path_factory):
    """A 2-step run trained and reported on the user's files only: WikiText-2 is made unreachable."""
    from llama_surgery_jax.train import main as train_main

    root = tmp_path_factory.mktemp("text-run")
    train_text = write(root / "train" / "part1.txt", PROSE)
    write(root / "train" / "part2.txt", PROSE.upper())
    eval_text = write(root / "held-out.txt", PROSE[::-1])
    with pytest.MonkeyPatch.context() as env:
        env.delenv(corpora.DATA_DIR_ENV, raising=False)
        assert train_main(["--preset", "smoke", "--out", str(root / "run"), f"model={tiny_model_dir}",
                           f"data_dir={root / 'no-wikitext'}", f"data={train_text.parent}", f"eval_data={eval_text}",
                           *TINY_RUN]) == 0
    return root


def test_train_on_text_reports_its_sources(run_on_text):
    report = json.loads((run_on_text / "run" / "report.json").read_text())
    assert report["protocol"]["dataset"] == "text" and report["protocol"]["path"] == str(run_on_text / "held-out.txt")
    assert report["protocol"]["windows"] == 2 and report["protocol"]["context"] == 64
    assert report["protocol"]["train_data"]["path"] == str(run_on_text / "train")
    assert report["protocol"]["train_data"]["files"] == 2
    assert report["config"]["data"] == str(run_on_text / "train")
    assert math.isfinite(report["dense_ppl"]) and math.isfinite(report["surgery_ppl"])
    assert str(run_on_text / "held-out.txt") in (run_on_text / "run" / "report.md").read_text()


def test_train_bad_text_fails_before_training(tiny_model_dir, tmp_path, capsys):
    from llama_surgery_jax.train import main as train_main

    text = write(tmp_path / "text.txt", PROSE)
    base = ["--preset", "smoke", f"model={tiny_model_dir}", *TINY_RUN]
    assert train_main(["--out", str(tmp_path / "a"), *base, f"data={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    # The report's text is checked before the first step, not after the last.
    assert train_main(["--out", str(tmp_path / "b"), *base, f"data={text}", f"eval_data={text}",
                       "eval_context=100000"]) == 2
    assert "make no window of 100000 tokens; give a longer text or a smaller eval_context" in capsys.readouterr().err
    assert not (tmp_path / "b" / "checkpoints").exists() or not any((tmp_path / "b" / "checkpoints").iterdir())


def test_quality_text_perplexity_section(run_on_text, tiny_model_dir, capsys):
    from llama_surgery_jax.quality import main as quality_main

    out = run_on_text / "quality"
    text = run_on_text / "held-out.txt"
    sections = ["--contexts", "64", "--windows", "1", "--curve-context", "64", "--curve-windows", "0",
                "--niah-lengths", "", "--speed-contexts", ""]
    assert quality_main(["--run", str(run_on_text / "run"), "--model", str(tiny_model_dir), "--text", str(text),
                         "--out", str(out), *sections]) == 0
    result = json.loads((out / "quality.json").read_text())
    assert result["protocol"]["dataset"] == "text" and result["protocol"]["path"] == str(text)
    assert [r["context"] for r in result["perplexity"]] == [64] and math.isfinite(result["perplexity"][0]["dense"])
    assert str(text) in (out / "quality.md").read_text()
    short = write(run_on_text / "short.txt", "Too short.")
    assert quality_main(["--run", str(run_on_text / "run"), "--model", str(tiny_model_dir), "--text", str(short),
                         "--out", str(out), *sections]) == 2
    assert "give a longer text or a smaller --contexts / --curve-context" in capsys.readouterr().err


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_wikitext_fails_in_ci_and_is_loud_elsewhere(ci, tmp_path):
    """A clone without ../shared must not look green: CI fails the tests that need the data; elsewhere they
    skip, and the end of the run says so in capitals."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WIKITEXT2_DIR": str(tmp_path / "absent"), "CI": ci}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_text_data.py::test_wikitext_stays_the_default_with_the_same_protocol"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    if ci:
        assert done.returncode == 1 and "1 error" in done.stdout, done.stdout[-2000:]
    else:
        assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout[-2000:]
    assert "WIKITEXT-2 MISSING" in done.stdout, done.stdout[-2000:]
