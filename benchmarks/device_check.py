"""A prepared accelerator check: one command, one JSON, under 4 minutes on one GPU.

Four parts, each guarded (a failure records its error and traceback in the
JSON, and the other parts still run), under one global time budget:

1. ``xla_trap`` — the XLA excess-precision trap (docs/concepts.md) on this backend. Knuth's TwoSum
   written naively in bfloat16 (``s = a + b; b' = s - a; a' = s - b';
   e = (a - a') + (b - b')``) and ``collage_optax.mcf.two_sum``, both under
   ``jit``, on a few million random bfloat16 pairs, compared bit for bit with
   the same sequence in numpy on ``ml_dtypes.bfloat16`` (every operation
   rounded to bfloat16) and checked exact in float64 (``s + e == a + b``).
   Reported: how many error terms each gets wrong and how many it returns as
   0 where the true error is not 0 (what excess precision does).
2. ``kernel`` — ``adamw(mode="compact")`` three steps on this backend (on GPU and TPU: its Pallas
   kernel, tested on CPU only in interpret mode) against the same steps on the CPU (the jnp path),
   bit for bit, with NaN/±inf/0/huge/tiny gradients among random ones: differing elements per array.
3. ``step`` — ``benchmarks/step.py``'s ``measure()`` (its protocol and
   parameter trees) at 16M and 256M parameters for ``optax.adamw`` on fp32
   and bf16 params and every mode of ``collage_optax.MODES``, donated and not
   (``ratio_to_fp32``, ``ratio_to_fp32_nondonated``), FlashOptim too when it
   is importable, and the per-leaf HLO (kernels, copies) of each step.
4. ``compare`` — ``collage-optax compare --size large --steps 200`` in a
   subprocess (every strategy; warmup scaled with the steps as in that size),
   its per-strategy results.

Needs only the repository and ``pip install -e .[test]`` (no network: the
compare corpus is the Python standard library). ``--quick`` runs everything
at tiny sizes on any backend (CPU included) in well under a minute: the smoke
test ``tests/test_device_check.py`` uses it.

Run: ``python benchmarks/device_check.py`` (writes
``benchmarks/results/device_check.json``; ``--out`` elsewhere).
"""

from __future__ import annotations

import os

# Before JAX starts: allocate on demand, and leave device memory to the compare subprocess.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import step

import collage_optax
from collage_optax import cli
from collage_optax.cli import strategies

OUT = _common.RESULTS / "device_check.json"
BF16 = ml_dtypes.bfloat16


