"""collage_optax: bfloat16 training without fp32 master weights (COLLAGE, ICML 2024).

Optax ``GradientTransformation``s over multi-component floats: parameters and
Adam's second moment are kept as unevaluated sums of two bfloat16 numbers and
updated with error-free arithmetic.
"""

from collage_optax import mcf
from collage_optax.alias import MODES, adamw
from collage_optax.mcf import MCF
from collage_optax.metrics import master_params, metrics
from collage_optax.sharding import abstract_state, sharded_init, state_shardings
from collage_optax.transform import (
    CompensateState,
    PrecisionMetrics,
    PrecisionState,
    ScaleByAdamState,
    compensate,
    measure_precision,
    scale_by_adam,
)

__version__ = "0.1.0"

__all__ = [
    "MCF",
    "MODES",
    "CompensateState",
    "PrecisionMetrics",
    "PrecisionState",
    "ScaleByAdamState",
    "abstract_state",
    "adamw",
    "compensate",
    "master_params",
    "mcf",
    "measure_precision",
    "metrics",
    "scale_by_adam",
    "sharded_init",
    "state_shardings",
]
