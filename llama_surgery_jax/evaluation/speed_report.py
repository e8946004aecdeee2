"""The speed tables of `python -m llama_surgery_jax.speed`: runs the prefill, layer, check and decode rows per model
and tile, streams each row as it finishes (one JSON line on stdout, OUT/speed.json rewritten), and writes one
markdown table per row kind (OUT/speed.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from llama_surgery_jax.evaluation.decode_speed import DECODE_HEADER, decode_cells, decode_rows, profile_lines
from llama_surgery_jax.evaluation.prefill_speed import build_model, check_row, layer_rows, prefill_rows

SECTIONS = ("prefill", "layer", "check", "decode")


class SpeedSettingError(ValueError):
    """Settings the benchmark cannot honour (a density below the floor of the forced tiles)."""


def prefill_cells(r: dict) -> list[str]:
    return [r["model"], str(r["length"]), r["attention"], f"{r['density']:.3f}", f"{r['seconds']:.4f}",
            f"{r['tokens_per_s']:.0f}", f"{r['speedup']:.2f}×", f"{r['memory_gib']:.1f}"]


def layer_cells(r: dict) -> list[str]:
    return [r["model"], str(r["length"]), str(r["density"]), f"{r['router_ms']:.2f}", f"{r['schedule_ms']:.2f}",
            f"{r['sparse_attention_ms']:.2f}", f"{r['dense_attention_ms']:.2f}", f"{r['attention_speedup']:.2f}×",
            f"{r['router_and_schedule_fraction']:.1%}"]


def check_cells(r: dict) -> list[str]:
    return [r["model"], str(r["length"]), str(r["density"]), f"{r['hidden_error']:.2e}", f"{r['logits_error']:.2e}",
            f"{r['bound']:.2e}", str(r["same_next_token"]), str(r["passed"])]


TABLES = (  # row kind, title, header, cells
    ("prefill", "# Prefill speed, dense against surgery ({device}, bf16, batch 1)",
     ["model", "tokens", "attention", "executed density", "prefill s", "tokens/s", "speedup", "memory GiB"],
     prefill_cells),
    ("layer", "One decoder layer's pieces on random inputs, × layers (ms):",
     ["model", "tokens", "ρ", "router", "schedule", "sparse attention", "dense attention", "attention speedup",
      "(router + schedule) / sparse attention"], layer_cells),
    ("check", "Kernel prefill against the reference evaluation forward on the same tiles:",
     ["model", "tokens", "ρ", "hidden rel. error", "last logits rel. error", "bound", "same next token", "passed"],
     check_cells),
)


def markdown(rows: list[dict], device: str) -> str:
    """Every table of the rows (prefill, layer, check, decode), then the decode profiles."""
    lines = []
    for kind, title, header, cells in TABLES:
        lines += [title.format(device=device), "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(cells(r)) + " |" for r in rows if r["kind"] == kind] + [""]
    lines += ["Decode, random cache contents, bf16, tokens/s of the whole batch "
              "(`llama_surgery_jax.evaluation.decode_speed`):",
              "", "| " + " | ".join(DECODE_HEADER) + " |", "|" + " --- |" * len(DECODE_HEADER)]
    lines += ["| " + " | ".join(decode_cells(r, rows)) + " |" for r in rows if r["kind"] == "decode"] + [""]
    return "\n".join(lines + profile_lines(rows))




def run_speed(out: Path, *, models: list[str], lengths: dict, tiles: dict, densities: list[float], reps: int,
              check_length: int, decode: dict, decode_steps: int, decode_dense: list[str], decode_loop: bool,
              profile_steps: int, skip: set[str], run: str | None, query: str = "block") -> str:
    """Every section not in `skip`, for each model and tile → the markdown of all tables (also OUT/speed.md). query:
    the random routers rank key blocks per query block or per query row (`prefill_speed.build_model`).
    Raises SpeedSettingError when the decode rows refuse a density."""
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0].device_kind
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "speed.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))

    for name in models:
        for tile in [None] if (name == "smollm2" and run) else tiles.get(name, [128]):
            model, described = build_model(name, tile or 128, run, query=query)
            model_lengths = lengths.get(name, [8192])
            if "check" not in skip and check_length:
                add(check_row(model, described, check_length, densities[0]))
            if "prefill" not in skip:
                for row in prefill_rows(model, described, model_lengths, densities, reps):
                    add(row)
            if "layer" not in skip:
                for row in layer_rows(model, described, model_lengths, densities, max(reps, 10)):
                    add(row)
            if "decode" not in skip:
                try:
                    for row in decode_rows(model, described, decode.get(name, []), densities, decode_steps,
                                           dense=decode_dense, loop=decode_loop, profile_steps=profile_steps):
                        add(row)
                except ValueError as error:
                    raise SpeedSettingError(str(error)) from None
            del model
    text = markdown(rows, device)
    (out / "speed.md").write_text(text)
    return text
