"""Every strategy's optimizer step compiled for GPUs and TPUs on a CPU-only machine (no device).

XLA compiles for a chip it does not see: ``JAX_PLATFORMS=cpu``, then
``jax.experimental.topologies.get_topology_desc`` with a GPU target config
(``benchmarks/target_configs/*.txtpb``, from openxla/xla) or libtpu, and
``jit(step).lower(<ShapeDtypeStructs on a mesh of that topology>).compile()``
(deviceless AOT; ``pip install 'collage-optax[accelerators]'``). Nothing is
allocated and nothing runs: these are the compiled programs' kernels and bytes,
not timings.

Part 1 and 2, the donated optimizer step ``collage_optax.apply_gradients(tx,
grads, state, params)`` (``apply_updates(params, tx.update(grads, state,
params))``, in one step for adamw's compact and lean leaves) of every strategy, over (a) one 4096×4096 bfloat16 leaf and
(b) the GPT-like tree of ``benchmarks/step.py``, per target. Reported:

* ``sweeps``: kernels over the params. Each kernel of the entry computation
  (fusion, copy, async copy, unfused op) counts the largest array it reads or
  writes, over the parameter count: 1.0 is one pass over every leaf; several
  leaves horizontally fused into one kernel can bring it below 1.
* ``multi_output``: fusions that write two or more param-sized arrays.
* ``cost_model_B``: XLA's cost model, bytes accessed per param (TPU:
  ``compiled.cost_analysis()``; GPU, where a compile-only executable has none:
  ``hlo_module_cost_analysis`` of the optimized module). On TPU part of it may
  be on-chip (VMEM) traffic.
* ``hbm_B``: bytes per param that the kernels read and write in memory space 0
  (HBM), from the optimized HLO: each kernel's distinct operands and results,
  padded to their layout's tiles (TPU); an async copy counts its source and
  destination.
* ``ideal_B``: what the layout implies, read params, grads and state, write params and state.
* ``temp_B``: ``memory_analysis()`` temporaries per param.
* ``time_vs_fp32``: ``hbm_B`` at the chip's HBM bandwidth, over ``optax.adamw``
  fp32's in the same run (the bandwidth cancels; ``time_us`` is the absolute).

Part 3, memory of a whole GPT training step (loss, grads, update, apply;
params and state donated) from ``memory_analysis()``: GPT-3-shaped models of
~125M, ~1.3B and ~6.7B params, batch 1 and 8, per strategy and target; and the
widest model of one family (width ``d``, ``max(12, d/128)`` layers) whose step
fits each chip's memory.

Run: ``python benchmarks/accelerators.py`` (writes
``benchmarks/results/accelerators.json``); ``--targets h200,v5e``,
``--strategies light,plus``, ``--parts 1,3``, ``--quick`` (a 1024×1024 leaf, a
small tree, no fits search).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile-only: no TPU is opened, so concurrent processes (pytest-xdist, two runs) may each load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Where JAX_PLATFORMS is not "cpu", the CUDA plugin checks the (absent) driver and does not register without this.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import collage_optax
from collage_optax.cli import strategies as registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import step as step_bench

OUT = _common.RESULTS / "accelerators.json"
CONFIGS = Path(__file__).resolve().parent / "target_configs"
BASELINE = "fp32"
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
  """A chip: how to get its topology, its HBM bandwidth (bytes/s) and capacity (bytes)."""

  label: str
  platform: str  # "cuda" or "tpu"
  spec: str  # a target config file (GPU) or a TPU topology name
  bandwidth: float
  capacity: int
  chip_config: str | None = None


#: The chips. GPU bandwidth and capacity: their target configs; TPU: Google's specs per chip.
TARGETS: dict[str, Target] = {
  "h100": Target("NVIDIA H100 SXM 80GB", "cuda", "h100_sxm.txtpb", 3.35232e12, 84_942_979_072),
  "h200": Target("NVIDIA H200 141GB", "cuda", "h200.txtpb", 4.8e12, 151_397_597_184),
  "v5e": Target("TPU v5e (v5 lite)", "tpu", "v5e:1x1", 819e9, 16 * GiB),
  "v6e": Target("TPU v6e (Trillium)", "tpu", "v6e:1x1", 1640e9, 32 * GiB),
  "v4": Target("TPU v4 (megacore)", "tpu", "v4:1x1x1", 1228e9, 32 * GiB, "megacore"),
  "v5p": Target("TPU v5p (megacore)", "tpu", "v5p:1x1x1", 2765e9, 95 * GiB, "megacore"),
}
DEFAULT_TARGETS = ("h100", "h200", "v5e", "v6e")  # v4 and v5p on request (--targets): each TPU adds minutes.
MEMORY_TARGETS = ("h200", "v5e")  # Part 3's training-step memory table.
FITS_TARGETS = ("h100", "h200", "v5e")  # Part 3's "largest that fits".
#: Part 3's strategies by default: the optax baselines and the four adamw modes of the test (compact and the
#: compensate chains on request, --memory-strategies).
MEMORY_STRATEGIES = ("fp32", "bf16", "light", "plus", "exact", "full", "compact", "lean")
#: Compiler options of Part 3's training steps: only ``memory_analysis()`` is read, and buffer assignment
#: precedes LLVM, so the GPU backend skips its expensive LLVM passes (same temp bytes, a fraction of the time).
TRAIN_STEP_OPTIONS: dict[str, dict[str, Any]] = {
  "cuda": {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
  "tpu": {},
}


#: FlashOptim's fused step (``flash_adamw(fused=True)``: a Pallas-Triton kernel, GPUs only), side by side when
#: ``flashoptim_jax`` is importable (the ``benchmarks`` extra).
FLASH_FUSED = "flash_adamw_fused"


def _flash_fused() -> Any:
  import flashoptim_jax  # pylint: disable=import-outside-toplevel

  return flashoptim_jax.flash_adamw(_common.LR, weight_decay=_common.WD, fused=True)


def strategies() -> dict[str, tuple[str, Any, Callable[[], Any]]]:
  """name -> (label, param dtype, factory): ``_common.STRATEGIES`` plus sgd+compensate and adamw+SR, and
  FlashOptim's fused step where it is importable."""
  lr, wd = _common.LR, _common.WD
  flash = {}
  if _common.flash_unavailable() is None:
    label = "FlashOptim flash_adamw fused (Triton): 24-bit master, 8-bit moments (GPUs)"
    flash = {FLASH_FUSED: (label, jnp.bfloat16, _flash_fused)}
  return {
    **flash,
    **_common.STRATEGIES,
    "sgd_compensate": (
      "optax.sgd + compensate, bf16",
      jnp.bfloat16,
      lambda: optax.chain(optax.sgd(lr), collage_optax.compensate()),
    ),
    "adamw_sr": (
      "optax.adamw + stochastic_rounding, bf16",
      jnp.bfloat16,
      lambda: optax.chain(optax.adamw(lr, weight_decay=wd), collage_optax.stochastic_rounding()),
    ),
  }


