"""What is asked is what runs: every tool reads a block run's budget the same way, every label and JSON names what
executed, every setting is range-checked before any work (a bad one names itself; the tests give a model folder that
does not exist, so a check that came after loading would print another error), output paths are checked first, and a
failed write leaves no temporary file.

The run: the tiny model in block mode at tile 32, W 16, ρ 0.3, adaptive budget, trained and calibrated at 128 tokens
(4 blocks: the sink, own and window tiles are 9 of the 10 causal tiles, so every head sits at the floor 0.9)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_train_config

from llama_surgery_jax.evaluate import main as evaluate
from llama_surgery_jax.generate import main as generate
from llama_surgery_jax.speed import main as speed
from llama_surgery_jax.training import calibration

NOWHERE = "/nonexistent/model"


@pytest.fixture(scope="module")
def block_run(tiny_model_dir, prose_dir, tmp_path_factory):
    from llama_surgery_jax.evaluation import training_report
    from llama_surgery_jax.training.loop import train

    config = tiny_train_config(tiny_model_dir, prose_dir, "router.mode=block", "router.d_max=0", "router.levels=2",
                               "router.block_size=32", "router.window=16", "router.routing_heads=kv",
                               "router.block_density=0.3", "router.budget=adaptive", "seq_len=128", "batch_size=2",
                               "steps=1", "checkpoint_every=1", "eval_context=128", "eval_windows=1",
                               "eval_batch=1", "calibration_sequences=2")
    out = tmp_path_factory.mktemp("block-run-32") / "run"
    train(config, out, report=training_report.prepare, progress=False)
    assert (out / "calibration.json").is_file(), "the precondition: an adaptive run with its calibration"
    return out


def refused(capsys, call, argv: list[str], setting: str) -> str:
    """The CLI stops with exit status 2 and a message that names the setting."""
    assert call(argv) == 2
    err = capsys.readouterr().err
    assert setting in err, err
    return err


@pytest.mark.parametrize("name", ["train", "evaluate", "generate", "quality", "speed", "density_report"])
def test_help_is_returned_as_status_zero(capsys, name):
    """argparse's own exits come back from `main` as a status (cli.arguments.command): 0 for --help, with the usage."""
    import importlib

    main = importlib.import_module(f"llama_surgery_jax.{name}").main
    assert main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_generate_settings_are_checked_before_loading(capsys):
    prompt = ["--model", NOWHERE, "--prompt", "a"]
    refused(capsys, generate, [*prompt, "--top-k", "0"], "--top-k")
    refused(capsys, generate, [*prompt, "--temperature", "-1"], "--temperature")
    refused(capsys, generate, [*prompt, "--temperature", "nan"], "--temperature")
    refused(capsys, generate, [*prompt, "--max-new-tokens", "0"], "--max-new-tokens")
    refused(capsys, generate, [*prompt, "--block-density", "1.5"], "--block-density")
    # The kernels take bf16 or fp16 only: a float32 routed model on them is refused by the settings alone.
    refused(capsys, generate, [*prompt, "--surgery", "init", "--attention", "kernel"], "--attention kernel")


def test_evaluate_settings_are_checked_before_loading(capsys):
    common = ["--model", NOWHERE]
    refused(capsys, evaluate, [*common, "--max-windows", "0"], "--max-windows")
    refused(capsys, evaluate, [*common, "--max-windows", "-1"], "--max-windows")
    refused(capsys, evaluate, [*common, "--batch-size", "0"], "--batch-size")
    refused(capsys, evaluate, [*common, "--context", "1"], "--context")
    refused(capsys, evaluate, [*common, "--contexts", "64,0"], "--contexts")
    refused(capsys, evaluate, [*common, "--block-density", "0"], "--block-density")
    refused(capsys, evaluate, [*common, "--niah-trials", "0"], "--niah-trials")


def test_the_kernels_refuse_a_routed_model_they_cannot_run_by_name():
    """bf16 passes the settings' check, but the tiny model's head dim 16 is not a kernel's: a ConfigError that names
    --attention kernel before any program is traced (it was the Pallas ValueError's traceback)."""
    import dataclasses

    from flax import nnx

    from llama_surgery_jax.inference.cache import check_kernel
    from llama_surgery_jax.model.config import ConfigError, ModelConfig, Precision
    from llama_surgery_jax.model.llama import LlamaForCausalLM
    from llama_surgery_jax.surgery.config import RouterConfig
    from llama_surgery_jax.surgery.routed_attention import inject_routers

    router = dataclasses.replace(RouterConfig(), mode="block", d_max=0, levels=2, block_size=32, window=16)
    model = LlamaForCausalLM(ModelConfig.named("tiny"), precision=Precision("bfloat16", "bfloat16"),
                             rngs=nnx.Rngs(0))
    inject_routers(model, router, nnx.Rngs(1))
    check_kernel("reference", model)
    with pytest.raises(ConfigError, match="--attention kernel: .* head dim 16"):
        check_kernel("kernel", model)


