"""Quality against density for a trained surgery run, as `python -m llama_surgery_jax.quality` asks it (that CLI's
docstring is the user's guide): the sections of `evaluation.quality` (token mode) or the table of
`evaluation.block_quality` (block mode), written into one folder of tables and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from llama_surgery_jax.evaluation.perplexity import protocol
from llama_surgery_jax.evaluation.quality import (
    Attention,
    ablation,
    curve,
    markdown,
    niah_section,
    perplexity_table,
    plot_curve,
    plot_routing,
    routing_choices,
    speed_section,
    surgery_density,
)
from llama_surgery_jax.io import corpora
from llama_surgery_jax.io.files import write_json_atomic
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.model.config import ConfigError


def progress(line: str) -> None:
    """A line of progress at once, even through a pipe (a long device run that is cut off keeps what it printed)."""
    print(line, flush=True)


def run_quality(args: argparse.Namespace) -> Path:
    """args: the quality CLI's settings (its `--help` names them) → the markdown file written. Raises
    CheckpointError, ConfigError, DataError or FileNotFoundError for what cannot run, before any section."""
    from llama_surgery_jax.model.embedded import default_model_dir
    from llama_surgery_jax.training.checkpoints import load_trained_routers, trained_base

    started = time.perf_counter()
    model_dir = Path(args.model or trained_base(args.run) or default_model_dir())  # the run's base by default
    tokenizer = load_tokenizer(model_dir)
    corpus = corpora.load_corpus(args.text, "test", args.data_dir, "raw")
    ids = corpora.tokenize(tokenizer, corpus.text)
    # The longest window any section cuts from the text; the curve's context is always used (routing plots).
    corpora.windows(ids, max([*args.contexts, args.curve_context]), 1, source=corpora.describe(corpus.source),
                    setting="--contexts / --curve-context")
    model, router, step = load_trained_routers(load_model(model_dir), args.run, model_dir=model_dir)
    longest = max([*args.contexts, args.curve_context, *args.niah_lengths, *args.speed_contexts])
    if longest > model.config.max_position_embeddings:
        raise ConfigError(f"{longest} tokens exceed the model's context {model.config.max_position_embeddings}")
    if getattr(args, "niah_thresholds", False) and args.niah_lengths and (router.mode != "block" or
                                                                           router.query != "row"):
        raise ConfigError("--niah-thresholds ranks rows: it needs a run trained with router.mode=block "
                          f"router.query=row (this one: mode {router.mode}, query {router.query})")
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
    first = corpora.windows(ids, args.curve_context, 1)
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
    return out / "quality.md"



def block_quality(args, model, router, step, model_dir, tokenizer, ids, corpus, out: Path, started: float) -> Path:
    """A block-mode run: the table of `evaluation.block_quality` (every context × ρ × row, with dense), attention
    recall per layer, and needles (the router's by KV-cache decode, the oracle's by re-prefill);
    OUT/block_quality.json and .md."""
    from llama_surgery_jax.evaluation import block_quality as bq
    from llama_surgery_jax.evaluation.niah import run_niah, summary
    from llama_surgery_jax.inference.cache import Decoder
    from llama_surgery_jax.surgery.routed_attention import remove_routers
    from llama_surgery_jax.training import calibration

    calibrated = calibration.read(Path(args.run))
    counts = dict(args.windows_at)
    windows = {c: corpora.windows(ids, c, counts.get(c, args.windows), source=corpora.describe(corpus.source),
                                  setting="--contexts") for c in args.contexts}
    training = None
    if any(budget.endswith(bq.THRESHOLDS) for _, _, budget in args.rows):
        train_ids = corpora.tokenize(tokenizer, corpora.load_text("valid", args.data_dir, "tokens"))
        training = {c: corpora.windows(train_ids, c, bq.CALIBRATION_SEQUENCES, setting="--contexts")
                    for c in args.contexts}
    rows = bq.quality_rows(model, router, calibrated, windows, args.densities, args.batch_size, rows=args.rows,
                           on_row=lambda rows: write_json_atomic(out / "block_quality.partial.json", rows),
                           training=training)
    niah = {}
    if args.niah_lengths:
        filler = corpora.tokenize(tokenizer, corpora.load_text("valid", args.data_dir, "tokens"))
        niah = bq.niah_rows(model, router, calibrated, tokenizer, filler, lengths=args.niah_lengths,
                            depths=args.niah_depths, trials=args.niah_trials,
                            settings=bq.niah_settings(args.niah_densities, args.niah_oracle_density,
                                                     router.budget if calibrated else "uniform",
                                                     thresholds=args.niah_thresholds),
                            model_context=model.config.max_position_embeddings, training=filler,
                            batch_size=args.batch_size, log=progress)
    cost = None
    if args.router_cost:
        longest = max(args.contexts)
        cost = bq.router_cost(model, router, windows[longest][:1], args.router_cost)
        remove_routers(model)
        cost["dense_forward_s"] = bq.forward_seconds(model, windows[longest][:1])
    remove_routers(model)
    dense = bq.dense_rows(model, windows, args.batch_size)
    if args.niah_lengths:
        started_dense = time.perf_counter()
        niah = {"dense": run_niah(Decoder(model), tokenizer, filler, lengths=args.niah_lengths, depths=args.niah_depths,
                                  trials=args.niah_trials, model_context=model.config.max_position_embeddings,
                                  log=progress)} | niah
        progress(f"needles: dense: {summary(niah['dense'])} ({time.perf_counter() - started_dense:.1f} s)")
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

        text += ("\n### Needle in a haystack (exact match; KV-cache decode for dense and surgery, re-prefill for the "
                 "oracle)\n\n" + table(niah) + "\n")
    if cost:
        ms = {k: 1e3 * cost[f"{k}_forward_s"] for k in ("router", "streaming", "dense")}
        text += (f"\nRouter cost at {cost['context']} tokens, batch {cost['batch']}, ρ = {cost['rho']} (hidden states, "
                 f"reference attention): router forward {ms['router']:.1f} ms, streaming selection "
                 f"{ms['streaming']:.1f} ms, dense {ms['dense']:.1f} ms: the router is "
                 f"{100 * cost['router_share']:.1f} % of the routed forward.\n")
    (out / "block_quality.md").write_text(text)
    print(text)
    print(f"wrote {out / 'block_quality.md'} ({math.ceil(result['seconds'])} s)")
    return out / "block_quality.md"


def same_text(protocol_fields: dict, source: dict) -> bool:
    """Whether an earlier result's protocol names the same text as `source` (the folder it was read from aside)."""
    identity = ("dataset", "split", "file", "path", "sha256")
    return all(protocol_fields.get(key) == source.get(key) for key in identity)
