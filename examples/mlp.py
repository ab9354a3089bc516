"""A tiny bfloat16 MLP, its shardings and a mesh-independent train step.

Shared by ``sharded_training.py`` and ``checkpoint_resume.py``. Shapes are
chosen so that every sharded dimension divides 8 and no two leaves share a
global shape (the tests search the compiled HLO for full-size arrays).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

IN, HIDDEN, OUT, BATCH, MICROBATCHES = 24, 64, 40, 64, 8


def init_params(seed: int = 0) -> dict[str, Any]:
  """bf16 weights, plus one float32 leaf (COLLAGE passes it through).

  Built with numpy and ``ml_dtypes`` on the host: nothing to compile.
  """
  rng = np.random.default_rng(seed)
  bf16 = lambda a: np.asarray(a, np.float32).astype(jnp.bfloat16)
  return {
      "dense1": {"kernel": bf16(rng.normal(size=(IN, HIDDEN)) / IN**0.5),
                 "bias": bf16(np.zeros(HIDDEN))},
      "dense2": {"kernel": bf16(rng.normal(size=(HIDDEN, OUT)) / HIDDEN**0.5),
                 "bias": bf16(np.zeros(OUT))},
      "temperature": np.ones((1,), np.float32),
  }


def batch(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Inputs (bf16) and targets (float32) of a random teacher."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, IN)).astype(np.float32)
  y = np.tanh(x @ rng.normal(size=(IN, OUT))).astype(np.float32)
  return x.astype(jnp.bfloat16), y


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
  p1, p2 = params["dense1"], params["dense2"]
  h = jax.nn.gelu(x @ p1["kernel"] + p1["bias"])
  out = (h @ p2["kernel"] + p2["bias"]) * params["temperature"].astype(jnp.bfloat16)
  return jnp.mean((out.astype(jnp.float32) - y) ** 2)


def grads_fixed_order(params: dict[str, Any], x: jax.Array, y: jax.Array) -> dict[str, Any]:
  """The batch-mean gradient, summed over microbatches in a fixed order.

  ``jax.grad`` of a batch mean over a batch-sharded input all-reduces partial
  sums in an order set by the mesh, so its float32 gradient differs in the
  last bit between 1 and 8 devices (for ``optax.adamw`` as much as for
  COLLAGE). Summing per-microbatch gradients one after the other makes the
  gradient, and so every step, independent of the device count.
  """
  xs = x.reshape(MICROBATCHES, -1, x.shape[-1])
  ys = y.reshape(MICROBATCHES, -1, y.shape[-1])
  g = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, xs, ys)
  total = lambda a: functools.reduce(jnp.add, [a[i].astype(jnp.float32) for i in range(MICROBATCHES)])
  return jax.tree.map(lambda a: (total(a) / MICROBATCHES).astype(a.dtype), g)


def make_step(tx: optax.GradientTransformation, compute_sharding=None, grads_fn=grads_fixed_order):
  """One jitted step ``(params, opt_state, x, y) -> (params, opt_state)``.

  With ``compute_sharding`` (FSDP: ``NamedSharding(mesh, P())``) the params are
  all-gathered for the forward and backward passes, as ZeRO-3/FSDP does; the
  gradients, the optimizer state and the update stay sharded like the params.
  """

  @jax.jit
  def step(params, opt_state, x, y):
    full = params if compute_sharding is None else jax.tree.map(
        lambda p: jax.lax.with_sharding_constraint(p, compute_sharding), params)
    grads = grads_fn(full, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def param_specs(layout: str, fsdp: str = "fsdp") -> dict[str, Any]:
  """``PartitionSpec``s: ``"dp"`` replicates every param; ``"fsdp"`` shards
  each weight along one axis (its larger one) over the mesh axis ``fsdp``."""
  if layout == "dp":
    return {"dense1": {"kernel": P(), "bias": P()}, "dense2": {"kernel": P(), "bias": P()},
            "temperature": P()}
  if layout == "fsdp":
    return {"dense1": {"kernel": P(None, fsdp), "bias": P(fsdp)},
            "dense2": {"kernel": P(fsdp, None), "bias": P(fsdp)},
            "temperature": P()}
  raise ValueError(f"unknown layout {layout!r}; use 'dp' or 'fsdp'.")


def place(mesh: Mesh, tree: Any, specs: Any) -> Any:
  """``jax.device_put`` every leaf with ``NamedSharding(mesh, spec)``."""
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda s: isinstance(s, P))
  return jax.device_put(tree, shardings)


def host_mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
  """A mesh over the first ``prod(shape)`` devices (``Auto`` axes, GSPMD)."""
  n = int(np.prod(shape))
  devices = jax.devices()
  if len(devices) < n:
    raise SystemExit(
        f"need {n} devices, have {len(devices)}: on CPU run with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
  return Mesh(np.array(devices[:n]).reshape(shape), names)
