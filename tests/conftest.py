"""Shared fixtures: tiny HF Llama checkpoints made with transformers, the embedded SmolLM2, the tests' own prose
(tests/data/prose: enough text to train and score the tiny model, in every clone), WikiText-2 (the real-weights
checks on real text, and the WikiText-2 loader's own test); one compilation cache for the session."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Original prose written for the tests (tests/data/make_prose.py), in the file layout the data loader reads from a
# --data-dir folder: wiki.valid.tokens is the training text, wiki.test.raw the evaluation text.
PROSE_DIR = REPO / "tests" / "data" / "prose"


# ---------------------------------------------------------------------------- one compilation cache per session
# Many tests compile the same program again (the tiny model's train step in every resumed run, the same forward of
# fresh random weights of one shape, one reference attention for two kernel settings): JAX's persistent compilation
# cache, in a folder that lives for this session only, compiles each such program once. A compiled program is a
# deterministic function of the program, so a cached one computes exactly what a fresh compile would. Programs
# that compile in under half a second are not worth a file. The session's first process makes the folder and
# removes it at the end; pytest-xdist's workers inherit it through the environment and share it.
# LLAMA_SURGERY_TEST_JIT_CACHE=off compiles every program afresh.
JIT_CACHE_VARIABLE = "LLAMA_SURGERY_TEST_JIT_CACHE"


# ---------------------------------------------------------------------------- compile time over run time
# The suite's programs are small and most run once or twice, so compiling them is most of its time; the kernels in
# interpret mode (each grid a loop over the kernel's body) compile longest. LLVM's optimisation level 0 for XLA's
# CPU code (xla_backend_optimization_level: LLVM's alone; XLA's HLO passes, which decide the program, its fusions
# and its sums, run alike at every level) roughly halves that: the kernel-path tests 191 → 116 s, 2 workers. The
# machine code is slower, on the tests' small inputs. What it may change in a result: whether a product and a sum
# fuse into one FMA, and the order in which the vector unit adds a reduction (XLA allows reductions to reassociate)
# — the rounding differences of another CPU's vector width, which every float32 bound here already covers
# (`float32_bound`); a comparison within one run compiles both sides alike. Set before any backend starts;
# pytest-xdist's workers and the tests' subprocesses inherit it through XLA_FLAGS.
# LLAMA_SURGERY_TEST_XLA_OPT=default compiles as users do.
XLA_OPT_VARIABLE = "LLAMA_SURGERY_TEST_XLA_OPT"
XLA_OPT_FLAG = "--xla_backend_optimization_level=0"


def fast_compile() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get(XLA_OPT_VARIABLE) != "default" and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_OPT_FLAG}".strip()


def pytest_configure(config):
    import jax

    fast_compile()
    folder = os.environ.get(JIT_CACHE_VARIABLE)
    if folder == "off":
        return
    if not folder:
        folder = config._jit_cache_to_remove = tempfile.mkdtemp(prefix="llama-surgery-jit-")
        os.environ[JIT_CACHE_VARIABLE] = folder
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    folder = getattr(config, "_jit_cache_to_remove", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(JIT_CACHE_VARIABLE, None)

# ---------------------------------------------------------------------------- tolerances
# Unit roundoff u = 2^-p of a binary floating type with p significand bits (the implicit bit counted):
# round to nearest changes a value by at most u of itself.
F32_U = 2.0**-24  # float32, 24 bits: 6.0e-8
F16_U = 2.0**-11  # float16, 11 bits: 4.9e-4
BF16_U = 2.0**-8  # bfloat16, 8 bits: 3.9e-3


def float32_bound(accumulation_length: int, depth: int = 1, margin: float = 10.0) -> float:
    """Relative bound on the difference of two float32 computations of one function that add in different
    orders: chunked vs whole, another matmul shape, another XLA fusion, torch vs XLA, another CPU's vector width.

    A float32 sum of n terms rounds n − 1 times, by at most u = 2^-24 of the running sum each time. The
    roundings have random signs, so they add like a random walk: about √n·u of the sum's scale (n·u is the
    worst case of roundings all of one sign, which data of random sign do not reach). Two orders differ by
    about that much. `depth` such sums in a row (a network's layers times the sums per layer whose order may
    change; the ops chained in a backward pass) add independent errors of their own, each passed on with a
    gain of order one (residual stream, normalised softmax), so again like a random walk: √(n·depth)·u.
    `margin` (×10 unless a caller says otherwise) covers the constants this estimate leaves out: two orders'
    errors, both operands of a dot, softmax and RMSNorm gains, moderate amplification by later layers, and
    the largest of many elements against their typical size. Use it for max|Δ| / max|reference| or
    ‖Δ‖ / ‖reference‖.

    accumulation_length: the longest sum whose order may differ (keys attended, hidden size, MLP width).
    """
    return margin * math.sqrt(accumulation_length * depth) * F32_U


def attention_order_bound(t: int, hidden_size: int, layers: int) -> float:
    """Two computations of a model that differ only in how attention sums (chunked queries, a baseline's own
    softmax): per layer the softmax normaliser and P·V over the t keys may reorder (2 sums); the hidden-size
    projections around them keep their shapes but may be fused differently, so the longest sum is
    max(t, hidden_size). Relative to the largest logit."""
    return float32_bound(max(t, hidden_size), depth=2 * layers)


# A Llama computed twice in float32 with its sums in other orders (torch vs XLA, 1 vs 4 devices, fsdp × tensor
# splits, remat, another compiled program of the same pipeline): per layer up to 8 sums may reorder (q, k, v, o
# projections, the softmax sum, P·V, gate/up, down), the longest over intermediate_size terms.
SUMS_PER_LAYER = 8


def logits_bound(preset: str) -> float:
    """float32_bound of a configs/models preset's forward, relative to the largest logit (or in RMS)."""
    config = json.loads((REPO / "configs" / "models" / f"{preset}.json").read_text())
    return float32_bound(config["intermediate_size"], depth=SUMS_PER_LAYER * config["num_hidden_layers"])


