"""The compact step's Pallas kernel compiled deviceless for GPUs and TPUs: sweeps and bytes per param.

Per mode (``--modes``: ``compact`` = compact/q8/q8, ``lean`` = compact/bf16/log16,
``compact_log16`` = compact/q8/log16), four steps over one leaf, each ``(params, state, grads) -> (params, state)``
donated, compiled as ``benchmarks/accelerators.py`` compiles (its topologies,
``kernel_stats`` and ``cost_model_bytes``):

* ``jnp``: ``apply_updates(params, adamw(mode="compact").update(...))`` with the
  kernel turned off (``_pallas.ENABLED = False``): the jnp path;
* ``adamw``: the same as users get it, the kernel chosen per platform inside ``adamw``, then
  ``optax.apply_updates``;
* ``apply_gradients``: ``collage_optax.apply_gradients(tx, ...)``, where adamw's kernel writes the new param;
* ``pallas``: the kernel called directly (``collage_optax._pallas.compact_step``),
  then ``optax.apply_updates``;
* ``pallas_fused``: the kernel writes the new param itself (``emit_param``):
  what a step that owns the params (FlashOptim's ``step``) costs.

Run: ``python benchmarks/pallas_compact.py [--targets h200,v5e] [--shapes 4096x4096,16777216]
[--modes compact,lean]``. ``benchmarks/results/pallas_compact.json``: compact;
``benchmarks/results/pallas_lean.json``: lean and compact_log16 (``--targets h100,h200,v5e,v6e
--modes lean,compact_log16``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# As accelerators.py: compile-only, before jax starts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax
import jax.numpy as jnp
import optax

import collage_optax
from collage_optax import _pallas

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accelerators

LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 1e-4
BACKEND = {"cuda": "triton", "tpu": "mosaic"}


#: The modes measured: adamw's keyword arguments.
MODES: dict[str, dict[str, Any]] = {
  "compact": dict(mode="compact"),
  "lean": dict(mode="lean"),
  "compact_log16": dict(mode="compact", nu_format="log16"),
}


def _tx(mode: str = "compact"):
  return collage_optax.adamw(LR, B1, B2, EPS, 0.0, WD, **MODES[mode])


def step_fn(kind: str, backend: str, mode: str = "compact"):
  """The donated step of ``kind`` (``jnp``, ``adamw``, ``apply_gradients``, ``pallas``, ``pallas_fused``) on a leaf."""
  tx = _tx(mode)
  if kind == "apply_gradients":
    return lambda params, state, grads: collage_optax.apply_gradients(tx, grads, state, params)
  if kind in ("jnp", "adamw"):

    def step(params, state, grads):
      _pallas.ENABLED = kind == "adamw"
      try:
        u, state = tx.update(grads, state, params)
      finally:
        _pallas.ENABLED = True
      return optax.apply_updates(params, u), state

    return step

  def kernel_step(params, state, grads):
    count = optax.safe_increment(state.count)
    sc = _pallas.scalars(B1, B2, EPS, 0.0, count, LR, WD, False)
    p, g = params["w"], grads["w"]
    out, lo, mu, nu = _pallas.compact_step(
      p, g, state.lo["w"], state.mu["w"], state.nu["w"], sc, backend=backend, emit_param=kind == "pallas_fused"
    )
    new_p = out if kind == "pallas_fused" else optax.apply_updates(p, out)
    return {"w": new_p}, state._replace(count=count, mu={"w": mu}, nu={"w": nu}, lo={"w": lo})

  return kernel_step


def measure(kind: str, shape: tuple[int, ...], target: str, mode: str = "compact") -> dict:
  t = accelerators.TARGETS[target]
  params = {"w": jax.ShapeDtypeStruct(shape, jnp.bfloat16)}
  state = jax.eval_shape(_tx(mode).init, params)
  p, s = accelerators.on_chip(params, target), accelerators.on_chip(state, target)
  n = math.prod(shape)
  t0 = time.perf_counter()
  try:
    compiled = jax.jit(step_fn(kind, BACKEND[t.platform], mode), donate_argnums=(0, 1)).lower(p, s, p).compile()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"}
  stats = accelerators.kernel_stats(compiled, n)
  return {
    **stats,
    "cost_model_B": round(accelerators.cost_model_bytes(compiled) / n, 2),
    "ideal_B": round(accelerators.ideal_bytes(_tx(mode), params) / n, 2),
    "compile_s": round(time.perf_counter() - t0, 1),
  }


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--targets", default="h200,v5e")
  ap.add_argument("--shapes", default="4096x4096,16777216")
  ap.add_argument("--kinds", default="jnp,adamw,apply_gradients,pallas,pallas_fused")
  ap.add_argument("--modes", default="compact", help=f"comma-separated, of {', '.join(MODES)}")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  rows = {}
  for shape_text in args.shapes.split(","):
    shape = tuple(int(d) for d in shape_text.split("x"))
    for target in args.targets.split(","):
      for mode in args.modes.split(","):
        for kind in args.kinds.split(","):
          r = measure(kind, shape, target, mode)
          # compact's rows keep their old keys (benchmarks/results/pallas_compact.json).
          rows[f"{shape_text} {target} {kind}" + ("" if mode == "compact" else f" {mode}")] = r
          print(f"{shape_text:>12} {target:>5} {mode:>13} {kind:>13}: {json.dumps(r)}", flush=True)
  if args.out:
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
  return rows


if __name__ == "__main__":
  main()
