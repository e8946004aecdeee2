"""A router-training run's config (`python -m llama_surgery_jax.train`), its presets and key=value overrides."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from llama_surgery_jax.model.config import ConfigError, Precision, read_preset
from llama_surgery_jax.surgery.config import RouterConfig, RouterExecution, RouterSchedule
from llama_surgery_jax.surgery.kernel_attention import kernel_tile

# The nested configs and what each holds: a resume checks `router` only (with the model and the data).
SECTIONS = {"router": RouterConfig, "execution": RouterExecution, "schedule": RouterSchedule}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One router-training run (`python -m llama_surgery_jax.train`); presets in `configs/train/`."""

    model: str = ""  # converted model folder; "" = the embedded SmolLM2-135M-Instruct
    data_dir: str = ""  # WikiText-2 folder; "" = $WIKITEXT2_DIR, else `datasets`
    train_split: str = "valid"  # the corpus the routers train on (wiki.valid.tokens here; never test)
    train_release: str = "tokens"
    # Your own text instead of WikiText-2: a UTF-8 file, or a folder whose *.txt files are read in name order.
    data: str = ""  # the routers' training text; "" = WikiText-2 (data_dir, train_split, train_release)
    eval_data: str = ""  # the final report's perplexity text; "" = WikiText-2 wiki.test.raw
    seq_len: int = 1024
    batch_size: int = 8  # global, over all devices and processes
    steps: int = 200
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False  # recompute each decoder layer in the backward pass (long sequences, large models)
    router: RouterConfig = RouterConfig()  # what the routers learn: p, L, d_max, window, mode, tile
    execution: RouterExecution = RouterExecution()  # how attention runs: backend, query chunk, router gradient
    schedule: RouterSchedule = RouterSchedule()  # τ and λ over the steps
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    # Block mode, row routing: weight of the end-to-end term, KL(dense ‖ surgery) of the next-token distributions with
    # the surgery at the router's tiles through the straight-through bridge (METHOD.md §12), added to the tile-mass
    # distillation; 0: distillation alone
    output_kl: float = 0.0
    report: bool = True  # evaluate dense vs surgery and write the report at the end
    eval_context: int = 1024
    eval_windows: int = 40
    eval_batch: int = 4
    # block mode: training sequences that calibrate the adaptive and sensitivity budgets (RUN/calibration.json); 0: no
    # calibration (it reads the frozen model alone, so a run of the same model, text, tile and length can lend its file)
    calibration_sequences: int = 8
    mesh_data: int = -1  # -1: every device not used by fsdp × tensor
    mesh_fsdp: int = 1
    mesh_tensor: int = 1

    def __post_init__(self):
        Precision(self.param_dtype, self.compute_dtype)  # validates the names
        if self.execution.attention_backend == "kernel" and not kernel_tile(self.router.block_size):
            raise ConfigError(f"execution.attention_backend=kernel needs router.block_size a power of two >= 16, "
                              f"got {self.router.block_size}")
        for field in ("seq_len", "batch_size", "steps", "eval_context", "eval_windows", "checkpoint_every"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")
        if self.output_kl < 0:
            raise ConfigError(f"output_kl must be 0 (off) or more, got {self.output_kl}")
        if self.calibration_sequences < 0:
            raise ConfigError(f"calibration_sequences must be 0 (no calibration) or more, "
                              f"got {self.calibration_sequences}")

    @property
    def precision(self) -> Precision:
        return Precision(self.param_dtype, self.compute_dtype)

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        """A named preset from `configs/train/NAME.json` (fields as here; router, execution and schedule
        nested dicts)."""
        values = read_preset("train", name)
        values.pop("description", None)
        return cls().override([f"{k}={json.dumps(v)}" for k, v in flatten_dict(values)])

    def override(self, assignments: list[str]) -> TrainConfig:
        """`key=value` overrides; `SECTION.KEY=value` for the nested configs (router, execution, schedule).
        Values are parsed as JSON when they parse, else taken as strings, then checked against the field's type."""
        config = self
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep:
                raise ConfigError(f"override {assignment!r} is not key=value")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            section, dot, name = key.partition(".")
            if dot and section in SECTIONS:
                for other, kind in SECTIONS.items():  # say where a setting moved (router.tau_steps → schedule.)
                    if other != section and name in {f.name for f in dataclasses.fields(kind)}:
                        raise ConfigError(f"{key!r}: {name} is a setting of {other!r} now; use {other}.{name}=")
                nested = replace_typed(getattr(config, section), name, value, f"{section}.")
                config = dataclasses.replace(config, **{section: nested})
            else:
                config = replace_typed(config, key, value, "")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flatten_dict(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in values.items():
        if isinstance(value, dict):
            items += flatten_dict(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def replace_typed(config, key: str, value, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(config)}
    if key not in fields or dataclasses.is_dataclass(getattr(config, key)):
        known = ", ".join(prefix + f for f in fields)
        raise ConfigError(f"unknown override {prefix}{key!r}; known keys: {known}")
    current = getattr(config, key)
    kind = fields[key].type
    if isinstance(current, bool) or kind in ("bool",):
        ok = isinstance(value, bool)
    elif isinstance(current, int) and "None" not in str(kind):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, str):
        ok, value = True, str(value)
    else:  # optional ints such as router.window
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{prefix}{key}={value!r} has the wrong type; it takes a {type(current).__name__}")
    return dataclasses.replace(config, **{key: value})