TINY_LOGITS_BOUND = logits_bound("tiny")  # 176 terms, 16 sums: 3.2e-5
SMOLLM2_LOGITS_BOUND = logits_bound("smollm2-135m")  # 1536 terms, 240 sums: 3.6e-4
# The tiny model's logits are small: |logit| ≤ ‖final normed hidden‖ · ‖lm_head row‖ = √64 (RMSNorm, weight 1)
# × ≤ 0.21 (rows of std 0.02 in 64 dims, the largest of 512; only routers ever train) < 2 (measured 0.77).
TINY_MAX_LOGIT = 2.0
# Mean cross-entropy, and so log perplexity, moves by at most 2·max|Δlogit| (log-sum-exp and the target logit are
# each 1-Lipschitz in the largest element): an absolute bound in nats on a loss or on log ppl, 1.3e-4 (so also on
# a relative change of perplexity, or a perplexity gap).
TINY_NLL_BOUND = 2 * TINY_LOGITS_BOUND * TINY_MAX_LOGIT


# ---------------------------------------------------------------------------- fresh seeds
SEED_VARIABLE = "LLAMA_SURGERY_TEST_SEED"
_seeds_drawn: list[int] = []


def fresh_seed() -> int:
    """A new seed per call (fresh random inputs each run); tests print it in their messages, and a failed
    test's report lists the seeds it drew. To reproduce, LLAMA_SURGERY_TEST_SEED=N1,N2,… makes a test's k-th
    call return N_k (the last one for later calls)."""
    fixed = [int(s) for s in os.environ.get(SEED_VARIABLE, "").split(",") if s.strip()]
    if fixed:
        seed = fixed[min(len(_seeds_drawn), len(fixed) - 1)]
    else:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    _seeds_drawn.append(seed)
    return seed