def unavailable() -> str | None:
  """Why the accelerator compilers cannot be used here, or ``None`` when both can."""
  missing = []
  for module, package in (("jax_plugins.xla_cuda12", "jax-cuda12-pjrt"), ("libtpu", "libtpu")):
    try:
      __import__(module)
    except ImportError:
      missing.append(package)
  if missing:
    return f"{', '.join(missing)} not installed; pip install 'collage-optax[accelerators]'"
  return None


_TOPOLOGIES: dict[str, Any] = {}


def topology(name: str) -> Any:
  """The (cached) one-chip topology of target ``name``, for deviceless compiles."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  if name not in _TOPOLOGIES:
    t = TARGETS[name]
    if t.platform == "cuda":
      _TOPOLOGIES[name] = topologies.get_topology_desc(
        platform="cuda", topology="1x1x1", target_config=(CONFIGS / t.spec).read_text()
      )
    else:
      extra = {"chip_config_name": t.chip_config} if t.chip_config else {}
      _TOPOLOGIES[name] = topologies.get_topology_desc(
        t.spec, platform="tpu", chips_per_host_bounds=(1, 1, 1), num_slices=1, wrap=(False, False, False), **extra
      )
  return _TOPOLOGIES[name]


def on_chip(tree: Any, target: str) -> Any:
  """``tree``'s leaves as ``ShapeDtypeStruct``s replicated on the one-chip mesh of ``target``."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  sharding = NamedSharding(topologies.make_mesh(topology(target), (1,), ("x",)), P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_step(tx: optax.GradientTransformation, params: Any, target: str) -> Any:
  """The donated optimizer step of ``tx`` over abstract ``params`` (grads alike), compiled for ``target``."""
  _, step = step_bench.step_function(tx)
  state = jax.eval_shape(tx.init, params)
  p, s = on_chip(params, target), on_chip(state, target)
  return jax.jit(step, donate_argnums=(0, 1)).lower(p, s, p).compile()


