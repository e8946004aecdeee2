"""The report at the end of router training: report.json, report.md and PNG plots in the run folder.

The report scores the dense baseline and the surgery through the same pipeline (evaluation.perplexity,
same windows, same protocol), and measures the realised hard topology per layer and head. The training loop
knows it only as the `report` it is given (`training.loop.train(report=prepare)`), so that training does not
import evaluation, which imports training (router checkpoints, budgets, the loop for ablations).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_surgery_jax.evaluation.perplexity import perplexity, protocol
from llama_surgery_jax.io import corpora
from llama_surgery_jax.io.files import write_json_atomic
from llama_surgery_jax.model.checkpoint import load_tokenizer
from llama_surgery_jax.surgery.mask import causal_pairs, executed_tiles, tile_mask, token_density
from llama_surgery_jax.surgery.routed_attention import hard_topology, remove_routers

DENSITY_TILES = (64, 128)
DENSITY_WINDOWS = 2  # evaluation windows over which densities are measured


def topology_densities(model, tokens: jax.Array, config) -> dict:
    """Hard topology of the evaluation routes on tokens [b, t]: densities per layer × head.

    One routed forward gives every layer's codes (they do not depend on the tile); every tile's counts come from
    those codes in one more program, layer by layer."""
    router = config.router
    tiles = tuple(sorted({*DENSITY_TILES, router.block_size}))
    codes = jnp.stack([topo.codes for topo in hard_topology(model, tokens, tile=tiles[0])])  # [layers, b, h, t]
    per_layer = _densities_from_codes(codes, tiles=tiles, window=router.window, sink=router.sink)
    order = ["token", *[f"block_{t}" for t in tiles], *[f"block_{t}_sorted" for t in tiles]]
    return {k: np.asarray(per_layer[k]).tolist() for k in order}  # [layers][heads]


@functools.partial(jax.jit, static_argnames=("tiles", "window", "sink"))
def _densities_from_codes(codes: jax.Array, *, tiles: tuple[int, ...], window: int | None, sink: bool) -> dict:
    """codes: [layers, b, h, t] → {measure: [layers, heads]}: `topology_densities`' counts."""

    def layer(codes):  # [b, h, t]
        out = {"token": jax.vmap(lambda c: token_density(c, window=window, sink=sink), in_axes=1)(codes)}
        for tile in tiles:
            mask = tile_mask(codes, tile=tile, window=window, sink=sink)
            n = mask.shape[-1]
            out[f"block_{tile}"] = jnp.sum(mask, axis=(0, 2, 3)) / (mask.shape[0] * causal_pairs(n))
            # What the kernel runs (METHOD.md §9): the bucket pass over the code-sorted sequence plus every
            # sink/window/diagonal tile of the band pass in original order.
            computed = jnp.sum(executed_tiles(codes, tile=tile, window=window, sink=sink), axis=0)
            out[f"block_{tile}_sorted"] = computed / (codes.shape[0] * causal_pairs(n))
        return out

    return jax.lax.map(layer, codes)


def prepare(config, model_dir: Path) -> Callable[..., dict]:
    """What `training.loop.train` is given as `report`: reads and windows the report's text now, before training,
    so that a missing or too short text fails before the work, not after it; returns
    finish(run, out, timing, train_source) → the report (`final_report` on those windows)."""
    evaluation = evaluation_windows(config, load_tokenizer(model_dir))

    def finish(run, out: Path, timing: dict, train_source: dict) -> dict:
        return final_report(run, out, config, timing, evaluation=evaluation, train_source=train_source)

    return finish


def evaluation_windows(config, tokenizer) -> tuple[np.ndarray, dict]:
    """The report's windows [eval_windows, eval_context] int32 and their source: `config.eval_data` when set,
    else WikiText-2 wiki.test.raw."""
    corpus = corpora.load_corpus(config.eval_data or None, "test", config.data_dir or None, "raw")
    ids = corpora.tokenize(tokenizer, corpus.text)
    windows = corpora.windows(ids, config.eval_context, config.eval_windows, source=corpora.describe(corpus.source),
                              setting="eval_context")
    return windows, corpus.source


