"""collage_optax: bfloat16 training without fp32 master weights (COLLAGE, ICML 2024).

Optax ``GradientTransformation``s over storage formats: parameters and Adam's
moments are float32 quantities stored in fewer bytes (a bfloat16 plus a
second component: the paper's multi-component floats), and each step is one
fused pass: decode, AdamW in float32, encode with explicit roundings.

Modules, bottom up: :mod:`~collage_optax.mcf` (the number type and its
error-free arithmetic), :mod:`~collage_optax.formats` (storage formats),
:mod:`~collage_optax.checks` (input checks), :mod:`~collage_optax.metrics`
(what precision costs), the Adam kernel (private), the transformations
(``compensate``, ``stochastic_rounding``, ``scale_by_adam``), ``adamw``,
``apply_gradients`` (update and apply in one step), ``master_params`` and
:mod:`~collage_optax.sharding`.
"""

from collage_optax import formats, mcf
from collage_optax.alias import MODES, PRESETS, AdamWState, adamw, precise_small_leaves
from collage_optax.apply import apply_gradients, chain
from collage_optax.master import init_from_master, master_params
from collage_optax.mcf import MCF
from collage_optax.precision import (
  LeafPrecision,
  PrecisionMetrics,
  PrecisionReport,
  PrecisionState,
  measure_precision,
  metrics,
  precision_report,
)
from collage_optax.sharding import abstract_state, sharded_init, state_shardings
from collage_optax.transform import (
  CompensateState,
  ScaleByAdamState,
  StochasticRoundingState,
  compensate,
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
  "LeafPrecision",
  "PrecisionMetrics",
  "PrecisionReport",
  "PrecisionState",
  "ScaleByAdamState",
  "StochasticRoundingState",
  "abstract_state",
  "adamw",
  "apply_gradients",
  "chain",
  "compensate",
  "formats",
  "init_from_master",
  "master_params",
  "mcf",
  "measure_precision",
  "metrics",
  "precise_small_leaves",
  "precision_report",
  "scale_by_adam",
  "sharded_init",
  "state_shardings",
  "stochastic_rounding",
]