# ---------------------------------------------------------------------------------------------------------------
# The optimized HLO: kernels, their arrays, bytes per memory space.

_ITEMSIZE = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s4": 0.5,
  "u4": 0.5,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\](?:\{([^}]*)\})?")
_NOT_KERNELS = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "copy-done",
  "slice-done",  # its slice-start counts the transfer
  "after-all",
  "partition-id",
  "replica-id",
  "opt-barrier",
  "async-done",
  "domain",
}


@dataclasses.dataclass(frozen=True)
class Array:
  """One array of the HLO: elements, bytes as laid out (tile-padded), memory space."""

  elements: int
  bytes: float
  space: int


def _array(dtype: str, dims: str, layout: str | None) -> Array:
  shape = [int(d) for d in dims.split(",") if d]
  elements = math.prod(shape)
  padded = elements
  space = 0
  if layout:
    minor_to_major, _, rest = layout.partition(":")
    space_match = re.search(r"S\((\d+)\)", rest)
    space = int(space_match.group(1)) if space_match else 0
    tile_match = re.search(r"T\(([\d,]+)\)", rest)
    if tile_match and shape:
      order = [int(i) for i in minor_to_major.split(",") if i]
      physical = [shape[i] for i in reversed(order)] if len(order) == len(shape) else shape
      tile = [int(t) for t in tile_match.group(1).split(",")]
      physical = [1] * max(0, len(tile) - len(physical)) + physical
      for k, t in enumerate(tile):
        i = len(physical) - len(tile) + k
        physical[i] = -(-physical[i] // t) * t
      padded = math.prod(physical)
  return Array(elements, padded * _ITEMSIZE[dtype], space)


def _arrays(shape_text: str) -> list[Array]:
  return [_array(*m) for m in _ARRAY.findall(shape_text)]


def _split_instruction(line: str) -> tuple[str, str, str, list[str]] | None:
  """``(name, result shape, opcode, operand names)`` of one HLO instruction line, or ``None``."""
  m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
  if not m:
    return None
  rest = line[m.end() :]
  if rest.startswith("("):  # A tuple shape: up to its matching parenthesis.
    depth = 0
    end = 0
    for end, c in enumerate(rest):  # noqa: B007 (end is read after the loop)
      depth += {"(": 1, ")": -1}.get(c, 0)
      if depth == 0:
        break
    shape, rest = rest[: end + 1], rest[end + 2 :]
  else:
    shape, _, rest = rest.partition(" ")
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  args, depth = rest[op.end() :], 1
  for i, c in enumerate(args):
    depth += {"(": 1, ")": -1}.get(c, 0)
    if depth == 0:
      args = args[:i]
      break
  return m.group(1), shape, op.group(1), re.findall(r"%([\w.\-]+)", args)


def kernels(hlo_text: str) -> list[dict[str, Any]]:
  """The kernels of the entry computation: opcode, the arrays each reads and writes (distinct operands)."""
  entry = hlo_text[hlo_text.find("\nENTRY") :]
  entry = entry[: entry.find("\n}") + 1]
  shapes: dict[str, str] = {}
  out = []
  for line in entry.splitlines()[1:]:
    parsed = _split_instruction(line)
    if parsed is None:
      continue
    name, shape, opcode, operands = parsed
    shapes[name] = shape
    if opcode in _NOT_KERNELS:
      continue
    results = _arrays(shape)
    if opcode == "copy-start":  # (destination, source alias, context): the destination is written.
      results = results[:1]
    reads = [a for o in dict.fromkeys(operands) if o in shapes for a in _arrays(shapes[o])]
    if opcode == "slice-start" and len(results) >= 2 and reads:
      # (source alias, slice, context): XLA:TPU's prefetch of one slice of the source reads that slice of it
      # (in the source's memory space) and writes the slice, not the whole source.
      reads = [dataclasses.replace(results[1], space=reads[0].space)]
      results = results[1:2]
    out.append({"name": name, "opcode": opcode, "reads": reads, "writes": results})
  return out


def kernel_stats(compiled: Any, n_params: int) -> dict[str, Any]:
  """Sweeps, multi-output fusions, HBM bytes per param and temporaries of a compiled step."""
  ks = kernels(compiled.as_text())
  largest = [max((a.elements for a in k["reads"] + k["writes"]), default=1) for k in ks]
  sweeping = [(k, e) for k, e in zip(ks, largest) if e > 1]
  big = max(largest, default=1) // 4
  hbm = sum(a.bytes for k in ks for a in k["reads"] + k["writes"] if a.space == 0 and a.elements > 1)
  return {
    "sweeps": round(sum(e for _, e in sweeping) / n_params, 2),
    "kernels": len(sweeping),
    "param_sized_kernels": sum(e >= big for e in largest),
    "multi_output": sum(k["opcode"] == "fusion" and sum(a.elements >= big for a in k["writes"]) >= 2 for k in ks),
    "copies": sum(k["opcode"] in ("copy", "copy-start") and e >= big for k, e in zip(ks, largest)),
    "hbm_B": round(hbm / n_params, 2),
    "temp_B": round(compiled.memory_analysis().temp_size_in_bytes / n_params, 2),
  }


def cost_model_bytes(compiled: Any) -> float:
  """XLA's cost model, bytes accessed; on GPU (no ``cost_analysis`` compile-only) the optimized module's."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost:
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel

    module = compiled.runtime_executable().hlo_modules()[0]
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  return float(cost.get("bytes accessed", 0.0))


def ideal_bytes(tx: optax.GradientTransformation, params: Any) -> float:
  """The layout's bytes: read params, grads (the params' dtype) and state; write params and state."""
  state = jax.eval_shape(tx.init, params)
  return 3 * registry.nbytes(params) + 2 * registry.nbytes(state)


# ---------------------------------------------------------------------------------------------------------------
# Parts 1 and 2: the optimizer step.


def step_cases(quick: bool) -> dict[str, dict[str, tuple[int, ...]]]:
  """The param sets: one large leaf, and a one-block ``step.py`` GPT-like tree (16 leaves, every leaf kind).

  One block, not four: the per-leaf kernels are the same, and XLA:TPU's compile time grows fast with the
  number of leaves (the four-block tree's 52 did not compile in 7 minutes on two cores).
  """
  side = 1024 if quick else 4096
  return {"leaf": {"w": (side, side)}, "tree": step_bench.param_shapes(2**20 if quick else 16 * 2**20, layers=1)}


def measure_step(name: str, shapes: dict[str, tuple[int, ...]], target: str) -> dict[str, Any]:
  """One strategy's step over ``shapes`` compiled for ``target``: kernels, bytes per param, time at HBM speed."""
  _, dtype, make = strategies()[name]
  params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}
  n = sum(math.prod(s) for s in shapes.values())
  tx = make()
  t0 = time.perf_counter()
  compiled = compile_step(tx, params, target)
  stats = kernel_stats(compiled, n)
  return {
    **stats,
    "cost_model_B": round(cost_model_bytes(compiled) / n, 2),
    "ideal_B": round(ideal_bytes(tx, params) / n, 2),
    "time_us": round(stats["hbm_B"] * n / TARGETS[target].bandwidth * 1e6, 2),
    "compile_s": round(time.perf_counter() - t0, 2),
  }


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
  """``time_vs_fp32``: each strategy's HBM time over optax fp32's (same target and params)."""
  base = rows.get(BASELINE, {}).get("time_us")
  for row in rows.values():
    row["time_vs_fp32"] = round(row["time_us"] / base, 3) if base else None


