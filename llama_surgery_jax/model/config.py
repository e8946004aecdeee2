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
    eos_token_id: int | tuple[int, ...] | None = None  # Llama 3.1 lists three; a tuple keeps the config hashable
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
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id (none, one, or Llama 3.1's three)."""
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

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
            eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list)
            else hf.get("eos_token_id"),
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
            d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
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
