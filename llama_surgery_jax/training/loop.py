"""The router-training loop: data, the jitted train step over a mesh, checkpoints, resume, then the report it is
given (`report`: the end-of-training report lives in evaluation/training_report.py and is passed in by the caller).

The command line, its options and protocol: `python -m llama_surgery_jax.train` (llama_surgery_jax/train.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from llama_surgery_jax.io import corpora
from llama_surgery_jax.model import sharding
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer, read_config
from llama_surgery_jax.model.config import ConfigError
from llama_surgery_jax.surgery.config import RouterSchedule
from llama_surgery_jax.surgery.routed_attention import inject_routers
from llama_surgery_jax.surgery.router import RouterParam, lambda_at, tau_at
from llama_surgery_jax.training.checkpoints import RouterCheckpoints, model_fingerprint
from llama_surgery_jax.training.config import TrainConfig
from llama_surgery_jax.training.metrics import MetricsLogger


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite steps); the last good checkpoint is intact."""


GPU_PRESET = "default"
CPU_PRESET = "cpu"


def choose_preset(backend: str) -> tuple[str, str]:
    """The training preset for a JAX backend (`jax.default_backend()`), and why, in words.

    The `default` run (200 steps of 8 × 1024 tokens) takes minutes on one GPU and about a day on a
    2-core CPU, so without an accelerator the short `cpu` run is the one that finishes.
    """
    if backend == "cpu":
        return CPU_PRESET, (f"no GPU: JAX backend is 'cpu'; the GPU preset '{GPU_PRESET}' would take hours here; "
                            f"pass --preset {GPU_PRESET} to run it anyway")
    return GPU_PRESET, f"JAX backend is '{backend}'; pass --preset {CPU_PRESET} for the short CPU run"


# ---------------------------------------------------------------------------- data


class PackedSequences:
    """Token stream → shuffled fixed-length sequences; the position is (epoch, cursor), so it resumes exactly.

    Each epoch visits every packed sequence once in an order drawn from PCG64(seed, epoch).
    """

    def __init__(self, ids: np.ndarray, seq_len: int, batch_size: int, seed: int, *,
                 source: str = "the training text"):
        self.sequences = corpora.windows(ids, seq_len, source=source, setting="seq_len")
        if len(self.sequences) < batch_size:
            raise corpora.DataError(f"{source} makes {len(self.sequences)} sequences of {seq_len} tokens, fewer "
                                    f"than one batch of {batch_size}: give more text or a smaller seq_len or "
                                    "batch_size")
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.cursor = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.sequences))

    def next_batch(self) -> np.ndarray:
        """[batch_size, seq_len] int32; drops an epoch's last partial batch."""
        if self.cursor + self.batch_size > len(self.sequences):
            self.epoch, self.cursor = self.epoch + 1, 0
        rows = self.order(self.epoch)[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.sequences[rows]

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, position: dict) -> None:
        self.epoch, self.cursor = int(position["epoch"]), int(position["cursor"])


def load_training_tokens(config: TrainConfig, model_dir: Path) -> tuple[np.ndarray, dict]:
    """The training text as one token stream [tokens] int32, and its source (`corpora.Corpus.source`):
    `config.data` when set, else the WikiText-2 split (never test)."""
    corpus = corpora.load_corpus(config.data or None, config.train_split, config.data_dir or None, config.train_release)
    return corpora.tokenize(load_tokenizer(model_dir), corpus.text), corpus.source


# ---------------------------------------------------------------------------- the step


def lm_loss(model, tokens: jax.Array, **attention_kwargs):
    """Mean next-token cross-entropy over tokens[:, 1:], and the per-layer aux."""
    logits, aux = model(tokens, **attention_kwargs)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return nll.mean(), aux


def vocab_matrix(model) -> jax.Array:
    """The LM head as [vocab, hidden] in the compute dtype (the tied embedding where there is no head)."""
    head = model.model.embed_tokens if model.lm_head is None else model.lm_head
    return head.weight[...].astype(model.precision.compute)


