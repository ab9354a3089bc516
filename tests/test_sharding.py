"""Sharded COLLAGE training: the state follows the params' sharding.

The multi-device checks run ``examples/sharded_training.py`` once, in a
subprocess with 8 simulated CPU devices (``XLA_FLAGS`` must be set before jax
starts; this process keeps its single device), and check what it wrote: the
shardings of every state array from every way of making the state, the
compiled HLO of the update and of the train step, and the final params and
state of ten steps on the mesh and on one device. The references are the
params' own shardings, ``optax.adamw``'s HLO and the one-device run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

import collage_optax as co
import multidevice

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "reduce-scatter", "all-to-all")
# Global shapes of the FSDP-sharded params of examples/mlp.py.
SHARDED_GLOBAL_SHAPES = ("24,64", "64", "64,40", "40")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  out = multidevice.shared_dir(
      tmp_path_factory, "sharded_training",
      lambda d: (d / "stdout.txt").write_text(multidevice.run_example("sharded_training.py", "--out", str(d))))
  return out, json.loads((out / "results.json").read_text()), (out / "stdout.txt").read_text()


def _spec(s: str) -> tuple[str, ...]:
  """``"P(None, 'fsdp')"`` -> ``("None", "fsdp")``, trailing ``None``s dropped (they mean the same)."""
  parts = [p.strip().strip("'\"") for p in s[s.index("(") + 1:s.rindex(")")].split(",")]
  parts = [p for p in parts if p]
  while parts and parts[-1] == "None":
    parts.pop()
  return tuple(parts)


def _param_of(state_path: str, params: dict) -> str | None:
  """The param a state leaf belongs to: the longest param path its own path ends with."""
  found = [p for p in params if state_path.endswith(p)]
  return max(found, key=len) if found else None


def _scales_layout(p: dict) -> tuple[list[int], tuple[str, ...], list[int]]:
  """Shape, ``_spec`` and shard shape a ``q8`` moment's scales must have, from its param's.

  One scale per group of 32 along the last axis: shape ``p.shape[:-1] +
  (ceil(n / 32),)``, ``(1,)`` for a scalar. Each dimension keeps the param's
  mesh axis where that axis's size (the param's dimension over its shard's)
  divides the scales' dimension, and is replicated otherwise.
  """
  shape = [*p["shape"][:-1], -(-p["shape"][-1] // 32)] if p["shape"] else [1]
  axes = list(_spec(p["spec"])) + ["None"] * (len(shape) - len(_spec(p["spec"])))
  ways = [n // s for n, s in zip(p["shape"], p["shard_shape"])] or [1]
  keep = [a != "None" and n % w == 0 for a, n, w in zip(axes, shape, ways)]
  spec = [a if k else "None" for a, k in zip(axes, keep)]
  while spec and spec[-1] == "None":
    spec.pop()
  return shape, tuple(spec), [n // w if k else n for n, w, k in zip(shape, ways, keep)]


def _check_follows(rec: dict, source: str) -> dict[tuple[str, str], str]:
  """Asserts every per-parameter state array of ``rec[source]`` is laid out like its param.

  A ``q8`` moment is two arrays, ``<path>.codes`` (laid out like the param)
  and ``<path>.scales`` (checked against :func:`_scales_layout`). Returns the
  ``(state kind, param)`` pairs found with each array's dtype, e.g.
  ``{("nu", "['dense1']['kernel']"): "uint32"}`` (a packed two-bfloat16 MCF
  moment) or ``{("mu.scales", "['dense1']['kernel']"): "bfloat16"}``.
  """
  params, found = rec["params"], {}
  for path, leaf in rec[source].items():
    base, part = re.fullmatch(r"(.*?)((?:\.codes|\.scales)?)", path).groups()
    ppath = _param_of(base, params)
    if not leaf["shape"]:  # step count, hyperparameters
      assert ppath is None or params[ppath]["shape"] == [], (source, path)
      continue
    assert ppath is not None, f"{source}: state leaf {path} matches no param"
    p = params[ppath]
    where = f"{source}: {path} (param {ppath} is {p['spec']} {p['shape']} in {p['shard_shape']} shards)"
    shape, spec, shard_shape = (p["shape"], _spec(p["spec"]), p["shard_shape"]) if part != ".scales" else (
        _scales_layout(p))
    assert leaf["shape"] == shape, where + f" got shape {leaf['shape']}"
    assert leaf["spec"].startswith("P("), where + f" got no NamedSharding ({leaf['devices']} device(s))"
    assert _spec(leaf["spec"]) == spec, where + f" got {leaf['spec']}, want {spec}"
    assert leaf["shard_shape"] == shard_shape, where + f" got {leaf['shard_shape']}"
    assert leaf["devices"] == p["devices"], where
    kind = re.search(r"\.(\w+)$", base[: len(base) - len(ppath)])
    found[((kind.group(1) if kind else base) + part, ppath)] = leaf["dtype"]
  return found


BF16 = ("['dense1']['bias']", "['dense1']['kernel']", "['dense2']['bias']", "['dense2']['kernel']")
FP32 = ("['temperature']",)
# (state kind, param) -> dtype. A bf16 param keeps no fp32 state: its MCF moments
# are two bfloat16 packed in one uint32 (formats "mcf"), its residual lo is bf16.
_FP32_MOMENTS = {(k, p): "float32" for p in FP32 for k in ("mu", "nu")}
EXPECTED_STATE = {
    "collage full": {(k, p): d for p in BF16 for k, d in (("mu", "uint32"), ("nu", "uint32"), ("lo", "bfloat16"))}
    | _FP32_MOMENTS,
    "collage plus": {(k, p): d for p in BF16 for k, d in (("mu", "bfloat16"), ("nu", "uint32"), ("lo", "bfloat16"))}
    | _FP32_MOMENTS,
    "optax.adamw": {(k, p): "bfloat16" for p in BF16 for k in ("mu", "nu")} | _FP32_MOMENTS,
    # float32 masters bit for bit: bf16 + an int16 residual, a float32 v.
    "collage exact": {(k, p): d for p in BF16 for k, d in (("mu", "bfloat16"), ("nu", "float32"), ("lo", "int16"))}
    | _FP32_MOMENTS,
    # bf16 + an int8 residual; q8 moments: 8-bit codes (signed for m, of √v for v), a bf16 scale per 32.
    "collage compact": {(k, p): d for p in BF16 for k, d in (
        ("mu.codes", "int8"), ("mu.scales", "bfloat16"), ("nu.codes", "uint8"), ("nu.scales", "bfloat16"),
        ("lo", "int8"))} | _FP32_MOMENTS,
}
SOURCES = ["eager init", "sharded_init"] + [f"step {i}" for i in range(1, 11)]


@pytest.mark.parametrize("run", ["dp/collage full", "fsdp/collage full", "fsdp/collage plus", "fsdp/collage compact",
                                 "fsdp/collage exact", "dp/optax.adamw", "fsdp/optax.adamw"])
def test_every_state_array_has_its_params_sharding(example, run):
  _, results, _ = example
  rec = results["shardings"][run]
  if run.startswith("fsdp"):  # the layout really shards: 1/8 of each bf16 weight per device
    for p in BF16:
      assert np.prod(rec["params"][p]["shard_shape"]) * 8 == np.prod(rec["params"][p]["shape"])
  for source in SOURCES:
    assert _check_follows(rec, source) == EXPECTED_STATE[run.split("/")[1]], source


def test_q8_scales_shard_where_the_mesh_divides_them(example):
  """mlp.py's FSDP layout splits the last axis of dense1's kernel (64) and both
  biases (64, 40) 8 ways: 2 groups of 32, so their scales are replicated;
  dense2's kernel is split along its rows, and so are its scales. Params whose
  shards hold whole groups (``ALIGNED``) get scales sharded like them."""
  _, results, _ = example
  for source in ("eager init", "sharded_init", "step 10"):
    rec = results["shardings"]["fsdp/collage compact"][source]
    for m in ("mu", "nu"):
      assert rec[f".{m}['dense1']['kernel'].scales"]["shard_shape"] == [24, 2], source
      assert rec[f".{m}['dense2']['bias'].scales"]["shard_shape"] == [2], source
      assert rec[f".{m}['dense2']['kernel'].scales"]["shard_shape"] == [8, 2], source
  rec = results["shardings"]["fsdp-aligned/collage compact"]
  found = _check_follows(rec, "sharded_init")
  assert {k for k, d in found.items() if d == "bfloat16"} == {(f"{m}.scales", f"['{p}']") for m in ("mu", "nu")
                                                              for p in ("kernel", "bias", "rows")}
  for path, leaf in rec["sharded_init"].items():
    if path.endswith(".scales"):
      p = rec["params"][re.search(r"\['\w+'\]", path).group(0)]
      assert _spec(leaf["spec"]) == _spec(p["spec"]), path
      assert np.prod(leaf["shard_shape"]) * 8 == np.prod(leaf["shape"]), path


def test_sharded_init_replicates_scalars_over_the_mesh(example):
  """``sharded_init`` puts the step count on the whole mesh (its per-parameter
  arrays are checked above). For the record, it prints what a plain
  ``jax.jit(tx.init)`` does: with ``Auto`` axes XLA may replicate the zero
  moments, ``optax.adamw``'s as COLLAGE's."""
  _, results, _ = example
  for run in ("fsdp/collage full", "fsdp/optax.adamw"):
    rec = results["shardings"][run]
    plain = rec["jit(tx.init)"]
    sharded = [p for p, leaf in plain.items() if leaf["shape"] and leaf["shard_shape"] != leaf["shape"]]
    replicated = [p for p, leaf in plain.items() if leaf["shape"] and leaf["shard_shape"] == leaf["shape"]]
    print(f"{run}: plain jax.jit(tx.init): {len(sharded)} arrays sharded, {len(replicated)} replicated")
    counts = [leaf for leaf in rec["sharded_init"].values() if not leaf["shape"]]
    assert counts and all(c["devices"] == 8 for c in counts)


def test_explicit_mesh_axes_and_optax_wrappers(example):
  """With ``Explicit`` axes even a plain ``jax.jit(tx.init)`` follows the params;
  inside ``inject_hyperparams``, ``MultiSteps`` and a ``lion``+``compensate``
  chain, ``sharded_init`` gives every per-parameter array its param's sharding."""
  _, results, _ = example
  rec = results["shardings"]["fsdp-explicit/collage full"]
  for source in ("eager init", "jit(tx.init)", "sharded_init", "step 1", "step 2", "step 3"):
    assert _check_follows(rec, source) == EXPECTED_STATE["collage full"], source
  for name in ("inject_hyperparams", "MultiSteps", "chain(clip, lion, compensate)"):
    # (MultiSteps accumulates gradients in float32: its own choice.)
    found = _check_follows(results["shardings"][f"fsdp/{name}"], "sharded_init")
    assert {("lo", p): "bfloat16" for p in BF16}.items() <= found.items(), name