def final_report(run, out: Path, config, timing: dict | None = None, *,
                 evaluation: tuple[np.ndarray, dict] | None = None, train_source: dict | None = None) -> dict:
    """Dense vs surgery perplexity and realised densities → report.json/.md, PNGs.

    evaluation: (windows, source) from `evaluation_windows`, when the caller read them already;
    train_source: the training text's source, recorded in the protocol as `train_data`."""
    windows, source = evaluation or evaluation_windows(config, load_tokenizer(run.model_dir))
    model = nnx.merge(run.graphdef, run.routers, run.frozen)
    if config.router.mode == "block":
        return block_report(model, run.model_dir, out, config, timing, windows, source, train_source)
    surgery = perplexity(model, windows, batch_size=config.eval_batch, train=False, rng=None)
    densities = topology_densities(model, jnp.asarray(windows[:DENSITY_WINDOWS]), config)
    dense = perplexity(remove_routers(model), windows, batch_size=config.eval_batch)
    mean = {k: float(np.mean(v)) for k, v in densities.items()}
    result = {
        "dense_ppl": dense["ppl"], "surgery_ppl": surgery["ppl"],
        "ppl_gap": surgery["ppl"] / dense["ppl"] - 1,
        "token_density": mean["token"], "block_density": mean[f"block_{config.router.block_size}"],
        "block_size": config.router.block_size,
        "block_density_by_tile": {k: v for k, v in mean.items() if k.startswith("block")},
        "density_per_layer_head": densities,
        "tokens_scored": dense["tokens"], "steps": config.steps,
        "protocol": protocol(config.eval_context, len(windows), source)
        | {"density_windows": DENSITY_WINDOWS, "routes": "argmax (no noise), hard mask"}
        | ({"train_data": train_source} if train_source else {}),
        "model": str(run.model_dir), "config": config.to_dict(), "timing": timing or {},
    }
    if jax.process_index() == 0:
        write_json_atomic(out / "report.json", result)
        (out / "report.md").write_text(markdown(result))
        plot(out, densities, config.router.block_size)
    return result


def markdown(r: dict) -> str:
    p = r["protocol"]
    lines = [
        "# Llama Surgery run report", "",
        f"Model: `{r['model']}`; {r['steps']} router-training steps.", "",
        f"Perplexity on `{corpora.describe(p)}`: {p['windows']} windows of {p['context']} tokens, "
        f"no BOS, every token after a window's first scored ({r['tokens_scored']} tokens), same pipeline for both.",
        *([f"Routers trained on `{corpora.describe(p['train_data'])}`."] if "train_data" in p else []),
        "", "| | perplexity |", "| --- | --- |",
        f"| dense baseline | {r['dense_ppl']:.4f} |",
        f"| surgery (hard mask, argmax routes) | {r['surgery_ppl']:.4f} |",
        f"| gap | {100 * r['ppl_gap']:+.2f} % |", "",
        f"Realised density (first {p['density_windows']} windows, mean over layers and heads):", "",
        "| measure | density |", "| --- | --- |",
        f"| token density | {r['token_density']:.4f} |",
        *[f"| {k.replace('_', ' ')} | {v:.4f} |" for k, v in r["block_density_by_tile"].items()],
        "", "Training speed (this invocation, first step with compilation left out): "
        + json.dumps(r["timing"]),
        "", "Block density: computed causal tiles / causal tiles. Original order: the tile OR of the token mask. "
        "'sorted': the tiles of the bucket pass over tokens sorted by (code, position) plus those of the "
        "sink/window band pass for pairs whose codes differ (two passes, so it can exceed 1 when nearly dense).",
        "", "![loss](loss.png)", "", "![density](density.png)", "",
    ]
    return "\n".join(lines)


