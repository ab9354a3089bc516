"""The precision strategies, by name: what each stores and the optimizer that makes it.

One registry for ``collage-optax compare`` and for ``benchmarks/``. Every
strategy is AdamW (but ``lion_compensate``) with the same hyperparameters
(:class:`AdamW`); only what the optimizer stores differs:

* ``fp32``: ``optax.adamw`` on float32 params (the fp32-master recipe, D);
* ``bf16``: ``optax.adamw`` on bfloat16 params (naive, A);
* every mode of ``collage_optax.MODES`` (``light`` B, ``plus`` C, ``full`` C+,
  ``exact``, ``compact``): ``collage_optax.adamw(mode=...)``;
* ``exact_m``: ``mode="exact", mu_format="exact"`` (float32 moments over the
  exact master), and the probes ``compact_f32``, ``exact_q8``,
  ``exact_q8_nu`` (one part of a mode's formats swapped: where its error
  comes from);
* ``sr``: ``optax.adamw`` on bfloat16 params and moments, the update added
  with stochastic rounding (``collage_optax.stochastic_rounding``);
* ``lion_compensate``: ``optax.lion(1e-4)`` then ``collage_optax.compensate()``
  (a chain that is not AdamW; it takes none of :class:`AdamW`'s values).

And the memory they take: :func:`bytes_per_param`, counted from the arrays
(or their ``jax.eval_shape``), never assumed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import optax

import collage_optax

__all__ = [
  "COMPARE",
  "REGISTRY",
  "AdamW",
  "Strategy",
  "bytes_per_param",
  "collage",
  "get",
  "nbytes",
]


@dataclasses.dataclass(frozen=True)
class AdamW:
  """AdamW's hyperparameters, the same for every strategy of a run.

  ``mask``: the weight-decay mask (a pytree of bools or a callable, as in
  ``optax.adamw``). ``metrics``: record EDQ and lost fraction
  (``collage_optax.measure_precision`` after ``optax.adamw``,
  ``track_metrics=True`` for ``collage_optax.adamw``). ``seed``: stochastic
  rounding's random stream.
  """

  learning_rate: optax.ScalarOrSchedule = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-4
  mask: Any = None
  metrics: bool = False
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Strategy:
  """One strategy: ``label``, ``param_dtype`` (what its params are stored in) and ``optimizer(hp)``,
  its optimizer with hyperparameters ``hp``.

  ``collage``: the ``collage_optax.adamw`` keyword arguments of a COLLAGE
  strategy (``mode``, and the moment formats it overrides); empty for the others.
  """

  label: str
  param_dtype: Any
  optimizer: Callable[[AdamW], optax.GradientTransformation]
  collage: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))


def _optax_adamw(hp: AdamW) -> optax.GradientTransformation:
  """``optax.adamw`` with ``hp``; with ``hp.metrics``, ``measure_precision`` after it."""
  tx = optax.adamw(hp.learning_rate, hp.b1, hp.b2, hp.eps, weight_decay=hp.weight_decay, mask=hp.mask)
  return optax.chain(tx, collage_optax.measure_precision()) if hp.metrics else tx


def _sr(hp: AdamW) -> optax.GradientTransformation:
  """``optax.adamw`` with ``hp``, the update added by stochastic rounding (its landing is random: no metrics)."""
  tx = optax.adamw(hp.learning_rate, hp.b1, hp.b2, hp.eps, weight_decay=hp.weight_decay, mask=hp.mask)
  return optax.chain(tx, collage_optax.stochastic_rounding(hp.seed))


def _lion_compensate(hp: AdamW) -> optax.GradientTransformation:
  """``optax.lion(1e-4)`` (its own defaults otherwise) then ``compensate()``; ``hp`` is not used."""
  del hp
  return optax.chain(optax.lion(1e-4), collage_optax.compensate())


def collage(
  label: str,
  mode: str,
  mu_format: str | None = None,
  nu_format: str | None = None,
  small_leaves: str | None = None,
  min_size: int = 4096,
  param_format: str | None = None,
) -> Strategy:
  """The strategy ``collage_optax.adamw(mode=mode)`` on bfloat16 params, with the moment formats given.

  ``small_leaves``: the mode of the leaves under ``min_size`` elements or 1-D
  (``collage_optax.precise_small_leaves(mode, small_leaves, min_size=min_size)``).
  """
  per_leaf = collage_optax.precise_small_leaves(mode, small_leaves, min_size=min_size) if small_leaves else mode

  def make(hp: AdamW) -> optax.GradientTransformation:
    return collage_optax.adamw(
      hp.learning_rate,
      hp.b1,
      hp.b2,
      hp.eps,
      weight_decay=hp.weight_decay,
      mask=hp.mask,
      mode=per_leaf,
      param_format=param_format,
      mu_format=mu_format,
      nu_format=nu_format,
      track_metrics=hp.metrics,
    )

  kwargs: dict[str, Any] = {
    "mode": mode,
    "param_format": param_format,
    "mu_format": mu_format,
    "nu_format": nu_format,
    "small_leaves": small_leaves,
  }
  if small_leaves:
    kwargs["min_size"] = min_size
  return Strategy(label, jnp.bfloat16, make, MappingProxyType({k: v for k, v in kwargs.items() if v is not None}))


#: The letters of the README's table of strategies (A–D), for the modes that have one.
_LETTERS = {"light": "B", "plus": "C", "full": "C+"}


def _mode_label(mode: str) -> str:
  """``"C: collage adamw plus"``: a mode's label, with its letter if it has one."""
  letter = _LETTERS.get(mode)
  return f"{letter}: collage adamw {mode}" if letter else f"collage adamw {mode}"


