"""Resume an fp32 ``optax.adamw`` run in bfloat16 from its orbax checkpoint, with ``init_from_master``.

::

  python examples/resume_from_fp32.py --dir /tmp/fp32_run

1. trains the MLP of ``examples/mlp.py`` in float32 with ``optax.adamw`` for
   ``STEPS`` steps and saves params and optimizer state with orbax;
2. restores them in a fresh optimizer of this library
   (``collage_optax.adamw(mode=...)`` for each of ``MODES``), with
   ``collage_optax.init_from_master``: bf16 params whose residuals hold the
   rest of each float32 value, and the fp32 run's moments and step count in
   the mode's formats;
3. trains both on, the fp32 run and the resumed bf16 ones, for ``STEPS`` more
   steps on the same batches, and prints the losses.

Right after the import ``master_params`` gives back the checkpoint: bit for
bit in ``mode="exact"`` (printed as ``exact import: bit for bit``). The
losses are written to ``<dir>/losses.json`` for the tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import mlp  # examples/mlp.py
import numpy as np
import optax
import orbax.checkpoint as ocp

import collage_optax

STEPS, LR = 20, 1e-2
MODES = ("exact", "plus", "compact")


def as_float32(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def train(tx: optax.GradientTransformation, params: Any, state: Any, steps: int, first: int) -> tuple[Any, Any, float]:
  """``steps`` steps from batch ``first`` on; the loss after them."""
  step = mlp.make_step(tx)
  for t in range(first, first + steps):
    x, y = mlp.batch(seed=t)
    params, state = step(params, state, x, y)
  x, y = mlp.batch(seed=10_000)
  return params, state, float(mlp.loss_fn(params, x, y))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", type=Path, required=True)
  args = parser.parse_args()
  args.dir.mkdir(parents=True, exist_ok=True)

  # 1. The fp32 run, checkpointed with orbax.
  fp32 = optax.adamw(LR)
  params = as_float32(mlp.init_params())
  params, state, loss = train(fp32, params, fp32.init(params), STEPS, 0)
  ckpt = ocp.StandardCheckpointer()
  path = (args.dir / "fp32").resolve()
  ckpt.save(path, {"params": params, "opt_state": state}, force=True)
  ckpt.wait_until_finished()
  print(f"fp32 run, step {STEPS}: loss {loss:.6f}; saved to {path}")

  # 2. Restored, and imported into each mode.
  target = jax.eval_shape(lambda: {"params": params, "opt_state": state})
  restored = ckpt.restore(path, target)
  losses = {"fp32_at_save": loss}
  for mode in MODES:
    tx = collage_optax.adamw(LR, mode=mode)
    p, s = collage_optax.init_from_master(tx, restored["params"], restored["opt_state"])
    back = collage_optax.master_params(p, s)
    same = all(
      np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
      for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(restored["params"]))
    )
    if mode == "exact":
      print(f"exact import: {'bit for bit' if same else 'NOT bit for bit'}")
      losses["exact_import_bit_for_bit"] = same
    # 3. Both train on.
    _, _, losses[mode] = train(tx, p, s, STEPS, STEPS)
    print(f"{mode:8s} resumed in bf16, step {2 * STEPS}: loss {losses[mode]:.6f}")
  _, _, losses["fp32"] = train(fp32, restored["params"], restored["opt_state"], STEPS, STEPS)
  print(f"fp32     continued,        step {2 * STEPS}: loss {losses['fp32']:.6f}")
  (args.dir / "losses.json").write_text(json.dumps(losses, indent=1))


if __name__ == "__main__":
  jnp.zeros(())  # initialise the backend before orbax's threads
  main()
