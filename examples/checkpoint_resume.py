"""Checkpoint COLLAGE training with orbax, resume it exactly, on any mesh.

Separate processes, in this order (each sets 8 simulated CPU devices unless
``XLA_FLAGS`` already names a device count)::

  python examples/checkpoint_resume.py train  --dir /tmp/ckpt
  python examples/checkpoint_resume.py resume --dir /tmp/ckpt --mesh 4x2
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python examples/checkpoint_resume.py resume --dir /tmp/ckpt --mesh 2

``train`` (FSDP over 8 devices):

* trains a bf16 MLP with plain ``optax.adamw`` for a few steps and saves its
  params alone: a plain bf16 model, no low components (``bf16_model/``);
* for each ``--mode`` (``MODES``: ``"plus"``, bf16 params + bf16 residuals and
  an MCF ``v``; ``"compact"``, bf16 + int8 residuals and ``q8`` moments, each a
  ``formats.Q8(codes, scales)`` pair of arrays), trains with
  ``collage_optax.adamw`` for ``STEPS`` steps and saves params and the whole
  optimizer state after ``SAVE_AT`` steps (``<mode>/collage/``);
* exports the final fp32 model (``hi + lo`` decoded) with ``master_params``
  (``<mode>/fp32_model/``).

``resume`` (a fresh process, on each ``--mesh``: ``8``, ``4x2`` = data x fsdp,
``2``, ...) restores each mode's step-``SAVE_AT`` checkpoint onto that mesh
and trains the remaining steps; and starts COLLAGE from the plain bf16 model
(``lo = 0``). Both also write their arrays as ``.npz`` next to the
checkpoints, for the tests to compare.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import collage_optax  # noqa: E402
import mlp  # noqa: E402  (examples/mlp.py)

STEPS, SAVE_AT, BF16_STEPS = 10, 5, 3
LR = 1e-2
MODES = ("plus", "compact")


def make_mesh(shape: str):
  """``"8"`` -> 8-way FSDP; ``"4x2"`` -> 4-way data x 2-way FSDP."""
  dims = tuple(int(d) for d in shape.split("x"))
  return mlp.host_mesh(dims, ("fsdp",) if len(dims) == 1 else ("data", "fsdp"))


def on_mesh(mesh, params, batch):
  """Params FSDP-sharded over ``fsdp``; the batch over every mesh axis."""
  params = mlp.place(mesh, params, mlp.param_specs("fsdp"))
  spec = P(mesh.axis_names)
  return params, mlp.place(mesh, batch, (spec, spec))


def abstract_params(mesh) -> Any:
  """The params as ``ShapeDtypeStruct``s with this mesh's shardings: a restore target."""
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), mlp.param_specs("fsdp"),
                           is_leaf=lambda s: isinstance(s, P))
  return jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                      mlp.init_params(), shardings)


def stepper(tx, mesh):
  """The jitted FSDP step: weights all-gathered for compute, state sharded."""
  return mlp.make_step(tx, NamedSharding(mesh, P()))


def run(step, params, state, batch, steps):
  for _ in range(steps):
    params, state = step(params, state, *batch)
  return params, state


def to_numpy(tree: Any) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(p): {"spec": str(x.sharding.spec), "shape": list(x.shape),
                                    "shard_shape": list(x.sharding.shard_shape(x.shape)), "dtype": str(x.dtype)}
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def train(d: Path, modes: tuple[str, ...] = MODES) -> None:
  mesh = make_mesh("8")
  params, batch = on_mesh(mesh, mlp.init_params(), mlp.batch())

  # A plain bf16 model: optax.adamw on bf16 params, params checkpointed alone.
  plain = optax.adamw(LR)
  bf16_params, _ = run(stepper(plain, mesh), params, plain.init(params), batch, BF16_STEPS)
  checkpointer = ocp.StandardCheckpointer()  # async: keep it, and wait at the end
  checkpointer.save(d / "bf16_model", bf16_params)
  np.savez(d / "bf16_model.npz", **to_numpy(bf16_params))
  for mode in modes:
    (d / mode).mkdir(exist_ok=True)
    train_collage(d / mode, mode, mesh, params, bf16_params, batch, checkpointer)
  checkpointer.wait_until_finished()
  checkpointer.close()
  print(f"trained {STEPS} steps of {', '.join(modes)} on {mesh.shape}; checkpoints in {d}")


