"""Input checks of the transformations: clear errors that name the leaf and the fix.

Each check is done once, where the input arrives: the leaves (dtype, kind),
the trees (structure, shapes), the hyperparameters, and the state, compared
as a whole with what ``init`` makes for the same params (``jax.eval_shape``,
no memory). Nothing here computes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from collage_optax import _tree, formats

__all__ = [
  "check_float_updates",
  "check_hyperparam",
  "check_shapes",
  "check_state",
  "check_state_type",
  "check_structure",
  "leaf_kind",
  "moment_format",
  "require_params",
]

_SAME_TREE_FIX = "Pass the same tree for both, e.g. the grads of the params the optimizer was initialised with."
_INIT_FIX = "The state was made for other params: call tx.init(params) with the params you train."


# ---------------------------------------------------------------------------
# Leaves.
# ---------------------------------------------------------------------------


def _check_supported_leaf(who: str, path: str, x: Any) -> None:
  """Rejects leaves COLLAGE cannot handle (complex, sub-16-bit floats)."""
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


def leaf_kind(who: str, path: str, p: Any) -> str:
  """``"low"`` (bfloat16/float16: COLLAGE), ``"native"`` (float32/float64), ``"frozen"`` (int, bool), ``"empty"``.

  Complex and 8-bit float leaves are refused with an error naming the leaf.
  """
  if _tree.is_empty(p) or not hasattr(p, "dtype"):
    return "empty"
  _check_supported_leaf(who, path, p)
  if _tree.is_low_precision(p):
    return "low"
  return "native" if _tree.is_float(p) else "frozen"


def check_float_updates(who: str, params: Any, updates: Any, *, what: str = "update") -> None:
  """Raises a TypeError naming the first float param whose update is not a real float (float0, int, complex)."""
  p_flat, treedef = _tree.leaves_with_paths(params)
  for (path, p), u in zip(p_flat, treedef.flatten_up_to(updates)):
    if _tree.is_empty(u) or not hasattr(u, "dtype"):
      continue
    if u.dtype == jax.dtypes.float0:
      raise TypeError(
        f"{who}: the {what} for leaf {path} is float0 (jax.grad(..., allow_int=True) "
        "of an integer leaf); optax cannot apply it either. Differentiate only "
        "the float params, or give that leaf a zero float gradient."
      )
    if _tree.is_float(p) and not _tree.is_float(u):
      raise TypeError(
        f"{who}: the {what} for leaf {path} has dtype {u.dtype}; it must be a real float "
        "like the param. Pass real float gradients (e.g. jax.grad of a real loss); optimise "
        "complex leaves with a plain optax optimizer."
      )


# ---------------------------------------------------------------------------
# Trees.
# ---------------------------------------------------------------------------


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
  if jax.tree.structure(ref, is_leaf=_tree.is_empty) == jax.tree.structure(other, is_leaf=_tree.is_empty):  # type: ignore[operator]
    return
  ref_paths = [p for p, _ in _tree.leaves_with_paths(ref)[0]]
  other_paths = [p for p, _ in _tree.leaves_with_paths(other)[0]]
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
  ref_flat, treedef = _tree.leaves_with_paths(ref)
  for (path, a), b in zip(ref_flat, treedef.flatten_up_to(other)):
    if _tree.is_empty(a) or _tree.is_empty(b) or not hasattr(a, "shape") or not hasattr(b, "shape"):
      continue
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
        f"{who}: leaf {path} has shape {jnp.shape(a)} in {ref_name} but "
        f"{jnp.shape(b)} in {other_name}. {_SAME_TREE_FIX}"
      )


# ---------------------------------------------------------------------------
# Arguments and hyperparameters.
# ---------------------------------------------------------------------------


def moment_format(who: str, name: Any, *, second: bool = False, path: str | None = None) -> formats.MomentFormat:
  """:func:`formats.moment_format`, its error (an unknown name; ``log16`` asked for a first moment) naming ``who``.

  And the leaf ``path`` where a per-leaf spec resolved it.
  """
  try:
    return formats.moment_format(name, second=second)
  except ValueError as e:
    where = f"leaf {path}: " if path is not None else ""
    raise ValueError(f"{who}: {where}{e}") from None


def require_params(who: str, params: Any) -> None:
  """Raises the one error for an ``update`` called without ``params``."""
  if params is None:
    raise ValueError(
      f"{who} needs `params`: call tx.update(grads, opt_state, params) with the current "
      "params (as for optax.adamw), so that their low components can be updated."
    )


def check_hyperparam(who: str, name: str, value: Any, *, upper: float | None = None) -> None:
  """Rejects negative or non-finite Python numbers and sub-float32 arrays.

  ``optax.inject_hyperparams`` casts hyperparameters to the params' widest
  dtype; with all-bfloat16 params ``b2=0.999`` arrives as ``1.0`` and Adam's
  bias correction ``1 − b2ᵗ`` is 0, so such arrays are refused.
  """
  dtype = getattr(value, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4:
    raise TypeError(
      f"{who}: {name} is a {jnp.dtype(dtype)} array; hyperparameters "
      "must be float32 (0.999 is 1.0 in bfloat16). Under optax.inject_hyperparams "
      "with bfloat16 params pass hyperparam_dtype=jnp.float32."
    )
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return  # arrays and schedules are checked by the user's own code.
  if not math.isfinite(value) or value < 0 or (upper is not None and value >= upper):
    bound = f"in [0, {upper})" if upper is not None else "finite and >= 0"
    raise ValueError(f"{who}: {name}={value!r} must be {bound}.")


# ---------------------------------------------------------------------------
# The state.
# ---------------------------------------------------------------------------


def check_state_type(who: str, state: Any, cls: type, example: str) -> None:
  """Raises a TypeError when ``state`` is not a ``cls`` (another optimizer's state, e.g. ``example``'s)."""
  if not isinstance(state, cls):
    raise TypeError(
      f"{who}: opt_state is a {type(state).__module__}.{type(state).__name__}, not collage_optax "
      f"{cls.__name__}: it is not the state of {who} but of another optimizer (e.g. {example}); "
      "call tx.init(params) with this optimizer for a new opt_state."
    )


def _layout(store: Any) -> Any:
  """A storage's arrays as ``(structure, [(dtype, shape)])``."""
  leaves, treedef = jax.tree.flatten(store)
  return treedef, [(jnp.dtype(x.dtype), tuple(jnp.shape(x))) for x in leaves]


