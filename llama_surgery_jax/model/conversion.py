"""Hugging Face Llama checkpoint (safetensors folder, or GGUF file) → converted Flax model folder: the library of
`python convert/hf_to_flax.py SOURCE OUTPUT_DIR` (that script's docstring is the user's guide).

SOURCE is an HF model folder (`config.json` with `model.safetensors`, or sharded
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`: the Llama 3.1 8B layout) or a
`.gguf` file (dequantized with the `gguf` package; llama.cpp's Q/K row permutation undone).
Tensors are read one by one from memory-mapped files, checked by name and shape against the Flax model,
and written as an orbax checkpoint with the config and tokenizer (see model/checkpoint.py).
The output appears atomically: it is built in a temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from llama_surgery_jax.model.checkpoint import parameter_shapes, save_params
from llama_surgery_jax.model.config import ConfigError, ModelConfig


class ConversionError(ValueError):
    """The source cannot become a converted Llama: the message says what is wrong and what to do."""


@dataclasses.dataclass
class Source:
    """A checkpoint opened for streaming: its config, tensor names, and how to read each one."""

    description: str
    config: ModelConfig
    names: list[str]
    read: Callable[[str], np.ndarray]  # HF name → array in HF layout
    save_tokenizer: Callable[[Path], None]
    native_dtype: str


# ---------------------------------------------------------------------------- safetensors folders

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data section, {name: {dtype, shape, data_offsets}}) of one file."""
    from safetensors import SafetensorError, safe_open

    try:  # the library checks the header and that the file is whole
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as e:
        raise ConversionError(f"{path} is not a readable safetensors file ({e}); is it truncated? "
                              "Download it again.") from None
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def open_hf_folder(folder: Path) -> Source:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json: give an HF model folder or a .gguf file")
    hf_config = json.loads(config_path.read_text())
    config = ModelConfig.from_hf_dict(hf_config, name=hf_config.get("_name_or_path") or folder.name)

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not weight_map:
            raise ConversionError(f"{index_path} has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ConversionError(f"{index_path.name} names shards that are not in {folder}: {missing}")
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
        weight_map = None
    else:
        raise ConversionError(f"{folder} has neither model.safetensors nor model.safetensors.index.json "
                              "(PyTorch .bin checkpoints are not supported: save them as safetensors)")

    entries: dict[str, tuple[Path, int, dict]] = {}
    for shard in shards:
        data_start, header = safetensors_header(folder / shard)
        for name, info in header.items():
            entries[name] = (folder / shard, data_start, info)
    if weight_map is not None:
        absent = sorted(n for n, s in weight_map.items() if n not in entries)
        if absent:
            raise ConversionError(f"the index maps tensors that their shards lack: {absent[:5]}")

    def read(name: str) -> np.ndarray:
        path, data_start, info = entries[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{name} in {path.name} has dtype {info['dtype']}; expected F32/F16/BF16")
        begin, end = info["data_offsets"]
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
        return raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])

    def save_tokenizer(out: Path) -> None:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)

    dtypes = {info["dtype"] for _, _, info in entries.values()}
    native = {"BF16": "bfloat16", "F16": "float16"}.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
    return Source(f"HF folder {folder} ({len(shards)} safetensors file(s))", config, sorted(entries),
                  read, save_tokenizer, native)


# ---------------------------------------------------------------------------- GGUF files

GGUF_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name_of_gguf(name: str) -> str:
    stem, _, kind = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part not in GGUF_TENSOR_NAMES:
            raise ConversionError(f"unexpected GGUF tensor {name}")
        return f"model.layers.{layer}.{GGUF_TENSOR_NAMES[part]}.{kind}"
    if stem not in GGUF_GLOBAL_NAMES:
        raise ConversionError(f"unexpected GGUF tensor {name}")
    return f"{GGUF_GLOBAL_NAMES[stem]}.{kind}"


