"""Speed of one optimizer step (update + apply), against the copy-bandwidth roofline.

For each parameter count (about 1M, 16M, 64M by default) and each strategy

* ``fp32``  (D): ``optax.adamw`` on float32 params and float32 gradients;
* ``bf16``  (A): ``optax.adamw`` on bfloat16 params and gradients;
* ``light`` (B), ``plus`` (C), ``full`` (C+), and any other mode of
  ``collage_optax.MODES``: ``collage_optax.adamw(mode=...)``;
* ``lion_compensate``: ``optax.chain(optax.lion(1e-4), collage_optax.compensate())``;
* ``flash_adamw`` (24-bit master, 8-bit moments) and ``flash_adamw_32``
  (32-bit master, fp32 moments): FlashOptim's ``flashoptim_jax.flash_adamw``
  (plain-JAX path, ``fused=False``), side by side when it is importable
  (``pip install 'collage-optax[benchmarks]'``), else skipped with a note;
  its other two variants, ``flash_adamw_24_f32`` and ``flash_adamw_32_q8``,
  run when named in ``--strategies``;

one jitted step ``params, state = collage_optax.apply_gradients(tx, grads,
state, params)`` (``apply_updates(params, tx.update(grads, state, params))``)
is timed with params and state donated (updated in place, as in a training
loop), and a second compiled step of the same function without
donation (``ratio_to_fp32_nondonated``: each step then allocates its outputs,
as XLA does whenever donation is impossible). FlashOptim's state shares
buffers (its mu and nu start as one array), so it cannot be donated: it is
timed without donation only, against fp32 without donation. In the same run a jitted in-place elementwise kernel
``x ← 1.0001·x`` over float32 (4 bytes read + 4 written per element) measures
the copy bandwidth; its array has ``4 × n_params`` elements, so that it moves
about as many bytes as step D.

Protocol: everything is compiled and warmed up first; then ``--rounds`` rounds,
each running every strategy (and the copy kernel) ``--calls`` times, in an
order rotated from round to round, so that a burst of load from other
processes hits all strategies alike. Reported per strategy: the median step
time, its interquartile range, the median over rounds of the per-round ratio
to D, the median user and system CPU time per step (summed over threads; the
system part is mostly page faults on XLA's per-call temporaries) and their
ratio to D, the bytes per parameter implied by the dtypes (reads of params,
grads and state + writes of params and state), the achieved bandwidth (those
bytes over the median time) and its fraction of the copy bandwidth; and from
the compiled HLO, XLA's own count of bytes accessed, flops and temporary bytes
per parameter, and the number of loop kernels (fusions and copies) per
parameter leaf, with the ``copy`` ops among them (a one-leaf 1024×1024 step,
donated and not).

Run: ``python benchmarks/step.py`` (writes ``benchmarks/results/step.json``),
``--sizes 16M`` for one size, ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import collage_optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from collage_optax.cli import strategies

OUT = _common.RESULTS / "step.json"
COPY = "copy"


def param_shapes(n_params: int, layers: int = 4) -> dict[str, tuple[int, ...]]:
  """A GPT-2-like parameter tree of about ``n_params`` parameters.

  ``layers`` pre-LayerNorm blocks of width ``w`` (qkv, projection, 4w MLP, with
  biases and LayerNorm gains/biases), byte embeddings and 256 positions: about
  ``12·layers·w²`` parameters, ``w`` a multiple of 16.
  """
  w = max(16, round(math.sqrt(n_params / (12 * layers)) / 16) * 16)
  shapes: dict[str, tuple[int, ...]] = {"embed": (256, w), "pos": (256, w)}
  for i in range(layers):
    for name, shape in (
      ("ln1_scale", (w,)),
      ("ln1_bias", (w,)),
      ("qkv_kernel", (w, 3 * w)),
      ("qkv_bias", (3 * w,)),
      ("proj_kernel", (w, w)),
      ("proj_bias", (w,)),
      ("ln2_scale", (w,)),
      ("ln2_bias", (w,)),
      ("fc_kernel", (w, 4 * w)),
      ("fc_bias", (4 * w,)),
      ("out_kernel", (4 * w, w)),
      ("out_bias", (w,)),
    ):
      shapes[f"block{i}/{name}"] = shape
  shapes["ln_f_scale"], shapes["ln_f_bias"] = (w,), (w,)
  return shapes


def _tree(shapes: dict[str, tuple[int, ...]], dtype: Any, seed: int, scale: float) -> dict[str, jax.Array]:
  key = jax.random.key(seed)
  return {
    name: (scale * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(dtype)
    for i, (name, shape) in enumerate(sorted(shapes.items()))
  }


def known_strategies() -> dict[str, tuple[str, Any, Any]]:
  """Every strategy this benchmark knows: the optax ones, then every FlashOptim variant."""
  return {**_common.STRATEGIES, **_common.ALL_FLASH_STRATEGIES}


def default_strategies() -> list[str]:
  """What a run without ``--strategies`` times: the optax ones and FlashOptim's two of ``FLASH_STRATEGIES``."""
  return [*_common.STRATEGIES, *_common.FLASH_STRATEGIES]