def output_divergence(vocab: jax.Array, dense: jax.Array, sparse: jax.Array, chunk: int = 512) -> jax.Array:
    """Mean over positions of KL(p_dense ‖ p_sparse), the next-token distributions of two final hidden states
    [b, t, hidden] under one LM head vocab [V, hidden]; chunked over positions under `jax.checkpoint`, so no
    [b, t, V] logits are held (8k tokens × 49k vocab × batch 4 would be 6.4 GB each in float32)."""
    b, t, d = dense.shape
    chunk = min(chunk, t)
    n_chunks = -(-t // chunk)
    pad = ((0, 0), (0, n_chunks * chunk - t), (0, 0))

    def chunks(h):
        return jnp.moveaxis(jnp.pad(h, pad).reshape(b, n_chunks, chunk, d), 1, 0)

    @jax.checkpoint
    def one_chunk(args):
        dense_h, sparse_h = args
        log_p = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", dense_h, vocab, preferred_element_type=jnp.float32))
        log_q = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", sparse_h, vocab, preferred_element_type=jnp.float32))
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [b, chunk]

    per_position = jnp.moveaxis(jax.lax.map(one_chunk, (chunks(dense), chunks(sparse))), 0, 1).reshape(b, -1)[:, :t]
    return jnp.mean(per_position)


def make_train_step(graphdef, schedule: RouterSchedule, optimizer: optax.GradientTransformation, *,
                    remat: bool = False, block_mode: bool = False, output_kl: float = 0.0):
    """The pure step: (routers, opt_state, frozen, tokens, step, seed) → (routers, opt_state, metrics).

    Gradients are taken with respect to the router parameters alone: the frozen base enters as a
    constant, so no weight gradient of the base is ever computed. A step whose loss or gradients are
    not finite leaves routers and optimizer state unchanged (metrics say so). remat: recompute each
    decoder layer in the backward pass (`model.checkpointed`): activation memory of one layer, not all.
    block_mode: the loss is the self-distillation of budgeted block routing (METHOD.md §11): the frozen
    model runs dense, and each layer's router fits its soft tile scores to the dense attention's tile mass;
    otherwise the preprint's LM loss through the straight-through mask. Both add λ · load balance.
    output_kl (block mode, row routing): plus this weight times KL(dense ‖ surgery) of the next-token distributions,
    the surgery run at the router's tiles through the straight-through bridge (`output_divergence`).
    """

    def step_fn(routers, opt_state, frozen, tokens, step, seed):
        tau = tau_at(step, schedule)
        lam = lambda_at(step, schedule)
        rng = jax.random.fold_in(jax.random.key(seed), step)

        def distill_fn(routers):
            # Self-distillation (block mode): the frozen model runs dense; no LM head, no LM loss.
            model = nnx.merge(graphdef, routers, frozen)
            dense, aux, _ = model.hidden_states(tokens, remat=remat, train=True, tau=tau, rng=rng)
            distill = jnp.mean(jnp.stack([a["distill_loss"] for a in aux]))
            balance = jnp.mean(jnp.stack([a["load_balance_loss"] for a in aux]))
            if not output_kl:
                return distill + lam * balance, (distill, balance, None)
            # The end-to-end term: the surgery at the router's tiles, its next-token distributions against dense's.
            sparse, _, _ = model.hidden_states(tokens, remat=remat, train=True, tau=tau, rng=rng, straight_through=True)
            divergence = output_divergence(vocab_matrix(model), jax.lax.stop_gradient(dense), sparse)
            return distill + lam * balance + output_kl * divergence, (distill, balance, divergence)

        def loss_fn(routers):
            model = nnx.merge(graphdef, routers, frozen)
            ce, aux = lm_loss(model, tokens, remat=remat, train=True, tau=tau, rng=rng, hard=True)
            # Mean over layers, so λ means the same for 2 layers or 32.
            balance = jnp.mean(jnp.stack([a["load_balance_loss"] for a in aux]))
            densities = (jnp.mean(jnp.stack([a["token_density"] for a in aux])),
                         jnp.mean(jnp.stack([a["block_density"] for a in aux])))
            return ce + lam * balance, (ce, balance, densities)

        (loss, (main, balance, densities)), grads = jax.value_and_grad(
            distill_fn if block_mode else loss_fn, has_aux=True)(routers)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, routers)
        new_routers = optax.apply_updates(routers, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics = {"loss": loss, "load_balance": balance, "tau": tau, "lambda": lam, "grad_norm": grad_norm,
                   "finite": finite}
        if block_mode:
            metrics["distill"] = main
            if output_kl:
                metrics["output_kl"] = densities
        else:
            metrics.update(ce=main, token_density=densities[0], block_density=densities[1])
        return keep(new_routers, routers), keep(new_opt_state, opt_state), metrics

    return step_fn


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps) \
        if config.warmup_steps else config.learning_rate
    return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """Everything a training run holds, placed on the mesh."""

    config: TrainConfig
    model_dir: Path
    graphdef: nnx.GraphDef
    routers: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState
    mesh: jax.sharding.Mesh
    step_fn: object  # the jitted step