#: Every strategy, by name, in a fixed order: optax's fp32 and bf16, every mode
#: of ``collage_optax.MODES`` in its order, the other COLLAGE formats, sr, Lion.
REGISTRY: Mapping[str, Strategy] = MappingProxyType(
  {
    "fp32": Strategy("D: optax.adamw, fp32 params", jnp.float32, _optax_adamw),
    "bf16": Strategy("A: optax.adamw, bf16 params", jnp.bfloat16, _optax_adamw),
    **{mode: collage(_mode_label(mode), mode=mode) for mode in collage_optax.MODES},
    "exact_m": collage("collage adamw exact, float32 m", mode="exact", mu_format="exact"),
    # Per-leaf formats: leaves under 4096 elements or 1-D in exact; 1-D leaves only (biases, norm gains).
    "compact_small_exact": collage("collage adamw compact, small leaves exact", mode="compact", small_leaves="exact"),
    "compact_1d_exact": collage(
      "collage adamw compact, 1-D leaves exact", mode="compact", small_leaves="exact", min_size=1
    ),
    # Probes: compact's param format alone, compact's moments alone, its second moment alone.
    "compact_f32": collage("collage adamw compact, float32 moments", mode="compact", mu_format="f32", nu_format="f32"),
    "exact_q8": collage("collage adamw exact, q8 moments", mode="exact", mu_format="q8", nu_format="q8"),
    "exact_q8_nu": collage("collage adamw exact, q8 v", mode="exact", mu_format="f32", nu_format="q8"),
    "sr": Strategy("optax.adamw, bf16 params, stochastic rounding", jnp.bfloat16, _sr),
    "lion_compensate": Strategy("optax.lion + compensate, bf16", jnp.bfloat16, _lion_compensate),
  }
)


def get(name: str) -> Strategy:
  """The strategy ``name`` of :data:`REGISTRY`; a ``ValueError`` naming the known ones if there is none."""
  if name not in REGISTRY:
    raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(REGISTRY)}.")
  return REGISTRY[name]


#: What ``collage-optax compare`` trains: optax's fp32 and bf16, every mode, and sr.
COMPARE: tuple[str, ...] = ("fp32", "bf16", *collage_optax.MODES, "sr")


def nbytes(tree: Any, *, scalars: bool = True) -> int:
  """Bytes of the array leaves of a pytree (concrete or ``ShapeDtypeStruct``); without the 0-d ones
  when ``scalars`` is false (a step count is not per parameter)."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in leaves if scalars or x.ndim > 0)


def bytes_per_param(params: Any, state: Any, grads: Any = None, *, scalars: bool = True) -> dict[str, Any]:
  """Bytes per parameter of the arrays: params, optimizer state, their sum, the gradients, all together.

  ``grads`` defaults to ``params`` (gradients have the params' dtypes);
  ``scalars=False`` leaves out the state's 0-d leaves (its per-parameter cost
  on any model size). Concrete arrays or ``jax.eval_shape`` results alike.
  """
  n = sum(int(x.size) for x in jax.tree.leaves(params))
  p, s = nbytes(params) / n, nbytes(state, scalars=scalars) / n
  g = nbytes(params if grads is None else grads) / n
  return {
    "n_params": n,
    "params": p,
    "optimizer_state": s,
    "params_plus_state": p + s,
    "gradients": g,
    "total_with_gradients": p + s + g,
  }