def can_donate(name: str) -> bool:
  """Whether a strategy's step can be donated (FlashOptim's cannot: its state shares buffers)."""
  return name in _common.STRATEGIES


def step_function(opt: Any) -> tuple[Any, Any]:
  """``(init, step)`` with ``step(params, state, grads) -> (params, state)``.

  For an optax ``GradientTransformation``, ``step`` is
  ``collage_optax.apply_gradients(tx, grads, state, params)``:
  ``apply_updates(params, tx.update(grads, state, params))``, in one step
  where ``tx`` has one (``adamw``'s compact and lean leaves on GPU and TPU);
  a FlashOptim ``FlashOptimizer`` has that ``step`` already.
  """
  if hasattr(opt, "update"):
    return opt.init, lambda params, state, grads: collage_optax.apply_gradients(opt, grads, state, params)
  return opt.init, opt.step


def compile_step(tx: Any, params: Any, grads: Any, donate: bool = True) -> Any:
  """One optimizer step of ``tx`` (optax or FlashOptim), jitted, params and state donated or not."""
  init, step = step_function(tx)
  state = jax.eval_shape(init, params)
  return jax.jit(step, donate_argnums=(0, 1) if donate else ()).lower(params, state, grads).compile()


def leaf_hlo(name: str, shape: tuple[int, ...] = (1024, 1024)) -> dict[str, Any]:
  """The compiled step of one strategy on a single ``shape`` leaf: kernels (copies among them), bytes, flops.

  The top-level numbers are the step as it is timed (donated where it can be);
  ``nondonated`` holds those of the step without donation.
  """
  _, dtype, make = known_strategies()[name]
  leaf = {"w": jax.ShapeDtypeStruct(shape, dtype)}
  n = int(np.prod(shape))
  nondonated = _common.hlo_stats(compile_step(make(), leaf, leaf, donate=False), n)
  if not can_donate(name):
    return {**nondonated, "donated": False}
  return {**_common.hlo_stats(compile_step(make(), leaf, leaf), n), "donated": True, "nondonated": nondonated}


class _Runner:
  """One strategy's compiled steps (donated where it can be, and not) and its live buffers.

  Both steps advance the same params and state: the donated one updates them
  in place, the other allocates new ones (and the old ones are freed).
  """

  def __init__(self, name: str, shapes: dict[str, tuple[int, ...]], nondonated: bool = True):
    self.name = name
    self.label, dtype, make = known_strategies()[name]
    tx = make()
    init, _ = step_function(tx)
    self.params = _tree(shapes, dtype, 0, 0.02)
    self.grads = _tree(shapes, dtype, 1, 1e-3)  # Gradients have the params' dtypes.
    self.state = init(self.params)
    b = strategies.bytes_per_param(self.params, self.state, self.grads)
    n = b["n_params"]
    self.bytes_read = b["total_with_gradients"]  # params, grads and state
    self.bytes_written = b["params_plus_state"]
    self.bytes_persistent = b["params_plus_state"]  # Between steps.
    self.bytes_grads = b["gradients"]

    self.donated = can_donate(name)
    self.compiled = compile_step(tx, self.params, self.grads) if self.donated else None
    self.compiled_nd = (
      compile_step(tx, self.params, self.grads, donate=False) if nondonated or not self.donated else None
    )
    self.hlo = _common.hlo_stats(self.compiled or self.compiled_nd, n)
    self.hlo_nd = _common.hlo_stats(self.compiled_nd, n) if self.compiled_nd is not None else None

  def __call__(self) -> tuple[float, float, float]:
    return _timed(lambda: self._step(self.compiled))

  def nondonated(self) -> tuple[float, float, float]:
    return _timed(lambda: self._step(self.compiled_nd))

  def _step(self, compiled: Any) -> None:
    self.params, self.state = compiled(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))