def undo_llama_cpp_rope_permutation(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves of Q/K rows; HF keeps them as two halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def open_gguf(path: Path) -> Source:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error/OSError for a damaged file
        raise ConversionError(f"{path} is not a readable GGUF file: {e}") from None

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ConversionError(f"{path} holds a {arch!r} model; only GGUF files of architecture 'llama' "
                              "(Llama, SmolLM2, ...) can be converted")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ConversionError(f"{path} stores Llama 3.1 rope scaling as a rope_freqs tensor, which is not "
                              "supported from GGUF: convert the HF safetensors folder instead")
    heads = int(field("llama.attention.head_count"))
    kv_heads = int(field("llama.attention.head_count_kv", heads))
    hidden = int(field("llama.embedding_length"))
    vocab = field("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_hidden_layers=int(field("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(field("llama.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(field("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_scaling=None,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        name=str(field("general.name", path.stem)),
    )
    by_hf_name = {hf_name_of_gguf(name): t for name, t in tensors.items()}

    def read(name: str) -> np.ndarray:
        tensor = by_hf_name[name]
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        weight = weight.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if name.endswith("q_proj.weight"):
            weight = undo_llama_cpp_rope_permutation(weight, heads)
        elif name.endswith("k_proj.weight"):
            weight = undo_llama_cpp_rope_permutation(weight, kv_heads)
        return weight

    def save_tokenizer(out: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.save_pretrained(str(out))

    return Source(f"GGUF {path} ({len(tensors)} tensors)", config, sorted(by_hf_name), read,
                  save_tokenizer, "float32")


def open_source(source: Path) -> Source:
    if not source.exists():
        raise ConversionError(f"{source} does not exist")
    if source.is_file():
        if source.suffix != ".gguf":
            raise ConversionError(f"{source} is a file but not .gguf; give an HF model folder or a .gguf file")
        return open_gguf(source)
    return open_hf_folder(source)


# ---------------------------------------------------------------------------- conversion


def convert(source_path: str | Path, output_dir: str | Path, *, dtype: str = "auto",
            force: bool = False, progress: bool = True) -> Path:
    """Converts `source_path` into `output_dir` atomically; returns the output folder."""
    source_path, output_dir = Path(source_path), Path(output_dir).absolute()
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise ConversionError(f"{output_dir} exists and is not empty; pass --force to replace it")
    try:
        source = open_source(source_path)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    dtype = source.native_dtype if dtype == "auto" else dtype
    store_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]

    expected = parameter_shapes(source.config)
    tied = source.config.tie_word_embeddings
    names = [n for n in source.names if not n.endswith(IGNORED_SUFFIXES)
             and not (tied and n == "lm_head.weight")]
    unknown = sorted(set(names) - set(expected))
    missing = sorted(set(expected) - set(names))
    if unknown or missing:
        raise ConversionError(f"{source.description} does not match a Llama of its config: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unknown[:5]}{'...' if len(unknown) > 5 else ''}")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    partial.chmod(0o755)
    try:
        tensors = {}
        for name in tqdm(names, desc=f"converting {source_path.name}", unit="tensor", disable=not progress):
            array = source.read(name)
            if tuple(array.shape) != expected[name]:
                raise ConversionError(f"{name} has shape {tuple(array.shape)}, but the config "
                                      f"({source.config.name}) needs {expected[name]}")
            tensors[name] = array if array.dtype == store_dtype else array.astype(store_dtype)
        save_params(partial, tensors)
        del tensors
        (partial / "config.json").write_text(json.dumps(source.config.to_hf_dict(), indent=2))
        source.save_tokenizer(partial)
        (partial / "conversion.json").write_text(json.dumps(
            {"source": str(source_path.absolute()), "description": source.description, "dtype": dtype,
             "parameters": int(sum(np.prod(s) for s in expected.values()))}, indent=2))
        if force and output_dir.exists():
            shutil.rmtree(output_dir)
        elif output_dir.exists() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        os.rename(partial, output_dir)  # fails if another process put a folder there meanwhile
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output_dir
