"""Typed, frozen configs: the Llama architecture and its dtypes.

Model configs use Hugging Face's `config.json` field names, so a converted checkpoint, a named
preset in `configs/models/` and an HF folder are all read by the same `ModelConfig.from_hf_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A config that cannot describe a supported Llama model."""


def read_preset(kind: str, name: str) -> dict[str, Any]:
    """The JSON of `configs/KIND/NAME.json` (kind: models or train), shipped as package data."""
    root = resources.files("configs") / kind
    names = sorted(p.name.removesuffix(".json") for p in root.iterdir() if p.name.endswith(".json"))
    if name not in names:
        raise ConfigError(f"unknown {kind} preset {name!r}; known presets: {', '.join(names)}")
    return json.loads((root / f"{name}.json").read_text())


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's `rope_type: llama3` frequency rescaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = "llama"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: grouped-query attention needs it"
            )
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], name: str | None = None) -> ModelConfig:
        """Reads an HF Llama `config.json` dict; refuses other architectures by name."""
        model_type = hf.get("model_type", "llama")
        architectures = hf.get("architectures") or ["LlamaForCausalLM"]
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in architectures):
            raise ConfigError(
                f"not a Llama model: model_type={model_type!r}, architectures={architectures}. "
                "Only LlamaForCausalLM checkpoints (Llama 2/3/3.1, SmolLM2, ...) can be converted."
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"config.json lacks the Llama fields {missing}")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("attention_bias/mlp_bias Llama variants are not supported")
        # transformers 5 writes `rope_parameters` (theta inside); earlier releases `rope_scaling`.
        scaling = hf.get("rope_parameters") or hf.get("rope_scaling")
        rope_theta = (scaling or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_scaling = None
        if scaling:
            rope_type = scaling.get("rope_type", scaling.get("type"))
            if rope_type == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                )
            elif rope_type != "default":
                raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3')")
        heads = int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            name=name or hf.get("_name_or_path") or "llama",
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The inverse of `from_hf_dict`: a `config.json` that transformers also reads."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "_name_or_path": self.name,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no model config at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(hf, name=hf.get("_name_or_path"))

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        """A preset from `configs/models/NAME.json`: llama-3.1-8b, smollm2-135m, tiny."""
        return cls.from_hf_dict(read_preset("models", name), name=name)

    def param_count(self) -> int:
        """Parameters of LlamaForCausalLM with this config (tied output counted once)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_hidden_layers * per_layer + d + head


@dataclasses.dataclass(frozen=True)
class Precision:
    """Storage dtype of the weights and dtype of the matmuls (norms and softmax run in float32)."""

    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ConfigError(f"{field}={getattr(self, field)!r}; choose one of {list(DTYPES)}")

    @property
    def params(self):
        return DTYPES[self.param_dtype]

    @property
    def compute(self):
        return DTYPES[self.compute_dtype]


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """The Dynamic Topology Router of METHOD.md §3–6 (symbols as there).

    A query token i sees key j iff j <= i and (prefix codes equal on the top `levels - d_max` levels,
    or sink and j == 0, or window is not None and i - j <= window, or i == j).
    """

    p: int = 2  # tree arity, prime
    levels: int = 13  # L = ceil(log_p N_ref); fixed by the context trained for, not by a config field
    d_max: int = 6  # largest visible tree distance; k = levels - d_max prefix levels must agree
    window: int | None = 128  # local window W in tokens (i - j <= W visible); None: no window
    sink: bool = True  # token 0 always visible
    routing_heads: str = "query"  # "query": one route per query head (preprint); "kv": per KV head
    mode: str = "token"  # "token": per-token routes; "block": routes from pooled causal block features
    block_size: int = 128  # block of the block-level mode and tile of the kernels
    query_chunk: int = 128  # query rows per step of the chunked reference attention (memory ~ chunk × seq)
    # "reference": the chunked plain-JAX attention (masked_attention.py); "kernel": the block-sparse
    # kernels (kernel_attention.py; interpret mode on CPU); "auto": kernel on a GPU for bf16/fp16 and
    # head dim 64/128, reference otherwise.
    attention_backend: str = "auto"
    # The router's gradient on the kernel backend. "chunked": plain JAX over query chunks against all keys
    # (O(N²) elementwise, measured on the H100); "fused": Pallas kernels beside the attention's backward,
    # on its computed tiles only (pallas_kernels/block_sparse_attention/route_gradient.py; checked in
    # interpret mode and compiled offline for sm_90, its GPU run is pending). The reference backend
    # differentiates masked_attention either way.
    router_gradient: str = "chunked"
    soft_mask_temperature: float = 0.5  # T_m
    init_bias: float = 5.0  # homotopy init: +b for child 0, -b for the others
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_steps: int = 100
    tau_schedule: str = "linear"  # or "cosine"
    lambda_max: float = 1.0
    lambda_steps: int = 50

    def __post_init__(self):
        if self.p < 2 or any(self.p % f == 0 for f in range(2, int(self.p**0.5) + 1)):
            raise ConfigError(f"p={self.p} must be a prime")
        if self.levels < 1 or not 0 <= self.d_max <= self.levels:
            raise ConfigError(f"need levels >= 1 and 0 <= d_max <= levels, got {self.levels}, {self.d_max}")
        if self.window is not None and self.window < 0:
            raise ConfigError(f"window={self.window} must be >= 0 or None")
        choices = {"routing_heads": ("query", "kv"), "mode": ("token", "block"),
                   "tau_schedule": ("linear", "cosine"), "attention_backend": ("auto", "reference", "kernel"),
                   "router_gradient": ("chunked", "fused")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(f"{field}={getattr(self, field)!r}; choose one of {list(allowed)}")
        for field in ("block_size", "query_chunk"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")

    @property
    def prefix_levels(self) -> int:
        """k = L - d_max: the top levels whose choices form a token's prefix code."""
        return self.levels - self.d_max

    @property
    def num_codes(self) -> int:
        """p^k distinct prefix codes."""
        return self.p**self.prefix_levels

    @classmethod
    def for_context(cls, n_ref: int = 8192, p: int = 2, d_max: int | None = None, **fields) -> RouterConfig:
        """L = ceil(log_p n_ref) (exact integer arithmetic) and d_max = floor(L / 2) unless given."""
        levels = 1
        while p**levels < n_ref:
            levels += 1
        return cls(p=p, levels=levels, d_max=levels // 2 if d_max is None else d_max, **fields)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One router-training run (`python -m llama_surgery_jax.train`); presets in `configs/train/`."""

    model: str = ""  # converted model folder; "" = the embedded SmolLM2-135M-Instruct
    data_dir: str = ""  # WikiText-2 folder; "" = $WIKITEXT2_DIR, else `datasets`
    train_split: str = "valid"  # the corpus the routers train on (wiki.valid.tokens here; never test)
    train_release: str = "tokens"
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
    router: RouterConfig = RouterConfig()
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    report: bool = True  # evaluate dense vs surgery and write the report at the end
    eval_context: int = 1024
    eval_windows: int = 40
    eval_batch: int = 4
    mesh_data: int = -1  # -1: every device not used by fsdp × tensor
    mesh_fsdp: int = 1
    mesh_tensor: int = 1

    def __post_init__(self):
        Precision(self.param_dtype, self.compute_dtype)  # validates the names
        for field in ("seq_len", "batch_size", "steps", "eval_context", "eval_windows", "checkpoint_every"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")

    @property
    def precision(self) -> Precision:
        return Precision(self.param_dtype, self.compute_dtype)

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        """A named preset from `configs/train/NAME.json` (fields as here; `router` a nested dict)."""
        values = read_preset("train", name)
        values.pop("description", None)
        return cls().override([f"{k}={json.dumps(v)}" for k, v in flatten_dict(values)])

    def override(self, assignments: list[str]) -> TrainConfig:
        """`key=value` overrides; `router.KEY=value` for the router. Values are parsed as JSON when they
        parse, else taken as strings, then checked against the field's type."""
        config = self
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep:
                raise ConfigError(f"override {assignment!r} is not key=value")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if key.startswith("router."):
                router = replace_typed(config.router, key.removeprefix("router."), value, "router.")
                config = dataclasses.replace(config, router=router)
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
