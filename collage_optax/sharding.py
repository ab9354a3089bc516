"""Optimizer state that follows the params' sharding (``jax.sharding``, GSPMD).

Every per-parameter array of a COLLAGE state (the residuals ``lo``, the
moments ``mu``/``nu`` in their storage formats, e.g. the packed uint32 of an
``mcf`` moment, a ``q8`` or ``log16`` moment's codes) is made with
``jnp.zeros_like(param, dtype)`` and updated elementwise (their
scales: along the last axis, sharded like the param where the mesh divides
them), so an eager ``tx.init`` and
every jitted step already give it its parameter's sharding. Only
``jax.jit(tx.init)`` needs help: its outputs are constants, and XLA is free to
replicate them (a full copy per device). :func:`state_shardings` derives the
state's shardings from the params' (``jax.eval_shape`` + tree matching), for
``out_shardings`` or for an orbax restore target; :func:`sharded_init` is the jitted
``tx.init`` that uses them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from collage_optax import _tree, formats

__all__ = ["abstract_state", "sharded_init", "state_shardings"]


def _mirrors(node: Any, params_def: Any, shapes: list[Any]) -> bool:
  """True if ``node`` is a per-parameter tree: the params' structure and shapes.

  ``None``/``MaskedNode`` leaves (no state for that param) match any param; a
  grouped (``q8``, ``log16``) moment matches by its codes.
  """
  node = formats.per_param(node)
  if jax.tree.structure(node, is_leaf=_tree.is_empty) != params_def:
    return False
  return all(
    _tree.is_empty(x) or (hasattr(x, "shape") and tuple(x.shape) == shape)
    for x, shape in zip(params_def.flatten_up_to(node), shapes)
  )


def _scales_sharding(s: Sharding, shape: tuple[int, ...], fallback: Any) -> Sharding:
  """The sharding of a grouped (``q8``, ``log16``) moment's scales (one per 32 along the last axis).

  For a param sharded by ``s``: the param's ``PartitionSpec``, with every axis the scales cannot be split
  evenly along replicated; a fully replicated ``s`` as it is.
  """
  if s.is_fully_replicated:
    return s
  if not isinstance(s, NamedSharding):
    return fallback()
  spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
  size = lambda axes: math.prod(s.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
  return NamedSharding(
    s.mesh, PartitionSpec(*(a if a is not None and n % size(a) == 0 else None for a, n in zip(spec, shape)))
  )


def _replicated(params: Any) -> Sharding:
  """A fully replicated sharding over the devices that hold the params."""
  shardings = [getattr(p, "sharding", None) for p in jax.tree.leaves(params)]
  for s in shardings:
    if isinstance(s, NamedSharding):
      return NamedSharding(s.mesh, PartitionSpec())
  for s in shardings:
    if s is not None and s.is_fully_replicated:
      return s
  raise ValueError(
    "state_shardings: no param carries a NamedSharding or a replicated sharding, "
    "so the sharding of the state's scalars (step counts) is unknown. Put the "
    "params on a mesh first (jax.device_put(params, NamedSharding(mesh, spec))) "
    "or pass replicated=NamedSharding(mesh, PartitionSpec())."
  )


def _param_sharding(path: str, p: Any) -> Sharding:
  sharding = getattr(p, "sharding", None)
  if sharding is None:
    raise ValueError(
      f"state_shardings: param {path} has no sharding ({type(p).__name__}). Pass "
      "jax.Arrays placed with jax.device_put, or jax.ShapeDtypeStruct(shape, "
      "dtype, sharding=...) for every leaf."
    )
  return sharding


def state_shardings(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  replicated: Sharding | None = None,
) -> Any:
  """The shardings of ``tx.init(params)``, derived from the params' shardings.

  The state's structure comes from ``jax.eval_shape(tx.init, params)`` (no
  memory is allocated). Every subtree of the state with the params' tree
  structure and leaf shapes — ``mu``, ``nu``, ``lo``, and
  the per-parameter trees of any other optax transformation — gets the params'
  shardings leaf by leaf (``None`` stays ``None``). Every other array (step
  counts, injected hyperparameters, metrics) gets ``replicated``: by default
  ``NamedSharding(mesh, PartitionSpec())`` on the params' mesh.

  Use it as ``out_shardings`` of a jitted ``tx.init`` (see :func:`sharded_init`) or of a
  jitted train step, or to build an orbax restore target (see
  :func:`abstract_state`).

  Args:
    tx: the optimizer.
    params: the params, as ``jax.Array`` or ``jax.ShapeDtypeStruct`` leaves with
      shardings.
    replicated: the sharding of state arrays that mirror no param.

  Returns:
    A tree of ``jax.sharding.Sharding`` with the structure of ``tx.init(params)``.
  """
  p_flat, params_def = _tree.leaves_with_paths(params)
  p_shardings = params_def.unflatten([None if _tree.is_empty(p) else _param_sharding(path, p) for path, p in p_flat])
  shapes = [None if _tree.is_empty(p) else tuple(p.shape) for _, p in p_flat]
  abstract = jax.eval_shape(tx.init, params)
  is_mirror = lambda x: _mirrors(x, params_def, shapes)
  default = replicated

  def replicated_default():
    nonlocal default
    if default is None:
      default = _replicated(params)
    return default

  def leaf_sharding(x, s):
    if isinstance(x, formats.GROUPED):
      return type(x)(s, _scales_sharding(s, tuple(x.scales.shape), replicated_default))
    return x if _tree.is_empty(x) else s  # empty leaves (None, MaskedNode) stay as they are

  def sharding_of(node):
    if is_mirror(node):
      is_leaf = lambda x: _tree.is_empty(x) or isinstance(x, formats.GROUPED)
      return jax.tree.map(leaf_sharding, node, p_shardings, is_leaf=is_leaf)
    return replicated_default()

  return jax.tree.map(sharding_of, abstract, is_leaf=is_mirror)


def abstract_state(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  replicated: Sharding | None = None,
) -> Any:
  """``tx.init(params)`` as ``jax.ShapeDtypeStruct`` leaves carrying :func:`state_shardings`.

  The target for restoring a checkpointed state onto any mesh, e.g.
  ``orbax.checkpoint.args.StandardRestore(abstract_state(tx, abstract_params))``.
  """
  shapes = jax.eval_shape(tx.init, params)
  shardings = state_shardings(tx, params, replicated=replicated)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def sharded_init(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  replicated: Sharding | None = None,
) -> Any:
  """``jax.jit(tx.init)(params)`` with every state array sharded like its param.

  A plain ``jax.jit(tx.init)`` may replicate the zero-initialised moments (with
  ``optax.adamw`` too): a full copy of every moment on every device. This one
  pins ``out_shardings`` to :func:`state_shardings`, so FSDP-sharded params get
  FSDP-sharded ``mu``, ``nu`` and ``lo``.
  """
  shardings = state_shardings(tx, params, replicated=replicated)
  return jax.jit(tx.init, out_shardings=shardings)(params)
