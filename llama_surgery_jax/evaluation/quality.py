"""The quality–density study of a trained run as functions: perplexity tables, the curve, NIAH, speed, plots.

The command line, its options and protocol: `python -m llama_surgery_jax.quality` (llama_surgery_jax/quality.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_surgery_jax.evaluation.perplexity import perplexity
from llama_surgery_jax.inference.cache import Decoder
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model
from llama_surgery_jax.model.config import ConfigError, Precision
from llama_surgery_jax.surgery.baselines import (
    BASELINES,
    baseline_block_density,
    extra_blocks_for_density,
    install_baseline,
)
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.routed_attention import RoutedAttention, remove_routers, routed_layers
from llama_surgery_jax.training.config import TrainConfig

EVAL_KWARGS = {"train": False, "rng": None}


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


class Attention:
    """Switches one model between its trained routers, dense attention and the baselines."""

    def __init__(self, model):
        self.model = model
        self.routers = [layer.self_attn.attention_impl for layer in model.model.layers]
        if not all(isinstance(r, RoutedAttention) for r in self.routers):
            raise ConfigError("the model has no trained routers")
        self.trained = self.routers[0].config

    def surgery(self, **overrides):
        """The trained routers, with router config fields (d_max, window) replaced at evaluation time."""
        config = dataclasses.replace(self.trained, **overrides)
        from flax import nnx

        for layer, router in zip(self.model.model.layers, self.routers, strict=True):
            router.config = config
            router.router.config = config
            layer.self_attn.attention_impl = nnx.data(router)
        return self.model

    def dense(self):
        return remove_routers(self.model)

    def baseline(self, kind: str, extra: int):
        return install_baseline(self.model, kind, extra=extra, tile=self.trained.block_size)


def surgery_density(model, tokens: np.ndarray) -> dict:
    """Densities of the current routers on tokens [b, t], mean over layers and heads, with per layer × head
    maps: token density, block density at tile = block_size in original order, and sorted: the tiles the
    kernel executes (`mask.executed_tiles`: bucket pass over (code, position) order plus every band tile)."""
    from flax import nnx

    from llama_surgery_jax.surgery.mask import causal_pairs, executed_tiles, tile_mask, token_density

    config = routed_layers(model)[0].config
    tile = config.block_size
    aux = nnx.jit(lambda m, x: m(x, train=False, rng=None, return_codes=True)[1])(model, jnp.asarray(tokens))
    per = {"token": [], f"block_{tile}": [], f"block_{tile}_sorted": []}

    @jax.jit
    def one_layer(codes):  # [b, h, t] → three [h] densities
        n = -(-codes.shape[-1] // tile)
        norm = codes.shape[0] * causal_pairs(n)
        original = jnp.sum(tile_mask(codes, tile=tile, window=config.window, sink=config.sink), axis=(0, 2, 3))
        executed = executed_tiles(codes, tile=tile, window=config.window, sink=config.sink)
        token = jax.vmap(lambda c: token_density(c, window=config.window, sink=config.sink), in_axes=1)(codes)
        return token, original / norm, jnp.sum(executed, axis=0) / norm

    for layer_aux in aux:
        for key, value in zip(per, one_layer(layer_aux["codes"]), strict=True):
            per[key].append(np.asarray(value).tolist())
    return {"token_density": float(np.mean(per["token"])),
            "block_density": float(np.mean(per[f"block_{tile}_sorted"])),
            "block_density_original": float(np.mean(per[f"block_{tile}"])), "per_layer_head": per}


def ppl(model, windows: np.ndarray, batch: int) -> float:
    return perplexity(model, windows, batch_size=batch, progress=False, **EVAL_KWARGS)["ppl"]


def perplexity_table(att: Attention, ids: np.ndarray, contexts, windows: int, batch: int) -> list[dict]:
    rows = []
    for context in contexts:
        w = corpora.windows(ids, context, windows)
        density = surgery_density(att.surgery(), w[:1])
        n = -(-context // att.trained.block_size)
        extra = extra_blocks_for_density(n, density["block_density"])
        row = {"context": context, "windows": len(w), "surgery_block_density": density["block_density"],
               "surgery_token_density": density["token_density"], "baseline_extra_blocks": extra,
               "baseline_block_density": baseline_block_density(n, extra),
               "surgery": ppl(att.surgery(), w, batch), "dense": ppl(att.dense(), w, batch)}
        for kind in BASELINES:
            row[kind] = ppl(att.baseline(kind, extra), w, batch)
        rows.append(row)
        print(f"context {context}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
    return rows


def curve(att: Attention, ids: np.ndarray, context: int, windows: int, batch: int, d_maxes, window_sweep,
          extras) -> list[dict]:
    w = corpora.windows(ids, context, windows)
    n = -(-context // att.trained.block_size)
    points = [{"series": "dense", "block_density": 1.0, "token_density": 1.0, "ppl": ppl(att.dense(), w, batch)}]
    settings = [("surgery (trained)", {})]
    settings += [(f"surgery d_max={d}", {"d_max": d}) for d in d_maxes if d <= att.trained.levels]
    settings += [(f"surgery W={x}", {"window": x}) for x in window_sweep]
    for label, overrides in settings:
        density = surgery_density(att.surgery(**overrides), w[:1])
        series = "surgery, d_max sweep" if "d_max" in overrides else "surgery, W sweep" if overrides else "surgery"
        points.append({"series": series, "label": label, **{k: v for k, v in overrides.items()},
                       "block_density": density["block_density"], "token_density": density["token_density"],
                       "ppl": ppl(att.surgery(**overrides), w, batch)})
    for kind in BASELINES:
        for extra in extras:
            points.append({"series": kind, "label": f"{kind} extra={extra}", "extra_blocks": extra,
                           "block_density": baseline_block_density(n, extra),
                           "ppl": ppl(att.baseline(kind, extra), w, batch)})
    att.surgery()
    return points


def routing_choices(model, tokens: jax.Array) -> list[jax.Array]:
    """tokens: [1, t] → per layer the argmax choices [heads, t, levels] (level L − 1 = root side)."""
    _, aux = model(tokens, return_choices=True)
    return [layer_aux["choices"][0] for layer_aux in aux]


def niah_section(att: Attention, tokenizer, data_dir, lengths, depths, trials: int, context: int) -> dict:
    from llama_surgery_jax.evaluation.niah import run_niah

    filler = corpora.tokenize(tokenizer, corpora.load_text("valid", data_dir, "tokens"))
    rows = {}
    for name, switch in (("dense", att.dense), ("surgery", att.surgery)):
        rows[name] = run_niah(Decoder(switch()), tokenizer, filler, lengths=lengths, depths=depths, trials=trials,
                              model_context=context)
    return rows


def speed_section(model_dir: Path, run: Path, ids: np.ndarray, contexts, new_tokens: int, dtype: str) -> list[dict]:
    """Prefill / decode tokens/s at batch 1, dense vs surgery, compilation excluded."""
    from llama_surgery_jax.inference.generate import generate
    from llama_surgery_jax.training.checkpoints import load_trained_routers

    dense = load_model(model_dir, Precision(dtype, dtype))
    routed, _, _ = load_trained_routers(load_model(model_dir, Precision(dtype, dtype)), run)
    decoders = {"dense": Decoder(dense, attention="auto"),
                "surgery, gather decode": Decoder(routed, attention="auto", gather=True),
                "surgery, masked decode": Decoder(routed, attention="auto", gather=False)}
    rows = []
    for context in contexts:
        prompt = [int(t) for t in ids[:context - new_tokens]]
        for name, decoder in decoders.items():
            result = generate(decoder, [prompt], max_new_tokens=new_tokens,
                              model_context=dense.config.max_position_embeddings)
            rows.append({"context": context, "model": name, "prefill_attention": result.attention,
                         "prefill_tokens": result.prompt_tokens, "prefill_s": result.prefill_s,
                         "prefill_tokens_per_s": result.prefill_tokens_per_s,
                         "decode_tokens_per_s": result.decode_tokens_per_s, "decode_budget": result.decode_budget,
                         "dtype": dtype, "device": str(jax.devices()[0].device_kind)})
            print(f"speed {context} {name}: prefill {result.prefill_tokens_per_s:.0f} tok/s, "
                  f"decode {result.decode_tokens_per_s:.1f} tok/s")
    return rows


def levels_for(p: int, seq_len: int) -> int:
    return RouterConfig.for_context(seq_len, p=p).levels


def ablation(args, model_dir: Path, ids: np.ndarray, out: Path) -> list[dict]:
    """Routers trained per p with the preset's other settings; each evaluated at the curve's context."""
    from llama_surgery_jax.evaluation import training_report
    from llama_surgery_jax.training.checkpoints import load_trained_routers
    from llama_surgery_jax.training.loop import train

    base = TrainConfig.preset(args.ablate_preset)
    rows = []
    w = corpora.windows(ids, args.curve_context, args.curve_windows)
    base = base.override([f"model={model_dir}", *([f"steps={args.ablate_steps}"] if args.ablate_steps else []),
                          *([f"data_dir={args.data_dir}"] if args.data_dir else []),
                          *([f"eval_data={args.text}"] if args.text else []), *args.ablate_override])
    for p in args.ablate_p:
        levels = levels_for(p, base.seq_len)
        config = base.override([f"router.p={p}", f"router.levels={levels}", f"router.d_max={levels // 2}"])
        train(config, out / f"ablate-p{p}", report=training_report.prepare, progress=False)
        model, router, _ = load_trained_routers(load_model(model_dir), out / f"ablate-p{p}")
        density = surgery_density(model, w[:1])
        rows.append({"p": p, "levels": levels, "d_max": levels // 2, "codes": router.num_codes,
                     "steps": config.steps, "block_density": density["block_density"],
                     "token_density": density["token_density"], "ppl": ppl(model, w, args.batch_size)})
        print(f"ablation p={p}: {rows[-1]}")
    return rows


def plot_curve(points: list[dict], out: Path, ylabel: str = "WikiText-2 test perplexity") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"dense": "*", "surgery": "o", "surgery, d_max sweep": "s", "surgery, W sweep": "^",
               "streaming": "x", "moba": "+"}
    for series in dict.fromkeys(p["series"] for p in points):
        sel = sorted((p for p in points if p["series"] == series), key=lambda p: p["block_density"])
        ax.plot([p["block_density"] for p in sel], [p["ppl"] for p in sel], marker=markers.get(series, "."),
                label=series, linestyle="-" if len(sel) > 1 else "none", markersize=9)
    ax.set_xlabel("block density (computed causal tiles / causal tiles)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quality_density.png", dpi=110)
    plt.close(fig)


def plot_routing(per_layer_head: dict, choices: list, token: int, tile: int, p: int, out: Path) -> None:
    """density_heatmap.png (layers × heads) and tree_path.png (one token's path, head 0, every layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("token", "token density"), (f"block_{tile}_sorted", f"block density, tile {tile}, sorted"),
              (f"block_{tile}", f"block density, tile {tile}, original order"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        image = ax.imshow(np.asarray(per_layer_head[key]), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set(xlabel="head", ylabel="layer", title=title)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "density_heatmap.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, layer_choices in enumerate(choices):
        c = np.asarray(layer_choices[0])[..., ::-1]  # head 0, [t, levels] root first
        same = np.cumprod(c == c[token][None, :], axis=1)[: token + 1]  # earlier tokens sharing the prefix
        ax.plot(np.arange(1, c.shape[1] + 1), same.sum(0), color=plt.cm.viridis(index / max(len(choices) - 1, 1)),
                label=f"layer {index}: " + "".join(map(str, c[token])) if index in (0, len(choices) - 1) else None)
    ax.set(xlabel=f"tree depth from the root (p = {p})", ylabel=f"tokens ≤ {token} sharing the prefix",
           yscale="log", title=f"route of token {token} (head 0); legend: its branch choices, root first")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tree_path.png", dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = ["# Quality against density", "", f"Run: `{result['run']}`; model `{result['model']}`; "
             f"routers: {result['router']}.", "",
             f"Perplexity protocol: `{corpora.describe(result['protocol'])}`, no BOS, stride = context, every token "
             "after a window's first scored; routes argmax, hard mask. Block density: computed causal tiles / causal "
             f"tiles at tile {result['router']['block_size']} (surgery: sorted by code + band, as the kernel runs).",
             ""]
    if result["perplexity"]:
        lines += ["## Perplexity", "", "| context | windows | dense | surgery | streaming | MoBA | surgery block "
                  "density | baseline block density | surgery token density |", "|" + " --- |" * 9]
        for r in result["perplexity"]:
            lines.append(f"| {r['context']} | {r['windows']} | {r['dense']:.3f} | {r['surgery']:.3f} | "
                         f"{r['streaming']:.3f} | {r['moba']:.3f} | {r['surgery_block_density']:.3f} | "
                         f"{r['baseline_block_density']:.3f} | {r['surgery_token_density']:.3f} |")
        lines.append("")
    if result["curve"]:
        lines += [f"## Quality–density curve (context {result['curve_context']})", "",
                  "| series | setting | block density | token density | perplexity |", "|" + " --- |" * 5]
        for r in sorted(result["curve"], key=lambda r: (r["series"], r["block_density"])):
            token = f"{r['token_density']:.3f}" if "token_density" in r else ""
            lines.append(f"| {r['series']} | {r.get('label', '')} | {r['block_density']:.3f} | {token} | "
                         f"{r['ppl']:.3f} |")
        lines += ["", "![quality against density](quality_density.png)", ""]
    if result["niah"]:
        from llama_surgery_jax.evaluation.niah import table

        lines += ["## Needle in a haystack (exact-match accuracy)", "", table(result["niah"]), ""]
    if result["speed"]:
        lines += ["## Speed (batch 1, compilation excluded)", "",
                  "| context | model | prefill attention | prefill tokens/s | decode tokens/s | decode budget |",
                  "|" + " --- |" * 6]
        for r in result["speed"]:
            lines.append(f"| {r['context']} | {r['model']} | {r['prefill_attention']} | "
                         f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {r['decode_budget']} |")
        lines.append(f"\nDevice: {result['speed'][0]['device']}, dtype {result['speed'][0]['dtype']}.\n")
    if result["ablation"]:
        lines += ["## Tree arity p", "", "| p | levels L | d_max | codes p^(L−d_max) | steps | block density | "
                  "token density | perplexity |", "|" + " --- |" * 8]
        for r in result["ablation"]:
            lines.append(f"| {r['p']} | {r['levels']} | {r['d_max']} | {r['codes']} | {r['steps']} | "
                         f"{r['block_density']:.3f} | {r['token_density']:.3f} | {r['ppl']:.3f} |")
        lines.append("")
    lines += ["![density heatmap](density_heatmap.png)", "", "![tree path](tree_path.png)", ""]
    return "\n".join(lines)