class Budget:
  """Seconds left of the global time budget."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.start = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.seconds - self.elapsed()


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """``fn()``, or its error and traceback; with the seconds it took either way."""
  t0 = time.perf_counter()
  try:
    out = fn()
  except Exception as e:  # pylint: disable=broad-except  # One part's failure must not stop the others.
    out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
  out["wall_s"] = round(time.perf_counter() - t0, 2)
  return out


# ---------------------------------------------------------------------------
# 1b. compact's Pallas kernel on this backend, against the jnp path on the CPU.
# ---------------------------------------------------------------------------


def kernel_bits(shapes: list[tuple[int, ...]], steps: int = 3, fused: bool = True, **modes: Any) -> dict[str, Any]:
  """``adamw(mode="compact")`` (or ``adamw(**modes)``: ``mode="lean"``, …) for ``steps`` steps here (on GPU
  and TPU: the Pallas kernel) and on the CPU (the jnp path, the reference), from the same bf16 params and
  gradients: elements whose bits differ, per array.

  The gradients hold adversarial entries too (NaN, ±inf, 0, 1e30, 1e-30). On CPU
  both runs are the jnp path (a smoke test); on an accelerator a nonzero count
  means the kernel's roundings are not the CPU's there (division, square root,
  FMA contraction, subnormals). ``fused``: each step is ``apply_gradients`` (the
  kernel writes the params), else ``tx.update`` and ``optax.apply_updates`` (the
  kernel writes the update: ``nnx.Optimizer``'s, a chain's).
  """
  from collage_optax import _pallas  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  params = {f"w{i}": (rng.standard_normal(s) * 0.1).astype(BF16) for i, s in enumerate(shapes)}
  grads = []
  for _ in range(steps):
    g = {k: (rng.standard_normal(v.shape) * 10.0 ** rng.uniform(-8, 2)).astype(np.float32) for k, v in params.items()}
    for v in g.values():
      flat = v.reshape(-1)
      flat[rng.integers(0, flat.size, 6)] = [np.nan, np.inf, -np.inf, 0.0, 1e30, 1e-30]
    grads.append({k: v.astype(BF16) for k, v in g.items()})
  tx = collage_optax.adamw(1e-3, weight_decay=0.1, **{"mode": "compact", **modes})

  def run(device: Any) -> list[np.ndarray]:
    put = lambda t: jax.device_put(t, device)
    p = put(params)
    s = jax.jit(tx.init)(p)

    @jax.jit
    def step_fn(p, s, g):  # on CPU both are update + apply_updates, the same bits
      if fused:
        return collage_optax.apply_gradients(tx, g, s, p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    for g in grads:
      p, s = step_fn(p, s, put(g))
    return [np.asarray(x) for x in jax.tree.leaves((p, s))]

  def bytes_of(x: np.ndarray) -> np.ndarray:  # one row of bytes per element
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8).reshape(x.size, -1)

  here, cpu = run(jax.devices()[0]), run(jax.devices("cpu")[0])
  layout = (params, jax.eval_shape(tx.init, params))
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(layout)[0]]
  differ = {n: int(np.any(bytes_of(a) != bytes_of(b), axis=1).sum()) for n, a, b in zip(names, here, cpu)}
  return {
    "backend": jax.default_backend(),
    "modes": {"mode": "compact", **modes},
    "fused": fused,
    "kernel": jax.default_backend() in ("gpu", "tpu") and _pallas.ENABLED and jax.device_count() == 1,
    "shapes": [list(s) for s in shapes],
    "steps": steps,
    "elements_differing": differ,
    "bit_for_bit": not any(differ.values()),
  }


# ---------------------------------------------------------------------------
# 1. The XLA excess-precision trap.
# ---------------------------------------------------------------------------


def random_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``n`` bfloat16 pairs whose sums mostly round: |a| spans 2^±8, |b| ∈ 2^-12..1 × |a|, either sign.

  The range keeps every ``a + b`` and ``s + e`` exact in float64, so the
  float64 check is a proof, not an approximation.
  """
  rng = np.random.default_rng(seed)
  a = rng.standard_normal(n) * 2.0 ** rng.integers(-8, 9, n)
  b = a * rng.choice([-1.0, 1.0], n) * 2.0 ** -rng.uniform(0.0, 12.0, n)
  return a.astype(BF16), b.astype(BF16)


def two_sum_reference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """TwoSum in numpy on ``ml_dtypes.bfloat16``: every operation rounded to bfloat16 (via float32,
  which is innocuous double rounding for + and −: 24 ≥ 2·8 + 2 bits)."""
  s = a + b
  bb = s - a
  aa = s - bb
  return s, (a - aa) + (b - bb)


