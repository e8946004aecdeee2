"""Perplexity on WikiText-2 test: dense, or with the surgery's routers.

    python -m llama_surgery_jax.evaluate [--model CONVERTED_DIR] [--data-dir DIR] [--context 1024]
                                         [--max-windows N] [--surgery init|CHECKPOINT] [--json FILE]

Protocol (stated in every result): the whole `wiki.test.raw` is tokenized as one stream with no BOS,
cut into non-overlapping windows of `--context` tokens (stride = context, the tail that fills no window
dropped); every token of a window after its first is scored. ppl = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llama_surgery_jax import data
from llama_surgery_jax.checkpoint import CheckpointError, load_model, load_tokenizer
from llama_surgery_jax.config import ConfigError, Precision
from llama_surgery_jax.embedded import default_model_dir


def window_nll(model, tokens: jax.Array, **attention_kwargs) -> jax.Array:
    """tokens: [batch, seq] → summed NLL of tokens 1..seq-1 of each window: [batch] float32."""
    logits, _ = model(tokens, **attention_kwargs)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -picked.sum(axis=-1)


def perplexity(model, token_windows: np.ndarray, *, batch_size: int = 1, progress: bool = True,
               **attention_kwargs) -> dict:
    """Scores [windows, seq] token windows; returns ppl, nll, tokens (the protocol is the caller's)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, tokens):
        return window_nll(nnx.merge(graphdef, state), tokens, **attention_kwargs)

    total = 0.0
    bar = tqdm(range(0, len(token_windows), batch_size), desc="perplexity", unit="batch",
               disable=not progress)
    for start in bar:
        batch = token_windows[start:start + batch_size]
        total += float(np.sum(np.asarray(score(state, jnp.asarray(batch)), dtype=np.float64)))
        scored = (start + len(batch)) * (token_windows.shape[1] - 1)
        bar.set_postfix(ppl=f"{math.exp(total / scored):.3f}")
    tokens = token_windows.shape[0] * (token_windows.shape[1] - 1)
    return {"ppl": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}


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


def protocol(context: int, windows: int, data_dir) -> dict:
    return {"dataset": "wikitext-2-raw-v1", "split": "test", "file": "wiki.test.raw",
            "data_dir": str(data_dir) if data_dir else "datasets.load_dataset",
            "context": context, "stride": context, "bos": False, "windows": windows,
            "scored": "every token of a window after its first"}


def write_json_atomic(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=2)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="WikiText-2 test perplexity of a converted Llama.")
    parser.add_argument("--model", help="converted model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data-dir", help=f"WikiText-2 folder (default: ${data.DATA_DIR_ENV}, else datasets)")
    parser.add_argument("--context", type=int, default=1024, help="window length in tokens")
    parser.add_argument("--max-windows", type=int, help="score only the first N windows")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter and compute dtype")
    parser.add_argument("--surgery", help="'init' (routers at their homotopy initialisation) or a "
                                          "router checkpoint folder written by train")
    parser.add_argument("--compare-transformers", action="store_true",
                        help="also score the same windows with transformers (torch) from the original source")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)

    try:
        model_dir = Path(args.model) if args.model else default_model_dir()
        model = load_model(model_dir, Precision(args.dtype, args.dtype))
        ids = data.tokenize(load_tokenizer(model_dir), data.load_text("test", args.data_dir, "raw"))
        token_windows = data.windows(ids, args.context, args.max_windows)
        attention_kwargs = {}
        if args.surgery:
            from llama_surgery_jax.router_checkpoint import prepare_for_evaluation

            model, attention_kwargs = prepare_for_evaluation(model, args.surgery)
    except (CheckpointError, ConfigError, data.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    result = perplexity(model, token_windows, batch_size=args.batch_size, **attention_kwargs)
    result.update(model=str(model_dir), dtype=args.dtype, surgery=args.surgery or "none",
                  protocol=protocol(args.context, len(token_windows), data.resolve_data_dir(args.data_dir)))
    if args.compare_transformers:
        reference = transformers_perplexity(model_dir, token_windows)
        result["transformers"] = reference | {"relative_difference": result["ppl"] / reference["ppl"] - 1}
        print(f"transformers perplexity {reference['ppl']:.4f} on the same windows "
              f"(ours/theirs - 1 = {result['transformers']['relative_difference']:+.2e})")
    print(f"wikitext-2 test perplexity {result['ppl']:.4f} over {result['tokens']} tokens "
          f"({len(token_windows)} windows of {args.context}, no BOS, surgery={result['surgery']})")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