JOBS = 1  # Worker processes for the compiles (--jobs); 1: in this process.


def _call(fn_name: str, args: tuple[Any, ...]) -> Any:
  return globals()[fn_name](*args)


def pmap(fn_name: str, calls: list[tuple[Any, ...]]) -> list[Any]:
  """``[fn(*args) for args in calls]``, over ``JOBS`` worker processes (each compiles independently)."""
  if JOBS <= 1 or len(calls) <= 1:
    return [_call(fn_name, a) for a in calls]
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  import multiprocessing  # pylint: disable=import-outside-toplevel

  with concurrent.futures.ProcessPoolExecutor(JOBS, mp_context=multiprocessing.get_context("spawn")) as pool:
    return list(pool.map(_call, [fn_name] * len(calls), calls))


def run_steps(targets: list[str], names: list[str], quick: bool, cases: list[str]) -> dict[str, Any]:
  """Parts 1 and 2: ``{case: {target: {strategy: stats}}}``."""
  out: dict[str, Any] = {}
  for case, shapes in step_cases(quick).items():
    if case not in cases:
      continue
    out[case] = {"n_params": sum(math.prod(s) for s in shapes.values()), "leaves": len(shapes), "targets": {}}
    t0 = time.perf_counter()
    if case == "tree":  # XLA:TPU compiles a tree slowly: one TPU (the first asked) next to the GPUs.
      tpus = [t for t in targets if TARGETS[t].platform == "tpu"]
      targets = [t for t in targets if TARGETS[t].platform != "tpu" or t == (tpus[0] if tpus else None)]
    # FlashOptim's fused step is a Triton kernel: GPUs only.
    runs = lambda target: [n for n in names if n != FLASH_FUSED or TARGETS[target].platform == "cuda"]
    jobs = [(name, shapes, target) for target in targets for name in runs(target)]
    stats = dict(zip([(j[0], j[2]) for j in jobs], pmap("measure_step", jobs)))
    for target in targets:
      rows = {name: stats[name, target] for name in runs(target)}
      add_ratios(rows)
      out[case]["targets"][target] = rows
      print(f"  {case} {target}: " + ", ".join(f"{k} {v['hbm_B']}" for k, v in rows.items()), flush=True)
    print(f"  {case}: {time.perf_counter() - t0:.0f} s", flush=True)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Part 3: a whole GPT training step's memory.

