"""The budget a block-mode run executes, read the way `evaluate` reads it (as
`training.checkpoints.prepare_for_evaluation` does): ρ is the run's `router.block_density` unless asked; the budget is
the run's (`router.budget`) when the run holds its calibration (RUN/calibration.json), else uniform; adaptive gives
every (layer, head) its calibrated density at ρ, uniform gives every head ρ.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from llama_surgery_jax.model.checkpoint import CheckpointError
from llama_surgery_jax.surgery.config import RouterConfig


class Budget(NamedTuple):
    """requested: ρ; name: "adaptive" or "uniform"; densities: ρ, or float32 [layers, heads] (adaptive)."""

    requested: float
    name: str
    densities: float | np.ndarray

    def describe(self) -> str:
        return f"{self.name} budget at ρ {self.requested:g}"


def run_budget(router: RouterConfig, run: str | Path | None, *, block_density: float | None = None,
               budget: str | None = None) -> Budget:
    """The budget of a block-mode router config trained in `run` (None or "init": no calibration). Raises
    CheckpointError for an adaptive budget without its calibration, or a ρ outside (0, 1]."""
    from llama_surgery_jax.surgery.block_routing import check_density
    from llama_surgery_jax.training import calibration

    rho = router.block_density if block_density is None else block_density
    try:
        check_density(rho)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    calibrated = None if run in (None, "init") else calibration.read(Path(run))
    name = budget or (router.budget if calibrated is not None else "uniform")
    if name == "uniform":
        return Budget(rho, name, rho)
    if calibrated is None:
        raise CheckpointError(f"{run} has no {calibration.FILE} (the adaptive budget's calibration): pass --budget "
                              "uniform, or retrain")
    return Budget(rho, name, calibration.densities_at(calibrated, rho))