def _describe(store: Any) -> str:
  """A storage (one array per param, :func:`formats.per_param`) for an error message: format name, dtype, shape."""
  if _tree.is_empty(store):
    return "nothing"
  arrays = "(" + " + ".join(f"{d}{list(sh)}" for d, sh in _layout(store)[1]) + ")"
  try:
    return f"a {formats.moment_format_of(store).name!r} moment {arrays}"
  except TypeError:  # a residual of an integer dtype
    return arrays


def check_state(who: str, params: Any, fields: dict[str, tuple[Any, Any]], *, fix: str = _INIT_FIX) -> None:
  """Compares per-param state trees with what ``init`` makes, naming the first leaf that differs.

  ``fields`` maps a name (``"moment"``, ``"residual"``) to ``(got, want)``:
  the state's tree and the one ``jax.eval_shape(init)`` gives for these
  params (``None`` for a leaf that keeps nothing).
  """
  p_flat, treedef = _tree.leaves_with_paths(params)
  for what, (got, want) in fields.items():
    got, want = formats.per_param(got), formats.per_param(want)
    check_structure(who, params, "params", got, "opt_state", fix=fix)
    for (path, _), g, w in zip(p_flat, treedef.flatten_up_to(got), treedef.flatten_up_to(want)):
      if _tree.is_empty(g) and _tree.is_empty(w):
        continue
      if _tree.is_empty(g) or _tree.is_empty(w) or _layout(g) != _layout(w):
        raise ValueError(
          f"{who}: the state's {what} for leaf {path} is {_describe(g)} but this optimizer "
          f"keeps {_describe(w)}. The state was made by another mode or format, or for other "
          "params: call tx.init(params) with this optimizer and the params you train."
        )