VOCAB, CONTEXT = 50304, 1024


@dataclasses.dataclass(frozen=True)
class GPTShape:
  """A GPT-2/3-style decoder: ``layers`` pre-LN blocks of width ``width``, ``heads`` heads, tied embeddings."""

  width: int
  layers: int
  heads: int

  @property
  def n_params(self) -> int:
    d, n = self.width, self.layers
    return VOCAB * d + CONTEXT * d + n * (12 * d * d + 13 * d) + 2 * d


#: GPT-3's small, XL and 6.7B shapes (Brown et al. 2020, table 2.1), head dim 64 / 128 / 128.
NAMED_MODELS = {"125M": GPTShape(768, 12, 12), "1.3B": GPTShape(2048, 24, 16), "6.7B": GPTShape(4096, 32, 32)}


def family(width: int) -> GPTShape:
  """The family of the fits search: ``max(12, width/128)`` layers of head dimension 128."""
  return GPTShape(width, max(12, width // 128), max(1, width // 128))


def gpt_params(shape: GPTShape, dtype: Any) -> dict[str, Any]:
  """Abstract params: embeddings, the blocks stacked on a leading layer axis (scanned), the final LayerNorm."""
  d, n = shape.width, shape.layers
  blocks = {
    "ln1_scale": (n, d),
    "ln1_bias": (n, d),
    "qkv_kernel": (n, d, 3 * d),
    "qkv_bias": (n, 3 * d),
    "proj_kernel": (n, d, d),
    "proj_bias": (n, d),
    "ln2_scale": (n, d),
    "ln2_bias": (n, d),
    "fc_kernel": (n, d, 4 * d),
    "fc_bias": (n, 4 * d),
    "out_kernel": (n, 4 * d, d),
    "out_bias": (n, d),
  }
  s = lambda *dims: jax.ShapeDtypeStruct(dims, dtype)
  return {
    "embed": s(VOCAB, d),
    "pos": s(CONTEXT, d),
    "blocks": {k: s(*v) for k, v in blocks.items()},
    "ln_f_scale": s(d),
    "ln_f_bias": s(d),
  }


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias).astype(x.dtype)


def _block(heads: int) -> Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, None]]:
  """One pre-LN block (causal attention, GELU MLP) in bfloat16, rematerialised in the backward pass."""

  @jax.checkpoint
  def block(x, p):
    p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
    b, t, d = x.shape
    q, k, v = jnp.split(_layer_norm(x, p["ln1_scale"], p["ln1_bias"]) @ p["qkv_kernel"] + p["qkv_bias"], 3, -1)
    q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / math.sqrt(d // heads)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e30)
    attn = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1).astype(x.dtype), v).reshape(b, t, d)
    x = x + attn @ p["proj_kernel"] + p["proj_bias"]
    h = jax.nn.gelu(_layer_norm(x, p["ln2_scale"], p["ln2_bias"]) @ p["fc_kernel"] + p["fc_bias"])
    return x + h @ p["out_kernel"] + p["out_bias"], None

  return block


