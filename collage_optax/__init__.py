"""collage_optax: bfloat16 training without fp32 master weights (COLLAGE, ICML 2024).

Optax ``GradientTransformation``s over storage formats: parameters and Adam's
moments are float32 quantities stored in fewer bytes (a bfloat16 plus a
second component: the paper's multi-component floats), and each step is one
fused pass: decode, AdamW in float32, encode with explicit roundings.
"""

from collage_optax import formats, mcf
from collage_optax.alias import MODES, PRESETS, AdamWState, adamw
from collage_optax.mcf import MCF
from collage_optax.metrics import master_params, metrics
from collage_optax.sharding import abstract_state, sharded_init, state_shardings
from collage_optax.transform import (
  CompensateState,
  PrecisionMetrics,
  PrecisionState,
  ScaleByAdamState,
  StochasticRoundingState,
  compensate,
  measure_precision,
  scale_by_adam,
  stochastic_rounding,
)

__version__ = "0.1.0"

__all__ = [
  "MCF",
  "MODES",
  "PRESETS",
  "AdamWState",
  "CompensateState",
  "PrecisionMetrics",
  "PrecisionState",
  "ScaleByAdamState",
  "StochasticRoundingState",
  "abstract_state",
  "adamw",
  "compensate",
  "formats",
  "master_params",
  "mcf",
  "measure_precision",
  "metrics",
  "scale_by_adam",
  "sharded_init",
  "state_shardings",
  "stochastic_rounding",
]