def build_run(config: TrainConfig, model_dir: Path) -> Run:
    model = load_model(model_dir, config.precision)
    inject_routers(model, config.router, nnx.Rngs(config.seed), execution=config.execution)
    graphdef, routers, frozen = nnx.split(model, RouterParam, ...)
    optimizer = make_optimizer(config)
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp, config.mesh_tensor)
    sharding.check_batch(config.batch_size, mesh)
    router_shardings = sharding.shard_state(routers, mesh)
    frozen_shardings = sharding.shard_state(frozen, mesh)
    routers = sharding.put(routers, router_shardings)
    frozen = sharding.put(frozen, frozen_shardings)
    # Adam's moments have the routers' names and shapes, so the same rules place them.
    opt_shardings = sharding.shard_state(jax.eval_shape(optimizer.init, routers), mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(routers)
    replicated = sharding.replicated(mesh)
    step_fn = jax.jit(
        make_train_step(graphdef, config.schedule, optimizer, remat=config.remat,
                        block_mode=config.router.mode == "block", output_kl=config.output_kl),
        in_shardings=(router_shardings, opt_shardings, frozen_shardings, sharding.batch_sharding(mesh),
                      replicated, replicated),
        out_shardings=(router_shardings, opt_shardings, replicated),
        donate_argnums=(0, 1),
    )
    return Run(config, model_dir, graphdef, routers, frozen, opt_state, mesh, step_fn)


# What `train` is given to write the report: called with (config, model_dir) before training (to read what it
# needs, so that a missing text fails before the work), it returns finish(run, out, timing, train_source) → report.
Report = Callable[[TrainConfig, Path], Callable[[Run, Path, dict, dict], dict]]


def train(config: TrainConfig, out: Path, *, report: Report | None = None, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Trains (resuming from `out` when it holds checkpoints) and writes the report; returns it.

    report: the end-of-training report, `evaluation.training_report.prepare`; needed when `config.report` is on
    (the default), so that a run asked for its report never ends without one.
    stop_after: return after this many steps of this invocation (a stand-in for a kill in tests).
    """
    if config.report and report is None:
        raise TypeError("train(): config.report is on but no report= was given: pass "
                        "report=llama_surgery_jax.evaluation.training_report.prepare, or set report=false")
    if config.output_kl and (config.router.mode != "block" or config.router.query != "row"):
        raise ConfigError("output_kl (the end-to-end term) needs row routing: router.mode=block router.query=row")
    if config.report and config.router.mode == "block" and not config.calibration_sequences:
        raise ConfigError("calibration_sequences=0 skips the calibration that the end-of-training report's budgets "
                          "read: set report=false too, or calibrate")
    out = out.absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{jax.process_index()}"  # one per process: several share the folder
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the output folder {out}: {e}") from None
    model_dir = Path(config.model) if config.model else _default_model_dir()
    read_config(model_dir)  # a clear error before anything heavy
    fingerprint = model_fingerprint(model_dir)
    checkpoints = RouterCheckpoints(out / "checkpoints", keep=config.keep_checkpoints)
    tokens, train_source = load_training_tokens(config, model_dir)
    data_source = {"source": corpora.describe(train_source), "tokens": int(len(tokens)),
                   "sha256": hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()}
    checkpoints.check_compatible(fingerprint, config.router, data_source)

    batches = PackedSequences(tokens, config.seq_len, config.batch_size, config.seed,
                              source=corpora.describe(train_source))
    # The report reads and windows its text now, so that a missing or too short one fails before training, not after.
    finish_report = report(config, model_dir) if config.report else None
    run = build_run(config, model_dir)
    replicated = sharding.replicated(run.mesh)
    seed = sharding.put(np.int32(config.seed), replicated)
    start = 0
    restored = checkpoints.restore_latest(run.routers, run.opt_state)
    if restored is not None:
        run.routers, run.opt_state, meta = restored
        start = meta["step"]
        batches.restore(meta["data_position"])
        print(f"resumed from {out / 'checkpoints'} at step {start}")
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    logger = MetricsLogger(out, resume_step=start, is_primary=jax.process_index() == 0)
    process_rows = config.batch_size // jax.process_count()
    bad_in_a_row = 0
    # Compiled ahead of the loop, so that the bar's rate and ETA count steady-state steps only and the
    # minutes of a first compilation on a CPU are announced rather than mistaken for a hang.
    step_fn, compile_seconds = compile_step(run, seed, primary=jax.process_index() == 0)
    bar = tqdm(initial=start, total=config.steps, desc="train", disable=not progress or jax.process_index() != 0)
    last_time, done, step_seconds = time.perf_counter(), 0, []
    for step in range(start, config.steps):
        rows = batches.next_batch()
        mine = rows[jax.process_index() * process_rows:(jax.process_index() + 1) * process_rows]
        batch = sharding.global_batch(mine, run.mesh, config.batch_size)
        run.routers, run.opt_state, metrics = step_fn(
            run.routers, run.opt_state, run.frozen, batch, sharding.put(np.int32(step), replicated), seed)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        metrics["tokens_per_s"] = config.batch_size * config.seq_len / (now - last_time)
        step_seconds.append(now - last_time)
        last_time = now
        shown = {"dens": f"{metrics['token_density']:.3f}"} if "token_density" in metrics else {}
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", lb=f"{metrics['load_balance']:.3f}",
                        tau=f"{metrics['tau']:.2f}", lam=f"{metrics['lambda']:.2f}", **shown,
                        tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        if step == start:  # the first call still holds one-off costs: the rate and ETA count the steps after it
            restart_clock(bar, step + 1)
        else:
            bar.update()
        if metrics["finite"]:
            bad_in_a_row = 0
        else:
            bad_in_a_row += 1
            print(f"step {step}: non-finite loss or gradients, update skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= config.max_bad_steps:
                raise TrainingError(
                    f"{bad_in_a_row} non-finite steps in a row; stopping. The last good checkpoint in "
                    f"{out / 'checkpoints'} is intact: lower learning_rate or use float32 and rerun.")
        logger.log(step + 1, metrics)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            checkpoints.save(step + 1, run.routers, run.opt_state,
                             {"step": step + 1, "data_position": batches.position, "seed": config.seed,
                              "model": fingerprint, "data": data_source, "router": dataclasses.asdict(config.router),
                              "execution": dataclasses.asdict(config.execution),
                              "schedule": dataclasses.asdict(config.schedule)})
        done += 1
        if stop_after is not None and done >= stop_after:
            bar.close()
            checkpoints.wait()
            logger.close()
            return {"stopped_at": step + 1}
    bar.close()
    checkpoints.wait()
    logger.close()
    if config.router.mode == "block" and config.calibration_sequences and jax.process_index() == 0:
        calibrate_budgets(run, out, batches)
    if not config.report:
        return {"steps": config.steps}
    # Compilation is timed on its own; the first step can still hold one-off costs: leave it out of the rate.
    timing = {"compile_s": compile_seconds, "steps_timed": len(step_seconds) - 1,
              "steps_per_s": (len(step_seconds) - 1) / sum(step_seconds[1:]) if len(step_seconds) > 1 else None,
              "peak_device_memory_gib": peak_device_memory_gib(), "device": jax.devices()[0].device_kind,
              "devices": jax.device_count()}
    return finish_report(run, out, timing, train_source)


def calibrate_budgets(run: Run, out: Path, batches: PackedSequences) -> None:
    """Block mode: the adaptive budget's per-(layer, head) densities from the dense model's tile masses on
    training sequences, and each layer's perplexity sensitivity (the sensitivity budget; `calibration`), written to
    RUN/calibration.json."""
    from llama_surgery_jax.training import calibration

    config = run.config
    sequences = batches.sequences[batches.order(0)[:config.calibration_sequences]]
    model = nnx.merge(run.graphdef, run.routers, run.frozen)
    print(f"calibrating the budgets (tile mass, head sensitivity) on {len(sequences)} training sequences ...", end=" ",
          flush=True)
    started = time.perf_counter()
    masses = calibration.dense_tile_masses(model, sequences, config.batch_size)
    densities = calibration.calibrate(masses, tile=config.router.block_size, window=config.router.window,
                                      sink=config.router.sink)
    # One forward per routing head and one dense: a batch of sequences is enough to rank the heads (2 on the cpu
    # preset, where 4 sequences per layer took 11 minutes of a make train on 2 busy cores).
    sensitivity = calibration.head_sensitivity(model, sequences[:config.batch_size],
                                                density=config.router.block_density, batch_size=config.batch_size)
    calibration.write(out, densities, context=config.seq_len, sequences=len(sequences),
                      tile=config.router.block_size, sensitivity=sensitivity,
                      sensitivity_density=config.router.block_density)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)


def compile_step(run: Run, seed: jax.Array, *, primary: bool = True):
    """The run's jitted step compiled for its batch shape ahead of time; returns (compiled, seconds)."""
    config = run.config
    replicated = sharding.replicated(run.mesh)
    batch = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32,
                                 sharding=sharding.batch_sharding(run.mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    if primary:
        print("compiling the train step ...", end=" ", flush=True)
    started = time.perf_counter()
    compiled = run.step_fn.lower(run.routers, run.opt_state, run.frozen, batch, step, seed).compile()
    seconds = time.perf_counter() - started
    if primary:
        print(f"done in {seconds:.1f} s", flush=True)
    return compiled, seconds


def restart_clock(bar: tqdm, n: int) -> None:
    """Sets the bar's count to n and starts its rate, ETA and elapsed time from now."""
    bar.reset()
    bar.initial = bar.n = bar.last_print_n = n
    bar.refresh()


def peak_device_memory_gib() -> float | None:
    """Peak bytes in use on this process's first device (GPU backends report it; the CPU backend does not)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def _default_model_dir() -> Path:
    from llama_surgery_jax.model.embedded import default_model_dir

    return default_model_dir()