def gpt_loss(params: dict[str, Any], tokens: jax.Array, heads: int) -> jax.Array:
  """Next-token cross-entropy of the GPT on ``tokens`` (batch, CONTEXT + 1), computed in bfloat16."""
  bf = lambda a: a.astype(jnp.bfloat16)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  x = bf(params["embed"])[inputs] + bf(params["pos"])[None]
  x, _ = jax.lax.scan(_block(heads), x, params["blocks"])
  x = _layer_norm(x, bf(params["ln_f_scale"]), bf(params["ln_f_bias"]))
  logits = (x @ bf(params["embed"]).T).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def compile_train_step(name: str, shape: GPTShape, batch: int, target: str) -> Any:
  """The donated training step (loss, grads, update, apply) of strategy ``name``, compiled for ``target``."""
  _, dtype, make = strategies()[name]
  tx = make()

  def train_step(params, state, tokens):
    loss, grads = jax.value_and_grad(gpt_loss)(params, tokens, shape.heads)
    params, state = collage_optax.apply_gradients(tx, grads, state, params)
    return params, state, loss

  params = gpt_params(shape, dtype)
  state = jax.eval_shape(tx.init, params)
  tokens = jax.ShapeDtypeStruct((batch, CONTEXT + 1), jnp.int32)
  args = on_chip((params, state, tokens), target)
  options = TRAIN_STEP_OPTIONS[TARGETS[target].platform]
  return jax.jit(train_step, donate_argnums=(0, 1)).lower(*args).compile(compiler_options=options or None)


def step_memory(name: str, shape: GPTShape, batch: int, target: str) -> dict[str, Any]:
  """``memory_analysis()`` of one training step: arguments, temporaries, peak (args + outputs − aliased + temp)."""
  t0 = time.perf_counter()
  _, dtype, make = strategies()[name]
  params = gpt_params(shape, dtype)
  args = registry.nbytes(params) + registry.nbytes(jax.eval_shape(make().init, params)) + 4 * batch * (CONTEXT + 1)
  if args > TARGETS[target].capacity:  # Params and state alone do not fit: nothing to compile.
    return {
      "args_GB": round(args / 1e9, 3),
      "temp_GB": None,
      "peak_GB": None,
      "fits": False,
      "n_params": shape.n_params,
      "compile_s": 0.0,
      "note": "params + state exceed the chip",
    }
  try:
    mem = compile_train_step(name, shape, batch, target).memory_analysis()
  except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program whose temporaries exceed HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    found = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
    return {
      "args_GB": round(args / 1e9, 3),
      "temp_GB": round(float(found.group(1)) * GiB / 1e9, 3) if found else None,
      "peak_GB": None,
      "fits": False,
      "n_params": shape.n_params,
      "compile_s": round(time.perf_counter() - t0, 1),
      "note": "the compiler ran out of HBM",
    }
  peak = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
    + mem.generated_code_size_in_bytes
  )
  return {
    "args_GB": round(mem.argument_size_in_bytes / 1e9, 3),
    "temp_GB": round(mem.temp_size_in_bytes / 1e9, 3),
    "peak_GB": round(peak / 1e9, 3),
    "fits": peak <= TARGETS[target].capacity,
    "n_params": shape.n_params,
    "compile_s": round(time.perf_counter() - t0, 1),
  }


def run_memory(
  targets: list[str], names: list[str], models: list[str], batches: tuple[int, ...] = (1, 8)
) -> dict[str, Any]:
  """Part 3a: ``{target: {model: {batch: {strategy: memory}}}}`` for ``models`` of :data:`NAMED_MODELS`."""
  shapes = {m: NAMED_MODELS[m] for m in models}
  calls = [
    (name, shape, batch, target)
    for target in targets
    for shape in shapes.values()
    for batch in batches
    for name in names
  ]
  t0 = time.perf_counter()
  results = iter(pmap("step_memory", calls))
  out: dict[str, Any] = {}
  for target in targets:
    out[target] = {}
    for model, shape in shapes.items():
      out[target][model] = {"n_params": shape.n_params, "batches": {}}
      for batch in batches:
        out[target][model]["batches"][str(batch)] = {name: next(results) for name in names}
  print(f"  memory: {len(calls)} training steps in {time.perf_counter() - t0:.0f} s", flush=True)
  return out


def _family_k(n_params: float, step: int) -> int:
  """The ``k`` whose ``family(step·k)`` has about ``n_params`` params (at least 1)."""
  k = 1
  while family(step * (k + 1)).n_params <= n_params:
    k += 1
  return k