def _count(hlo: str) -> dict[str, int]:
  return {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}


@pytest.mark.parametrize("layout", ["dp", "fsdp"])
def test_no_collectives_beyond_optax_adamw(example, layout):
  out, _, _ = example
  read = lambda name, what: (out / "hlo" / f"{layout}_{name}_{what}.txt").read_text()
  for name in ("collage-full", "collage-plus", "collage-exact") if layout == "fsdp" else ("collage-full",):
    assert _count(read(name, "update")) == dict.fromkeys(COLLECTIVES, 0), name
    assert _count(read(name, "step")) == _count(read("optax.adamw", "step")), name
  assert _count(read("optax.adamw", "update")) == dict.fromkeys(COLLECTIVES, 0)
  assert sum(_count(read("optax.adamw", "step")).values()) > 0  # the counter sees collectives


def test_compact_fsdp_collectives_are_the_q8_group_maxima(example):
  """A q8 moment's scale is the largest magnitude of a group of 32 along the
  last axis. mlp.py's FSDP layout puts 8 (dense1) and 5 (dense2's bias)
  elements of a last axis on each device, so a group spans 4 to 7 devices and
  the update needs collectives (an all-reduce of partial group maxima, small
  all-gathers and halo exchanges; no full-size array, see below); the train
  step needs exactly optax.adamw's and the update's. Where every shard holds
  whole groups (``ALIGNED``: 32 of 256 per device, or rows sharded) there are
  none."""
  out, results, _ = example
  read = lambda name, what: _count((out / "hlo" / f"{name}_{what}.txt").read_text())
  update = read("fsdp_collage-compact", "update")
  assert update["all-reduce"] >= 1 and sum(update.values()) > 1, update
  assert update == results["collectives"]["fsdp/collage compact"]["update"]
  optax_step = read("fsdp_optax.adamw", "step")
  assert read("fsdp_collage-compact", "step") == {c: optax_step[c] + update[c] for c in COLLECTIVES}
  assert read("fsdp-aligned_collage-compact", "update") == dict.fromkeys(COLLECTIVES, 0)


