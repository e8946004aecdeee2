"""Router training: exact resume, device-count invariance, multi-process, bad input, the smoke preset."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_surgery_jax.model.config import ConfigError
from llama_surgery_jax.train import main
from llama_surgery_jax.training.config import TrainConfig
from llama_surgery_jax.training.loop import PackedSequences, train

REPO = Path(__file__).resolve().parents[1]
# The same float32 step on 1 and on 4 devices differs only by the order of cross-device sums.
DEVICE_COUNT_RTOL = 1e-6


def tiny_config(model_dir, wikitext_dir, *extra) -> TrainConfig:
    return TrainConfig.preset("smoke").override([
        f"model={model_dir}", f"data_dir={wikitext_dir}", "seq_len=64", "batch_size=4", "steps=6",
        "checkpoint_every=1", "eval_context=64", "eval_windows=2", "eval_batch=2",
        # A small homotopy margin and a large rate, so that routes move within a few steps.
        "router.init_bias=1.0", "learning_rate=0.05", *extra])


def router_params(out: Path, like_run_config: TrainConfig, model_dir: Path):
    from llama_surgery_jax.training.checkpoints import RouterCheckpoints
    from llama_surgery_jax.training.loop import build_run

    run = build_run(like_run_config, model_dir)
    checkpoints = RouterCheckpoints(out / "checkpoints")
    restored = checkpoints.restore(checkpoints.steps()[-1], run.routers, run.opt_state)
    return jax.tree.leaves(restored.routers), jax.tree.leaves(restored.optimizer)


def test_packed_sequences_resume_exactly():
    ids = np.arange(1000, dtype=np.int32)
    a = PackedSequences(ids, 10, 4, seed=3)
    straight = [a.next_batch() for _ in range(60)]  # crosses several epochs
    b = PackedSequences(ids, 10, 4, seed=3)
    first = [b.next_batch() for _ in range(25)]
    c = PackedSequences(ids, 10, 4, seed=3)
    c.restore(b.position)
    resumed = first + [c.next_batch() for _ in range(35)]
    for x, y in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_is_exact(tiny_model_dir, wikitext_dir, tmp_path):
    config = tiny_config(tiny_model_dir, wikitext_dir)
    straight = train(config, tmp_path / "straight", progress=False)
    assert train(config, tmp_path / "killed", progress=False, stop_after=3) == {"stopped_at": 3}
    resumed = train(config, tmp_path / "killed", progress=False)
    a_params, a_opt = router_params(tmp_path / "straight", config, tiny_model_dir)
    b_params, b_opt = router_params(tmp_path / "killed", config, tiny_model_dir)
    for x, y in zip(a_params + a_opt, b_params + b_opt, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert straight["surgery_ppl"] == resumed["surgery_ppl"]
    losses = lambda out: [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "killed")
    # The routers moved: the run is not a no-op.
    report = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert report["token_density"] < 1.0
    assert {"dense_ppl", "surgery_ppl", "token_density", "block_density", "protocol"} <= set(report)
    assert (tmp_path / "straight" / "report.md").is_file() and (tmp_path / "straight" / "density.png").is_file()


def test_remat_changes_memory_not_results(tiny_model_dir, wikitext_dir):
    """remat=true (every decoder layer recomputed in the backward pass): the same step (loss, gradient norm
    and updated routers within 1e-6 relative) and the parameter paths (so the checkpoints) of the plain model."""
    from llama_surgery_jax.training.loop import build_run

    tokens = np.random.default_rng(0).integers(0, 256, (4, 64), dtype=np.int32)
    results = []
    for remat in ("false", "true"):
        run = build_run(tiny_config(tiny_model_dir, wikitext_dir, f"remat={remat}"), tiny_model_dir)
        routers, _, metrics = run.step_fn(run.routers, run.opt_state, run.frozen, tokens, 3, 0)
        results.append((jax.tree.map(np.asarray, routers), float(metrics["loss"]), float(metrics["grad_norm"])))
    (plain, *plain_metrics), (recomputed, *recomputed_metrics) = results
    assert recomputed_metrics == pytest.approx(plain_metrics, rel=1e-6)
    assert jax.tree.structure(recomputed) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(recomputed), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def run_one_step(model_dir, wikitext_dir, out: Path, devices: int, *mesh) -> float:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "llama_surgery_jax.training.loop", "--preset", "smoke", "--out", str(out),
           f"model={model_dir}", f"data_dir={wikitext_dir}", "seq_len=64", "batch_size=4", "steps=1",
           "report=false", "router.init_bias=1.0", *mesh]
    subprocess.run(cmd, env=env, check=True, cwd=REPO, capture_output=True)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.parametrize("mesh", [("mesh_data=4",), ("mesh_data=1", "mesh_fsdp=2", "mesh_tensor=2")],
                         ids=["data4", "fsdp2xtensor2"])
def test_same_step_on_one_and_four_devices(tiny_model_dir, wikitext_dir, tmp_path, mesh):
    one = run_one_step(tiny_model_dir, wikitext_dir, tmp_path / "one", 1)
    four = run_one_step(tiny_model_dir, wikitext_dir, tmp_path / "four", 4, *mesh)
    assert abs(four - one) <= DEVICE_COUNT_RTOL * abs(one), (one, four)


def test_two_processes_with_jax_distributed(tiny_model_dir, wikitext_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--preset", "smoke", "--out", str(tmp_path / "multi"), f"model={tiny_model_dir}",
              f"data_dir={wikitext_dir}", "seq_len=64", "batch_size=4", "steps=1", "report=false",
              "router.init_bias=1.0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-m", "llama_surgery_jax.training.loop", "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *common],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    multi = json.loads((tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    single = run_one_step(tiny_model_dir, wikitext_dir, tmp_path / "single", 1)
    assert abs(multi - single) <= DEVICE_COUNT_RTOL * abs(single), (single, multi)


# ---------------------------------------------------------------------------- bad input


def test_unknown_preset_and_override(capsys):
    assert main(["--preset", "nope"]) == 2
    assert "unknown train preset 'nope'" in capsys.readouterr().err
    assert main(["--preset", "smoke", "stepz=3"]) == 2
    assert "unknown override 'stepz'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="wrong type"):
        TrainConfig().override(["router.p=two"])
    with pytest.raises(ConfigError, match="must be a prime"):
        TrainConfig().override(["router.p=4"])


def test_unwritable_output_folder(tiny_model_dir, wikitext_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--preset", "smoke", "--out", str(blocker / "run"), f"model={tiny_model_dir}"]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_checkpoint_of_another_model(tiny_model_dir, wikitext_dir, tmp_path, tiny_hf_dir):
    from conftest import make_hf_llama, train_tiny_tokenizer

    from convert.hf_to_flax import convert
    from llama_surgery_jax.model.checkpoint import CheckpointError

    config = tiny_config(tiny_model_dir, wikitext_dir, "steps=1")
    train(config, tmp_path / "run", progress=False)
    other = convert(make_hf_llama(tmp_path / "other-hf", seed=7, intermediate_size=128),
                    tmp_path / "other", progress=False)
    train_tiny_tokenizer(other, wikitext_dir)
    with pytest.raises(CheckpointError, match="another model"):
        train(tiny_config(other, wikitext_dir, "steps=2"), tmp_path / "run", progress=False)


def test_corrupt_checkpoint_falls_back_to_the_previous(tiny_model_dir, wikitext_dir, tmp_path, capsys):
    config = tiny_config(tiny_model_dir, wikitext_dir, "steps=3")
    train(config, tmp_path / "run", progress=False, stop_after=2)
    newest = tmp_path / "run" / "checkpoints" / "2" / "routers"
    for f in newest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    train(config, tmp_path / "run", progress=False)
    err = capsys.readouterr()
    assert "is unreadable" in err.err and "falling back" in err.err
    assert "resumed from" in err.out and "at step 1" in err.out


@pytest.mark.slow
def test_smoke_preset_on_the_embedded_model(smollm2_dir, wikitext_dir, tmp_path, capsys):
    assert main(["--preset", "smoke", "--out", str(tmp_path / "smoke"), f"data_dir={wikitext_dir}"]) == 0
    report = json.loads((tmp_path / "smoke" / "report.json").read_text())
    assert report["dense_ppl"] > 1 and report["surgery_ppl"] > 1
    assert "surgery ppl" in capsys.readouterr().out
    assert "surgery" in (tmp_path / "smoke" / "report.md").read_text()
    shutil.rmtree(tmp_path / "smoke")


def test_resume_checks_what_is_learned_not_how_it_runs(tiny_model_dir, wikitext_dir, tmp_path):
    """An execution setting (query chunk, backend, router gradient) may change on resume; a learned one may not."""
    from llama_surgery_jax.model.checkpoint import CheckpointError

    out = tmp_path / "run"
    first = tiny_config(tiny_model_dir, wikitext_dir, "steps=2", "report=false")
    train(first, out, progress=False)
    resumed = train(first.override(["steps=3", "execution.query_chunk=16", "execution.attention_backend=reference"]),
                    out, progress=False)
    assert resumed["steps"] == 3
    with pytest.raises(CheckpointError, match=r"router\.d_max: 3 there, 2 here"):
        train(first.override(["steps=4", "router.d_max=2"]), out, progress=False)
    with pytest.raises(ConfigError, match="schedule.tau_steps"):
        first.override(["router.tau_steps=5"])


# ---------------------------------------------------------------------------- the preset that fits the machine


def run_main_without_training(monkeypatch, argv: list[str], backend: str) -> tuple[TrainConfig, Path]:
    """main(argv) on a machine whose JAX backend is `backend`; returns what it would train, and where."""
    import llama_surgery_jax.train as cli

    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(cli, "train", lambda config, out: calls.append((config, out)) or {})
    assert cli.main(argv) == 0
    (call,) = calls
    return call


def test_choose_preset_by_backend():
    from llama_surgery_jax.training.loop import choose_preset

    assert choose_preset("cpu")[0] == "cpu"
    assert choose_preset("gpu")[0] == "default"
    why = choose_preset("cpu")[1]
    assert "no GPU" in why and "'cpu'" in why and "--preset default" in why


def test_no_preset_on_a_cpu_runs_the_cpu_preset_and_says_why(monkeypatch, capsys):
    config, out = run_main_without_training(monkeypatch, [], "cpu")
    assert config == TrainConfig.preset("cpu") and out == Path("runs/cpu")
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("preset: cpu (no GPU: JAX backend is 'cpu'")
    assert "--preset default" in first_line


def test_no_preset_on_a_gpu_runs_the_default_preset(monkeypatch, capsys):
    config, out = run_main_without_training(monkeypatch, ["steps=3"], "gpu")
    assert config == TrainConfig.preset("default").override(["steps=3"]) and out == Path("runs/default")
    assert capsys.readouterr().out.splitlines()[0].startswith("preset: default (JAX backend is 'gpu'")


def test_an_explicit_preset_wins(monkeypatch, capsys):
    config, out = run_main_without_training(monkeypatch, ["--preset", "default", "--out", "elsewhere"], "cpu")
    assert config == TrainConfig.preset("default") and out == Path("elsewhere")
    assert capsys.readouterr().out.splitlines()[0] == "preset: default (--preset)"
    config, out = run_main_without_training(monkeypatch, ["--preset", "smoke"], "gpu")
    assert config == TrainConfig.preset("smoke") and out == Path("runs/smoke")


def test_cpu_preset_is_a_short_run_of_the_embedded_model():
    """The cpu preset parses, and is what `make train` without a GPU should be: the embedded model on
    WikiText-2 valid, a short run with the final report, windows that fit the evaluation context."""
    config = TrainConfig.preset("cpu")
    assert config.model == "" and config.train_split == "valid" and config.report
    assert config.steps < TrainConfig.preset("default").steps
    assert config.seq_len * config.batch_size < 1024 * 8
    assert config.eval_windows >= 8 and config.eval_windows % config.eval_batch == 0
    assert config.router.p ** config.router.levels >= config.eval_context  # L = ceil(log_p N_ref)
    assert config.schedule.tau_steps <= config.steps and config.schedule.lambda_steps <= config.steps
