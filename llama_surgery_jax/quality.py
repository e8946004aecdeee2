"""Quality against density for a trained surgery run: one script, one folder of tables and plots.

    python -m llama_surgery_jax.quality --run RUN_DIR [--model DIR] [--data-dir DIR] [--out DIR]
        [--contexts 1024,4096,8192] [--windows 8] [--curve-context 1024] [--curve-windows 8]
        [--d-max 2,3,4,5,6,7] [--window-sweep 0,32,64,128,256] [--baseline-extra 0,1,2,3,4,6]
        [--niah-lengths 2048,4096,8192] [--niah-depths 0,0.25,0.5,0.75,1] [--niah-trials 2]
        [--speed-contexts 1024,4096,8192] [--speed-new-tokens 64]
        [--ablate-p 2,3,5,7 --ablate-steps 200 --ablate-preset default] [--text FILE|DIR]

Writes OUT/quality.json, OUT/quality.md (every table), OUT/quality_density.png (the curve),
OUT/density_heatmap.png (per layer × head densities), OUT/tree_path.png (one token's route). Sections
(each skipped by giving an empty list, e.g. `--niah-lengths ""`, or `--curve-windows 0`; a section
not run keeps the results an earlier run wrote into the same OUT/quality.json, so the work can be split
into several shorter commands):

  perplexity   WikiText-2 test (or the `--text` file or folder, which the curve, the ablation's evaluation and
               the speed prompts use too) at each context: dense, surgery, streaming and MoBA baselines at the
               surgery's own block density (sorted, tile = block_size, measured on the first window),
               the evaluate.py protocol (no BOS, stride = context, all tokens after a window's first).
  curve        at --curve-context: surgery with d_max and W changed at evaluation time (the trained
               routers' choices are kept; a larger d_max compares fewer prefix levels), the baselines
               at several `extra` blocks, dense at 1.0; x = block density (sorted, tile = block_size).
  niah         needle-in-a-haystack exact-match accuracy, dense vs surgery (`niah.py`); the filler is always
               WikiText-2 valid.
  speed        prefill and decode tokens/s, dense (cuDNN via jax.nn.dot_product_attention) vs surgery
               (block-sparse kernel prefill; decode gathering visible keys, and masked over the cache),
               batch 1, compilation excluded, in --speed-dtype.
  ablation     routers trained per tree arity p (L = ceil(log_p seq_len), d_max = L // 2, else the
               preset), each evaluated like the curve's surgery point.

Routes are the argmax (no noise), the hard mask; WikiText-2 test is only evaluated on, never tuned on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from llama_surgery_jax import data
from llama_surgery_jax.evaluation.perplexity import protocol
from llama_surgery_jax.evaluation.quality import (
    Attention,
    ablation,
    curve,
    float_list,
    int_list,
    markdown,
    niah_section,
    perplexity_table,
    plot_curve,
    plot_routing,
    routing_choices,
    speed_section,
    surgery_density,
)
from llama_surgery_jax.files import write_json_atomic
from llama_surgery_jax.model.checkpoint import CheckpointError, load_model, load_tokenizer
from llama_surgery_jax.model.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Quality against density of a trained surgery run "
                                                 "(perplexity, curve, NIAH, speed, p ablation).")
    parser.add_argument("--run", required=True, help="training run folder (its router checkpoints)")
    parser.add_argument("--model", help="converted model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data-dir", help=f"WikiText-2 folder (default: ${data.DATA_DIR_ENV})")
    parser.add_argument("--text", metavar="FILE|DIR",
                        help="score this UTF-8 text instead of WikiText-2 test: a file, or a folder whose *.txt files "
                             "(not sub-folders') are read in name order; the NIAH filler stays WikiText-2 valid "
                             "(without WikiText-2, skip it: --niah-lengths '')")
    parser.add_argument("--out", help="output folder (default: RUN/quality)")
    parser.add_argument("--contexts", type=int_list, default=[1024, 4096, 8192])
    parser.add_argument("--windows", type=int, default=8, help="windows per context of the perplexity table")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--curve-context", type=int, default=1024)
    parser.add_argument("--curve-windows", type=int, default=8)
    parser.add_argument("--d-max", type=int_list, default=[2, 3, 4, 5, 6, 7], help="evaluation-time d_max sweep")
    parser.add_argument("--window-sweep", type=int_list, default=[0, 32, 64, 256], help="evaluation-time W sweep")
    parser.add_argument("--baseline-extra", type=int_list, default=[0, 1, 2, 3, 4, 5, 6],
                        help="extra blocks of the baselines on the curve")
    parser.add_argument("--niah-lengths", type=int_list, default=[2048, 4096, 8192])
    parser.add_argument("--niah-depths", type=float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--niah-trials", type=int, default=2)
    parser.add_argument("--speed-contexts", type=int_list, default=[1024, 4096, 8192])
    parser.add_argument("--speed-new-tokens", type=int, default=64)
    parser.add_argument("--speed-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ablate-p", type=int_list, default=[], help="e.g. 2,3,5,7: train routers per p")
    parser.add_argument("--ablate-steps", type=int, help="training steps per p (default: the preset's)")
    parser.add_argument("--ablate-preset", default="default")
    parser.add_argument("--ablate-override", action="append", default=[], help="key=value for each p's training")
    parser.add_argument("--route-token", type=int, default=512, help="the token whose tree path is drawn")
    parser.add_argument("--densities", type=float_list, default=[0.1, 0.2, 0.3],
                        help="block-mode runs: the executed block densities of the table")
    parser.add_argument("--windows-at", type=context_counts, default=[],
                        help="block-mode runs: windows per context, e.g. 8192:all,1024:8 (else --windows)")
    parser.add_argument("--router-cost", type=float, default=0.0,
                        help="block-mode runs: time the router's share of a forward at this ρ (0: skip)")
    parser.add_argument("--niah-oracle-density", type=float, default=0.2,
                        help="block-mode runs: the uniform oracle's needle row at this ρ (0: none)")
    parser.add_argument("--niah-densities", type=float_list, default=[0.2, 0.3],
                        help="block-mode runs: the densities of the needle rows")
    args = parser.parse_args(argv)

    from llama_surgery_jax.model.embedded import default_model_dir
    from llama_surgery_jax.training.checkpoints import load_trained_routers, trained_base

    started = time.perf_counter()
    try:
        model_dir = Path(args.model or trained_base(args.run) or default_model_dir())  # the run's base by default
        tokenizer = load_tokenizer(model_dir)
        corpus = data.load_corpus(args.text, "test", args.data_dir, "raw")
        ids = data.tokenize(tokenizer, corpus.text)
        # The longest window any section cuts from the text; the curve's context is always used (routing plots).
        data.windows(ids, max([*args.contexts, args.curve_context]), 1, source=data.describe(corpus.source),
                     setting="--contexts / --curve-context")
        model, router, step = load_trained_routers(load_model(model_dir), args.run, model_dir=model_dir)
        longest = max([*args.contexts, args.curve_context, *args.niah_lengths, *args.speed_contexts])
        if longest > model.config.max_position_embeddings:
            raise ConfigError(f"{longest} tokens exceed the model's context {model.config.max_position_embeddings}")
    except (CheckpointError, ConfigError, data.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run) / "quality"
    out.mkdir(parents=True, exist_ok=True)
    if router.mode == "block":
        return block_quality(args, model, router, step, model_dir, tokenizer, ids, corpus, out, started)
    att = Attention(model)
    # Sections not run this time keep what an earlier invocation on the same folder wrote, so the
    # measurement can be split into several shorter commands.
    previous = json.loads((out / "quality.json").read_text()) if (out / "quality.json").is_file() else {}
    if previous and not same_text(previous.get("protocol", {}), corpus.source):
        print(f"{out / 'quality.json'} was measured on other text: its sections are not kept")
        previous = {}
    result = {"perplexity": [], "curve": [], "niah": {}, "speed": [], "ablation": []}
    result |= {k: v for k, v in previous.items() if k in result}
    result |= {"run": str(args.run), "step": step, "model": str(model_dir), "router": dataclasses.asdict(router),
               "protocol": protocol(args.curve_context, args.curve_windows, corpus.source)}
    if args.contexts:
        result["perplexity"] = perplexity_table(att, ids, args.contexts, args.windows, args.batch_size)
    if args.curve_windows:
        result["curve_context"] = args.curve_context
        result["curve"] = curve(att, ids, args.curve_context, args.curve_windows, args.batch_size, args.d_max,
                                args.window_sweep, args.baseline_extra)
    result.setdefault("curve_context", previous.get("curve_context", args.curve_context))
    first = data.windows(ids, args.curve_context, 1)
    density = surgery_density(att.surgery(), first)
    token = min(args.route_token, args.curve_context - 1)
    choices = routing_choices(att.surgery(), jnp.asarray(first))
    result["density_per_layer_head"] = density["per_layer_head"]
    if args.niah_lengths:
        result["niah"] = niah_section(att, tokenizer, args.data_dir, args.niah_lengths, args.niah_depths,
                                      args.niah_trials, model.config.max_position_embeddings)
    if args.speed_contexts:
        result["speed"] = speed_section(model_dir, Path(args.run), ids, args.speed_contexts, args.speed_new_tokens,
                                        args.speed_dtype)
    if args.ablate_p:  # rows of other p from earlier invocations are kept: one p per command works
        kept = [r for r in result["ablation"] if r["p"] not in args.ablate_p]
        result["ablation"] = sorted(kept + ablation(args, model_dir, ids, out), key=lambda r: r["p"])
    result["seconds"] = time.perf_counter() - started
    write_json_atomic(out / "quality.json", result)
    (out / "quality.md").write_text(markdown(result))
    if result["curve"]:
        ylabel = f"perplexity on {Path(corpus.source['path']).name}" if args.text else "WikiText-2 test perplexity"
        plot_curve(result["curve"], out, ylabel=ylabel)
    plot_routing(density["per_layer_head"], choices, token, router.block_size, router.p, out)
    print(f"wrote {out / 'quality.md'} ({math.ceil(result['seconds'])} s)")
    return 0


def block_quality(args, model, router, step, model_dir, tokenizer, ids, corpus, out: Path, started: float) -> int:
    """A block-mode run: the table of `evaluation.block_quality` (every context × ρ × row, with dense), attention
    recall per layer, and needles by re-prefill; OUT/block_quality.json and .md."""
    from llama_surgery_jax.evaluation import block_quality as bq
    from llama_surgery_jax.evaluation.niah import run_niah
    from llama_surgery_jax.inference.cache import Decoder
    from llama_surgery_jax.surgery.routed_attention import remove_routers
    from llama_surgery_jax.training import calibration

    calibrated = calibration.read(Path(args.run))
    counts = dict(args.windows_at)
    windows = {c: data.windows(ids, c, counts.get(c, args.windows), source=data.describe(corpus.source),
                               setting="--contexts") for c in args.contexts}
    rows = bq.quality_rows(model, router, calibrated, windows, args.densities, args.batch_size,
                           on_row=lambda rows: write_json_atomic(out / "block_quality.partial.json", rows))
    niah = {}
    if args.niah_lengths:
        filler = data.tokenize(tokenizer, data.load_text("valid", args.data_dir, "tokens"))
        niah = bq.niah_rows(model, router, calibrated, tokenizer, filler, lengths=args.niah_lengths,
                            depths=args.niah_depths, trials=args.niah_trials,
                            settings=bq.niah_settings(args.niah_densities, args.niah_oracle_density),
                            model_context=model.config.max_position_embeddings)
    cost = None
    if args.router_cost:
        longest = max(args.contexts)
        cost = bq.router_cost(model, router, windows[longest][:1], args.router_cost)
        remove_routers(model)
        cost["dense_forward_s"] = bq.forward_seconds(model, windows[longest][:1])
    remove_routers(model)
    dense = bq.dense_rows(model, windows, args.batch_size)
    if args.niah_lengths:
        niah = {"dense": run_niah(Decoder(model), tokenizer, filler, lengths=args.niah_lengths, depths=args.niah_depths,
                                  trials=args.niah_trials, model_context=model.config.max_position_embeddings)} | niah
    result = {"run": str(args.run), "step": step, "model": str(model_dir), "router": dataclasses.asdict(router),
              "calibration": {k: v for k, v in (calibrated or {}).items() if k != "densities"},
              "protocol": {**corpus.source, "stride": "context", "bos": False,
                           "scored": "every token of a window after its first"},
              "dense": {str(c): d for c, d in dense.items()}, "rows": rows, "niah": niah, "router_cost": cost,
              "seconds": time.perf_counter() - started, "device": jax.devices()[0].device_kind}
    write_json_atomic(out / "block_quality.json", result)
    text = bq.markdown(rows, dense)
    if niah:
        from llama_surgery_jax.evaluation.niah import table

        text += "\n### Needle in a haystack (exact match; re-prefill for the sparse rows)\n\n" + table(niah) + "\n"
    if cost:
        ms = {k: 1e3 * cost[f"{k}_forward_s"] for k in ("router", "streaming", "dense")}
        text += (f"\nRouter cost at {cost['context']} tokens, batch {cost['batch']}, ρ = {cost['rho']} (hidden states, "
                 f"reference attention): router forward {ms['router']:.1f} ms, streaming selection "
                 f"{ms['streaming']:.1f} ms, dense {ms['dense']:.1f} ms: the router is "
                 f"{100 * cost['router_share']:.1f} % of the routed forward.\n")
    (out / "block_quality.md").write_text(text)
    print(text)
    print(f"wrote {out / 'block_quality.md'} ({math.ceil(result['seconds'])} s)")
    return 0


def context_counts(text: str) -> list[tuple[int, int | None]]:
    """'8192:36,1024:8' → [(8192, 36), (1024, 8)]; 'all' for every window of the text."""
    pairs = []
    for item in filter(None, text.split(",")):
        context, _, count = item.partition(":")
        pairs.append((int(context), None if count == "all" else int(count)))
    return pairs


def same_text(protocol_fields: dict, source: dict) -> bool:
    """Whether an earlier result's protocol names the same text as `source` (the folder it was read from aside)."""
    identity = ("dataset", "split", "file", "path", "sha256")
    return all(protocol_fields.get(key) == source.get(key) for key in identity)


if __name__ == "__main__":
    sys.exit(main())