def test_baseline_densities_that_cannot_run_are_refused(capsys):
    common = ["--model", NOWHERE, "--baseline", "streaming"]
    refused(capsys, evaluate, [*common, "--baseline-density", "5"], "--baseline-density")
    refused(capsys, evaluate, [*common, "--baseline-density", "0"], "--baseline-density")
    refused(capsys, evaluate, [*common, "--baseline-tile", "0"], "--baseline-tile")
    # One block of 128 at --context 128: every baseline density is the whole (dense) window.
    err = refused(capsys, evaluate, [*common, "--context", "128", "--baseline-density", "0.5"], "--baseline-tile")
    assert "dense" in err


def test_speed_refuses_an_unknown_section_and_bad_ranges(capsys, tmp_path):
    out = ["--models", "", "--out", str(tmp_path / "speed")]
    err = refused(capsys, speed, [*out, "--skip", "prefil"], "--skip")
    assert "prefill" in err, "the message lists the sections"
    refused(capsys, speed, [*out, "--densities", "0.1,1.5"], "--densities")
    refused(capsys, speed, [*out, "--reps", "0"], "--reps")
    refused(capsys, speed, [*out, "--decode-dense", "kernel,flash"], "--decode-dense")
    refused(capsys, speed, ["--models", "", "--out", __file__], "--out")


def test_the_other_command_lines_check_their_settings(capsys, tmp_path):
    from llama_surgery_jax import step_bench
    from llama_surgery_jax.density_report import main as density_report
    from llama_surgery_jax.train import main as train

    refused(capsys, density_report, ["--model", NOWHERE, "--tokens", "0"], "--tokens")
    refused(capsys, density_report, ["--model", NOWHERE, "--json", str(tmp_path)], "--json")
    refused(capsys, train, ["--num-processes", "0"], "--num-processes")
    for argv, setting in ((["--repeats", "0"], "--repeats"), (["--backends", "kernal"], "--backends"),
                          (["--lengths", "64,x"], "--lengths"), (["--out", str(tmp_path)], "--out")):
        with pytest.raises(SystemExit) as stopped:  # its main returns the rows, so argparse's exit stands
            step_bench.main(argv)
        assert stopped.value.code == 2 and setting in capsys.readouterr().err


