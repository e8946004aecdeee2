"""Needle in a haystack: one fact sentence at several depths of filler text, exact-match retrieval.

Each case is `length` tokens: filler text with the needle inserted at `depth` (0 = start, 1 = end of the
filler), then the question, ending where the answer starts:

    ... filler ... The secret number of <city> is <7 digits>. ... filler ...
    Question: what is the secret number of <city>? Answer: The secret number of <city> is

The model generates greedily through the full inference path (prefill + KV-cache decode, so the surgery's
routing is exercised exactly as in use); a case is correct iff the first run of digits in its completion
equals the needle's number. Filler is WikiText-2 valid text (wiki.valid.tokens; never the test split),
taken at a different offset for every case; numbers and cities come from a seeded RNG.

    rows = run_niah(decoder, tokenizer, filler_ids, lengths=[2048, 4096, 8192], depths=[0, .25, .5, .75, 1])
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_surgery_jax.inference.cache import Decoder
from llama_surgery_jax.inference.generate import generate

CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tromsø", "Adelaide", "Tbilisi", "Montevideo", "Hanoi", "Accra")
NEEDLE = " The secret number of {city} is {number}. "
QUESTION = "\nQuestion: what is the secret number of {city}? Answer: The secret number of {city} is"
ANSWER_DIGITS = 7
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class NeedleCase:
    """prompt: token ids (exactly `length`); answer: the digits; depth: where the needle sits (0–1)."""

    prompt: list[int]
    answer: str
    length: int
    depth: float


class Reprefill:
    """`Decoder`'s interface without a KV cache: every step runs the whole (padded) sequence again and reads the
    logits at each row's last token. Exact for any causal mask, the budgeted block routing's included: row i
    depends on tokens ≤ i only, so the padding after it changes nothing. One compiled program per length."""

    attention = "re-prefill"  # what `generate` reports of the decoder
    budget = None

    def __init__(self, model, **attention_kwargs):
        graphdef, self.state = nnx.split(model)

        @jax.jit
        def last_logits(state, tokens, lengths):
            model = nnx.merge(graphdef, state)
            hidden, _, _ = model.hidden_states(tokens, **attention_kwargs)
            return model.logits(hidden[jnp.arange(tokens.shape[0]), lengths - 1][:, None])[:, 0]

        self.last_logits = last_logits

    @staticmethod
    def describe() -> str:
        return "re-prefill of the whole sequence per token"

    def prefill(self, tokens, lengths, slots: int):
        buffer = jnp.zeros((tokens.shape[0], slots), jnp.int32).at[:, :tokens.shape[1]].set(tokens)
        return self.last_logits(self.state, buffer, lengths), (buffer, lengths)  # [b, vocab]: the last position

    def step(self, cache, next_tokens):
        buffer, lengths = cache
        buffer = buffer.at[jnp.arange(buffer.shape[0]), lengths].set(next_tokens)
        lengths = lengths + 1
        return self.last_logits(self.state, buffer, lengths), (buffer, lengths)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_case(tokenizer, filler_ids: np.ndarray, *, length: int, depth: float,
               rng: np.random.Generator) -> NeedleCase:
    """A case of exactly `length` tokens from a random offset of `filler_ids` ([n] int)."""
    city = CITIES[rng.integers(len(CITIES))]
    number = str(rng.integers(10 ** (ANSWER_DIGITS - 1), 10**ANSWER_DIGITS))
    needle = encode(tokenizer, NEEDLE.format(city=city, number=number))
    question = encode(tokenizer, QUESTION.format(city=city))
    filler_len = length - len(needle) - len(question)
    if filler_len < 1:
        raise ValueError(f"length {length} leaves no room for filler around a {len(needle) + len(question)}-token "
                         "needle and question")
    if len(filler_ids) < filler_len:
        raise ValueError(f"the filler text has {len(filler_ids)} tokens, fewer than the {filler_len} needed")
    start = int(rng.integers(0, len(filler_ids) - filler_len + 1))
    filler = [int(t) for t in filler_ids[start:start + filler_len]]
    at = round(depth * filler_len)
    return NeedleCase(filler[:at] + needle + filler[at:] + question, number, length, depth)


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


MAX_NEW_TOKENS = ANSWER_DIGITS + 3  # a leading space and a token or two of slack


def needle_lengths(lengths, model_context: int) -> list[int]:
    """The prompt lengths run for `lengths`: a case at the model's full context leaves no room for the answer, so
    it is cut to context − answer."""
    return [min(length, model_context - MAX_NEW_TOKENS) for length in lengths]


def run_niah(decoder: Decoder, tokenizer, filler_ids: np.ndarray, *, lengths, depths=DEFAULT_DEPTHS,
             trials: int = 1, seed: int = 0, model_context: int, batch_size: int = 8, one_shape: bool = True,
             decoder_at: dict[int, Decoder] | None = None, log=None) -> list[dict]:
    """Exact-match accuracy per (length, depth) over `trials` cases each.

    Batches have one size: the last one is filled with copies of its last case (their answers dropped).
    one_shape: every length's prompts padded to the longest, so the decoder compiles one prefill and one set of
    decode programs for the whole table (minutes each on a GPU at 8k), not one per length; False: each length
    its own shape, for a decoder whose run time outweighs its compilation (`Reprefill`: a whole forward a token).
    decoder_at: a decoder per prompt length (`needle_lengths`) instead of `decoder`, e.g. per-row thresholds
    calibrated at each length; a batch then holds one length (padded as one_shape says).
    log(text): a line per batch with its wall time (compilation included), e.g. `print`.

    Returns rows {length, depth, correct, cases, accuracy, completions (the first few)}.
    """
    rng = np.random.default_rng(seed)
    max_new = MAX_NEW_TOKENS
    lengths = needle_lengths(lengths, model_context)
    if decoder_at is not None and set(lengths) - set(decoder_at):
        raise ValueError(f"decoder_at has no decoder for prompt lengths {sorted(set(lengths) - set(decoder_at))}")
    cases = [build_case(tokenizer, filler_ids, length=length, depth=d, rng=rng)
             for length in lengths for d in depths for _ in range(trials)]
    rows_per_batch = min(batch_size, len(cases))
    by_length = not one_shape or decoder_at is not None
    groups = [[c for c in cases if c.length == n] for n in dict.fromkeys(lengths)] if by_length else [cases]
    batches = [group[start:start + rows_per_batch] for group in groups
               for start in range(0, len(group), rows_per_batch)]
    completions, done = {}, 0
    for batch in batches:
        prompts = [c.prompt for c in batch] + [batch[-1].prompt] * (rows_per_batch - len(batch))
        began = time.perf_counter()
        result = generate(decoder if decoder_at is None else decoder_at[batch[0].length], prompts,
                          max_new_tokens=max_new, model_context=model_context, warmup=False,
                          width=max(lengths) if one_shape else None)
        answered = result.tokens[:len(batch)]  # the filling copies' answers dropped
        completions |= {id(c): tokenizer.decode(t, skip_special_tokens=True)
                        for c, t in zip(batch, answered, strict=True)}
        done += len(batch)
        if log is not None:
            shape = f"padded to {max(lengths)}" if one_shape else f"{batch[0].length}"
            log(f"needles: {done} of {len(cases)} cases ({shape} tokens) in "
                f"{time.perf_counter() - began:.1f} s")
    rows = []
    for length in dict.fromkeys(lengths):
        for depth in depths:
            picked = [(c, completions[id(c)]) for c in cases if c.length == length and c.depth == depth]
            correct = sum(first_number(text) == c.answer for c, text in picked)
            rows.append({"length": length, "depth": depth, "correct": correct, "cases": len(picked),
                         "accuracy": correct / len(picked),
                         "completions": [{"answer": c.answer, "completion": text} for c, text in picked[:2]]})
    return rows


def by_length(rows: list[dict]) -> dict[int, float]:
    """Accuracy per length over all its depths."""
    lengths = dict.fromkeys(r["length"] for r in rows)
    return {n: sum(r["correct"] for r in rows if r["length"] == n) / sum(r["cases"] for r in rows if r["length"] == n)
            for n in lengths}


def summary(rows: list[dict]) -> str:
    """One line: the accuracy at each length, e.g. `2048: 0.95, 4096: 0.90`."""
    return ", ".join(f"{n}: {accuracy:.2f}" for n, accuracy in by_length(rows).items())


def table(rows_by_model: dict[str, list[dict]]) -> str:
    """Markdown: one row per (length, depth), one accuracy column per model, and a mean row per length."""
    names = list(rows_by_model)
    first = rows_by_model[names[0]]
    lines = ["| tokens | depth | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for i, row in enumerate(first):
        accs = " | ".join(f"{rows_by_model[n][i]['accuracy']:.2f}" for n in names)
        lines.append(f"| {row['length']} | {row['depth']:.2f} | {accs} |")
    accuracies = {n: by_length(rows_by_model[n]) for n in names}
    for length in accuracies[names[0]]:
        lines.append(f"| {length} | all | " + " | ".join(f"{accuracies[n][length]:.2f}" for n in names) + " |")
    return "\n".join(lines)