def naive_two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The same sequence on bfloat16 ``jax.Array``s: what XLA may fuse into float32 without roundings."""
  s = a + b
  bb = s - a
  aa = s - bb
  return s, (a - aa) + (b - bb)


def _bits(x: Any) -> np.ndarray:
  return np.asarray(x).astype(BF16).view(np.uint16)


def xla_trap(n_pairs: int) -> dict[str, Any]:
  a, b = random_pairs(n_pairs)
  s_ref, e_ref = two_sum_reference(a, b)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  ref_exact = int(np.sum(s_ref.astype(np.float64) + e_ref.astype(np.float64) != a64 + b64))
  nonzero = e_ref != 0
  ja, jb = jax.device_put(a), jax.device_put(b)
  out: dict[str, Any] = {
    "n_pairs": n_pairs,
    "dtype": "bfloat16",
    "pairs": "|a| in 2^-8..2^8 (normal x 2^k), |b| = |a| x 2^-U(0,12), random signs",
    "reference": "numpy on ml_dtypes.bfloat16, every op rounded; s + e == a + b checked in float64",
    "reference_inexact_pairs": ref_exact,
    "true_error_nonzero": int(nonzero.sum()),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  for name, fn in (("naive", naive_two_sum), ("ours", collage_optax.mcf.two_sum)):
    s, e = jax.block_until_ready(jax.jit(fn)(ja, jb))
    s, e = np.asarray(s), np.asarray(e)
    s_wrong = int(np.sum(_bits(s) != _bits(s_ref)))
    e_wrong = int(np.sum(_bits(e) != _bits(e_ref)))
    inexact = int(np.sum(s.astype(np.float64) + e.astype(np.float64) != a64 + b64))
    out[name] = {
      "dtypes": [str(s.dtype), str(e.dtype)],
      "sum_bits_wrong": s_wrong,
      "error_bits_wrong": e_wrong,
      "error_zero_where_true_nonzero": int(np.sum((e == 0) & nonzero)),
      "float64_inexact_pairs": inexact,
      "exact": s_wrong == 0 and e_wrong == 0 and inexact == 0,
    }
  out["naive_function"] = "s = a + b; bb = s - a; aa = s - bb; e = (a - aa) + (b - bb), bfloat16 arrays, jit"
  out["ours_function"] = "collage_optax.mcf.two_sum, jit"
  return out


# ---------------------------------------------------------------------------
# 2. Step time.
# ---------------------------------------------------------------------------


def step_names(quick: bool = False) -> list[str]:
  """optax.adamw on fp32 and bf16 params, every COLLAGE mode, FlashOptim's two when importable.

  ``quick``: fp32 and one COLLAGE mode only (the COLLAGE steps compile slowly on a CPU).
  """
  modes = list(collage_optax.MODES)
  if quick:
    return ["fp32", "plus" if "plus" in modes else modes[0]]
  return ["fp32", "bf16", *modes, *_common.FLASH_STRATEGIES]


def step_times(
  names: list[str],
  sizes: list[str],
  rounds: int,
  calls: int,
  layers: int,
  leaf_shape: tuple[int, ...],
  budget: Budget,
  reserve_s: float,
) -> dict[str, Any]:
  """``step.measure`` at each size, each guarded; a size is skipped when the budget would not leave
  ``reserve_s`` seconds for what comes after it, counting 1.5× the previous size's time for it
  (compiling dominates, and it does not grow with the size)."""
  names, skipped = step.available(names)
  out: dict[str, Any] = {
    "strategies": names,
    "skipped": skipped,
    "protocol": {
      "rounds": rounds,
      "calls_per_round": calls,
      "layers": layers,
      "baseline": _common.BASELINE,
      "lr": _common.LR,
      "weight_decay": _common.WD,
      "see": "benchmarks/step.py",
    },
    "per_leaf_hlo": {},
    "sizes": {},
  }
  for name in names:
    out["per_leaf_hlo"][name] = guarded(functools.partial(step.leaf_hlo, name, leaf_shape))
  out["per_leaf_hlo_shape"] = list(leaf_shape)
  predicted = 0.0
  for size in sizes:
    if budget.left() < reserve_s + predicted:
      out["sizes"][size] = {
        "skipped": f"time budget: {budget.left():.0f} s left, {reserve_s:.0f} s reserved "
        f"for compare, {predicted:.0f} s predicted for this size"
      }
      continue
    n_params = _common.parse_count(size)
    out["sizes"][size] = guarded(functools.partial(step.measure, n_params, names, rounds, calls, layers=layers))
    predicted = 1.5 * out["sizes"][size]["wall_s"]
    print(f"[device_check] step {size}: {out['sizes'][size]['wall_s']} s", file=sys.stderr, flush=True)
  out["ratios"] = {
    size: {
      k: {
        "ratio_to_fp32": s.get("ratio_to_fp32"),
        "ratio_to_fp32_nondonated": s.get("ratio_to_fp32_nondonated"),
        "median_ms": s.get("median_ms"),
        "median_ms_nondonated": s.get("median_ms_nondonated"),
      }
      for k, s in res.get("strategies", {}).items()
    }
    for size, res in out["sizes"].items()
  }
  return out


# ---------------------------------------------------------------------------
# 3. collage-optax compare.
# ---------------------------------------------------------------------------


def compare_run(
  size: str, steps: int, names: list[str], timeout_s: float, corpus: Path | None = None
) -> dict[str, Any]:
  """``collage-optax compare --size S --steps N`` in a subprocess; its per-strategy results."""
  base = cli.MODEL_SIZES[size]
  warmup = max(1, round(steps * base["warmup"] / base["steps"]))  # The size's warmup share of the run.
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [
      sys.executable,
      "-m",
      "collage_optax",
      "compare",
      "--size",
      size,
      "--steps",
      str(steps),
      "--warmup",
      str(warmup),
      "--strategies",
      ",".join(names),
      "--seeds",
      "1",
      "--out",
      tmp,
      "--no-progress",
    ]  # one seed: this checks that it runs on the device, not the statistics
    if corpus is not None:
      cmd += ["--corpus", str(corpus)]
    # The parent keeps its device memory pool; the child takes a share of the rest.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION="0.3")
    out: dict[str, Any] = {"command": " ".join(cmd[1:]), "timeout_s": round(timeout_s, 1)}
    if timeout_s < 10:
      return out | {"skipped": f"time budget: {timeout_s:.0f} s left"}
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as e:
      tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
      return out | {"error": f"timed out after {timeout_s:.0f} s", "stderr_tail": tail[-3000:]}
    out["returncode"] = proc.returncode
    out["table"] = proc.stdout.strip()
    if proc.returncode != 0:
      return out | {"error": f"exit code {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    results = json.loads((Path(tmp) / "results.json").read_text())
  keep = (
    "val_loss",
    "val_loss_std",
    "val_ppl",
    "delta_vs_fp32",
    "delta_ci95",
    "approx_fp32",
    "n_seeds",
    "edq",
    "lost_fraction",
    "bytes_per_param",
    "bytes_per_param_with_grads",
    "n_params",
    "step_time_s",
    "step_time_ratio",
    "step_wall_ratio",
  )
  out["config"] = results["config"]
  out["strategies"] = {
    name: {k: r.get(k) for k in keep}
    | {"val_curves": [[s["curves"]["val_step"], s["curves"]["val_loss"]] for s in r["seeds"]]}
    for name, r in results["strategies"].items()
  }
  return out


def _quick_corpus(directory: Path) -> Path:
  """A small text corpus for --quick: the library's own source."""
  src = Path(collage_optax.__file__).parent
  path = directory / "corpus.txt"
  path.write_bytes(b"\n".join(p.read_bytes() for p in sorted(src.glob("*.py")))[:200_000])
  return path


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=OUT)
  parser.add_argument(
    "--budget-s", type=float, default=210.0, help="global time budget in seconds, startup not included (default: 210)"
  )
  parser.add_argument("--pairs", type=int, default=1 << 22, help="TwoSum pairs (default: 4M)")
  parser.add_argument("--sizes", default="16M,256M", help="step-time sizes (default: 16M,256M)")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--compare-steps", type=int, default=200)
  parser.add_argument(
    "--compare-strategies",
    default=",".join(strategies.COMPARE),
    help=f"compare's --strategies (default: {','.join(strategies.COMPARE)})",
  )
  parser.add_argument(
    "--compare-reserve-s",
    type=float,
    default=100.0,
    help="seconds kept for compare: a step size starts only with more left (default: 100)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="tiny sizes and few steps, on any backend: a smoke test in well under a minute"
  )
  args = parser.parse_args(argv)
  layers, leaf_shape, model_size, corpus_dir = 4, (1024, 1024), "large", None
  compare_strategies = [x.strip() for x in args.compare_strategies.split(",") if x.strip()]
  if args.quick:
    args.pairs, args.sizes, args.rounds, args.calls, args.compare_steps = 1 << 14, "8k", 2, 1, 3
    args.compare_reserve_s = min(args.compare_reserve_s, 20.0)
    layers, leaf_shape, model_size, compare_strategies = 1, (128, 128), "tiny", ["plus"]
    corpus_dir = tempfile.TemporaryDirectory()
  budget = Budget(args.budget_s)
  result: dict[str, Any] = {
    "benchmark": "device check: XLA excess-precision trap, step-time ratios, compare --size large",
    "quick": args.quick,
    "machine": _common.machine(),
    "budget_s": args.budget_s,
    "env": {
      k: os.environ.get(k, "")
      for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS")
    },
  }
  print(f"[device_check] backend {jax.default_backend()}: {result['machine']['devices']}", file=sys.stderr, flush=True)

  def save() -> None:
    result["wall_s"] = round(budget.elapsed(), 1)
    _common.write_json(result, args.out)

  result["xla_trap"] = guarded(lambda: xla_trap(args.pairs))
  print(f"[device_check] xla_trap: {result['xla_trap']['wall_s']} s", file=sys.stderr, flush=True)
  save()
  kernel_shapes = [(64, 96), (1000,)] if args.quick else [(1024, 1024), (1000, 1000), (50257, 768), (3_000_001,)]
  result["kernel"] = guarded(lambda: kernel_bits(kernel_shapes))
  print(f"[device_check] kernel: {result['kernel']['wall_s']} s", file=sys.stderr, flush=True)
  save()
  # The kernel writing the update instead (tx.update + optax.apply_updates).
  result["kernel_update"] = guarded(lambda: kernel_bits(kernel_shapes, fused=False))
  print(f"[device_check] kernel_update: {result['kernel_update']['wall_s']} s", file=sys.stderr, flush=True)
  save()
  # The same kernel with lean's moments (a bf16 m, a log16 v): their roundings show an FMA or a subnormal.
  result["kernel_lean"] = guarded(lambda: kernel_bits(kernel_shapes, mode="lean"))
  print(f"[device_check] kernel_lean: {result['kernel_lean']['wall_s']} s", file=sys.stderr, flush=True)
  save()
  result["step"] = guarded(
    lambda: step_times(
      step_names(args.quick),
      [s.strip() for s in args.sizes.split(",") if s.strip()],
      args.rounds,
      args.calls,
      layers,
      leaf_shape,
      budget,
      args.compare_reserve_s,
    )
  )
  save()
  corpus = _quick_corpus(Path(corpus_dir.name)) if corpus_dir is not None else None
  result["compare"] = guarded(
    lambda: compare_run(model_size, args.compare_steps, compare_strategies, budget.left() - 3, corpus)
  )
  print(f"[device_check] compare: {result['compare']['wall_s']} s", file=sys.stderr, flush=True)
  if corpus_dir is not None:
    corpus_dir.cleanup()
  result["errors"] = _errors(result)
  save()
  print(summary(result))
  print(f"wrote {args.out}")
  return result


