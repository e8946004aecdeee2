"""Router checkpoints of a training run: router params, optimizer state, step, RNG seed, data position.

The frozen base is referenced (its folder and a fingerprint of its config and source), never copied.
    RUN/checkpoints/<step>/{routers,optimizer,meta}   orbax CheckpointManager, the last k kept
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from llama_surgery_jax.model.checkpoint import CheckpointError
from llama_surgery_jax.surgery.config import RouterConfig, RouterExecution


class BaseModelMismatch(CheckpointError):
    """Routers trained on one base model, asked to run on another."""


def model_fingerprint(model_dir: Path) -> dict:
    """What identifies the frozen base: its folder, and a hash of its config and conversion record (dtype,
    parameter count) without the source's path, so the same model converted on another machine matches.
    `legacy_sha256` is the hash that runs recorded before (path included), so their checkpoints still resume."""
    model_dir = Path(model_dir).absolute()
    content, legacy = hashlib.sha256(), hashlib.sha256()
    for name in ("config.json", "conversion.json"):
        path = model_dir / name
        raw = path.read_bytes() if path.is_file() else b""
        legacy.update(raw)
        if name == "conversion.json" and raw:
            record = json.loads(raw)
            record.pop("source", None)
            record.pop("description", None)  # names the source's path too
            raw = json.dumps(record, sort_keys=True).encode()
        content.update(raw)
    return {"dir": str(model_dir), "sha256": content.hexdigest(), "legacy_sha256": legacy.hexdigest()}


def same_model(recorded: dict, fingerprint: dict) -> bool:
    """Whether a run's recorded base (`model_fingerprint` then) is the model of `fingerprint` (now)."""
    return recorded["sha256"] in (fingerprint["sha256"], fingerprint["legacy_sha256"])


def run_checkpoints(run_or_checkpoints: str | Path) -> Path:
    """A training run's checkpoints folder, from the run folder or the folder itself."""
    path = Path(run_or_checkpoints).absolute()
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def trained_base(run_or_checkpoints: str | Path) -> Path | None:
    """The base model folder a run trained on, when that folder is on this machine (else None)."""
    path = run_checkpoints(run_or_checkpoints)
    steps = RouterCheckpoints(path).steps() if path.is_dir() else []
    if not steps:
        return None
    recorded = Path(RouterCheckpoints(path).read_meta(steps[-1])["model"]["dir"])
    return recorded if (recorded / "config.json").is_file() else None


def abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RouterCheckpoints:
    """An orbax CheckpointManager over (routers, optimizer, meta), asynchronous saves, last `keep` kept."""

    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def check_compatible(self, fingerprint: dict, router: RouterConfig, data_source: dict | None = None) -> None:
        """Refuses to resume checkpoints of another base model or of other learned router settings; how
        attention executes (`RouterExecution`) may differ."""
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception:  # unreadable: restore_latest reports and skips it
                continue
            if not same_model(meta["model"], fingerprint):
                raise CheckpointError(
                    f"{self.directory} holds router checkpoints of another model ({meta['model']['dir']}), "
                    f"not {fingerprint['dir']}: use another --out folder")
            trained_on = meta.get("data")
            if data_source is not None and trained_on is not None and trained_on["sha256"] != data_source["sha256"]:
                raise CheckpointError(
                    f"{self.directory} holds routers trained on {trained_on['source']} ({trained_on['tokens']} "
                    f"tokens), not on {data_source['source']} ({data_source['tokens']} tokens): its saved data "
                    "position means nothing in another text; use another --out folder, or the same data to resume")
            trained = RouterConfig.from_dict(meta["router"])
            if trained.learned() != router.learned():
                changed = {k: (v, getattr(router, k)) for k, v in trained.learned().items()
                           if v != getattr(router, k)}
                differences = ", ".join(f"router.{k}: {a} there, {b} here" for k, (a, b) in changed.items())
                raise CheckpointError(
                    f"{self.directory} holds routers trained with other settings ({differences}): "
                    "use another --out folder, or the same router settings to resume")
            return

    def save(self, step: int, routers, opt_state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            routers=ocp.args.StandardSave(routers), optimizer=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, routers_like, opt_state_like=None):
        args = {"routers": ocp.args.StandardRestore(abstract(routers_like)), "meta": ocp.args.JsonRestore()}
        if opt_state_like is not None:
            args["optimizer"] = ocp.args.StandardRestore(abstract(opt_state_like))
        return self.manager.restore(step, args=ocp.args.Composite(**args))

    def restore_latest(self, routers_like, opt_state_like):
        """(routers, opt_state, meta) of the newest readable checkpoint, or None; a damaged one is
        reported and skipped in favour of the one before it."""
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, routers_like, opt_state_like)
                return restored.routers, restored.optimizer, restored.meta
            except Exception as e:  # orbax raises many types for damaged files
                print(f"warning: checkpoint {self.directory / str(step)} is unreadable ({type(e).__name__}: "
                      f"{str(e)[:200]}); falling back to the one before it", file=sys.stderr)
        if self.steps():  # checkpoints exist and none reads: starting over would discard the run silently
            raise CheckpointError(
                f"no checkpoint in {self.directory} is readable (steps {self.steps()}): to start this run over on "
                f"purpose, delete {self.directory} (or give another --out folder)")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()


