"""The fused step compiled for an H200, a TPU v5e and a v6e (deviceless): one sweep at the layout's ideal bytes.

Needs the compile-only backends (``pip install 'collage-optax[accelerators]'``);
skipped with the reason otherwise. The step reads every moment back from its
storage (only 8-bit moments use their value before rounding): were the
unrounded bf16 moment used, XLA:TPU would recompute and rewrite it in a second
kernel (26 to 64 B/param instead of 18 to 22 on v5e).
"""

from __future__ import annotations

import os
from pathlib import Path

# Before jax initialises its backends: the CUDA plugin then registers (compile-only) without a driver.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import pytest

import collage_optax

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SHAPE = (1024, 1024)
# Read params, grads, residual and moments; write all but the grads (B/param, bf16 grads).
IDEAL = {"light": 18, "plus": 22, "exact": 22, "full": 26}


@pytest.mark.parametrize("target", ["h200", "v5e", "v6e"])
@pytest.mark.parametrize("mode", ["light", "plus", "exact", "full"])
def test_one_sweep_at_the_ideal_bytes(accel, target, mode):
  tx = collage_optax.adamw(1e-3, weight_decay=0.1, mode=mode)
  params = {"w": jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16)}
  n = SHAPE[0] * SHAPE[1]
  assert round(accel.ideal_bytes(tx, params) / n, 2) == IDEAL[mode]  # + the 4-byte step count
  compiled = accel.compile_step(tx, params, target)
  stats = accel.kernel_stats(compiled, n)
  cost = accel.cost_model_bytes(compiled) / n
  assert stats["param_sized_kernels"] == 1, stats
  assert abs(cost - IDEAL[mode]) <= 1, (cost, stats)
  assert abs(stats["hbm_B"] - IDEAL[mode]) <= 1, stats
  assert stats["temp_B"] < 1, stats


def test_flashoptim_fused_side_by_side_on_gpus_only(accel):
  """FlashOptim's fused step (a Triton kernel), where ``flashoptim_jax`` is installed (the ``benchmarks``
  extra): compiled for the GPU next to the baseline, left out on the TPU, and the table renders both."""
  import _common  # pylint: disable=import-outside-toplevel

  why = _common.flash_unavailable()
  if why:
    pytest.skip(why)
  out = accel.run_steps(["h200", "v5e"], ["fp32", accel.FLASH_FUSED], quick=True, cases=["leaf"])
  rows = out["leaf"]["targets"]
  assert set(rows["h200"]) == {"fp32", accel.FLASH_FUSED} and set(rows["v5e"]) == {"fp32"}
  flash = rows["h200"][accel.FLASH_FUSED]
  assert flash["hbm_B"] >= flash["ideal_B"] > 0 and flash["time_vs_fp32"] < 1, flash
  assert "FlashOptim" in accel.step_tables(out)
