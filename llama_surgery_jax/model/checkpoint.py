"""The converted-model folder: what `convert/hf_to_flax.py` writes and everything else reads.

    DIR/config.json        the model config (HF field names)
    DIR/params/            orbax checkpoint: nested dict of HF parameter names → arrays
    DIR/conversion.json    where it came from (source, format, stored dtype)
    DIR/tokenizer*.json …  the tokenizer (`transformers.AutoTokenizer.from_pretrained(DIR)`)

Parameter names are HF's (`model.layers.3.self_attn.q_proj.weight`), so conversion is a rename table
and a check against the shapes of `jax.eval_shape` of the target model.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from llama_surgery_jax.model.config import ModelConfig, Precision
from llama_surgery_jax.model.llama import LlamaForCausalLM, abstract_model

PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A converted-model folder that is missing, incomplete or for another model."""


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name → shape of every parameter the Flax model holds for this config."""
    state = nnx.state(abstract_model(config), nnx.Param)
    return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def nest(flat: dict[str, np.ndarray]) -> dict:
    """{'a.b.c': x} → {'a': {'b': {'c': x}}} (orbax stores nested dicts of string keys)."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def save_params(directory: Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes `directory/params` (the caller renames the whole folder into place afterwards)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute() / PARAMS_DIR, nest(tensors))
        checkpointer.wait_until_finished()


def read_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / PARAMS_DIR).is_dir():
        raise CheckpointError(
            f"{directory} is not a converted model (it needs config.json and {PARAMS_DIR}/); "
            "make one with `python convert/hf_to_flax.py SOURCE OUTPUT_DIR`")
    return ModelConfig.from_json(directory / "config.json")


def load_model(directory: str | Path, precision: Precision = Precision()) -> LlamaForCausalLM:
    """The converted model in `directory`, its weights cast to `precision.param_dtype`."""
    directory = Path(directory).absolute()
    config = read_config(directory)
    model = abstract_model(config, precision)
    graphdef, state = nnx.split(model)
    flat_state = list(nnx.to_flat_state(state))
    stored_dtype = json.loads((directory / "conversion.json").read_text()).get("dtype", "float32")
    target = nest({
        ".".join(map(str, path)): jax.ShapeDtypeStruct(v.shape, jnp.dtype(stored_dtype))
        for path, v in flat_state if isinstance(v, nnx.Param)
    })
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = flatten(checkpointer.restore(directory / PARAMS_DIR, target))
    except Exception as e:  # orbax raises several types for a damaged or mismatched folder
        raise CheckpointError(f"cannot read the parameters in {directory / PARAMS_DIR}: {e}") from e
    values = []
    for path, variable in flat_state:
        name = ".".join(map(str, path))
        if isinstance(variable, nnx.Param):
            variable = variable.replace(jnp.asarray(restored[name], precision.params))
        values.append((path, variable))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def load_tokenizer(directory: str | Path):
    """The tokenizer saved beside the converted weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