def test_measuring_precision_costs_one_all_reduce_either_way(example):
  """``track_metrics`` sums over all leaves: one all-reduce of scalars, as
  ``measure_precision`` after ``optax.adamw`` needs."""
  out, _, _ = example
  read = lambda name: _count((out / "hlo" / f"fsdp_{name}_update.txt").read_text())
  assert read("collage-plus+track_metrics") == read("optax.adamw+measure_precision")
  assert read("collage-plus+track_metrics")["all-reduce"] >= 1


def _shapes(hlo: str) -> set[str]:
  return set(re.findall(r"(?:bf16|f16|f32|f64)\[([\d,]*)\]", hlo))


def test_fsdp_update_holds_no_full_size_array(example):
  """No replicated copy (fp32 or bf16) of a sharded param, moment or low part
  exists anywhere in the compiled FSDP update: only per-device shards."""
  out, _, _ = example
  for name in ("collage-full", "collage-plus", "collage-exact", "collage-compact"):
    shapes = _shapes((out / "hlo" / f"fsdp_{name}_update.txt").read_text())
    assert "24,8" in shapes and "8,40" in shapes, name  # the shards are there
    assert not shapes & set(SHARDED_GLOBAL_SHAPES), (name, shapes & set(SHARDED_GLOBAL_SHAPES))
  # The check can fail: replicated (data-parallel) params are full size.
  assert "24,64" in _shapes((out / "hlo" / "dp_collage-full_update.txt").read_text())