def test_output_paths_are_checked_before_the_work(capsys, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    refused(capsys, evaluate, ["--model", NOWHERE, "--json", str(folder)], "--json")
    refused(capsys, evaluate, ["--model", NOWHERE, "--json", str(a_file / "r.json")], "--json")
    refused(capsys, generate, ["--model", NOWHERE, "--prompt", "a", "--json", str(folder)], "--json")
    assert list(folder.iterdir()) == []


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    from llama_surgery_jax.io.files import write_json_atomic

    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(OSError):
        write_json_atomic(folder, {"ppl": 1.0})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "r.json", {"ppl": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder"]


def test_a_budget_at_the_floor_runs_and_one_below_it_is_refused_by_its_request(block_run, prose_dir, capsys):
    """At 128 tokens the floor is 0.9 (float64); the adaptive densities at ρ 0.9 are float32, at the floor (0.9 rounded
    down): a request at the floor runs (it was refused: `block density 0.900 is below the floor 0.900`), and the
    run's own ρ 0.3 is refused by name, not by the densities it became."""
    from llama_surgery_jax.surgery.block_routing import floor_density

    assert floor_density(4, tile=32, window=16, sink=True) == 0.9 > float(np.float32(0.9)), "the precondition"
    common = ["--surgery", str(block_run), "--data-dir", str(prose_dir), "--context", "128", "--max-windows", "1"]
    assert evaluate([*common, "--block-density", "0.9"]) == 0
    assert "adaptive budget, ρ requested 0.9, executed 0.900" in capsys.readouterr().out
    assert evaluate(common) == 2
    assert "block density 0.3 (--block-density, else the run's router.block_density) is below the floor 0.900" in (
        capsys.readouterr().err)


def test_evaluate_names_selection_budget_and_both_densities(block_run, prose_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    common = ["--surgery", str(block_run), "--data-dir", str(prose_dir), "--context", "128", "--max-windows", "1"]
    # The run's own ρ 0.3 and adaptive budget (--allow-floor: every head at the floor 0.9 at 128 tokens).
    assert evaluate([*common, "--allow-floor", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["selection"], result["budget"], result["requested_block_density"]) == ("router", "adaptive", 0.3)
    assert capsys.readouterr().out.count("selection router, adaptive budget, ρ requested 0.3, executed 0.900") == 1
    # 0.95 of 10 tiles rounds up to all 10: the label says 1.000 executed.
    assert evaluate([*common, "--selection", "recent", "--budget", "uniform", "--block-density", "0.95",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["selection"], result["budget"], result["requested_block_density"]) == ("recent", "uniform", 0.95)
    assert result["block_density"]["mean"] == pytest.approx(1.0)
    assert "selection recent, uniform budget, ρ requested 0.95, executed 1.000" in capsys.readouterr().out


def test_generate_reads_the_runs_budget_and_labels_what_ran(block_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "g.json"
    common = ["--surgery", str(block_run), "--prompt", "The history of", "--max-new-tokens", "3", "--no-compare",
              "--json", str(out)]
    assert generate(common) == 0
    result = json.loads(out.read_text())
    # Re-normalised to ρ (no floor: generate's lengths vary): the calibrated shares at ρ 0.3 are all the 128-token
    # floor 0.9, equal, so every head runs 0.3.
    calibrated = calibration.read(block_run)
    heads = len(calibrated["densities"][0][0])
    expected = calibration.budget_densities(calibrated, "adaptive", 0.3, floor=0.0, heads=heads)
    np.testing.assert_allclose(expected, 0.3, rtol=1e-6)
    assert (result["budget"], result["requested_block_density"]) == ("adaptive", 0.3)
    np.testing.assert_array_equal(np.asarray(result["block_density"], np.float32), expected)
    printed = capsys.readouterr().out
    assert "decode: block-sparse, router selection, adaptive budget at ρ 0.3" in printed, printed
    assert generate([*common, "--budget", "uniform", "--block-density", "0.95", "--no-gather"]) == 0
    result = json.loads(out.read_text())
    assert (result["budget"], result["block_density"]) == ("uniform", 0.95)
    printed = capsys.readouterr().out
    assert "decode: block-sparse, router selection, uniform budget at ρ 0.95" in printed
    assert "masked over the cache" not in printed, "block decode ignores --no-gather: the label says what ran"
    # The dense model: its label says dense, never a gather budget.
    assert generate(["--model", str(tiny_model_dir), "--prompt", "a", "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert "decode: dense" in printed and "gather" not in printed
    assert generate(["--model", str(tiny_model_dir), "--prompt", "a", "--block-density", "0.5"]) == 2
    assert "need --surgery RUN of a block-mode run" in capsys.readouterr().err


def test_needle_thresholds_need_a_row_router(block_run, prose_dir, tmp_path, capsys):
    """`quality --niah-thresholds` ranks rows: on a run whose router ranks query blocks it stops before any section,
    naming the setting, and writes nothing."""
    from llama_surgery_jax.quality import main as quality

    out = tmp_path / "quality"
    refused(capsys, quality, ["--run", str(block_run), "--data-dir", str(prose_dir), "--contexts", "128",
                              "--windows", "1", "--curve-context", "128", "--curve-windows", "0",
                              "--niah-lengths", "96", "--speed-contexts", "", "--niah-thresholds", "--out", str(out)],
            "--niah-thresholds")
    assert not out.exists()


def test_generate_spends_the_budget_by_per_row_thresholds(block_run, tiny_model_dir, prose_dir, tmp_path, capsys):
    """`generate --thresholds` as `evaluate --thresholds`: on a row-routing run, τ [layers, heads] is calibrated on 8
    windows of the training text at the generation's length (prompt + new tokens), and the label and JSON say so;
    without --surgery, and on a run whose router ranks query blocks, it is refused by name."""
    from llama_surgery_jax.io import corpora
    from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
    from llama_surgery_jax.training.checkpoints import load_trained_routers
    from llama_surgery_jax.training.loop import train

    refused(capsys, generate, ["--model", NOWHERE, "--prompt", "a", "--thresholds"], "--thresholds")
    refused(capsys, generate, ["--surgery", str(block_run), "--prompt", "a", "--thresholds", "--data-dir",
                               str(prose_dir), "--no-compare"], "--thresholds ranks rows")
    config = tiny_train_config(tiny_model_dir, prose_dir, "router.mode=block", "router.query=row", "router.trees=2",
                               "router.d_max=0", "router.levels=2", "router.block_size=8", "router.window=8",
                               "router.routing_heads=kv", "router.block_density=0.6", "router.budget=uniform",
                               "seq_len=64", "batch_size=2", "steps=1", "checkpoint_every=1", "report=false",
                               "calibration_sequences=0")
    run = tmp_path / "rows"
    train(config, run, report=None, progress=False)
    assert not (run / "calibration.json").exists()  # not calibrated: the uniform budget needs none
    out = tmp_path / "g.json"
    prompt, new = "The history of the", 6
    assert generate(["--surgery", str(run), "--prompt", prompt, "--max-new-tokens", str(new), "--thresholds",
                     "--data-dir", str(prose_dir), "--no-compare", "--json", str(out)]) == 0
    tokenizer = load_tokenizer(tiny_model_dir)
    length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + new
    printed = capsys.readouterr().out
    assert f"uniform budget at ρ 0.6, per-row thresholds (τ calibrated at {length} tokens)" in printed, printed
    result = json.loads(out.read_text())
    assert result["allocation"].startswith("per-row thresholds") and f"at {length} tokens" in result["allocation"]
    model, _, _ = load_trained_routers(load_model(tiny_model_dir), str(run))
    text = corpora.tokenize(tokenizer, corpora.load_text("valid", prose_dir, "tokens"))
    table = np.full((model.config.num_hidden_layers, model.config.num_key_value_heads), 0.6, np.float32)
    expected = calibration.row_thresholds(model, corpora.windows(text, length, 8), selection="router",
                                          densities=table, scope="layer", batch_size=8)
    np.testing.assert_array_equal(np.asarray(result["thresholds"], np.float32), expected)