def pytest_runtest_setup(item):
    _seeds_drawn.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _seeds_drawn:
        seeds = ",".join(map(str, _seeds_drawn))
        report.sections.append(("fresh seeds", f"reproduce with {SEED_VARIABLE}={seeds} pytest '{item.nodeid}'"))


def make_hf_llama(folder: Path, *, preset: str = "tiny", max_shard_size: str | None = "120KB",
                  dtype: str = "float32", seed: int = 0, **overrides) -> Path:
    """A random LlamaForCausalLM saved by transformers (sharded safetensors + index when small shards)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = json.loads((REPO / "configs" / "models" / f"{preset}.json").read_text())
    hf.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hf)).to(getattr(torch, dtype)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """Tiny Llama in the Llama 3.1 8B layout: GQA 4:1, rope_scaling llama3, untied, sharded safetensors."""
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "tiny-llama31")


@contextlib.contextmanager
def session_cache(tmp_path_factory, work: str):
    """The cache folder of `smollm2_dir` and `smollm2_transformers` ($LLAMA_SURGERY_CACHE, else a temporary one),
    held under a file lock for `work` (one lock each: a worker that needs the converted model does not wait for
    another's GGUF read). pytest-xdist's workers share the folder (their base temps sit in one folder of the
    session), so the first worker to need SmolLM2 converts it (or reads transformers' GGUF) while the other waits
    and then reuses what it kept, rather than both doing the same work at once."""
    import fcntl

    if "LLAMA_SURGERY_CACHE" not in os.environ:
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        folder = tmp_path_factory.getbasetemp().parent / "cache" if worker else tmp_path_factory.mktemp("cache")
        folder.mkdir(exist_ok=True)
        os.environ["LLAMA_SURGERY_CACHE"] = str(folder)
    folder = Path(os.environ["LLAMA_SURGERY_CACHE"])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{work}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M GGUF, converted once for the session into a temporary cache."""
    from llama_surgery_jax.model import embedded as embedded

    with session_cache(tmp_path_factory, "convert"):
        return embedded.default_model_dir()


@pytest.fixture(scope="session")
def prose_dir() -> Path:
    """The tests' own prose (tests/data/prose), for every test that needs some text but not WikiText-2's: the tiny
    model's tokenizer, training runs and evaluations. Read it as a --data-dir / data_dir folder."""
    return PROSE_DIR


def wikitext_missing() -> str | None:
    """Why WikiText-2 cannot be read, or None when it can."""
    path = Path(os.environ.get("WIKITEXT2_DIR", REPO.parent / "shared" / "data" / "wikitext-2"))
    if (path / "wiki.test.raw").is_file():
        return None
    return f"WikiText-2 not found at {path}: set WIKITEXT2_DIR (or put ../shared beside the clone)"


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    """WikiText-2, for the tests of its loader and the real-weights checks on real text. Missing in CI (CI=true):
    every test that needs it fails. Elsewhere they skip, and the end of the run says loudly that they did not run."""
    missing = wikitext_missing()
    if missing and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(missing + "; CI runs every test", pytrace=False)
    if missing:
        pytest.skip(missing)
    return Path(os.environ.get("WIKITEXT2_DIR", REPO.parent / "shared" / "data" / "wikitext-2"))


def pytest_terminal_summary(terminalreporter):
    missing = wikitext_missing()  # checked here too: under xdist the fixtures ran in the workers
    if missing:
        terminalreporter.section("WIKITEXT-2 MISSING", sep="!")
        terminalreporter.write_line(f"{missing}: the WikiText-2 loader's test and SmolLM2's checks on real text "
                                    "(perplexity against transformers, NIAH at 1k) were SKIPPED, so this run does "
                                    "not cover them")


def first_layers(model, n: int):
    """`model` (a LlamaForCausalLM) cut to its first `n` decoder layers, their weights as loaded, the final norm and
    head kept: real weights at a fraction of the compile time (programs unroll over the layers)."""
    import dataclasses

    from flax import nnx

    model.model.layers = nnx.List(list(model.model.layers)[:n])
    model.config = dataclasses.replace(model.config, num_hidden_layers=n)
    return model


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_dir, tmp_path_factory):
    """transformers' model of the embedded GGUF, dequantized to float32: the reference of the SmolLM2 conversion
    and perplexity tests. Read only.

    Its GGUF reader takes 20 to 35 s (it parses the whole tokenizer's metadata), so what it read is kept beside the
    converted model, in the cache that `smollm2_dir` uses: the float32 state dict (safetensors) and config, in a
    folder that transformers loads, named for the GGUF (its file name and size, as `default_model_dir`) and for the
    versions of transformers and gguf that read it. Loading that folder gives the same float32 tensors, bit for
    bit (safetensors stores them as they are), so the reference is the reader's output whichever way it came."""
    import importlib.metadata

    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    from llama_surgery_jax.model.embedded import cache_dir, embedded_gguf

    with session_cache(tmp_path_factory, "transformers"):
        gguf = embedded_gguf()
        versions = "-".join(f"{name}{importlib.metadata.version(name)}" for name in ("transformers", "gguf"))
        kept = cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}-{versions}"
        if (kept / "model.safetensors").is_file():
            return AutoModelForCausalLM.from_pretrained(kept, dtype=torch.float32).eval()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=kept.parent, prefix=f".{kept.name}-"))
        save_model(model, str(partial / "model.safetensors"))  # save_pretrained refuses a model read from a GGUF
        model.config.save_pretrained(partial)
        try:
            partial.rename(kept)  # whole or not at all; another process may have kept it first
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
        return model