@pytest.mark.parametrize("run", ["dp_collage-full", "fsdp_collage-full", "fsdp_collage-plus", "fsdp_collage-compact",
                                 "fsdp_collage-exact"])
def test_ten_steps_on_the_mesh_are_bitwise_one_device(example, run):
  out, _, _ = example
  mesh = multidevice.load_npz(out / f"{run}_mesh.npz")
  single = multidevice.load_npz(out / f"single_{run.split('_')[1]}.npz")
  assert sorted(mesh) == sorted(single)
  for key in mesh:
    assert mesh[key].dtype == single[key].dtype, key
    assert mesh[key].tobytes() == single[key].tobytes(), f"{run}: {key} differs"
  # It trained, and the low components carry something.
  sys.path.insert(0, str(ROOT / "examples"))
  import mlp  # noqa: PLC0415
  init = mlp.init_params()
  kernel = mesh["[0]['dense1']['kernel']"].view(np.uint16)
  assert (kernel != np.asarray(init["dense1"]["kernel"]).view(np.uint16)).mean() > 0.5
  lo = [k for k in mesh if ".lo[" in k]
  assert len(lo) == len(BF16)
  for k in lo:  # bf16 (mcf): a nonzero magnitude; int16 (exact), int8 (compact): a nonzero integer
    bits = mesh[k].view(np.uint16) & 0x7FFF if mesh[k].dtype.kind == "V" else mesh[k]
    assert mesh[k].dtype.itemsize == {"exact": 2, "compact": 1}.get(run.split("-")[-1], 2), (k, mesh[k].dtype)
    assert np.any(bits), k
  # The packed MCF moments (hi << 16 | lo, uint32) carry low halves too.
  packed = [k for k in mesh if mesh[k].dtype == np.uint32]
  assert len(packed) == len(BF16) * {"full": 2, "plus": 1}.get(run.split("-")[-1], 0), packed
  assert all(np.any(mesh[k] & 0x7FFF) for k in packed)
  # q8 moments: codes and scales moved off zero.
  q8 = [k for k in mesh if k.endswith((".codes", ".scales"))]
  assert len(q8) == (4 * len(BF16) if run.endswith("compact") else 0), q8
  assert all(np.any(mesh[k].view(np.uint16) if mesh[k].dtype.kind == "V" else mesh[k]) for k in q8)


def test_master_params_of_a_sharded_state_stay_sharded(example):
  _, results, _ = example
  for run in ("dp/collage full", "fsdp/collage full", "fsdp/collage plus", "fsdp/collage compact",
              "fsdp/collage exact"):
    rec = results["shardings"][run]
    for source in ("master_params", "jit(master_params)"):
      for path, leaf in rec[source].items():
        p = rec["params"][path]
        assert leaf["dtype"] == "float32", (run, source, path)
        assert leaf["shard_shape"] == p["shard_shape"] and leaf["devices"] == p["devices"], (
            run, source, path, leaf, p)