class _Copy:
  """The roofline: ``x ← 1.0001·x`` in place over ``4·n`` float32 elements."""

  def __init__(self, n_params: int):
    self.n = 4 * n_params
    self.x = jnp.ones((self.n,), jnp.float32)
    self.compiled = jax.jit(lambda x: x * jnp.float32(1.0001), donate_argnums=0).lower(self.x).compile()

  def __call__(self) -> tuple[float, float, float]:
    return _timed(self._step)

  def _step(self) -> None:
    self.x = self.compiled(self.x)
    self.x.block_until_ready()


def _timed(fn) -> tuple[float, float, float]:
  """``(wall, user CPU, system CPU)`` seconds of one call (CPU time summed over threads)."""
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  fn()
  t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  return t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
  q = np.percentile(np.asarray(xs), [25, 50, 75])
  return float(q[0]), float(q[1]), float(q[2])


ND = "/nondonated"  # Suffix of the timing key of a step without donation.


def measure(
  n_target: int, names: list[str], rounds: int, calls: int, warmup: int = 2, nondonated: bool = True, layers: int = 4
) -> dict[str, Any]:
  """Times every strategy and the copy kernel at one size, interleaved.

  With ``nondonated``, each strategy's step without donation is timed too
  (as one more entry of the rotation); a strategy that cannot be donated
  (FlashOptim) is timed without donation only, and its primary numbers
  (``median_ms`` ...) are those, with ``"donated": false``. ``layers``: the
  blocks of :func:`param_shapes` (fewer leaves compile faster).
  """
  shapes = param_shapes(n_target, layers)
  n = sum(int(np.prod(s)) for s in shapes.values())
  built: dict[str, _Runner] = {name: _Runner(name, shapes, nondonated) for name in names}
  runners: dict[str, Any] = {}
  for name, run in built.items():
    if run.donated:
      runners[name] = run
    if run.compiled_nd is not None:
      runners[name + ND] = run.nondonated
  runners[COPY] = _Copy(n)
  for run in runners.values():
    for _ in range(warmup):
      run()
  order = list(runners)
  times: dict[str, list[float]] = {k: [] for k in order}
  cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in order}
  per_round: list[dict[str, float]] = []
  for r in range(rounds):
    this_round: dict[str, list[float]] = {k: [] for k in order}
    for k in order[r % len(order) :] + order[: r % len(order)]:
      for _ in range(calls):
        wall, user, system = runners[k]()
        this_round[k].append(wall)
        cpu[k].append((user, system))
    for k, ts in this_round.items():
      times[k].extend(ts)
    per_round.append({k: statistics.median(ts) for k, ts in this_round.items()})
  copy_t = statistics.median(times[COPY])
  copy_bw = 8 * runners[COPY].n / copy_t
  out: dict[str, Any] = {
    "n_params": n,
    "n_leaves": len(shapes),
    "copy": {
      "elements": runners[COPY].n,
      "median_ms": copy_t * 1e3,
      "GBps": copy_bw / 1e9,
      "iqr_rel": _iqr_rel(times[COPY]),
    },
    "strategies": {},
  }
  base = _common.BASELINE
  for k in names:
    run = built[k]
    key = k if run.donated else k + ND
    q1, med, q3 = _quartiles(times[key])
    total = run.bytes_read + run.bytes_written
    entry = {
      "label": run.label,
      "donated": run.donated,
      "median_ms": med * 1e3,
      "q1_ms": q1 * 1e3,
      "q3_ms": q3 * 1e3,
      "iqr_rel": (q3 - q1) / med,
      "cpu_user_ms": 1e3 * statistics.median(u for u, _ in cpu[key]),
      "cpu_system_ms": 1e3 * statistics.median(s for _, s in cpu[key]),
      "bytes_per_param": {
        "read": run.bytes_read,
        "written": run.bytes_written,
        "total": total,
        "persistent": run.bytes_persistent,
        "persistent_with_gradients": run.bytes_persistent + run.bytes_grads,
      },
      "achieved_GBps": total * n / med / 1e9,
      "fraction_of_copy_bandwidth": total * n / med / copy_bw,
      "hlo": run.hlo,
    }
    if base in names and run.donated:
      entry.update(_ratios(k, base, times, cpu, per_round))
    if k + ND in times:
      q1, med, q3 = _quartiles(times[k + ND])
      entry.update(
        {
          "median_ms_nondonated": med * 1e3,
          "q1_ms_nondonated": q1 * 1e3,
          "q3_ms_nondonated": q3 * 1e3,
          "iqr_rel_nondonated": (q3 - q1) / med,
          "hlo_nondonated": run.hlo_nd,
        }
      )
      if base + ND in times:
        entry.update(
          {f"{name}_nondonated": value for name, value in _ratios(k + ND, base + ND, times, cpu, per_round).items()}
        )
    out["strategies"][k] = entry
  del runners, built
  return out


