"""The params at full precision, out of a COLLAGE state: ``master_params``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from collage_optax import _tree, checks, formats
from collage_optax.alias import AdamWState
from collage_optax.transform import CompensateState

__all__ = ["master_params"]

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
