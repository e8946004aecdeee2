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
import optax
import pytest
from conftest import F32_U, SUMS_PER_LAYER, TINY_NLL_BOUND, float32_bound, tiny_train_overrides
from conftest import tiny_train_config as tiny_config

from llama_surgery_jax.evaluation import training_report
from llama_surgery_jax.model.config import ConfigError, ModelConfig
from llama_surgery_jax.train import main
from llama_surgery_jax.training.config import TrainConfig
from llama_surgery_jax.training.loop import PackedSequences, train

REPO = Path(__file__).resolve().parents[1]

# 1 vs 4 devices (the batch split and, with fsdp × tensor, every projection's sum split across devices) and
# remat (another XLA fusion) change the tiny model's order of summation: its loss agrees to TINY_NLL_BOUND
# (conftest, 1.3e-4 nats). The backward pass chains the forward's sums and their transposes: twice the depth,
# 4.5e-5 of the gradient's norm.
TINY = ModelConfig.named("tiny")
TINY_GRADIENT_BOUND = float32_bound(TINY.intermediate_size, depth=2 * SUMS_PER_LAYER * TINY.num_hidden_layers)


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


def test_resume_is_exact(tiny_run, tiny_model_dir, tmp_path):
    """Killed after 3 of 6 steps and resumed, a run ends bit for bit where the uninterrupted one (the shared
    `tiny_run`) ends: the same compiled step on the same batches, from routers, optimizer state and data position
    restored bit for bit, so the results are equal by construction and compared exactly."""
    config, straight_dir, straight = tiny_run
    killed = tmp_path / "killed"
    assert train(config, killed, report=training_report.prepare, progress=False, stop_after=3) == {"stopped_at": 3}
    resumed = train(config, killed, report=training_report.prepare, progress=False)
    a_params, a_opt = router_params(straight_dir, config, tiny_model_dir)
    b_params, b_opt = router_params(tmp_path / "killed", config, tiny_model_dir)
    for x, y in zip(a_params + a_opt, b_params + b_opt, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert straight["surgery_ppl"] == resumed["surgery_ppl"]
    losses = lambda out: [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(straight_dir) == losses(tmp_path / "killed")
    # The routers moved: the run is not a no-op.
    report = json.loads((straight_dir / "report.json").read_text())
    assert report["token_density"] < 1.0
    assert {"dense_ppl", "surgery_ppl", "token_density", "block_density", "protocol"} <= set(report)
    assert (straight_dir / "report.md").is_file() and (straight_dir / "density.png").is_file()


def adam_first_step_atol(gradient: np.ndarray, gradient_error: float, params: np.ndarray, lr: float,
                         eps: float = 1e-8) -> np.ndarray:
    """Per-parameter bound on |Δ parameter| after one Adam step (optax.adamw, eps 1e-8, no weight decay) of two
    runs whose (clipped) gradients differ by at most `gradient_error` per element.

    At step 1 bias correction makes m̂ = g and v̂ = g², so the step is −lr·s(g) with s(g) = g / (|g| + ε): about
    lr·sign(g). Where |g| > 2e (e = gradient_error) both runs' gradients keep its sign and exceed |g|/2, and
    |s(g) − s(g')| = ε·||g| − |g'|| / ((|g| + ε)(|g'| + ε)) ≤ 2εe / g²: tiny. Where |g| ≤ 2e the sign itself is
    float32 noise and the step may flip: |Δs| < 2. Each run rounds p − lr·s once: + 2u·|p|.
    """
    g = np.abs(gradient.astype(np.float64))
    settled = 2 * eps * gradient_error / np.maximum(g, 2 * gradient_error) ** 2
    return lr * np.where(g > 2 * gradient_error, np.minimum(2.0, settled), 2.0) + 2 * F32_U * np.abs(params)


def test_remat_changes_memory_not_results(tiny_model_dir, prose_dir):
    """remat=true (every decoder layer recomputed in the backward pass) is another XLA program for the same step:
    the same loss, gradient norm and gradients (Adam's first moment, (1 − β1)·clipped gradient) within float32
    reassociation, the same parameter paths (so the checkpoints), and the updated routers as close as one Adam
    step makes them from gradients that close (`adam_first_step_atol`)."""
    from llama_surgery_jax.training.loop import build_run

    tokens = np.random.default_rng(0).integers(0, 256, (4, 64), dtype=np.int32)
    results = []
    for remat in ("false", "true"):
        config = tiny_config(tiny_model_dir, prose_dir, f"remat={remat}")
        run = build_run(config, tiny_model_dir)
        routers, opt_state, metrics = run.step_fn(run.routers, run.opt_state, run.frozen, tokens, 3, 0)
        assert bool(metrics["finite"]), remat
        first_moment = jax.tree.leaves(optax.tree_utils.tree_get(opt_state, "mu"))
        results.append((jax.tree.map(np.asarray, routers), [np.asarray(m) for m in first_moment],
                        float(metrics["loss"]), float(metrics["grad_norm"])))
    (plain, plain_mu, plain_loss, plain_norm), (recomputed, recomputed_mu, loss, norm) = results
    assert abs(loss - plain_loss) <= TINY_NLL_BOUND, (plain_loss, loss)
    assert abs(norm - plain_norm) <= TINY_GRADIENT_BOUND * plain_norm, (plain_norm, norm)
    mu_norm = np.sqrt(sum(np.sum(m.astype(np.float64) ** 2) for m in plain_mu))
    assert mu_norm > 0, "a step with no gradient compares nothing"
    mu_error = np.sqrt(sum(np.sum((a.astype(np.float64) - b) ** 2) for a, b in zip(recomputed_mu, plain_mu,
                                                                                     strict=True)))
    # The clipping factor min(1, 1/‖g‖) carries the norm's error too: twice the gradient bound.
    assert mu_error <= 2 * TINY_GRADIENT_BOUND * mu_norm, (mu_error / mu_norm, 2 * TINY_GRADIENT_BOUND)
    assert jax.tree.structure(recomputed) == jax.tree.structure(plain)
    beta1 = 0.9  # optax.adamw's default b1: μ = (1 − β1)·g after one step
    gradient_error = 2 * TINY_GRADIENT_BOUND * mu_norm / (1 - beta1)  # bounds every element of Δg
    for a, b, mu, recomputed_mu_leaf in zip(jax.tree.leaves(recomputed), jax.tree.leaves(plain), plain_mu,
                                            recomputed_mu, strict=True):
        # The homotopy init's route head is 0, so the backbone's gradient is exactly 0 in any order of summation,
        # and Adam leaves those parameters exactly where they were.
        np.testing.assert_array_equal(recomputed_mu_leaf[mu == 0], 0)
        atol = np.where(mu == 0, 0.0, adam_first_step_atol(mu / (1 - beta1), gradient_error, b, config.learning_rate))
        assert np.all(np.abs(a - b) <= atol), float(np.max(np.abs(a - b) - atol))


def first_loss(out: Path) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def one_step_command(model_dir, data_dir, out: Path) -> list[str]:
    """The first step of `tiny_run` (the same overrides), alone and without a report."""
    return ["--preset", "smoke", "--out", str(out), *tiny_train_overrides(model_dir, data_dir), "steps=1",
            "report=false"]


def run_one_step(model_dir, data_dir, out: Path, devices: int, *mesh) -> float:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "llama_surgery_jax.train", *one_step_command(model_dir, data_dir, out), *mesh]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and (out / "metrics.jsonl").is_file(), done.stdout + done.stderr
    return first_loss(out)


@pytest.fixture
def one_device_loss(tiny_run) -> float:
    """The reference of the multi-device tests: the first step's loss of the shared single-device run, which
    the multi-device commands repeat (same preset and overrides, so the same batch, routers and step)."""
    return first_loss(tiny_run[1])


# The loss of one step on 1 device and on 4 (or 2 processes): float32 reassociation of the forward only
# (TINY_NLL_BOUND); the 252-token mean's own cross-device sum adds √252·u·loss ≈ 6e-6, within its margin.
@pytest.mark.parametrize("mesh", [("mesh_data=4",), ("mesh_data=1", "mesh_fsdp=2", "mesh_tensor=2")],
                         ids=["data4", "fsdp2xtensor2"])
def test_same_step_on_one_and_four_devices(one_device_loss, tiny_model_dir, prose_dir, tmp_path, mesh):
    one = one_device_loss
    four = run_one_step(tiny_model_dir, prose_dir, tmp_path / "four", 4, *mesh)
    assert abs(four - one) <= TINY_NLL_BOUND, (one, four)


def test_two_processes_with_jax_distributed(one_device_loss, tiny_model_dir, prose_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = one_step_command(tiny_model_dir, prose_dir, tmp_path / "multi")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    procs = [subprocess.Popen([sys.executable, "-m", "llama_surgery_jax.train", "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *common],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert (tmp_path / "multi" / "metrics.jsonl").is_file(), outputs
    multi = json.loads((tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    single = one_device_loss
    assert abs(multi - single) <= TINY_NLL_BOUND, (single, multi)


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
    with pytest.raises(ConfigError, match="0 .no calibration. or more"):
        TrainConfig().override(["calibration_sequences=-1"])
    with pytest.raises(ConfigError, match="calibration_sequences=0 skips the calibration"):
        train(TrainConfig().override(["router.mode=block", "calibration_sequences=0"]), Path("unused"),
              report=training_report.prepare)


def test_unwritable_output_folder(tiny_model_dir, prose_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--preset", "smoke", "--out", str(blocker / "run"), f"model={tiny_model_dir}"]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_a_run_asked_for_its_report_needs_the_report(tiny_model_dir, prose_dir, tmp_path):
    """The loop writes the report it is given (evaluation.training_report.prepare): with config.report on and none
    given, it refuses before any work rather than end without one."""
    with pytest.raises(TypeError, match="report="):
        train(tiny_config(tiny_model_dir, prose_dir, "steps=1"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_model(tiny_run, prose_dir, tmp_path):
    from conftest import make_hf_llama, train_tiny_tokenizer

    from llama_surgery_jax.model.checkpoint import CheckpointError
    from llama_surgery_jax.model.conversion import convert

    shutil.copytree(tiny_run[1], tmp_path / "run")  # a run of the tiny model
    other = convert(make_hf_llama(tmp_path / "other-hf", seed=7, intermediate_size=128),
                    tmp_path / "other", progress=False)
    train_tiny_tokenizer(other, prose_dir)
    with pytest.raises(CheckpointError, match="another model"):
        train(tiny_config(other, prose_dir, "steps=2"), tmp_path / "run", report=training_report.prepare,
              progress=False)


def test_corrupt_checkpoint_falls_back_to_the_previous(tiny_run, tmp_path, capsys):
    config, run_dir, _ = tiny_run
    shutil.copytree(run_dir, tmp_path / "run")  # finished at step 6, with checkpoints 4, 5 and 6
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    newest = steps[-1]
    assert newest - 1 in steps, f"no previous checkpoint to fall back to: {steps}"
    for f in (tmp_path / "run" / "checkpoints" / str(newest) / "routers").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    capsys.readouterr()
    train(config.override(["report=false"]), tmp_path / "run", progress=False)
    err = capsys.readouterr()
    assert "is unreadable" in err.err and "falling back" in err.err
    assert "resumed from" in err.out and f"at step {newest - 1}" in err.out, (newest, err.out)


@pytest.mark.slow
def test_smoke_preset_on_the_embedded_model(smollm2_dir, prose_dir, tmp_path, capsys, monkeypatch):
    """The CLI on the embedded SmolLM2 (no model= given): the smoke preset trains and reports, shortened to
    1 step of 2 × 64 tokens and 1 evaluation window of 64 (the step compiles in half the time), on the
    tests' prose: what is checked is that the whole command runs and reports, which needs some text, not WikiText-2,
    and one step, not two (the time is in compiling the step and the report's programs). The loop gets SmolLM2 cut
    to its first 4 layers (of 30; conftest.first_layers on what it loads): the command, its default model, its
    tokenizer and its report are the whole model's, and the programs, unrolled over the layers, compile in about
    4/30 of the time."""
    from conftest import first_layers

    import llama_surgery_jax.training.loop as loop

    load = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *args, **kwargs: first_layers(load(*args, **kwargs), 4))
    assert main(["--preset", "smoke", "--out", str(tmp_path / "smoke"), f"data_dir={prose_dir}", "steps=1",
                 "checkpoint_every=1", "seq_len=64", "eval_context=64", "eval_windows=1", "eval_batch=1"]) == 0
    report = json.loads((tmp_path / "smoke" / "report.json").read_text())
    assert report["dense_ppl"] > 1 and report["surgery_ppl"] > 1
    assert "surgery ppl" in capsys.readouterr().out
    assert "surgery" in (tmp_path / "smoke" / "report.md").read_text()
    shutil.rmtree(tmp_path / "smoke")


def test_resume_checks_what_is_learned_not_how_it_runs(tiny_model_dir, prose_dir, tmp_path):
    """An execution setting (query chunk, backend, router gradient) may change on resume; a learned one may not."""
    from llama_surgery_jax.model.checkpoint import CheckpointError

    out = tmp_path / "run"
    first = tiny_config(tiny_model_dir, prose_dir, "steps=2", "report=false")
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

    def train(config, out, *, report):
        assert report is training_report.prepare  # the CLI's run ends with the end-of-training report
        calls.append((config, out))
        return {}

    monkeypatch.setattr(cli, "train", train)
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
    # Budgeted block routing places blocks on the tree: a leaf for each block of the evaluation context.
    assert config.router.mode == "block" and config.router.query == "row" and config.router.budget == "sensitivity"
    assert config.router.p ** config.router.levels >= config.eval_context // config.router.block_size
    assert config.router.block_density > 0.21  # above the sink-and-window floor at 1024 tokens, tile 32, W 32
    assert config.schedule.tau_steps <= config.steps and config.schedule.lambda_steps <= config.steps


def test_a_run_whose_checkpoints_are_all_unreadable_is_refused(tiny_run, tmp_path):
    """Restarting from step 0 would silently discard the run: refuse, and say how to start over on purpose."""
    from llama_surgery_jax.model.checkpoint import CheckpointError

    config, run_dir, _ = tiny_run
    shutil.copytree(run_dir, tmp_path / "run")
    for f in (tmp_path / "run" / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name != "checkpoints":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="is readable.*delete"):
        train(config.override(["report=false"]), tmp_path / "run", progress=False)


def test_resuming_on_other_data_is_refused(tiny_run, prose_dir, tmp_path):
    """The checkpoint's data position indexes the text it was trained on; another text cannot resume it."""
    from llama_surgery_jax.model.checkpoint import CheckpointError

    config, run_dir, _ = tiny_run
    shutil.copytree(run_dir, tmp_path / "run")
    other = tmp_path / "other.txt"
    other.write_text((prose_dir / "wiki.valid.tokens").read_text()[:20_000])  # another text than the run's
    with pytest.raises(CheckpointError, match="not on .*other.txt"):
        train(config.override([f"data={other}", "report=false"]), tmp_path / "run", progress=False)


def test_the_paper_preset_needs_its_model(capsys):
    assert main(["--preset", "paper"]) == 2
    assert "pass model=<converted Llama 3.1 8B folder>" in capsys.readouterr().err


def test_batch_size_must_split_over_the_mesh_and_the_processes():
    from types import SimpleNamespace

    from llama_surgery_jax.model.sharding import check_batch

    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 1})
    check_batch(8, mesh)
    with pytest.raises(ConfigError, match="batch_size=6 does not split over the mesh's data × fsdp = 4"):
        check_batch(6, mesh)
