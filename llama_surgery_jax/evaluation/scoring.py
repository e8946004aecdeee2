"""One evaluation as `python -m llama_surgery_jax.evaluate` asks it (that CLI's docstring is the user's guide): the
model (dense, with a run's routers, or a baseline mask), the text cut into windows at each context, perplexity,
optionally dense on the same windows, transformers on the same windows, and needles → one result dict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_surgery_jax.evaluation.perplexity import niah, perplexity, protocol, transformers_perplexity
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import CheckpointError, load_model, load_tokenizer
from llama_surgery_jax.model.config import Precision
from llama_surgery_jax.model.embedded import default_model_dir


def run_evaluation(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """args: the evaluate CLI's settings (its `--help` names them) → (the result, the lines to print). Raises
    CheckpointError, ConfigError, DataError or FileNotFoundError for what cannot run, before the scoring."""
    evaluation = Evaluation(args)
    result = evaluation.score()
    return result, evaluation.notes


class Evaluation:
    """The model, text and windows of one evaluation, loaded and checked (the constructor), then scored."""

    def __init__(self, args: argparse.Namespace):
        """args: the evaluate CLI's settings (its `--help` names them)."""
        from llama_surgery_jax.training.checkpoints import prepare_for_evaluation, trained_base

        self.args = args
        self.contexts = list(args.contexts) if args.contexts else [args.context]
        thresholds = getattr(args, "thresholds", False)
        if not args.surgery and (args.block_density is not None or args.budget or args.selection or thresholds):
            raise CheckpointError("--block-density, --budget, --selection and --thresholds need --surgery RUN of a "
                                  "block-mode run")
        model_dir = args.model
        if not model_dir and args.surgery and args.surgery != "init":
            model_dir = trained_base(args.surgery)  # the run's own base model, when it is here
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.model = load_model(self.model_dir, Precision(args.dtype, args.dtype))
        self.attention_kwargs = {}
        if args.surgery:
            self.model, self.attention_kwargs, chosen = prepare_for_evaluation(
                self.model, args.surgery, context=max(self.contexts), model_dir=self.model_dir,
                block_density=args.block_density, budget=args.budget, selection=args.selection)
        self.budget = {}  # what a block run executes: named in the result and the printed label
        if "block_density" in self.attention_kwargs:
            requested = chosen.requested
            self.budget = {"selection": self.attention_kwargs["selection"], "budget": chosen.name,
                           "requested_block_density": requested}
            if not args.allow_floor:
                check_above_floor(self.model, requested, self.contexts)
        if thresholds:
            if args.niah:
                raise CheckpointError("--niah with --thresholds: τ is calibrated per context, and needles run at "
                                      "other lengths; score needles without --thresholds")
            check_row_selection(self.model, self.attention_kwargs)
            self.budget["allocation"] = (f"per-row thresholds, one τ per layer, calibrated on {CALIBRATION_SEQUENCES} "
                                         "windows of wiki.valid.tokens at each context")
        # The text last: what the settings refuse is refused before it is read and tokenized.
        self.tokenizer = load_tokenizer(self.model_dir)
        self.corpus = corpora.load_corpus(args.text, "test", args.data_dir, "raw")
        ids = corpora.tokenize(self.tokenizer, self.corpus.text)
        setting = "--contexts" if args.contexts else "--context"
        self.windows = {c: corpora.windows(ids, c, args.max_windows, source=corpora.describe(self.corpus.source),
                                           setting=setting) for c in self.contexts}
        self.training = None  # training windows per context, on which per-row thresholds are calibrated
        if thresholds:
            train_ids = corpora.tokenize(self.tokenizer, corpora.load_text("valid", args.data_dir, "tokens"))
            self.training = {c: corpora.windows(train_ids, c, CALIBRATION_SEQUENCES, source="wiki.valid.tokens",
                                                setting=setting) for c in self.contexts}

    def score(self) -> dict:
        """Every context's perplexity (and the rest the settings ask for) → the result dict; `notes` lists the lines
        to print beside it."""
        args, model = self.args, self.model
        by_context = []
        for context, windows in self.windows.items():
            if args.baseline:
                from llama_surgery_jax.surgery.baselines import describe, extra_blocks_for_density, install_baseline

                extra = extra_blocks_for_density(-(-context // args.baseline_tile), args.baseline_density)
                install_baseline(model, args.baseline, extra=extra, tile=args.baseline_tile)
            kwargs = dict(self.attention_kwargs)
            if self.training is not None:
                kwargs["thresholds"] = calibrated_thresholds(model, kwargs, self.training[context], args.batch_size)
            scored = perplexity(model, windows, batch_size=args.batch_size, **kwargs)
            scored.update(context=context, protocol=protocol(context, len(windows), self.corpus.source))
            if args.baseline:
                scored["baseline"] = describe(args.baseline, extra, args.baseline_tile, context)
            by_context.append(scored)
        result = dict(by_context[0])
        result.update(model=str(self.model_dir), dtype=args.dtype, surgery=args.surgery or "none", **self.budget)
        if args.contexts:
            result["by_context"] = by_context
        notes = []
        if args.niah:
            result["niah"] = niah(model, self.tokenizer, args, **self.attention_kwargs)
        if args.dense_too:
            from llama_surgery_jax.surgery.routed_attention import remove_routers

            remove_routers(model)
            for row in by_context:
                row["dense"] = perplexity(model, self.windows[row["context"]], batch_size=args.batch_size)
                row["gap"] = row["ppl"] / row["dense"]["ppl"] - 1
                notes.append(f"context {row['context']}: perplexity {row['ppl']:.4f}, dense {row['dense']['ppl']:.4f} "
                             f"({100 * row['gap']:+.2f} %)")
            result.update(dense=by_context[0]["dense"], gap=by_context[0]["gap"])
            if args.niah:
                result["niah_dense"] = niah(model, self.tokenizer, args)
        if args.compare_transformers:
            reference = transformers_perplexity(self.model_dir, self.windows[self.contexts[0]])
            result["transformers"] = reference | {"relative_difference": result["ppl"] / reference["ppl"] - 1}
            notes.append(f"transformers perplexity {reference['ppl']:.4f} on the same windows "
                         f"(ours/theirs - 1 = {result['transformers']['relative_difference']:+.2e})")
        scored_text = f"text {corpora.describe(self.corpus.source)}" if args.text else "wikitext-2 test"
        for row in by_context:
            label = f"baseline={args.baseline}" if args.baseline else f"surgery={result['surgery']}"
            if args.baseline:
                label += f", block density {row['baseline']['block_density']:.3f}"
            elif self.budget:
                label += (f", selection {self.budget['selection']}, {self.budget['budget']} budget, ρ requested "
                          f"{self.budget['requested_block_density']:g}, executed {row['block_density']['mean']:.3f}")
                if "allocation" in self.budget:
                    label += (f" [{row['block_density']['min']:.3f}, {row['block_density']['max']:.3f}] by "
                              f"{self.budget['allocation']}")
            notes.append(f"{scored_text} perplexity {row['ppl']:.4f} over {row['tokens']} tokens "
                         f"({row['protocol']['windows']} windows of {row['context']}, no BOS, {label})")
        if args.niah:
            from llama_surgery_jax.evaluation.niah import table

            notes.append(table({"model": result["niah"], **({"dense": result["niah_dense"]} if args.dense_too
                                                             else {})}))
        self.notes = notes
        return result


def check_above_floor(model, rho: float, contexts: list[int]) -> None:
    """A requested block density ρ below what the sink and window tiles alone execute is refused (it cannot be
    honoured). The request is compared, not the densities it became: calibrated per-head densities are float32 and
    never below the floor (a head at the floor reads a hair below the float64 floor), so their mean would refuse a
    request at the floor and accept one below it."""
    from llama_surgery_jax.surgery.block_routing import floor_density
    from llama_surgery_jax.surgery.routed_attention import routed_layers

    config = routed_layers(model)[0].config
    for context in contexts:
        n = -(-context // config.block_size)
        floor = floor_density(n, tile=config.block_size, window=config.window, sink=config.sink)
        if rho < floor:
            raise CheckpointError(
                f"block density {rho:g} (--block-density, else the run's router.block_density) is below the floor "
                f"{floor:.3f} at context {context} (tile "
                f"{config.block_size}, window {config.window}: the sink, own and window tiles alone execute that "
                "much): raise --block-density, use a longer context, or pass --allow-floor to run the floor")


CALIBRATION_SEQUENCES = 8  # training windows τ is calibrated on, per context (as `block_quality`'s rows)


def check_row_selection(model, attention_kwargs: dict) -> None:
    """--thresholds ranks rows: a row selection, or the router of a row-routing run."""
    from llama_surgery_jax.surgery.block_routing import ROW_SELECTIONS
    from llama_surgery_jax.surgery.routed_attention import routed_layers

    selection = attention_kwargs["selection"]
    row_router = selection == "router" and routed_layers(model)[0].config.query == "row"
    if selection not in ROW_SELECTIONS and not row_router:
        raise CheckpointError(f"--thresholds ranks rows: selection {selection!r} ranks query blocks; use --selection "
                              f"{' or '.join(ROW_SELECTIONS)}, or the router of a run trained with router.query=row")


def calibrated_thresholds(model, kwargs: dict, windows, batch_size: int):
    """τ [layers, heads] for the selection and densities of `kwargs`, calibrated on training windows [s, t]."""
    import numpy as np

    from llama_surgery_jax.surgery.routed_attention import routed_layers
    from llama_surgery_jax.training import calibration

    layers = routed_layers(model)
    table = np.broadcast_to(np.asarray(kwargs["block_density"], np.float32),
                            (len(layers), layers[0].router.routing_heads))
    return calibration.row_thresholds(model, windows, selection=kwargs["selection"], densities=table, scope="layer",
                                      batch_size=batch_size)