def plot(out: Path, densities: dict, block_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plot_metrics(out, {"ce": "cross-entropy", "load_balance": "load-balancing loss",
                       "token_density": "token density (train)"})

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    block = f"block_{block_size}"
    panels = (("token", "token density"), (block, f"block density, tile {block_size}, original order"),
              (f"{block}_sorted", f"block density, tile {block_size}, sorted by code"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        image = ax.imshow(np.asarray(densities[key]), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "density.png", dpi=110)
    plt.close(fig)


def block_report(model, model_dir, out: Path, config, timing, windows, source, train_source) -> dict:
    """Block mode: dense against the surgery at the run's ρ, with each budget the run has (uniform, adaptive,
    sensitivity), every density counted from the tiles the attention was given, and attention recall."""
    from llama_surgery_jax.training import calibration

    rho = config.router.block_density
    calibrated = calibration.read(out)
    budgets = {"uniform": rho}
    if calibrated is not None:
        from llama_surgery_jax.surgery.block_routing import floor_density

        router = config.router
        floor = floor_density(-(-config.eval_context // router.block_size), tile=router.block_size,
                              window=router.window, sink=router.sink)
        heads = len(calibrated["densities"][0][0])
        for name in ("adaptive", "sensitivity") if calibration.has_sensitivity(calibrated) else ("adaptive",):
            budgets[name] = calibration.budget_densities(calibrated, name, rho, floor=floor, heads=heads)
    scored = {name: perplexity(model, windows, batch_size=config.eval_batch, train=False, rng=None,
                               block_density=value, measure_recall=True) for name, value in budgets.items()}
    dense = perplexity(remove_routers(model), windows, batch_size=config.eval_batch)
    chosen = scored.get(config.router.budget, scored["uniform"])
    result = {
        "dense_ppl": dense["ppl"], "surgery_ppl": chosen["ppl"], "ppl_gap": chosen["ppl"] / dense["ppl"] - 1,
        "mode": "block", "budget": config.router.budget if config.router.budget in scored else "uniform",
        "target_block_density": rho, "block_size": config.router.block_size, "context": config.eval_context,
        "block_density": chosen["block_density"]["mean"], "token_density": chosen["token_density"]["mean"],
        "attention_recall": chosen["attention_recall"]["mean"],
        "by_budget": {name: {"ppl": r["ppl"], "ppl_gap": r["ppl"] / dense["ppl"] - 1,
                             "block_density": r["block_density"], "token_density": r["token_density"],
                             "attention_recall": r["attention_recall"]} for name, r in scored.items()},
        "tokens_scored": dense["tokens"], "steps": config.steps,
        "protocol": protocol(config.eval_context, len(windows), source)
        | {"routes": "argmax (no noise); densities counted from the tiles the attention computed"}
        | ({"train_data": train_source} if train_source else {}),
        "model": str(model_dir), "config": config.to_dict(), "timing": timing or {},
    }
    if jax.process_index() == 0:
        write_json_atomic(out / "report.json", result)
        (out / "report.md").write_text(block_markdown(result))
        plot_block(out, result)
    return result


def block_markdown(r: dict) -> str:
    p = r["protocol"]
    lines = [
        "# Llama Surgery run report (budgeted block routing, self-distilled)", "",
        f"Model: `{r['model']}`; {r['steps']} router-training steps; tile {r['block_size']}; target block density "
        f"ρ = {r['target_block_density']}.", "",
        f"Perplexity on `{corpora.describe(p)}`: {p['windows']} windows of {p['context']} tokens, no BOS, every token "
        f"after a window's first scored ({r['tokens_scored']} tokens), same pipeline for all rows.",
        *([f"Routers trained on `{corpora.describe(p['train_data'])}`."] if "train_data" in p else []), "",
        "| | perplexity | gap | executed block density (min–max over windows) | token density | attention recall |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| dense baseline | {r['dense_ppl']:.4f} | | 1 | 1 | 1 |",
    ]
    for name, row in r["by_budget"].items():
        d = row["block_density"]
        lines.append(f"| surgery, {name} budget | {row['ppl']:.4f} | {100 * row['ppl_gap']:+.2f} % | "
                     f"{d['mean']:.4f} ({d['min']:.4f}–{d['max']:.4f}) | {row['token_density']['mean']:.4f} | "
                     f"{row['attention_recall']['mean']:.4f} |")
    lines += ["", "Executed block density: the causal tiles the attention computed (sink, own and window blocks "
              "included) / all causal tiles, over layers and heads. Attention recall: the layer's dense attention "
              "mass inside those tiles, mean over rows, heads and layers.", "",
              "Training speed (this invocation, first step with compilation left out): " + json.dumps(r["timing"]),
              "", "![loss](loss.png)", "", "![recall](recall.png)", ""]
    return "\n".join(lines)


def plot_block(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_metrics(out, {"distill": "distillation KL", "load_balance": "load-balancing loss"})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, row in result["by_budget"].items():
        ax.plot(row["attention_recall"]["per_layer"], marker="o", label=f"recall, {name}")
        ax.plot(row["block_density"]["per_layer"], linestyle="--", label=f"block density, {name}")
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=110)
    plt.close(fig)


def plot_metrics(out: Path, panels: dict[str, str]) -> None:
    """OUT/loss.png: one panel per metrics.jsonl key (title its value) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.5))
    for ax, (key, label) in zip(axes, panels.items(), strict=True):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_xlabel("step")
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
