"""Pytree helpers shared by the modules: leaf paths, empty leaves, dtypes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_empty(x: Any) -> bool:
  """A leaf with no state: ``None`` or optax's ``MaskedNode``."""
  return x is None or isinstance(x, optax.MaskedNode)


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


def find(tree: Any, kind: Any) -> list[tuple[str, Any]]:
  """Every ``kind`` node anywhere in a (chained, injected, masked) state, with its path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, kind))
  return [(path_str(p), x) for p, x in flat if isinstance(x, kind)]


def per_leaf(spec: Any, params: Any, *, is_value: Callable[[Any], bool]) -> list[Any]:
  """``spec`` given for the whole tree, as a prefix of it, or as ``fn(path, leaf)``: one value per leaf of ``params``.

  A value (``is_value``) applies to every leaf; a tree whose structure is a
  prefix of the params' (as ``optax.masked``'s mask) gives each of its
  values to the leaves below it; a callable is called with each leaf's path
  string (as in the error messages, e.g. ``"['enc']['w']"``) and the leaf.
  """
  flat, treedef = leaves_with_paths(params)
  if is_value(spec):
    return [spec] * len(flat)
  if callable(spec):
    return [spec(path, p) for path, p in flat]
  full = jax.tree.map(
    lambda v, sub: jax.tree.map(lambda _: v, sub, is_leaf=is_empty),
    spec,
    params,
    is_leaf=lambda x: is_value(x) or is_empty(x),
  )
  return treedef.flatten_up_to(full)
