"""Text generation with a dense or surgically sparsified Llama: routed prefill, then KV-cache decode.

    python -m llama_surgery_jax.generate --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N]
        [--model DIR] [--surgery RUN|init] [--temperature T] [--top-k K] [--seed S]
        [--attention auto|reference|kernel] [--no-gather] [--no-compare] [--json FILE]
        [--block-density RHO] [--budget adaptive|sensitivity|uniform] [--thresholds [--data-dir DIR]]

Several `--prompt`s make one batch (right-padded; prompts may differ in length). No `--model`: the
embedded SmolLM2-135M-Instruct. `--surgery` loads the routers of a training run; a folder without
router checkpoints runs the dense model and says so. Greedy by default; `--temperature > 0` samples
(seeded: the same seed gives the same text). Prints each completion and tokens/s of prefill and decode
(compilation timed apart); with `--surgery`, then runs the dense model (the same weights without routers)
on the same prompts and prints both speeds and their ratio (`--no-compare` skips it). A block-mode run decodes
under its budget read as `evaluate` reads it: ρ the run's unless `--block-density`, its calibrated per-head
densities (adaptive, the default when the run holds calibration.json) or ρ for every head (`--budget uniform`);
the first line printed says what the decode ran. `--thresholds` (row-routing runs) spends that budget by per-row
thresholds as `evaluate --thresholds` does: τ one per layer, calibrated on 8 windows of the training text
(wiki.valid.tokens) at the generation's length (the longest prompt plus the new tokens), prefill and decode alike.
See `inference/cache.py` for the attention paths.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import numpy as np

from llama_surgery_jax.cli.arguments import command, density, integer, output_file, real
from llama_surgery_jax.evaluation.scoring import CALIBRATION_SEQUENCES, calibrated_thresholds
from llama_surgery_jax.inference.cache import ContextError
from llama_surgery_jax.inference.generate import generate_and_compare, load_for_inference
from llama_surgery_jax.io.corpora import DataError
from llama_surgery_jax.model.checkpoint import CheckpointError
from llama_surgery_jax.model.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings, each checked (a bad one exits with status 2 and a message that names it)."""
    parser = argparse.ArgumentParser(description="Generate text with a dense or routed (surgery) Llama.")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=integer(1), default=32)
    parser.add_argument("--model", help="converted model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--surgery", help="a training run folder (its routers), or 'init'")
    parser.add_argument("--temperature", type=real(0.0), default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=integer(1), help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default="auto", choices=["auto", "reference", "kernel"],
                        help="prefill attention: kernel (GPU), reference (chunked masked attention), auto")
    parser.add_argument("--no-gather", action="store_true",
                        help="token-mode routers: decode over the whole cache with a mask instead of gathering "
                             "visible keys (block mode always reads its listed blocks)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=output_file, help="write the completions and timings here (its path checked "
                                                         "before the work)")
    parser.add_argument("--no-compare", action="store_true",
                        help="with --surgery: skip the dense model's run on the same prompts (its speeds)")
    parser.add_argument("--block-density", type=density,
                        help="block-mode runs: the block density ρ (default: the run's router.block_density)")
    parser.add_argument("--budget", choices=["adaptive", "sensitivity", "uniform"],
                        help="block-mode runs: per-head densities calibrated on training data (adaptive, the default "
                             "when the run has them) or ρ for every head")
    parser.add_argument("--thresholds", action="store_true",
                        help="row-routing runs: spend the budget by per-row thresholds, τ calibrated on the training "
                             "text at the generation's length (as evaluate --thresholds)")
    parser.add_argument("--data-dir", help="with --thresholds: the WikiText-2 folder whose wiki.valid.tokens τ is "
                                           "calibrated on (default: $WIKITEXT2_DIR, else datasets)")
    args = parser.parse_args(argv)
    if args.thresholds and not args.surgery:
        parser.error("--thresholds needs --surgery RUN of a run trained with router.query=row")
    if args.attention == "kernel" and args.surgery and args.dtype == "float32":
        parser.error("--attention kernel: the kernels take bfloat16 or float16 activations, never float32 (--dtype "
                     "float32); pass --dtype bfloat16, or --attention reference (or auto)")
    return args


def run(args: argparse.Namespace) -> int:
    try:
        model, tokenizer, described = load_for_inference(args.model, args.surgery, args.dtype)
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
        # With --thresholds, τ is calibrated at the generation's length and the sensitivity floor is taken there.
        length = min(max(map(len, prompts)) + args.max_new_tokens, model.config.max_position_embeddings)
        budget = block_budget(model, args, context=length if args.thresholds else None)
        if args.thresholds:
            budget = with_thresholds(model, budget, tokenizer, length, args.data_dir)
        result, dense = generate_and_compare(
            model, prompts, attention=args.attention, gather=not args.no_gather, block_budget=budget,
            compare=not args.no_compare, max_new_tokens=args.max_new_tokens,
            model_context=model.config.max_position_embeddings, temperature=args.temperature, top_k=args.top_k,
            seed=args.seed, eos_ids=model.config.eos_token_ids)
    except (CheckpointError, ConfigError, ContextError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    print(f"model: {described}; prefill attention: {result.attention}; decode: {result.decode}")
    for prompt, text in zip(args.prompt, result.texts, strict=True):
        print(f"--- {prompt!r}\n{prompt}{text}")
    print(f"prefill {result.prompt_tokens} tokens: {result.prefill_tokens_per_s:.1f} tokens/s; decode "
          f"{result.decode_steps} steps × {len(prompts)}: {result.decode_tokens_per_s:.1f} tokens/s "
          f"(compilation {result.compile_s:.1f} s, excluded)")
    if dense is not None:
        print(speed_table(dense, result))
    if args.json:
        from llama_surgery_jax.io.files import write_json_atomic

        speeds = {"prefill_tokens_per_s": result.prefill_tokens_per_s,
                  "decode_tokens_per_s": result.decode_tokens_per_s}
        if dense is not None:
            speeds["dense"] = {"prefill_tokens_per_s": dense.prefill_tokens_per_s,
                               "decode_tokens_per_s": dense.decode_tokens_per_s, "tokens": dense.tokens}
        if budget is not None:
            speeds |= {"budget": budget.name, "requested_block_density": budget.requested,
                       "block_density": np.asarray(budget.densities).tolist(),
                       "allocation": "count per query block" if budget.thresholds is None else
                       f"per-row thresholds, one τ per layer, calibrated on {CALIBRATION_SEQUENCES} windows of "
                       f"wiki.valid.tokens at {budget.calibrated_at} tokens",
                       "thresholds": None if budget.thresholds is None else np.asarray(budget.thresholds).tolist()}
        write_json_atomic(args.json, asdict(result) | {"model": described} | speeds)
    return 0


def block_budget(model, args: argparse.Namespace, context: int | None = None):
    """A block-mode model's budget as `evaluate` reads it (`training.budget.run_budget`; context: the length whose
    floor the sensitivity budget keeps); None for other models, which refuse --block-density and --budget."""
    from llama_surgery_jax.surgery.routed_attention import routed_layers
    from llama_surgery_jax.training.budget import run_budget

    layers = routed_layers(model)
    if layers and layers[0].config.mode == "block":
        return run_budget(layers[0].config, args.surgery, block_density=args.block_density, budget=args.budget,
                          layers=len(layers), heads=layers[0].router.routing_heads, context=context)
    if args.block_density is not None or args.budget:
        raise CheckpointError("--block-density and --budget need --surgery RUN of a block-mode run")
    return None


def with_thresholds(model, budget, tokenizer, length: int, data_dir):
    """`budget` spent by per-row thresholds: τ [layers, heads] calibrated at `length` tokens on CALIBRATION_SEQUENCES
    windows of the training text (as `evaluate --thresholds`). Refuses a model whose router ranks query blocks."""
    from llama_surgery_jax.io import corpora
    from llama_surgery_jax.surgery.routed_attention import routed_layers

    layers = routed_layers(model)
    if budget is None or layers[0].config.query != "row":
        raise CheckpointError("--thresholds ranks rows: it needs --surgery RUN of a run trained with router.mode=block "
                              "router.query=row")
    text = corpora.tokenize(tokenizer, corpora.load_text("valid", data_dir, "tokens"))
    windows = corpora.windows(text, length, CALIBRATION_SEQUENCES, source="wiki.valid.tokens",
                              setting="--max-new-tokens")
    tau = calibrated_thresholds(model, {"selection": "router", "block_density": budget.densities}, windows,
                                batch_size=len(windows))
    return budget._replace(thresholds=tau, calibrated_at=length)


def speed_table(dense, surgery) -> str:
    """Prefill and decode tokens/s of the dense model and the surgery on the same prompts, and their ratio."""
    rows = [("dense", dense.prefill_tokens_per_s, dense.decode_tokens_per_s),
            ("surgery", surgery.prefill_tokens_per_s, surgery.decode_tokens_per_s)]
    lines = ["dense against surgery (same prompts and weights; compilation excluded):", "",
             "| model | prefill tokens/s | decode tokens/s |", "| --- | --- | --- |"]
    lines += [f"| {name} | {prefill:.1f} | {decode:.1f} |" for name, prefill, decode in rows]
    lines.append(f"| surgery ÷ dense | {surgery.prefill_tokens_per_s / dense.prefill_tokens_per_s:.2f}× | "
                 f"{surgery.decode_tokens_per_s / dense.decode_tokens_per_s:.2f}× |")
    return "\n".join(lines)


main = command(parse_args, run)

if __name__ == "__main__":
    sys.exit(main())
