"""The prefill speed table's machinery on CPU (interpret mode; the numbers themselves come from a GPU): every row
kind is produced, the executed density is the budget's, and the kernel prefill passes its check."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import fresh_seed
from flax import nnx

from llama_surgery_jax import speed
from llama_surgery_jax.evaluation import decode_speed, prefill_speed, speed_report
from llama_surgery_jax.model.config import ModelConfig
from llama_surgery_jax.model.llama import LlamaForCausalLM
from llama_surgery_jax.surgery.routed_attention import inject_routers, routed_layers

CONFIG = dataclasses.replace(ModelConfig.named("tiny"), head_dim=64)


def routed_model(seed: int, query: str = "block") -> LlamaForCausalLM:
    model = LlamaForCausalLM(CONFIG, precision=prefill_speed.BF16, rngs=nnx.Rngs(seed))
    router = dataclasses.replace(prefill_speed.random_router(prefill_speed.ROUTER_8B, 16, query), window=16, levels=3)
    return inject_routers(model, router, nnx.Rngs(seed + 1))


def test_speed_rows_on_a_tiny_model(tmp_path):
    seed = fresh_seed()
    model = routed_model(seed)
    rows = list(prefill_speed.prefill_rows(model, "tiny", [256], [0.5], reps=1, seed=seed))
    assert [r["attention"] for r in rows] == ["dense (cuDNN)", "surgery (block-sparse)"]
    # 16 blocks: ⌈0.5 · 136⌉ = 68 of the 136 causal tiles per head, counted from the tiles executed.
    assert rows[1]["density"] == pytest.approx(68 / 136, abs=1e-6), f"seed {seed}"
    assert len(routed_layers(model)) == CONFIG.num_hidden_layers, "the routers stay in the model"
    layer = next(prefill_speed.layer_rows(model, "tiny", [256], [0.5], reps=1, seed=seed))
    assert layer["router_ms"] > 0 and layer["sparse_attention_ms"] > 0
    check = prefill_speed.check_row(model, "tiny", 256, 0.5, seed=seed)
    assert check["passed"], f"seed {seed}: {check}"
    decode = list(decode_speed.decode_rows(model, "tiny", [(256, 2)], [0.5], steps=2, loop=True, profile_steps=1,
                                           seed=seed))
    assert [(r["attention"], r.get("decode_attention")) for r in decode] == [
        ("dense", "kernel"), ("dense", "cudnn"), ("dense", "masked"), ("surgery", "kernel")]
    assert "error" in decode[1], "no cuDNN on a CPU: the row says why"
    # Row 16 at ρ 0.5: ⌈0.5 · 153⌉ − ⌈0.5 · 136⌉ = 9 blocks of 16 keys per head, against the 256 written keys that
    # flash-decoding reads (the masked attention reads all 384 slots of the cache: whole blocks of 128).
    kernel, _, masked, surgery = decode
    assert surgery["kv_gib_read_per_step"] / kernel["kv_gib_read_per_step"] == pytest.approx(9 * 16 / 256)
    assert masked["kv_gib_read_per_step"] / kernel["kv_gib_read_per_step"] == pytest.approx(384 / 256)
    for row in (kernel, masked, surgery):
        assert row["step_ms"] > 0 and row["loop_step_ms"] > 0
        assert 0 < row["profile"]["busy_ms"] and row["profile"]["groups"], "the trace found the program's work"
    text = speed_report.markdown(rows + [layer, check, *decode], "cpu")
    assert "surgery (block-sparse)" in text and "| tiny | 256 | 0.5 |" in text
    assert "| tiny | 256 | 2 | surgery | 0.5 |" in text and "Profile: tiny, context 256 × 2, surgery 0.5" in text


def test_speed_rows_of_row_routers():
    """Row routing (each query row ranks key blocks; tiles computed from their first row) through every section: the
    executed density is the budget's union, the kernel prefill replays the in-tile first rows, decode runs one
    program (every step routes)."""
    seed = fresh_seed()
    model = routed_model(seed, "row")
    dense, surgery = prefill_speed.prefill_rows(model, "tiny", [256], [0.5], reps=1, seed=seed)
    # The per-block budget, as for block routing: ⌈0.5 · 136⌉ = 68 of the 136 causal tiles per head run (the union).
    assert surgery["density"] == pytest.approx(68 / 136, abs=1e-6), f"seed {seed}"
    layer = next(prefill_speed.layer_rows(model, "tiny", [256], [0.5], reps=1, seed=seed))
    assert layer["router_ms"] > 0 and layer["sparse_attention_ms"] > 0
    check = prefill_speed.check_row(model, "tiny", 256, 0.5, seed=seed)
    assert check["passed"], f"seed {seed}: {check}"
    kernel, surgery = decode_speed.decode_rows(model, "tiny", [(256, 2)], [0.5], steps=2, dense=("kernel",),
                                               loop=True, seed=seed)
    assert surgery["attention"] == "surgery" and surgery["step_ms"] > 0 and surgery["loop_step_ms"] > 0


def test_decode_density_below_the_floor_is_an_error():
    """At 256 tokens in 16 blocks of 16 (window 16) the sink, own and previous tiles are 45 of the 136 causal
    tiles: ρ = 0.1 cannot execute."""
    model = routed_model(fresh_seed())
    with pytest.raises(ValueError, match="below the floor 0.331"):
        next(decode_speed.decode_rows(model, "tiny", [(256, 1)], [0.1], steps=1))


def test_per_model_lists():
    assert speed.per_model("smollm2:8192,llama-3.1-8b:32768+131072", int) == {
        "smollm2": [8192], "llama-3.1-8b": [32768, 131072]}
    assert speed.decode_settings("llama-3.1-8b:131072x1+32768x8") == {"llama-3.1-8b": [(131072, 1), (32768, 8)]}
