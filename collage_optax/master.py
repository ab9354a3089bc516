"""Full-precision params in and out of a COLLAGE state: ``master_params`` and ``init_from_master``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from collage_optax import _tree, checks, formats
from collage_optax.alias import AdamWState
from collage_optax.transform import CompensateState, ScaleByAdamState

__all__ = ["init_from_master", "master_params"]

#: The states that keep the params' residuals in a field ``lo``.
_RESIDUAL_STATES = (CompensateState, AdamWState)


def _unbox(tree: Any) -> Any:
  """Flax ``nnx.Variable`` nodes (``nnx.state``, ``nnx.Optimizer``'s state) as their values."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda x: x.get_value() if is_var(x) else x, tree, is_leaf=is_var)


def master_params(params: Any, opt_state: Any, dtype=jnp.float32) -> Any:
  """The params at full precision: each param's format decoded (``hi + lo``) as ``dtype`` (float32).

  The residuals (``lo``) come from the :func:`~collage_optax.adamw` or
  :func:`~collage_optax.compensate` state(s) anywhere in ``opt_state``
  (several, e.g. from ``optax.multi_transform``, are merged).
  Float leaves without a low component are cast to ``dtype``; other leaves are
  returned unchanged. Works under ``jit``; sharded inputs give sharded outputs.
  Flax NNX works too: ``master_params(nnx.state(model, nnx.Param),
  optimizer.opt_state)`` returns an ``nnx.State`` of arrays.
  """
  states = _tree.find(opt_state, _RESIDUAL_STATES)
  if not states:
    raise ValueError(
      "master_params: no collage_optax.compensate state in opt_state. Build the "
      "optimizer with collage_optax.adamw(...) or optax.chain(..., collage_optax.compensate())."
    )
  params = _unbox(params)
  p_flat, treedef = _tree.leaves_with_paths(params)
  lo_flat = [None] * len(p_flat)
  for where, st in states:
    lo_tree = _unbox(st.lo)
    checks.check_structure("master_params", params, "params", lo_tree, f"the low components at {where}")
    for i, lo in enumerate(treedef.flatten_up_to(lo_tree)):
      if not _tree.is_empty(lo):
        lo_flat[i] = lo
  out = []
  for (path, p), lo in zip(p_flat, lo_flat):
    if lo is not None:
      if jnp.shape(lo) != jnp.shape(p):
        raise ValueError(f"master_params: leaf {path} has shape {jnp.shape(p)} but its low component {jnp.shape(lo)}.")
      fmt = formats.param_format_of(lo)
      # An MCF is hi + lo: summed in a wider dtype when one is asked for (float32 may round it).
      wide = jnp.finfo(dtype).bits > 32 and fmt is formats.MCF_RESIDUAL
      out.append(p.astype(dtype) + lo.astype(dtype) if wide else fmt.decode(p, lo).astype(dtype))
    elif _tree.is_float(p):
      out.append(p.astype(dtype))
    else:
      out.append(p)
  return treedef.unflatten(out)


def _narrowed(x: Any, dtype: Any) -> Any:
  """A float leaf wider than ``dtype`` rounded to it (nearest even); other leaves as they are."""
  if _tree.is_float(x) and jnp.finfo(x.dtype).bits > jnp.finfo(dtype).bits:
    return formats.narrow(jnp.asarray(x), dtype)
  return x


def _store(x: Any, p: Any, lo: Any) -> tuple[Any, Any]:
  """``(param, residual)`` holding the value ``x`` in the format of the residual ``lo`` (from ``p``'s rounding).

  The format's own encode, with a float32 update from ``p``: it always lands
  on the format's first component, so ``exact`` keeps ``x`` bit for bit.
  """
  fmt = formats.param_format_of(lo)
  x32 = jnp.asarray(x).astype(jnp.float32)
  u, lo_new = fmt.encode(x32, p, jnp.float32)
  return formats.narrow(formats.landed(p, u), p.dtype), lo_new


def _moments_of(opt_state: Any) -> Any:
  """The one ``optax.ScaleByAdamState`` (``optax.adam``/``adamw``'s moments) in ``opt_state``."""
  found = _tree.find(opt_state, optax.ScaleByAdamState)
  if len(found) != 1:
    raise ValueError(
      f"init_from_master: opt_state holds {len(found)} optax.ScaleByAdamState (the moments of optax.adam or "
      "optax.adamw); pass the state of one optax.adam/adamw, or opt_state=None to start the moments at zero."
    )
  return found[0][1]


def _encode_like(value: Any, storage: Any) -> Any:
  """A moment ``value`` (float32) encoded in the format of ``storage`` (the zeros ``init`` made)."""
  if _tree.is_empty(storage):
    return storage
  return formats.moment_format_of(storage).encode(jnp.asarray(value).astype(jnp.float32))


def init_from_master(
  tx: optax.GradientTransformation, master_params: Any, opt_state: Any = None, *, dtype=jnp.bfloat16
):
  """Params and a state of ``tx`` that hold full-precision ``master_params`` (and optax's moments).

  Every float leaf of ``master_params`` wider than ``dtype`` becomes a
  ``dtype`` param; where ``tx`` keeps a residual (:func:`~collage_optax.adamw`,
  :func:`~collage_optax.compensate`) the param is the format's first
  component and the residual holds the rest of the value, so that
  :func:`master_params` returns ``master_params`` again: bit for bit in the
  ``exact`` format, within the format's precision otherwise (``mcf``:
  ``2**-16`` relative for bfloat16; ``compact``: ``ulp/508``); but for a
  ``−0.0``, which lands on ``+0.0`` as under ``optax.apply_updates``, and
  float32 subnormals, which XLA flushes to zero on CPU and TPU. Given the
  ``opt_state`` of ``optax.adam``/``optax.adamw`` on the master params, the
  moments (and the step count) of every Adam state of ``tx`` are its ``mu``
  and ``nu`` stored in ``tx``'s formats; without it they start at zero.
  The way back is :func:`master_params`. Example::

    params, state = collage_optax.init_from_master(collage_optax.adamw(lr, mode="exact"), fp32_params, fp32_state)

  Args:
    tx: an optimizer of this library (or a chain holding one).
    master_params: the full-precision params (float32, say).
    opt_state: optionally, the state of ``optax.adam``/``optax.adamw`` for those params.
    dtype: the params' low-precision dtype.

  Returns:
    ``(params, opt_state)`` for ``tx``.
  """
  params = jax.tree.map(lambda x: _narrowed(x, dtype), master_params)
  state = tx.init(params)
  m_flat, treedef = _tree.leaves_with_paths(master_params)
  p_flat = treedef.flatten_up_to(params)
  stored: dict[int, tuple[Any, Any]] = {}
  for _, st in _tree.find(state, _RESIDUAL_STATES):
    for i, lo in enumerate(treedef.flatten_up_to(st.lo)):
      if not _tree.is_empty(lo):
        stored[i] = _store(m_flat[i][1], p_flat[i], lo)
  params = treedef.unflatten([stored[i][0] if i in stored else p for i, p in enumerate(p_flat)])
  moments = _moments_of(opt_state) if opt_state is not None else None

  def fill(node: Any) -> Any:
    if isinstance(node, (AdamWState, CompensateState)):
      lo = treedef.unflatten([stored[i][1] if i in stored else x for i, x in enumerate(treedef.flatten_up_to(node.lo))])
      node = node._replace(lo=lo)
    if moments is not None and isinstance(node, (AdamWState, ScaleByAdamState)):
      encoded = lambda given, ours: treedef.unflatten(
        [_encode_like(v, s) for v, s in zip(treedef.flatten_up_to(given), treedef.flatten_up_to(ours))]
      )
      node = node._replace(
        count=jnp.asarray(moments.count, jnp.int32), mu=encoded(moments.mu, node.mu), nu=encoded(moments.nu, node.nu)
      )
    return node

  is_node = lambda x: isinstance(x, (AdamWState, CompensateState, ScaleByAdamState))
  return params, jax.tree.map(fill, state, is_leaf=is_node)
