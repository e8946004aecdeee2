"""The budget a block-mode run executes, read the way `evaluate` reads it (as
`training.checkpoints.prepare_for_evaluation` does): ρ is the run's `router.block_density` unless asked; the budget is
the run's (`router.budget`) when the run holds its calibration (RUN/calibration.json), else uniform; adaptive gives
every (layer, head) its calibrated density at ρ, sensitivity every layer its share of ρ by its measured perplexity
sensitivity (re-normalised to ρ above the floor of the length evaluated), uniform gives every head ρ.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from llama_surgery_jax.model.checkpoint import CheckpointError
from llama_surgery_jax.surgery.config import RouterConfig


class Budget(NamedTuple):
    """requested: ρ; name: "adaptive", "sensitivity" or "uniform"; densities: ρ, or float32 [layers, heads];
    thresholds: None (each query block runs its budget's count of tiles) or per-row thresholds τ [layers, heads]
    calibrated to those densities' tiles (`calibration.row_thresholds`: blocks run as many as their rows reach), at
    calibrated_at tokens."""

    requested: float
    name: str
    densities: float | np.ndarray
    thresholds: np.ndarray | None = None
    calibrated_at: int | None = None  # the length τ was calibrated at

    def describe(self) -> str:
        rows = "" if self.thresholds is None else ", per-row thresholds"
        if self.thresholds is not None and self.calibrated_at is not None:
            rows += f" (τ calibrated at {self.calibrated_at} tokens)"
        return f"{self.name} budget at ρ {self.requested:g}{rows}"

    def arguments(self) -> dict:
        """The layers' keyword arguments for this budget (traced arrays: one program serves every ρ)."""
        out = {"block_density": jnp.asarray(self.densities, jnp.float32)}
        if self.thresholds is not None:
            out["thresholds"] = jnp.asarray(self.thresholds, jnp.float32)
        return out


def run_budget(router: RouterConfig, run: str | Path | None, *, block_density: float | None = None,
               budget: str | None = None, layers: int | None = None, heads: int | None = None,
               context: int | None = None) -> Budget:
    """The budget of a block-mode router config trained in `run` (None or "init": no calibration). layers and heads
    shape the sensitivity budget's table; context, the length evaluated, sets the floor its layers keep (None: no
    floor; a layer below it runs at it). Raises CheckpointError for a calibrated budget without its calibration, or
    a ρ outside (0, 1]."""
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
        raise CheckpointError(f"{run} has no {calibration.FILE} (the {name} budget's calibration): pass --budget "
                              "uniform, or retrain")
    floor = 0.0
    if context is not None:
        from llama_surgery_jax.surgery.block_routing import floor_density

        floor = floor_density(-(-context // router.block_size), tile=router.block_size, window=router.window,
                              sink=router.sink)
    try:
        table = calibration.budget_densities(calibrated, name, rho, floor=floor, heads=heads or 1)
    except KeyError as e:
        raise CheckpointError(f"{run}: {e.args[0]}") from None
    if name == "sensitivity" and layers is not None and table.shape[0] != layers:
        raise CheckpointError(f"{run}'s calibration covers {table.shape[0]} layers, the model has {layers}")
    return Budget(rho, name, table)
