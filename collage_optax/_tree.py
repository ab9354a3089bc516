"""Pytree helpers shared by the transforms: leaf paths, checks, dtypes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_empty(x: Any) -> bool:
  """A leaf with no state: ``None`` or optax's ``MaskedNode``."""
  return x is None or isinstance(x, optax.MaskedNode)


def per_param(tree: Any) -> Any:
  """A state tree with each per-param storage node (a ``q8`` moment's codes and scales) as one leaf.

  So that it has the params' tree structure for :func:`check_structure`.
  """
  from collage_optax.formats import Q8  # pylint: disable=g-import-not-at-top

  return jax.tree.map(
    lambda x: x.codes if isinstance(x, Q8) else x, tree, is_leaf=lambda x: isinstance(x, Q8) or is_empty(x)
  )


def lift_storage(tree: Any) -> Any:
  """A state tree with each flax ``nnx.Variable`` holding a ``q8`` moment split into two, under the ``Q8``.

  ``tx.init(nnx.state(model, nnx.Param))`` mirrors the params' Variables;
  a Variable's value must be an array (``nnx.Optimizer`` writes each step's
  state back into it with ``nnx.update``, which would turn a pytree value
  into an ``nnx.State``), so a ``Q8(codes, scales)`` value becomes
  ``Q8(Variable(codes), Variable(scales))``.
  """
  if "flax" not in sys.modules:
    return tree
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from collage_optax.formats import Q8  # pylint: disable=g-import-not-at-top

  def lift(x):
    if isinstance(x, nnx.Variable) and isinstance(x.get_value(), Q8):
      q = x.get_value()
      return Q8(x.replace(q.codes), x.replace(q.scales))
    return x

  return jax.tree.map(lift, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def path_str(path) -> str:
  s = jax.tree_util.keystr(path)
  return s if s else "<root>"


def leaves_with_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  """``[(path, leaf)]`` and the treedef, with ``None``/``MaskedNode`` kept as leaves."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_empty)
  return [(path_str(p), x) for p, x in flat], treedef


def is_low_precision(x: Any) -> bool:
  """True for bfloat16 and float16 arrays: the leaves COLLAGE compensates."""
  return hasattr(x, "dtype") and jnp.dtype(x.dtype) in _LOW


def is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def check_supported_leaf(who: str, path: str, x: Any) -> None:
  """Rejects leaves COLLAGE cannot handle (complex, sub-16-bit floats)."""
  if not hasattr(x, "dtype"):
    return
  dtype = jnp.dtype(x.dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
      f"{who}: leaf {path} is complex ({dtype}); COLLAGE supports real float "
      "params. Optimise complex leaves with a plain optax optimizer, e.g. "
      "optax.multi_transform({'collage': ..., 'complex': optax.adamw(...)}, labels)."
    )
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 2:
    raise TypeError(
      f"{who}: leaf {path} is {dtype}; COLLAGE keeps bfloat16/float16 params "
      "as multi-component floats. Cast 8-bit params to bfloat16 first."
    )


_SAME_TREE_FIX = "Pass the same tree for both, e.g. the grads of the params the optimizer was initialised with."


def check_structure(
  who: str,
  ref: Any,
  ref_name: str,
  other: Any,
  other_name: str,
  fix: str = _SAME_TREE_FIX,
) -> None:
  """Raises a ValueError naming the first leaf path where two trees differ; ``fix`` says what to do."""
  # jaxlib ships no stubs for PyTreeDef (mypy sees an unresolved type), so its __eq__ is unknown to mypy.
  if jax.tree.structure(ref, is_leaf=is_empty) == jax.tree.structure(other, is_leaf=is_empty):  # type: ignore[operator]
    return
  ref_paths = [p for p, _ in leaves_with_paths(ref)[0]]
  other_paths = [p for p, _ in leaves_with_paths(other)[0]]
  missing = [p for p in ref_paths if p not in set(other_paths)]
  extra = [p for p in other_paths if p not in set(ref_paths)]
  detail = []
  if missing:
    detail.append(f"{other_name} lacks leaf {missing[0]}")
  if extra:
    detail.append(f"{other_name} has extra leaf {extra[0]}")
  if not detail:
    detail.append(f"{ref_name} is {jax.tree.structure(ref)} but {other_name} is {jax.tree.structure(other)}")
  raise ValueError(f"{who}: {other_name} and {ref_name} have different tree structures ({'; '.join(detail)}). {fix}")


def check_shapes(who: str, ref: Any, ref_name: str, other: Any, other_name: str) -> None:
  """Raises a ValueError naming the first leaf path where two same-structure trees differ in shape."""
  ref_flat, treedef = leaves_with_paths(ref)
  for (path, a), b in zip(ref_flat, treedef.flatten_up_to(other)):
    if is_empty(a) or is_empty(b) or not hasattr(a, "shape") or not hasattr(b, "shape"):
      continue
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
        f"{who}: leaf {path} has shape {jnp.shape(a)} in {ref_name} but "
        f"{jnp.shape(b)} in {other_name}. {_SAME_TREE_FIX}"
      )


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``jax.tree.map`` with the leaf path string as first argument; ``None``/``MaskedNode`` are leaves."""
  flat, treedef = leaves_with_paths(tree)
  rest_flat = [treedef.flatten_up_to(r) for r in rest]
  out = [fn(p, x, *[r[i] for r in rest_flat]) for i, (p, x) in enumerate(flat)]
  return treedef.unflatten(out)


def top_level_groups(tree: Any) -> dict[str, list[int]]:
  """Indices of the leaves under each top-level key (empty for a bare array).

  A key whose leaves are all ``None``/``MaskedNode`` (a subtree that
  ``optax.masked``/``multi_transform`` hands to another transformation) is
  left out, so that metrics do not report a perfect EDQ for updates never seen.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_empty)
  groups: dict[str, list[int]] = {}
  seen: set[str] = set()
  for i, (path, leaf) in enumerate(flat):
    if not path:
      return {}
    key = path_str(path[:1]).strip("[]'.\"")
    groups.setdefault(key, []).append(i)
    if not is_empty(leaf):
      seen.add(key)
  return {k: idx for k, idx in groups.items() if k in seen}