def test_example_prints_the_state_table(example):
  _, _, stdout = example
  assert "fsdp/collage full: param sharding" in stdout
  # dense1's kernel and its state: m, v (packed MCF) and lo, each sharded like it.
  assert re.search(r"\['dense1'\]\['kernel'\] +bfloat16 +P\(None, 'fsdp'\) +state: "
                   r"mu=P\(None, 'fsdp'\), nu=P\(None, 'fsdp'\), lo=P\(None, 'fsdp'\)\n", stdout), stdout
  # A q8 moment: codes like the param, scales (2 groups of 32 over 8 devices) replicated.
  assert re.search(r"\['dense1'\]\['kernel'\] +bfloat16 +P\(None, 'fsdp'\) +state: mu.codes=P\(None, 'fsdp'\), "
                   r"mu.scales=P\(\), nu.codes=P\(None, 'fsdp'\), nu.scales=P\(\), lo=P\(None, 'fsdp'\)\n",
                   stdout), stdout
  assert "bitwise equal to one device: {'dp/collage full': True, 'fsdp/collage full': True, " in stdout


def test_scaling_table_is_current():
  """benchmarks/results/scaling.json and the table in docs/scaling.md are what
  benchmarks/scaling_table.py computes. (Its bytes per param: test_trajectory.py's
  ``test_bytes_per_param``.)"""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import scaling_table  # noqa: PLC0415
  data = scaling_table.compute()
  # Strategy C (plus): 12 bytes per param with its gradients, 70e9 params over 64 devices.
  assert data["gib_per_device"]["70B"]["C"]["fsdp-64"] == round(12 * 70e9 / 64 / 2**30, 2)
  assert json.loads((ROOT / "benchmarks" / "results" / "scaling.json").read_text()) == json.loads(
      json.dumps(data))
  assert scaling_table.markdown(data) in (ROOT / "docs" / "scaling.md").read_text()


# --- state_shardings in this (single-device) process -------------------------


def _params():
  return {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros((3,), jnp.bfloat16),
          "f": jnp.ones((2,), jnp.float32), "step": jnp.zeros((), jnp.int32)}


@pytest.mark.parametrize("tx", [
    co.adamw(1e-3, mode="full", track_metrics=True),
    optax.inject_hyperparams(co.adamw)(learning_rate=1e-3),
    optax.MultiSteps(co.adamw(1e-3), every_k_schedule=2),
    optax.chain(optax.lion(1e-4), co.compensate()),
    optax.multi_transform({"collage": co.adamw(1e-3), "sgd": optax.sgd(1e-3, momentum=0.9)},
                          {"w": "collage", "b": "collage", "f": "sgd", "step": "sgd"}),
    optax.adamw(1e-3),
], ids=["full+metrics", "inject_hyperparams", "MultiSteps", "lion+compensate", "multi_transform",
        "optax.adamw"])
def test_state_shardings_mirror_the_state_tree(tx):
  params = _params()
  state = tx.init(params)
  shardings = co.state_shardings(tx, params)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  assert all(isinstance(s, SingleDeviceSharding) for s in jax.tree.leaves(shardings))
  jitted = co.sharded_init(tx, params)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.dtype == b.dtype
  abstract = co.abstract_state(tx, params)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)] == [
      (x.shape, x.dtype) for x in jax.tree.leaves(state)]


def test_state_shardings_maps_each_array_to_its_own_param():
  """Each state array gets its own param's sharding (distinct PartitionSpecs on
  a one-device mesh tell them apart); scalars get the mesh, replicated."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  specs = {"w": PartitionSpec("x", None), "b": PartitionSpec("x"), "f": PartitionSpec(),
           "step": PartitionSpec()}
  params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in _params().items()}
  tx = co.adamw(1e-3, mode="full")
  shardings = co.state_shardings(tx, params)
  state = tx.init(params)
  assert {k for k, a in state.nu.items() if a is not None and a.dtype == jnp.uint32} == {"w", "b"}  # packed MCF
  for tree in (shardings.mu, shardings.nu, shardings.lo):
    for k, s in tree.items():
      assert s is None or s.spec == specs[k], (k, s)
  assert {k for k, s in shardings.lo.items() if s is not None} == {"w", "b"}
  assert {k for k, s in shardings.mu.items() if s is not None} == {"w", "b", "f"}
  assert shardings.count.spec == PartitionSpec()
  assert shardings.lo["f"] is None and shardings.lo["step"] is None and shardings.nu["step"] is None


def test_state_shardings_names_the_leaf_without_a_sharding():
  params = {"w": np.ones((4,), jnp.bfloat16)}
  with pytest.raises(ValueError, match=r"param \['w'\] has no sharding"):
    co.state_shardings(co.adamw(1e-3), params)
