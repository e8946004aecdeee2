"""Hugging Face Llama checkpoint (safetensors folder, or GGUF file) → converted Flax model folder.

    python convert/hf_to_flax.py SOURCE OUTPUT_DIR [--dtype auto|float32|bfloat16|float16] [--force]

SOURCE is an HF model folder (`config.json` with `model.safetensors`, or sharded
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`: the Llama 3.1 8B layout) or a
`.gguf` file (dequantized with the `gguf` package; llama.cpp's Q/K row permutation undone).
Tensors are read one by one from memory-mapped files, checked by name and shape against the Flax model,
and written as an orbax checkpoint with the config and tokenizer (see llama_surgery_jax/model/checkpoint.py).
Peak RSS is about 2.6× the checkpoint (Llama 3.1 8B: 42 GiB for 16 GB; README).
The output appears atomically: it is built in a temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import argparse
import sys

from llama_surgery_jax.model.conversion import ConversionError, convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="an HF Llama model folder (safetensors) or a .gguf file")
    parser.add_argument("output_dir", help="where the converted model goes (created atomically)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="stored weight dtype; auto keeps the source's (GGUF: float32)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.output_dir, dtype=args.dtype, force=args.force)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.source} → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
