"""Perplexity with a stated protocol: windows scored through the model, and the same windows through transformers.

The command line, its options and protocol: `python -m llama_surgery_jax.evaluate` (llama_surgery_jax/evaluate.py).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llama_surgery_jax.io import corpora

# Per-sequence measures that routed layers may report in aux ([batch] arrays), collected per window.
WINDOW_STATS = ("block_density", "token_density", "attention_recall", "tie_share")


def window_nll(model, tokens: jax.Array, **attention_kwargs) -> jax.Array:
    """tokens: [batch, seq] → summed NLL of tokens 1..seq-1 of each window: [batch] float32."""
    return window_nll_and_stats(model, tokens, **attention_kwargs)[0]


def window_nll_and_stats(model, tokens: jax.Array, **attention_kwargs) -> tuple[jax.Array, dict]:
    """(summed NLL [batch], {stat: [layers, batch]} for the `WINDOW_STATS` the layers report per sequence)."""
    logits, aux = model(tokens, **attention_kwargs)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    stats = {k: jnp.stack([a[k] for a in aux]) for k in WINDOW_STATS
             if aux and k in aux[0] and jnp.ndim(aux[0][k]) == 1}
    return -picked.sum(axis=-1), stats


def perplexity(model, token_windows: np.ndarray, *, batch_size: int = 1, progress: bool = True,
               **attention_kwargs) -> dict:
    """Scores [windows, seq] token windows; returns ppl, nll, tokens (the protocol is the caller's)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, tokens):
        return window_nll_and_stats(nnx.merge(graphdef, state), tokens, **attention_kwargs)

    # Compiled before the bar starts, so that its rate and ETA are those of scoring (a ragged last batch
    # compiles its own shape when it comes).
    first = jnp.asarray(token_windows[:batch_size])
    if progress:
        print("compiling the perplexity scorer ...", end=" ", flush=True)
    started = time.perf_counter()
    compiled = score.lower(state, first).compile()
    if progress:
        print(f"done in {time.perf_counter() - started:.1f} s", flush=True)
    total = 0.0
    per_window: dict[str, list] = {}
    bar = tqdm(range(0, len(token_windows), batch_size), desc="perplexity", unit="batch",
               disable=not progress)
    for start in bar:
        batch = token_windows[start:start + batch_size]
        nll, stats = (compiled if batch.shape == first.shape else score)(state, jnp.asarray(batch))
        total += float(np.sum(np.asarray(nll, dtype=np.float64)))
        for key, value in stats.items():
            per_window.setdefault(key, []).extend(np.asarray(value, dtype=np.float64).T.tolist())
        scored = (start + len(batch)) * (token_windows.shape[1] - 1)
        bar.set_postfix(ppl=f"{math.exp(total / scored):.3f}")
    tokens = token_windows.shape[0] * (token_windows.shape[1] - 1)
    result = {"ppl": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}
    return result | {key: summarize(rows) for key, rows in per_window.items()}


def summarize(rows: list[list[float]]) -> dict:
    """[windows][layers] → mean, the spread of the per-window mean over layers, and the per-layer mean."""
    values = np.asarray(rows)
    by_window = values.mean(axis=1)
    return {"mean": float(by_window.mean()), "min": float(by_window.min()), "max": float(by_window.max()),
            "std": float(by_window.std()), "per_layer": values.mean(axis=0).tolist()}


def transformers_perplexity(model_dir: Path, token_windows: np.ndarray, *, progress: bool = True) -> dict:
    """The same protocol through transformers (torch, CPU, float32) on the source the model came from."""
    import torch
    from transformers import AutoModelForCausalLM

    source = Path(json.loads((model_dir / "conversion.json").read_text())["source"])
    if source.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    total = 0.0
    with torch.no_grad():
        for window in tqdm(token_windows, desc="transformers", disable=not progress):
            batch = torch.tensor(window[None], dtype=torch.long)
            logits = hf.eval()(batch).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, batch[0, 1:], reduction="sum").item()
    tokens = token_windows.shape[0] * (token_windows.shape[1] - 1)
    return {"ppl": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}


def protocol(context: int, windows: int, source: dict) -> dict:
    """What a perplexity was measured on and how: the corpus source (`corpora.Corpus.source`, e.g. dataset
    "wikitext-2-raw-v1", split "test", file "wiki.test.raw"; or dataset "text", path, files, sha256) and the
    windowing."""
    return {**source, "context": context, "stride": context, "bos": False, "windows": windows,
            "scored": "every token of a window after its first"}


def niah(model, tokenizer, args, **attention_kwargs) -> list[dict]:
    """Needle-in-a-haystack rows of the model as it is now (filler: wiki.valid.tokens, never test). A block-mode
    model (attention_kwargs with block_density) generates by re-prefill (`niah.Reprefill`)."""
    from llama_surgery_jax.evaluation.niah import Reprefill, run_niah
    from llama_surgery_jax.inference.cache import Decoder

    filler = corpora.tokenize(tokenizer, corpora.load_text("valid", args.data_dir, "tokens"))
    decoder = Reprefill(model, **attention_kwargs) if "block_density" in attention_kwargs else Decoder(model)
    return run_niah(decoder, tokenizer, filler, lengths=[int(n) for n in args.niah.split(",")],
                    trials=args.niah_trials, model_context=model.config.max_position_embeddings)
