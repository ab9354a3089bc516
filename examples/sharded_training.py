"""COLLAGE on a device mesh: data parallel and FSDP, with the state sharded like the params.

Run on CPU with 8 simulated devices (the script sets the flag itself if jax has
not started yet)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_training.py

It puts a bf16 MLP on an 8-device mesh, replicated (data parallel, batch
sharded) or sharded along one axis (FSDP), and shows:

* where every array of the optimizer state lives, from an eager ``tx.init``, a
  plain ``jax.jit(tx.init)``, ``collage_optax.sharded_init`` and after every
  jitted step;
* the collectives (all-gather, all-reduce, ...) in the compiled update and
  train step, next to ``optax.adamw``'s (mode ``"compact"``'s 8-bit moments
  take one scale per 32 elements along the last axis: where a shard of that
  axis is not a whole number of groups, as here, the group maxima cross shards;
  params whose shards hold whole groups need none);
* that ten steps on the mesh end bitwise where ten steps on one device end.

``--out DIR`` writes what the tests check: ``results.json`` (shardings,
collective counts, seconds), the final params and state of every run
(``*.npz``) and the compiled HLO texts (``hlo/``).
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import collage_optax  # noqa: E402
import mlp  # noqa: E402  (examples/mlp.py)

STEPS = 10
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "reduce-scatter", "all-to-all")
# (layout, optimizer) pairs trained on the mesh. The COLLAGE runs are compared
# with the same steps on one device ("full" keeps every MCF component there
# is, "exact" an int16 residual, "compact" an int8 one and q8 moments);
# optax.adamw is the baseline for shardings and collectives.
RUNS = (("dp", "collage full"), ("fsdp", "collage full"), ("fsdp", "collage plus"),
        ("fsdp", "collage compact"), ("fsdp", "collage exact"),
        ("dp", "optax.adamw"), ("fsdp", "optax.adamw"))
REFERENCES = ("collage full", "collage plus", "collage compact", "collage exact")
# Params whose FSDP shards (of the last axis, or of another one) hold whole
# groups of 32: a q8 moment's scales split like them (see ``q8_collectives``).
ALIGNED = {"kernel": ((8, 256), P(None, "fsdp")), "bias": ((256,), P("fsdp")), "rows": ((64, 40), P("fsdp", None))}


def optimizer(name: str) -> optax.GradientTransformation:
  if name == "optax.adamw":
    return optax.adamw(1e-2)
  return collage_optax.adamw(1e-2, mode=name.split()[-1])


def describe(tree: Any) -> dict[str, dict[str, Any]]:
  """Leaf path -> dtype, shape, PartitionSpec, per-device shard shape, #devices."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    s = x.sharding
    out[jax.tree_util.keystr(path)] = {
        "dtype": str(x.dtype),
        "shape": list(x.shape),
        "spec": str(getattr(s, "spec", None)),
        "shard_shape": list(s.shard_shape(x.shape)),
        "devices": len(s.device_set),
    }
  return out


def to_numpy(tree: Any) -> dict[str, np.ndarray]:
  """Leaf path -> host array (gathered from all shards)."""
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def count_collectives(hlo: str) -> dict[str, int]:
  return {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}


def setup(mesh, layout: str):
  """Params placed by ``layout``; the batch sharded over the mesh (both layouts)."""
  params = mlp.place(mesh, mlp.init_params(), mlp.param_specs(layout, fsdp=mesh.axis_names[-1]))
  spec = P(mesh.axis_names[0])
  return params, mlp.place(mesh, mlp.batch(), (spec, spec))


def train(tx, params, batch, compute_sharding=None, record=None):
  """``STEPS`` steps from ``tx.init(params)`` with one compiled step; returns its HLO too."""
  state = tx.init(params)
  step = mlp.make_step(tx, compute_sharding).lower(params, state, *batch).compile()
  for i in range(STEPS):
    params, state = step(params, state, *batch)
    if record is not None:
      record[f"step {i + 1}"] = describe(state)
  return (params, state), step.as_text()