def _ratios(
  k: str,
  base: str,
  times: dict[str, list[float]],
  cpu: dict[str, list[tuple[float, float]]],
  per_round: list[dict[str, float]],
) -> dict[str, Any]:
  """Timing key ``k`` against ``base``: the median per-round ratio, its quartiles, the ratio of medians, of CPU."""
  ratios = [pr[k] / pr[base] for pr in per_round]
  return {
    "ratio_to_fp32": statistics.median(ratios),
    "ratio_to_fp32_q1_q3": list(np.percentile(ratios, [25, 75]).astype(float)),
    "ratio_of_medians": _quartiles(times[k])[1] / _quartiles(times[base])[1],
    "cpu_ratio_to_fp32": sum(map(sum, cpu[k])) / sum(map(sum, cpu[base])),
  }


def _iqr_rel(xs: list[float]) -> float:
  q1, med, q3 = _quartiles(xs)
  return (q3 - q1) / med


def _count(n: int) -> str:
  return f"{n / 1e6:.1f}M" if n >= 10**5 else f"{n / 1e3:.0f}k"


def _fmt(x: float | None, spec: str = ".2f") -> str:
  return "—" if x is None else format(x, spec)


def table(result: dict[str, Any]) -> str:
  """One row per size and strategy; a strategy that cannot be donated (FlashOptim) shows its non-donated step."""
  rows = []
  per_leaf = result.get("per_leaf_hlo", {})
  for size in result["sizes"]:
    for k, s in size["strategies"].items():
      kernels = per_leaf.get(k, {}).get("loop_kernels", "—")
      copies = per_leaf.get(k, {}).get("copies", "—")
      rows.append(
        [
          _count(size["n_params"]),
          k + ("" if s.get("donated", True) else " (not donated)"),
          f"{s['median_ms']:.2f}",
          f"±{100 * s['iqr_rel'] / 2:.0f}%",
          _fmt(s.get("ratio_to_fp32")),
          _fmt(s.get("ratio_to_fp32_nondonated")),
          _fmt(s.get("cpu_ratio_to_fp32")),
          f"{s['cpu_user_ms']:.1f}+{s['cpu_system_ms']:.1f}",
          f"{s['bytes_per_param']['total']:.0f}",
          f"{s['hlo']['xla_bytes_accessed_per_param']:g}",
          f"{s['hlo']['temp_bytes_per_param']:g}",
          f"{s['achieved_GBps']:.1f}",
          f"{100 * s['fraction_of_copy_bandwidth']:.0f}%",
          f"{kernels} ({copies})",
        ]
      )
    rows.append(
      [
        _count(size["n_params"]),
        "copy",
        f"{size['copy']['median_ms']:.2f}",
        f"±{100 * size['copy']['iqr_rel'] / 2:.0f}%",
        "",
        "",
        "",
        "",
        "8",
        "8",
        "0",
        f"{size['copy']['GBps']:.1f}",
        "100%",
        "1 (0)",
      ]
    )
  return _common.format_table(
    [
      "params",
      "strategy",
      "median ms",
      "spread",
      "× fp32",
      "× fp32 not donated",
      "CPU × fp32",
      "user+sys ms",
      "B/param (dtypes)",
      "B/param (XLA)",
      "temp B/param",
      "GB/s",
      "of copy BW",
      "kernels (copies) per leaf",
    ],
    rows,
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1M,16M,64M", help="comma-separated parameter counts (k/M suffixes)")
  parser.add_argument(
    "--strategies",
    default=",".join(default_strategies()),
    help=f"comma-separated subset of {', '.join(known_strategies())}",
  )
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--calls", type=int, default=3, help="timed calls per strategy per round")
  parser.add_argument("--out", type=Path, default=OUT)
  parser.add_argument(
    "--donated-only",
    action="store_true",
    help="skip the steps without donation (FlashOptim, which cannot be donated, is then skipped)",
  )
  parser.add_argument("--quick", action="store_true", help="tiny smoke run: --sizes 20k --rounds 2 --calls 1")
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.rounds, args.calls = "20k", 2, 1
  names = [s.strip() for s in args.strategies.split(",") if s.strip()]
  unknown = [s for s in names if s not in known_strategies()]
  if unknown:
    parser.error(f"unknown strategies {unknown}; choose from {', '.join(known_strategies())}")
  names, skipped = available(names, nondonated=not args.donated_only)
  result: dict[str, Any] = {
    "benchmark": "optimizer step (update + apply_updates), jitted, params and state donated, and not donated",
    "machine": _common.machine(),
    "protocol": {
      "rounds": args.rounds,
      "calls_per_round": args.calls,
      "warmup_calls": 2,
      "copy_kernel": "x <- 1.0001*x in place, float32, 4*n_params elements",
      "baseline": _common.BASELINE,
      "lr": _common.LR,
      "weight_decay": _common.WD,
    },
    "load_average_before": _common.load_average(),
    "skipped": skipped,
    "sizes": [],
  }
  result["per_leaf_hlo"] = {name: leaf_hlo(name) for name in names}
  started = time.time()
  for size in args.sizes.split(","):
    result["sizes"].append(
      measure(_common.parse_count(size), names, args.rounds, args.calls, nondonated=not args.donated_only)
    )
    print(f"[step] {size}: done after {time.time() - started:.0f} s", file=sys.stderr, flush=True)
  result["load_average_after"] = _common.load_average()
  result["wall_s"] = round(time.time() - started, 1)
  _common.write_json(result, args.out)
  print(table(result))
  print(
    f"machine: {result['machine'].get('lscpu_model_name', '?')}, {result['machine']['cpu_count']} CPUs; "
    f"load average before {result['load_average_before']}, after {result['load_average_after']}"
  )
  for name, why in skipped.items():
    print(f"skipped {name}: {why}")
  print(f"wrote {args.out}")
  return result


def available(names: list[str], nondonated: bool = True) -> tuple[list[str], dict[str, str]]:
  """``names`` less the strategies that cannot run here, and why each of those is skipped."""
  skipped: dict[str, str] = {}
  flash = [k for k in names if k in _common.ALL_FLASH_STRATEGIES]
  why = _common.flash_unavailable() if flash else None
  if why is None and not nondonated:
    why = "FlashOptim's step cannot be donated (its state shares buffers) and --donated-only was given"
  if why is not None:
    skipped = {k: why for k in flash}
  return [k for k in names if k not in skipped], skipped


if __name__ == "__main__":
  main()