def _errors(result: dict[str, Any]) -> dict[str, str]:
  """Every ``error`` anywhere in the result, by its path."""
  found: dict[str, str] = {}

  def walk(x: Any, path: str) -> None:
    if isinstance(x, dict):
      if "error" in x:
        found[path] = x["error"]
      for k, v in x.items():
        if k != "error":
          walk(v, f"{path}/{k}" if path else k)

  walk({k: v for k, v in result.items() if k != "errors"}, "")
  return found


def summary(result: dict[str, Any]) -> str:
  """A few lines for the terminal."""
  lines = []
  trap = result["xla_trap"]
  if "error" not in trap:
    for name in ("naive", "ours"):
      t = trap[name]
      lines.append(
        f"two_sum {name}: {t['error_bits_wrong']} of {trap['n_pairs']} error terms wrong, "
        f"{t['error_zero_where_true_nonzero']} zero where the true error is not "
        f"({trap['true_error_nonzero']} nonzero); exact: {t['exact']}"
      )
  for key, label in (
    ("kernel", "compact"),
    ("kernel_update", "compact, update + apply_updates,"),
    ("kernel_lean", "lean"),
  ):
    kernel = result.get(key, {"error": "not run"})
    if "error" not in kernel:
      lines.append(
        f"{label} {'Pallas kernel' if kernel['kernel'] else 'jnp path'} on {kernel['backend']} vs the CPU's jnp "
        f"path: bit for bit {kernel['bit_for_bit']}, differing elements {kernel['elements_differing']}"
      )
  for size, ratios in result["step"].get("ratios", {}).items():
    cells = ", ".join(f"{k} {_r(v['ratio_to_fp32'])}/{_r(v['ratio_to_fp32_nondonated'])}" for k, v in ratios.items())
    lines.append(f"step {size} (x fp32 donated/not): {cells}")
  for name, r in result["compare"].get("strategies", {}).items():
    lines.append(f"compare {name}: val loss {r['val_loss']:.4f}, EDQ {r['edq']:.3f}, step x{_r(r['step_time_ratio'])}")
  for path, err in result["errors"].items():
    lines.append(f"ERROR {path}: {err}")
  return "\n".join(lines)


def _r(x: float | None) -> str:
  return "—" if x is None else f"{x:.2f}"


if __name__ == "__main__":
  main()
