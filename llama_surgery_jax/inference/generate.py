"""Generation as a library: prompts → sampled or greedy tokens through a `Decoder`, with timings.

The command line, its options and protocol: `python -m llama_surgery_jax.generate` (llama_surgery_jax/generate.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_surgery_jax.inference.cache import Decoder, check_context, check_kernel
from llama_surgery_jax.model.checkpoint import CheckpointError, load_model, load_tokenizer
from llama_surgery_jax.model.config import Precision


@dataclass
class Generation:
    """tokens: the new tokens of each prompt (stopped at EOS, which is kept); timings in seconds."""

    tokens: list[list[int]]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    compile_s: float
    attention: str
    decode_budget: int | None
    texts: list[str] = field(default_factory=list)
    decode: str = ""  # what the decode ran (`Decoder.describe`)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens of the whole batch per second of decode steps."""
        batch = len(self.tokens)
        return batch * self.decode_steps / self.decode_s if self.decode_s else float("nan")


GREEDY_CHUNK = 32  # greedy tokens per device-loop call; the end-of-sequence check runs between calls


def sample(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int | None) -> jax.Array:
    """logits: [b, vocab] float32 → tokens [b] int32: argmax when temperature == 0, else a seeded sample."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _timed(fn, *args):
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


def last_logits(logits: jax.Array, lengths: jax.Array) -> jax.Array:
    """A prefill's logits at each prompt's last token: [b, t, vocab] indexed, or [b, vocab] as given (a decoder
    that computes the last position only)."""
    return logits if logits.ndim == 2 else logits[jnp.arange(logits.shape[0]), lengths - 1]


def generate(decoder: Decoder, prompts: list[list[int]], *, max_new_tokens: int, model_context: int,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             eos_ids: tuple[int, ...] = (), warmup: bool = True, width: int | None = None) -> Generation:
    """prompts: token ids per prompt → Generation. Raises ContextError for empty or too long prompts.

    width: pad the prompts to this many tokens (at least the longest) and size the cache for it, so that calls
    with prompts of several lengths share one compiled prefill and decode (the padding is never seen: causal).

    eos_ids: end-of-sequence ids (`ModelConfig.eos_token_ids`): a row stops at the first of any of them (kept).

    warmup: compile (and run once) prefill and the first decode step before timing, so the reported
    speeds exclude compilation (compile_s holds it). Greedy decoding (temperature 0) with a decoder that has
    device loops (`Decoder.greedy`: dense and block-mode models) runs GREEDY_CHUNK tokens per call, the
    end-of-sequence check between calls (the tokens after an EOS are dropped); its warm-up runs the whole decode
    once, so every program the chunks need is compiled before the timed run.
    """
    check_context([len(p) for p in prompts], max_new_tokens, model_context)
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = max(int(lengths.max()), width or 0)
    slots = check_context([width], max_new_tokens, model_context)
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    tokens, lengths_j = jnp.asarray(tokens), jnp.asarray(lengths)
    key = jax.random.key(seed)

    loops = temperature == 0 and getattr(decoder, "loops", False)  # greedy: chunks of steps in device loops
    compile_s = 0.0
    if warmup:
        start = time.perf_counter()
        logits, cache = jax.block_until_ready(decoder.prefill(tokens, lengths_j, slots))
        first = sample(last_logits(logits, lengths_j), key, temperature=temperature, top_k=top_k)
        if loops:  # the same chunks as below, so every program they run is compiled
            for done_steps in range(1, max_new_tokens, GREEDY_CHUNK):
                new, cache = decoder.greedy(cache, first, min(GREEDY_CHUNK, max_new_tokens - done_steps))
                first = new[:, -1]
            jax.block_until_ready(cache)
        elif max_new_tokens > 1:
            jax.block_until_ready(decoder.step(cache, first))
        compile_s = time.perf_counter() - start
    (logits, cache), prefill_s = _timed(decoder.prefill, tokens, lengths_j, slots)
    logits = last_logits(logits, lengths_j)

    new = np.zeros((len(prompts), max_new_tokens), np.int32)
    done = np.zeros(len(prompts), bool)
    decode_s, steps = 0.0, 0
    if loops:
        next_tokens = sample(logits, key, temperature=0.0, top_k=None)
        new[:, 0] = np.asarray(next_tokens)
        done |= np.isin(new[:, 0], eos_ids)
        filled = 1
        while filled < max_new_tokens and not done.all():
            n = min(GREEDY_CHUNK, max_new_tokens - filled)
            (chunk, cache), seconds = _timed(decoder.greedy, cache, next_tokens, n)
            new[:, filled:filled + n] = np.asarray(chunk)
            done |= np.isin(new[:, filled:filled + n], eos_ids).any(axis=1)
            filled, steps, decode_s = filled + n, steps + n, decode_s + seconds
            next_tokens = chunk[:, -1]
        step = filled - 1
    else:
        for step in range(max_new_tokens):
            next_tokens = sample(logits, jax.random.fold_in(key, step), temperature=temperature, top_k=top_k)
            new[:, step] = np.asarray(next_tokens)
            done |= np.isin(new[:, step], eos_ids)
            if step == max_new_tokens - 1 or done.all():
                break
            (logits, cache), seconds = _timed(decoder.step, cache, next_tokens)
            decode_s += seconds
            steps += 1
    out = []
    for row in new[:, :step + 1].tolist():
        ends = [i for i, token in enumerate(row) if token in eos_ids]
        out.append(row[:ends[0] + 1] if ends else row)
    return Generation(out, int(lengths.sum()), prefill_s, decode_s, steps, compile_s, decoder.attention,
                      decoder.budget, decode=decoder.describe())


def generate_and_compare(model, prompts: list[list[int]], *, attention: str = "auto", gather: bool = True,
                         block_budget=None, compare: bool = True, **sampling) -> tuple[Generation, Generation | None]:
    """(the model's generation, the same prompts on the model without its routers when it has any and `compare`).
    block_budget: the block run's budget (`training.budget.run_budget`); sampling: `generate`'s keywords."""
    from llama_surgery_jax.surgery.routed_attention import remove_routers, routed_layers

    check_kernel(attention, model)
    result = generate(Decoder(model, attention=attention, gather=gather, block_budget=block_budget), prompts,
                      **sampling)
    dense = None
    if routed_layers(model) and compare:
        dense = generate(Decoder(remove_routers(model), attention=attention, gather=gather), prompts, **sampling)
    return result, dense


def load_for_inference(model_dir: Path | None, surgery: str | None, dtype: str = "float32"):
    """(model, tokenizer, surgery description). A run folder without router checkpoints → dense, said."""
    from llama_surgery_jax.model.embedded import default_model_dir
    from llama_surgery_jax.training.checkpoints import BaseModelMismatch, load_trained_routers, trained_base

    if not model_dir and surgery and surgery != "init" and Path(surgery).exists():
        model_dir = trained_base(surgery)  # the run's own base model, when it is here
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    model = load_model(model_dir, Precision(dtype, dtype))
    tokenizer = load_tokenizer(model_dir)
    described = "dense"
    if surgery == "init":
        from flax import nnx

        from llama_surgery_jax.surgery.config import RouterConfig
        from llama_surgery_jax.surgery.routed_attention import inject_routers

        inject_routers(model, RouterConfig(), nnx.Rngs(0))
        described = "routers at their homotopy initialisation"
    elif surgery:
        run = Path(surgery)
        if not run.exists():
            raise CheckpointError(f"--surgery {surgery}: no such folder; give a training run's --out folder, or 'init'")
        if not (run / "config.json").is_file() and not (run / "checkpoints").is_dir() and run.name != "checkpoints":
            raise CheckpointError(f"--surgery {surgery} is not a training run folder (no config.json, no "
                                  "checkpoints/): give the --out folder of `python -m llama_surgery_jax.train`")
        try:
            model, config, step = load_trained_routers(model, surgery, model_dir=model_dir)
            described = f"routers of {surgery} (step {step}; p={config.p}, d_max={config.d_max}, W={config.window})"
        except BaseModelMismatch:
            raise
        except CheckpointError as e:
            print(f"warning: {e}; running the DENSE model", file=sys.stderr)
            described = f"dense ({surgery} holds no routers)"
    return model, tokenizer, described
