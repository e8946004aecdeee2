"""Shared fixtures: tiny HF Llama checkpoints made with transformers, the embedded SmolLM2, WikiText-2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def fresh_seed() -> int:
    """A new seed per call (fresh random inputs each run); tests print it in their messages."""
    return int(np.random.SeedSequence().entropy % (2**31))


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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M GGUF, converted once for the session into a temporary cache."""
    from llama_surgery_jax.model import embedded as embedded

    os.environ.setdefault("LLAMA_SURGERY_CACHE", str(tmp_path_factory.mktemp("cache")))
    return embedded.default_model_dir()


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    path = Path(os.environ.get("WIKITEXT2_DIR", REPO.parent / "shared" / "data" / "wikitext-2"))
    if not (path / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 not found at {path}; set WIKITEXT2_DIR")
    return path


def train_tiny_tokenizer(folder: Path, wikitext: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE of the tiny model's vocabulary size, trained on a slice of WikiText-2 valid."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (wikitext / "wiki.valid.tokens").read_text()[:200_000]
    tokenizer.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_hf_dir, wikitext_dir, tmp_path_factory) -> Path:
    """The tiny Llama converted, with a 512-token BPE tokenizer: the whole training path in seconds."""
    from convert.hf_to_flax import convert

    out = convert(tiny_hf_dir, tmp_path_factory.mktemp("converted") / "tiny", progress=False)
    train_tiny_tokenizer(out, wikitext_dir)
    return out
