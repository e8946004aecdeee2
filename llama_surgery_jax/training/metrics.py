"""What a training run streams as it goes: one JSON line per step (metrics.jsonl) and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """One JSON line per step in DIR/metrics.jsonl and TensorBoard scalars in DIR/tensorboard."""

    def __init__(self, out: Path, *, resume_step: int, is_primary: bool = True):
        self.enabled = is_primary
        if not self.enabled:
            return
        path = out / "metrics.jsonl"
        # On resume, drop lines past the checkpoint: those steps are computed again.
        kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()