def largest_fit(
  name: str, target: str, per_param: float | None = None, batch: int = 1, step: int = 256, hi: int = 64
) -> dict[str, Any]:
  """The widest ``family(step·k)``, ``k ≤ hi``, whose training step fits ``target``'s memory.

  Each probe compiles the whole training step (``memory_analysis()``). With ``per_param``, the peak bytes per
  param of a large model of the same strategy (Part 3a), the search starts at the width that fills the chip
  at that rate and walks to the boundary (two or three compiles when the guess is close); without it, a
  bisection over ``k`` (six compiles).
  """
  probes: dict[int, dict[str, Any]] = {}

  def fits(k: int) -> bool:
    if k not in probes:
      probes[k] = step_memory(name, family(step * k), batch, target)
    return probes[k]["fits"]

  if per_param:
    k = min(hi, _family_k(TARGETS[target].capacity / per_param, step))
    if fits(k):
      while k < hi and fits(k + 1):
        k += 1
    else:
      while k > 1 and not fits(k - 1):
        k -= 1
      k -= 1
  else:
    lo_k, hi_k = 0, hi + 1
    while hi_k - lo_k > 1:
      mid = (lo_k + hi_k) // 2
      lo_k, hi_k = (mid, hi_k) if fits(mid) else (lo_k, mid)
    k = lo_k
  tried = {step * j: probes[j]["peak_GB"] for j in sorted(probes)}
  if k < 1 or not fits(k):
    return {"width": None, "n_params": 0, "probes": tried}
  shape = family(step * k)
  return {
    "width": shape.width,
    "layers": shape.layers,
    "n_params": shape.n_params,
    "peak_GB": probes[k]["peak_GB"],
    "probes": tried,
  }


def _per_param(memory: dict[str, Any], target: str, name: str) -> float | None:
  """Peak bytes per param of the largest batch-1 model of ``memory`` (H100 borrows H200's: same compiler)."""
  source = memory.get(target) or memory.get("h200" if TARGETS[target].platform == "cuda" else "v5e")
  if not source:
    return None
  rows = [(d["n_params"], d["batches"]["1"].get(name)) for d in source.values()]
  rows = [(n, r) for n, r in rows if r and r["peak_GB"]]
  if not rows:
    return None
  n, row = max(rows, key=lambda nr: nr[0])
  return row["peak_GB"] * 1e9 / n


def run_fits(targets: list[str], names: list[str], memory: dict[str, Any] | None = None) -> dict[str, Any]:
  """Part 3b: ``{target: {strategy: largest fit}}`` at batch 1."""
  t0 = time.perf_counter()
  calls = [(name, target, _per_param(memory or {}, target, name)) for target in targets for name in names]
  results = iter(pmap("largest_fit", calls))
  out: dict[str, dict[str, Any]] = {}
  for target in targets:
    out[target] = {
      "capacity_GB": round(TARGETS[target].capacity / 1e9, 1),
      "strategies": {name: next(results) for name in names},
    }
    print(
      f"  fits {target}: " + ", ".join(f"{k} {v['n_params'] / 1e9:.2f}B" for k, v in out[target]["strategies"].items()),
      flush=True,
    )
  print(f"  fits: {time.perf_counter() - t0:.0f} s", flush=True)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Tables and the command line.


def step_tables(results: dict[str, Any]) -> str:
  """Markdown: per case, strategy rows, per target ``hbm_B (cost model) ×sweeps``, and the ratio to fp32."""
  labels = {k: v[0] for k, v in strategies().items()}
  out = []
  for case, data in results.items():
    targets = list(data["targets"])
    names = list(dict.fromkeys(n for t in targets for n in data["targets"][t]))
    header = ["strategy", "ideal B"] + [f"{t}: HBM B (cost model) / sweeps / temp B / × fp32" for t in targets]
    rows = []
    for name in names:
      row = [
        labels.get(name, name),
        next(data["targets"][t][name]["ideal_B"] for t in targets if name in data["targets"][t]),
      ]
      for t in targets:
        r = data["targets"][t].get(name)
        row.append(
          f"{r['hbm_B']} ({r['cost_model_B']}) / {r['sweeps']} / {r['temp_B']} / {r['time_vs_fp32']}" if r else ""
        )
      rows.append(row)
    title = f"### {case}: {data['n_params']:,} params in {data['leaves']} leaves"
    out.append(title + "\n\n" + _common.format_table(header, rows))
  return "\n\n".join(out)