def load_trained_routers(model, run_or_checkpoints: str | Path, *, model_dir: str | Path | None = None):
    """Injects routers into `model` and loads the newest checkpoint of a training run folder
    (or its `checkpoints/` folder). Returns (model, router config, step).

    model_dir: the folder `model` was loaded from; routers trained on another base are refused.
    """
    from llama_surgery_jax.surgery.routed_attention import inject_routers
    from llama_surgery_jax.surgery.router import RouterParam

    path = run_checkpoints(run_or_checkpoints)
    steps = RouterCheckpoints(path).steps() if path.is_dir() else []
    if not steps:
        raise CheckpointError(f"{path} holds no router checkpoints: give a training run's --out folder")
    checkpoints = RouterCheckpoints(path)
    meta = checkpoints.read_meta(steps[-1])
    if model_dir is not None and not same_model(meta["model"], model_fingerprint(model_dir)):
        raise BaseModelMismatch(
            f"the routers in {path} were trained on the base model {meta['model']['dir']}, not on {model_dir} "
            "(their config or conversion differs): pass --model with the run's base model, or leave --model out")
    router_config = RouterConfig.from_dict(meta["router"])
    inject_routers(model, router_config, nnx.Rngs(0))
    graphdef, routers, rest = nnx.split(model, RouterParam, ...)
    restored = checkpoints.restore(steps[-1], routers)
    return nnx.merge(graphdef, restored.routers, rest), router_config, steps[-1]


def prepare_for_evaluation(model, surgery: str, context: int | None = None, model_dir: str | Path | None = None, *,
                           block_density: float | None = None, budget: str | None = None,
                           selection: str | None = None):
    """`--surgery init` (homotopy routers) or a run folder → (model, attention kwargs for evaluation).

    At init the routed attention takes the whole window as one query chunk (`context`), so it runs the
    dense model's arithmetic and the perplexity is the dense one bit for bit.

    A block-mode run (budgeted block routing) is evaluated at block_density ρ (default: the run's) under its budget
    read by `training.budget.run_budget` (the run's calibrated one by default: adaptive, or sensitivity, re-normalised
    to ρ at `context`; or ρ for every head, "uniform"); selection replaces the router by a baseline under the same
    budget (`block_routing.SELECTIONS`). Any of them on a token-mode run is an error. → (model, kwargs, the `Budget`
    or None for a run without one).
    """
    from llama_surgery_jax.surgery.routed_attention import inject_routers

    kwargs = {"train": False, "rng": None}
    if surgery == "init":
        execution = RouterExecution() if context is None else RouterExecution(query_chunk=context)
        inject_routers(model, RouterConfig(), nnx.Rngs(0), execution=execution)
        router_config = RouterConfig()
    else:
        model, router_config, step = load_trained_routers(model, surgery, model_dir=model_dir)
        print(f"routers from {surgery} (step {step})")
    asked = {"--block-density": block_density, "--budget": budget, "--selection": selection}
    if router_config.mode != "block":
        given = [flag for flag, value in asked.items() if value is not None]
        if given:
            raise CheckpointError(f"{', '.join(given)} need a block-mode run (router.mode=block); {surgery} routes "
                                  f"in {router_config.mode} mode, whose density comes from its codes")
        return model, kwargs, None
    from llama_surgery_jax.surgery.block_routing import SELECTIONS
    from llama_surgery_jax.training.budget import run_budget

    if selection is not None and selection not in SELECTIONS:
        raise CheckpointError(f"--selection {selection!r}: choose one of {list(SELECTIONS)}")
    config = model.config
    heads = config.num_key_value_heads if router_config.routing_heads == "kv" else config.num_attention_heads
    chosen = run_budget(router_config, surgery, block_density=block_density, budget=budget,
                        layers=model.config.num_hidden_layers, heads=heads, context=context)
    kwargs["block_density"] = chosen.densities
    kwargs.update(selection=selection or "router", measure_recall=True)
    return model, kwargs, chosen