def mesh_run(mesh, layout: str, name: str, out: Path | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
  """Init the state every way, train on the mesh; shardings and collectives."""
  params, batch = setup(mesh, layout)
  tx = optimizer(name)
  rec = {"params": describe(params), "eager init": describe(tx.init(params)),
         "jit(tx.init)": describe(jax.jit(tx.init)(params)),
         "sharded_init": describe(collage_optax.sharded_init(tx, params))}
  gather = NamedSharding(mesh, P()) if layout == "fsdp" else None
  final, step_hlo = train(tx, params, batch, gather, record=rec)
  state = collage_optax.sharded_init(tx, params)
  update_hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  if name != "optax.adamw":
    rec["master_params"] = describe(collage_optax.master_params(*final))
    rec["jit(master_params)"] = describe(jax.jit(collage_optax.master_params)(*final))
  arrays = to_numpy(final)
  if out is not None:
    tag = f"{layout}_{name.replace(' ', '-')}"
    np.savez(out / f"{tag}_mesh.npz", **arrays)
    (out / "hlo" / f"{tag}_step.txt").write_text(step_hlo)
    (out / "hlo" / f"{tag}_update.txt").write_text(update_hlo)
  return rec, {"update": count_collectives(update_hlo), "step": count_collectives(step_hlo)}, arrays


def single_device_run(name: str, out: Path | None) -> dict[str, np.ndarray]:
  """The reference: the same steps on one device."""
  device = jax.devices()[0]
  params = jax.device_put(mlp.init_params(), device)
  final, _ = train(optimizer(name), params, jax.device_put(mlp.batch(), device))
  arrays = to_numpy(final)
  if out is not None:
    np.savez(out / f"single_{name.replace(' ', '-')}.npz", **arrays)
  return arrays


def bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
  return a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def explicit_mesh_run() -> dict[str, Any]:
  """The state with ``Explicit`` mesh axes (``jax.make_mesh``'s default), under ``jax.set_mesh``.

  (A model needs ``out_sharding`` annotations on explicit axes; the optimizer
  needs nothing, so this drives ``tx.update`` with fixed sharded gradients.)
  """
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = mlp.place(mesh, mlp.init_params(), mlp.param_specs("fsdp"))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    tx = collage_optax.adamw(1e-2, mode="full")
    rec = {"params": describe(params), "eager init": describe(tx.init(params)),
           "jit(tx.init)": describe(jax.jit(tx.init)(params)),
           "sharded_init": describe(collage_optax.sharded_init(tx, params))}
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for i in range(3):
      params, state = step(params, state)
      rec[f"step {i + 1}"] = describe(state)
  return rec


def metrics_collectives(mesh, out: Path | None) -> dict[str, dict[str, int]]:
  """Collectives of the FSDP update when it also measures EDQ and lost fraction."""
  params, _ = setup(mesh, "fsdp")
  txs = {"collage plus+track_metrics": collage_optax.adamw(1e-2, track_metrics=True),
         "optax.adamw+measure_precision": optax.chain(optax.adamw(1e-2), collage_optax.measure_precision())}
  counts = {}
  for name, tx in txs.items():
    state = collage_optax.sharded_init(tx, params)
    hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    counts[f"fsdp/{name}"] = {"update": count_collectives(hlo)}
    if out is not None:
      (out / "hlo" / f"fsdp_{name.replace(' ', '-')}_update.txt").write_text(hlo)
  return counts


def q8_collectives(mesh, out: Path | None) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
  """Mode "compact"'s FSDP update on params whose shards hold whole groups of 32 (``ALIGNED``).

  mlp.py's ``dense1`` kernel and bias put 8 elements of the last axis on each
  device, ``dense2``'s bias 5: a group of 32 spans devices, and its scale (the
  group's largest magnitude) needs their values. Here every shard holds whole
  groups, so the scales shard like the param and the update stays local.
  """
  params = {k: jax.device_put(jnp.ones(shape, jnp.bfloat16), NamedSharding(mesh, spec))
            for k, (shape, spec) in ALIGNED.items()}
  tx = collage_optax.adamw(1e-2, mode="compact")
  state = collage_optax.sharded_init(tx, params)
  hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  if out is not None:
    (out / "hlo" / "fsdp-aligned_collage-compact_update.txt").write_text(hlo)
  rec = {"params": describe(params), "sharded_init": describe(state)}
  return {"fsdp-aligned/collage compact": rec}, {"fsdp-aligned/collage compact": {"update": count_collectives(hlo)}}


def composite_run(mesh) -> dict[str, Any]:
  """``sharded_init`` of COLLAGE inside other optax wrappers, FSDP params."""
  params, _ = setup(mesh, "fsdp")
  wrapped = {
      "inject_hyperparams": optax.inject_hyperparams(collage_optax.adamw)(learning_rate=1e-2),
      "MultiSteps": optax.MultiSteps(collage_optax.adamw(1e-2), every_k_schedule=2),
      "chain(clip, lion, compensate)": optax.chain(
          optax.clip_by_global_norm(1.0), optax.lion(1e-3), collage_optax.compensate()),
  }
  return {f"fsdp/{name}": {"params": describe(params),
                           "sharded_init": describe(collage_optax.sharded_init(tx, params))}
          for name, tx in wrapped.items()}


def print_table(rec: dict[str, Any], title: str) -> None:
  """One line per param: its sharding, then every state array of that param."""
  print(f"\n{title}")
  for ppath, p in rec["params"].items():
    state = []
    for s, d in rec[f"step {STEPS}"].items():
      base, part = re.fullmatch(r"(.*?)((?:\.codes|\.scales)?)", s).groups()  # a q8 moment's two arrays
      if base.endswith(ppath):
        state.append(f"{base.split('.')[-1].split('[')[0]}{part}={d['spec']}")
    print(f"  {ppath:22s} {p['dtype']:8s} {p['spec']:16s} state: {', '.join(state)}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=None, help="write results for the tests here")
  args = parser.parse_args()
  out = args.out
  if out is not None:
    (out / "hlo").mkdir(parents=True, exist_ok=True)
  meshes = {"dp": mlp.host_mesh((8,), ("data",)), "fsdp": mlp.host_mesh((8,), ("fsdp",))}
  results: dict[str, Any] = {"shardings": {}, "collectives": {}, "bitwise": {}, "seconds": {}}
  single = {}
  for name in REFERENCES:
    t0 = time.perf_counter()
    single[name] = single_device_run(name, out)
    results["seconds"][f"single/{name}"] = time.perf_counter() - t0
  for layout, name in RUNS:
    t0 = time.perf_counter()
    rec, counts, arrays = mesh_run(meshes[layout], layout, name, out)
    results["shardings"][f"{layout}/{name}"] = rec
    results["collectives"][f"{layout}/{name}"] = counts
    if name in single:
      results["bitwise"][f"{layout}/{name}"] = bitwise_equal(arrays, single[name])
    results["seconds"][f"{layout}/{name}"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  results["shardings"]["fsdp-explicit/collage full"] = explicit_mesh_run()
  results["seconds"]["fsdp-explicit"] = time.perf_counter() - t0
  results["shardings"].update(composite_run(meshes["fsdp"]))
  results["collectives"].update(metrics_collectives(meshes["fsdp"], out))
  shardings, counts = q8_collectives(meshes["fsdp"], out)
  results["shardings"].update(shardings)
  results["collectives"].update(counts)
  if out is not None:
    (out / "results.json").write_text(json.dumps(results, indent=1))

  for key in ("dp/collage full", "fsdp/collage full", "fsdp/collage compact"):
    print_table(results["shardings"][key], f"{key}: param sharding, state shardings after {STEPS} jitted steps")
  print("\ncollectives in the compiled HLO: update alone | whole train step")
  fmt = lambda d: " ".join(f"{k}={v}" for k, v in d.items() if v) or "none"
  for key, c in results["collectives"].items():
    print(f"  {key:40s} {fmt(c['update']):12s} | {fmt(c['step']) if 'step' in c else '-'}")
  print(f"\nparams and state after {STEPS} steps, bitwise equal to one device:", results["bitwise"])
  print("\nseconds:", {k: round(v, 1) for k, v in results["seconds"].items()})


if __name__ == "__main__":
  main()
