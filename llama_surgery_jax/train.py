"""Router training: the surgery on a converted Llama, only the routers learn (METHOD.md §6).

    python -m llama_surgery_jax.train [--preset cpu|default|token|smoke|paper] [--out DIR] [key=value ...]

No arguments: the embedded default (SmolLM2-135M-Instruct on WikiText-2 valid) with the preset that fits
the machine: `default` on a GPU, the short `cpu` run (a few minutes on 2 cores) otherwise; the first
line printed says which and why. Running the same command on the same DIR resumes from its newest
readable checkpoint. At the end, dense and surgery perplexity on `wiki.test.raw` through the same
pipeline and the realised densities go to DIR/report.json, DIR/report.md and PNG plots; metrics stream
to DIR/metrics.jsonl and TensorBoard.

Multi-process (one process per host, the JAX runtime's own coordination):
    python -m llama_surgery_jax.train --coordinator HOST:PORT --num-processes N --process-id I ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from llama_surgery_jax.cli.arguments import command, integer
from llama_surgery_jax.evaluation import training_report
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import CheckpointError
from llama_surgery_jax.model.config import ConfigError
from llama_surgery_jax.training.config import TrainConfig
from llama_surgery_jax.training.loop import (
    TrainingError,
    choose_preset,
    train,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings, each checked (a bad one exits with status 2 and a message that names it)."""
    parser = argparse.ArgumentParser(
        description="Train the surgery's routers on a frozen Llama (only the routers learn).",
        epilog="Overrides: any TrainConfig field as key=value (router fields as router.KEY=value), "
               "e.g. steps=50 router.d_max=4 model=/path/to/converted-llama; router.* is what the routers learn, "
               "execution.* how attention runs (backend, query_chunk, router_gradient), schedule.* τ and λ",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="cpu | default | token | smoke | paper (configs/train/); without it, "
                        "'default' on a GPU and 'cpu' (a few minutes on 2 cores) otherwise")
    parser.add_argument("--out", help="output folder (default runs/PRESET, the preset run); rerun on it to resume")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-process runs")
    parser.add_argument("--num-processes", type=integer(1))
    parser.add_argument("--process-id", type=integer(0))
    parser.add_argument("overrides", nargs="*", help="key=value")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    preset, why = (args.preset, "--preset") if args.preset else choose_preset(jax.default_backend())
    if jax.process_index() == 0:
        print(f"preset: {preset} ({why})", flush=True)
    try:
        config = TrainConfig.preset(preset).override(args.overrides)
        if preset == "paper" and not config.model:
            raise ConfigError("--preset paper is the preprint's run on Llama 3.1 8B: pass model=<converted Llama "
                              "3.1 8B folder> (convert/hf_to_flax.py); it would otherwise train the embedded SmolLM2")
        out = Path(args.out or f"runs/{preset}")
        result = train(config, out, report=training_report.prepare)
    except (ConfigError, CheckpointError, corpora.DataError, FileNotFoundError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0 and "dense_ppl" in result:
        print(f"dense ppl {result['dense_ppl']:.4f}  surgery ppl {result['surgery_ppl']:.4f}  "
              f"token density {result['token_density']:.3f}  block density {result['block_density']:.3f}"
              f"  → {out / 'report.md'}")
    return 0


main = command(parse_args, run)

if __name__ == "__main__":
    sys.exit(main())