def train_collage(d: Path, mode: str, mesh, params, bf16_params, batch, checkpointer) -> None:
  """One mode: checkpoint at ``SAVE_AT``, train on to ``STEPS``, export the fp32 model."""
  # COLLAGE, checkpointed mid-training with orbax's CheckpointManager.
  tx = collage_optax.adamw(LR, mode=mode)
  step = stepper(tx, mesh)
  manager = ocp.CheckpointManager(d / "collage")
  params, state = run(step, params, tx.init(params), batch, SAVE_AT)
  manager.save(SAVE_AT, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
  np.savez(d / "saved.npz", **to_numpy({"params": params, "opt_state": state}))
  params, state = run(step, params, state, batch, STEPS - SAVE_AT)
  manager.wait_until_finished()
  manager.close()
  np.savez(d / "uninterrupted.npz", **to_numpy((params, state)))

  # Export the fp32 model hi + lo: still sharded, saved like any pytree. (Jitted: one
  # compiled decode, where an eager call dispatches its elementwise ops one by one.)
  checkpointer.save(d / "fp32_model", jax.jit(collage_optax.master_params)(params, state))

  # The reference for starting COLLAGE from the bf16 model: the same, in memory.
  state = tx.init(bf16_params)
  np.savez(d / "from_bf16_reference.npz",
           **to_numpy(run(step, bf16_params, state, batch, STEPS - SAVE_AT)))


def resume(d: Path, shape: str, mode: str) -> dict[str, Any]:
  """Restores ``d / mode``'s checkpoint onto the mesh ``shape``; trains on; the shardings it got."""
  mesh = make_mesh(shape)
  tx = collage_optax.adamw(LR, mode=mode)
  step = stepper(tx, mesh)
  target_params = abstract_params(mesh)
  _, batch = on_mesh(mesh, mlp.init_params(), mlp.batch())
  out = d / mode

  # Resume mid-training: the restore target carries the new mesh's shardings.
  manager = ocp.CheckpointManager(out / "collage")
  target = {"params": target_params, "opt_state": collage_optax.abstract_state(tx, target_params)}
  restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
  np.savez(out / f"restored_{shape}.npz", **to_numpy(restored))
  final = run(step, restored["params"], restored["opt_state"], batch, STEPS - manager.latest_step())
  np.savez(out / f"resumed_{shape}.npz", **to_numpy(final))

  # Start COLLAGE from a plain bf16 model: restore the params, tx.init gives lo = 0.
  manager.close()
  checkpointer = ocp.StandardCheckpointer()
  bf16_params = checkpointer.restore(d / "bf16_model", target_params)
  state = collage_optax.sharded_init(tx, bf16_params)
  np.savez(out / f"from_bf16_init_{shape}.npz", **to_numpy((bf16_params, state)))
  np.savez(out / f"from_bf16_{shape}.npz", **to_numpy(run(step, bf16_params, state, batch, STEPS - SAVE_AT)))

  # The exported fp32 model, onto this mesh.
  fp32_target = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, np.float32, sharding=p.sharding),
                             target_params)
  np.savez(out / f"fp32_model_{shape}.npz",
           **to_numpy(checkpointer.restore(out / "fp32_model", fp32_target)))
  checkpointer.close()
  print(f"{mode}: resumed at step {manager.latest_step()} on mesh {dict(mesh.shape)}")
  return {"params": describe(target_params), "restored": describe(restored),
          "from_bf16_init": describe(state)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=["train", "resume"])
  parser.add_argument("--dir", type=Path, required=True, help="checkpoint directory")
  parser.add_argument("--mesh", action="append", default=None,
                      help="resume onto this mesh: 8, 4x2 (data x fsdp), 2, ... (repeatable)")
  parser.add_argument("--mode", action="append", default=None, choices=collage_optax.MODES,
                      help=f"collage_optax.adamw's mode (repeatable; default: {', '.join(MODES)})")
  args = parser.parse_args()
  d = args.dir.resolve()
  modes = tuple(args.mode or MODES)
  if args.command == "train":
    d.mkdir(parents=True, exist_ok=True)
    train(d, modes)
  else:
    for mode in modes:
      for shape in args.mesh or ["8"]:
        (d / mode / f"shardings_{shape}.json").write_text(json.dumps(resume(d, shape, mode), indent=1))


if __name__ == "__main__":
  main()