def train_tiny_tokenizer(folder: Path, text_dir: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE of the tiny model's vocabulary size, trained on the training text of a data folder
    (`prose_dir`: all of it, 37 KB)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (text_dir / "wiki.valid.tokens").read_text()[:200_000]
    tokenizer.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_hf_dir, prose_dir, tmp_path_factory) -> Path:
    """The tiny Llama converted, with a 512-token BPE tokenizer: the whole training path in seconds."""
    from llama_surgery_jax.model.conversion import convert

    out = convert(tiny_hf_dir, tmp_path_factory.mktemp("converted") / "tiny", progress=False)
    train_tiny_tokenizer(out, prose_dir)
    return out


def tiny_train_overrides(model_dir, data_dir) -> list[str]:
    """The smoke preset's overrides for the tiny model: 6 steps of 4 × 64 tokens, a checkpoint after every step,
    a small evaluation (2 windows of 64). A small homotopy margin and a large rate, so routes move within a few
    steps. Also the command line of the multi-device runs, whose first step is then `tiny_run`'s."""
    return [f"model={model_dir}", f"data_dir={data_dir}", "seq_len=64", "batch_size=4", "steps=6",
            "checkpoint_every=1", "eval_context=64", "eval_windows=2", "eval_batch=2",
            "router.init_bias=1.0", "learning_rate=0.05"]


def tiny_train_config(model_dir, data_dir, *extra):
    """The smoke preset with `tiny_train_overrides` (and `extra` key=value overrides)."""
    from llama_surgery_jax.training.config import TrainConfig

    return TrainConfig.preset("smoke").override([*tiny_train_overrides(model_dir, data_dir), *extra])


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, prose_dir, tmp_path_factory):
    """One run of `tiny_train_config` with its report, trained once per session and shared: (config, run folder,
    train's result). Tests only read the folder; one that changes a run works on a copy (shutil.copytree)."""
    from llama_surgery_jax.evaluation import training_report
    from llama_surgery_jax.training.loop import train

    config = tiny_train_config(tiny_model_dir, prose_dir)
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    return config, out, train(config, out, report=training_report.prepare, progress=False)
