"""The sensitivity budget (`training.calibration`): per-(layer, head) shares ∝ the measured sensitivity, spending ρ
above the floor; calibrations from before the per-head form (per-layer sensitivities) are still read."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh_seed

from llama_surgery_jax.training import calibration


@pytest.mark.parametrize("rho", [0.15, 0.3, 0.6, 0.95])
def test_head_sensitivity_budget_spends_rho_above_the_floor_in_the_heads_order(rho):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    sensitivity = rng.exponential(size=(10, 3)) * rng.integers(0, 2, (10, 3))  # zeros weigh as the least positive
    floor = 0.12
    table = calibration.budget_densities({"head_sensitivity": sensitivity.tolist()}, "sensitivity", rho, floor=floor,
                                         heads=3).astype(np.float64)
    assert table.shape == (10, 3)
    assert abs(table.mean() - rho) < 1e-6, f"seed {seed}: mean {table.mean()} for ρ {rho}"
    assert np.all(table >= np.float32(floor) - 1e-7) and np.all(table <= 1.0), f"seed {seed}"
    weight = np.maximum(sensitivity, sensitivity[sensitivity > 0].min()).ravel()
    order = np.argsort(weight, kind="stable")
    assert np.all(np.diff(table.ravel()[order]) >= -1e-7), f"seed {seed}: not monotone in the sensitivity"
    # Power 1 per head: two heads both strictly between the floor and 1 run in the ratio of their sensitivities.
    inside = (table.ravel() > floor + 1e-6) & (table.ravel() < 1 - 1e-6)
    if inside.sum() >= 2:
        ratio = table.ravel()[inside] / weight[inside]
        assert np.allclose(ratio, ratio[0], rtol=1e-5), f"seed {seed}"


def test_a_calibration_with_layer_sensitivities_keeps_its_rule():
    layer = np.array([0.04, 0.01, 0.0, 0.09])
    table = calibration.budget_densities({"layer_sensitivity": layer.tolist()}, "sensitivity", 0.3, floor=0.1,
                                         heads=2)
    assert table.shape == (4, 2) and np.all(table == table[:, :1])
    assert table[3, 0] / table[0, 0] == pytest.approx(np.sqrt(0.09 / 0.04), rel=1e-5)  # √s_l
    with pytest.raises(KeyError, match="no sensitivity"):
        calibration.budget_densities({"grid": []}, "sensitivity", 0.3, floor=0.1, heads=2)


def test_write_keeps_the_tables_kind(tmp_path):
    heads = np.arange(6.0).reshape(3, 2)
    calibration.write(tmp_path, np.zeros((1, 3, 2)), context=64, sequences=2, tile=8, grid=(0.5,), sensitivity=heads,
                      sensitivity_density=0.3)
    read = calibration.read(tmp_path)
    assert read["head_sensitivity"] == heads.tolist() and "layer_sensitivity" not in read
    assert calibration.has_sensitivity(read)