def memory_tables(memory: dict[str, Any], fits: dict[str, Any]) -> str:
  """Markdown: training-step peak GB per model and batch, and the largest model that fits."""
  out = []
  for target, models in memory.items():
    cols = [(m, b) for m, d in models.items() for b in d["batches"]]
    names = list(dict.fromkeys(n for m, b in cols for n in models[m]["batches"][b]))
    header = ["strategy"] + [f"{m} b{b} peak GB" for m, b in cols]
    rows = [[n] + [_fmt_mem(models[m]["batches"][b].get(n)) for m, b in cols] for n in names]
    out.append(f"### training step memory, {TARGETS[target].label}\n\n" + _common.format_table(header, rows))
  if fits:
    names = list(next(iter(fits.values()))["strategies"])
    header = ["strategy"] + [f"{t} ({d['capacity_GB']} GB)" for t, d in fits.items()]
    rows = [[n] + [_fmt_fit(d["strategies"][n]) for d in fits.values()] for n in names]
    out.append("### largest model that fits (batch 1, context 1024)\n\n" + _common.format_table(header, rows))
  return "\n\n".join(out)


def _fmt_mem(m: dict[str, Any] | None) -> str:
  if m is None:
    return "—"
  if m["peak_GB"] is None:
    return f"args {m['args_GB']} (over)"
  return f"{m['peak_GB']}" + ("" if m["fits"] else " (over)")


def _fmt_fit(f: dict[str, Any]) -> str:
  if not f.get("width"):
    return "none"
  return f"{f['n_params'] / 1e9:.2f}B (d={f['width']}, L={f['layers']})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Compile, measure, write ``accelerators.json``, print the tables."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
  parser.add_argument("--strategies", default=",".join(strategies()))
  parser.add_argument("--parts", default="1,3", help="1: optimizer step (leaf and tree); 3: training-step memory")
  parser.add_argument("--cases", default="leaf,tree", help="part 1's param sets: leaf (one matrix), tree (GPT-like)")
  parser.add_argument("--memory-strategies", default=",".join(MEMORY_STRATEGIES), help="part 3's strategies")
  parser.add_argument("--models", default=",".join(NAMED_MODELS), help="part 3's GPT-3 shapes")
  parser.add_argument("--batches", default="1,8", help="part 3's batch sizes")
  parser.add_argument("--memory-targets", default=",".join(MEMORY_TARGETS), help="part 3's targets")
  parser.add_argument("--no-fits", action="store_true", help="skip the largest-model search")
  parser.add_argument("--jobs", type=int, default=2, help="worker processes compiling in parallel")
  parser.add_argument("--quick", action="store_true", help="small shapes, 125M model only, no fits search")
  parser.add_argument("--out", default=str(OUT))
  args = parser.parse_args(argv)
  why = unavailable()
  if why:
    raise SystemExit(f"accelerators.py: {why}")
  global JOBS  # pylint: disable=global-statement
  JOBS = args.jobs
  targets, names = args.targets.split(","), args.strategies.split(",")
  if BASELINE not in names:
    names.insert(0, BASELINE)
  t0 = time.perf_counter()
  result: dict[str, Any] = {
    "machine": _common.machine(),
    "quick": args.quick,
    "targets": {t: dataclasses.asdict(TARGETS[t]) for t in targets},
  }
  if "1" in args.parts:
    result["step"] = run_steps(targets, names, args.quick, args.cases.split(","))
    print(step_tables(result["step"]))
  if "3" in args.parts:
    mem_names = [n for n in args.memory_strategies.split(",") if n]
    models = ["125M"] if args.quick else args.models.split(",")
    batches = tuple(int(b) for b in args.batches.split(","))
    mem_targets = [t for t in args.memory_targets.split(",") if t in targets]
    result["memory"] = run_memory(mem_targets, mem_names, models, batches)
    fits_targets = [] if args.quick or args.no_fits else [t for t in FITS_TARGETS if t in targets]
    result["fits"] = run_fits(fits_targets, mem_names, result["memory"])
    print(memory_tables(result["memory"], result["fits"]))
  result["wall_s"] = round(time.perf_counter() - t0, 1)
  _common.write_json(result, Path(args.out))
  print(f"wrote {args.out} in {result['wall_s']} s")
  Path(args.out).with_suffix(".md").write_text(
    "\n\n".join(
      t
      for t in (step_tables(result.get("step", {})), memory_tables(result.get("memory", {}), result.get("fits", {})))
      if t
    )
    + "\n"
  )
  return result


if __name__ == "__main__":
  main()
