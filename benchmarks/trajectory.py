"""Trajectory quality: how far bf16 AdamW variants drift from float64 AdamW.

One fixed, seeded stream of bfloat16 gradients is replayed through

* ``float64``: AdamW in numpy float64 (``tests/reference.py``), the reference;
* ``fp32``: ``optax.adamw`` on float32 params (the fp32-master recipe, D);
* ``bf16``: ``optax.adamw`` on bfloat16 params (naive, A);
* ``light`` / ``plus`` / ``full`` / ``exact`` / ``compact``:
  ``collage_optax.adamw(mode=...)`` on bfloat16 params (B, C, C+, and the
  int16- and int8-residual formats), read out with ``collage_optax.master_params``;
* ``exact_m``: ``mode="exact", mu_format="exact"`` (float32 moments over the
  exact master: float32 AdamW but for the bfloat16 rounding of the updates
  (bf16 gradients make bf16 updates) where a param crosses a binade, see
  tests/test_exact.py; it should track float64 as fp32 does);
* ``flash_adamw`` (24-bit master, 8-bit moments: FlashOptim's default),
  ``flash_adamw_24_f32``, ``flash_adamw_32_q8``, ``flash_adamw_32`` (32-bit
  master, fp32 moments): FlashOptim's ``flashoptim_jax.flash_adamw``
  (``fused=False``) on bfloat16 params, read out with
  ``flashoptim_jax.reconstruct_weights(params, state.ecc)``, when it is
  importable (else skipped, with the reason in ``result["skipped"]``). It takes
  the same schedule (called with the step count before the step, as optax
  does), and the weight-decay mask as ``param_groups`` (weight decay 0 on the
  undecayed leaves); it computes in float32 from float32-cast gradients, as
  collage_optax does.

Probes, run only when named (``--strategies compact_f32,exact_q8,exact_q8_nu``):
``compact``'s param format with float32 moments, and ``exact``'s with
``compact``'s q8 moments (both, or the second moment only): where a preset's
error comes from; ``compact_small_exact`` and ``compact_1d_exact``: compact with
per-leaf formats (``collage_optax.precise_small_leaves``: leaves under 4096
elements or 1-D in ``exact``; 1-D leaves only).

The gradients do not depend on the params (a replay), so every optimizer sees
exactly the same inputs and the trajectories are comparable step for step.

Metric: the error relative to the distance travelled,
``||θ_T − θ64_T|| / ||θ64_T − θ_0||`` (2-norms over all params together), where
``θ64`` is the float64 trajectory and ``θ_0`` the common bf16 initial params.
0 means the float64 trajectory exactly; 1 means an error as large as the whole
way the reference moved.

The stream (chosen to look like a small transformer's, not tuned to any
optimizer): LayerNorm-like gains at 1.0 and biases at 0, weight matrices
``~N(0, 0.02)`` and ``~N(0, 0.5)``; per element a gradient scale spread over
about two decades (log-normal around a per-leaf base), a persistent component
(an AR(1) process with a ~500-step time scale, per-element signal-to-noise
ratio uniform in [0, 1]), heavy-tailed noise (Student-t, 5 degrees of freedom),
and a gradient norm that falls early in training; AdamW with a warmup + cosine
learning rate (peak 1e-3, to 1e-4), ``b1=0.9, b2=0.999, eps=1e-8``, weight
decay 0.1 on the weight matrices only.

A second scenario replays the same stream with a constant learning rate of
3e-4 given as a Python float (``result["constant_lr"]``): optax rounds such a
learning rate to bfloat16 (2.9948e-4, 0.17% short on every step).

Memory: for each strategy ``result["bytes_per_param"]`` counts the arrays
themselves (the ``nbytes`` of the param and optimizer-state leaves over the
number of params), and adds the gradients (bfloat16, 2 B/param; float32 for
fp32). On this small tree a per-32 scale costs a little more than on a large
model (``mlp/kernel``'s rows are 16 long: one scale per 16 for compact's q8).

Run: ``python benchmarks/trajectory.py`` (writes
``benchmarks/results/trajectory.json`` and prints the tables);
``--strategies exact,compact`` for a subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import collage_optax
from collage_optax.cli import strategies

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common  # noqa: E402  (FlashOptim's variants)
import reference  # noqa: E402  (tests/reference.py: numpy float64 AdamW)
import step as step_benchmark  # noqa: E402  (step_function: optax and FlashOptim alike)

RESULTS = ROOT / "benchmarks" / "results" / "trajectory.json"

STEPS = 4000
SEED = 0
PEAK_LR = 1e-3
WARMUP = 200
FINAL_LR_FRACTION = 0.1
B1, B2, EPS = 0.9, 0.999, 1e-8
WEIGHT_DECAY = 0.1
CONSTANT_LR = 3e-4  # the second scenario: 2.9948e-4 once rounded to bfloat16.

# name: (shape, init, gradient base scale, weight decay).
LAYOUT = {
  "ln/scale": ((256,), ("const", 1.0), 3e-3, False),
  "ln/bias": ((256,), ("const", 0.0), 3e-3, False),
  "attn/kernel": ((32, 64), ("normal", 0.02), 1e-3, True),
  "mlp/kernel": ((64, 16), ("normal", 0.5), 1e-2, True),
}
#: What :func:`run` replays by default: optax's fp32 and bf16, then the COLLAGE strategies
#: (``collage_optax.cli.strategies.REGISTRY`` has them all).
STRATEGIES = ("fp32", "bf16", "light", "plus", "full", "exact", "compact", "lean", "exact_m")
#: Probes, by name only (not in the defaults): which part of a preset the error comes from.
PROBES = ("compact_f32", "exact_q8", "exact_q8_nu", "compact_small_exact", "compact_1d_exact")
#: FlashOptim's variants (``_common.FLASH_VARIANTS``), replayed when ``flashoptim_jax`` is importable.
FLASH = tuple(_common.FLASH_VARIANTS)
#: Every strategy, the default of the command line (the probes are not in it).
ALL = STRATEGIES + FLASH
KNOWN = ALL + PROBES


def _unflatten(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
  tree: dict[str, dict[str, Any]] = {}
  for name, x in flat.items():
    outer, inner = name.split("/")
    tree.setdefault(outer, {})[inner] = x
  return tree


def _flatten(tree: dict[str, dict[str, Any]]) -> dict[str, Any]:
  return {f"{o}/{i}": tree[o][i] for o in tree for i in tree[o]}


def make_problem(steps: int = STEPS, seed: int = SEED, constant_lr: float | None = None) -> dict[str, Any]:
  """The initial params (bf16 values), the bf16 gradient stream and the lrs.

  Returns a dict with ``params0`` and ``decay_mask`` (name -> array),
  ``grads`` (name -> bfloat16 array of shape ``(steps, *shape)``), ``lrs``
  (float64, one per step: the warmup + cosine schedule, or ``constant_lr``)
  and ``constant_lr`` (then given to the optimizers as a Python float, the
  common way to write a constant learning rate).
  """
  rng = np.random.default_rng(seed)
  params0, mask, scale, snr, size = {}, {}, {}, {}, {}
  for name, (shape, (kind, value), base, decay) in LAYOUT.items():
    init = np.full(shape, value) if kind == "const" else rng.normal(0.0, value, shape)
    params0[name] = reference.bf16(init)
    mask[name] = decay
    scale[name] = base * np.exp(rng.normal(0.0, 1.0, shape))  # ~2 decades.
    snr[name] = rng.uniform(0.0, 1.0, shape)
    size[name] = int(np.prod(shape))
  n = sum(size.values())
  s = np.concatenate([scale[k].ravel() for k in LAYOUT])
  r = np.concatenate([snr[k].ravel() for k in LAYOUT])
  rho = 1.0 - 1.0 / 500.0
  signal = rng.normal(0.0, 1.0, n)
  flat = np.empty((steps, n), reference.BF16)
  t_noise = np.sqrt(5.0 / 3.0)  # std of Student-t(5).
  for t in range(steps):
    signal = rho * signal + np.sqrt(1.0 - rho**2) * rng.normal(0.0, 1.0, n)
    noise = rng.standard_t(5, n) / t_noise
    norm = 0.5 + np.exp(-t / 300.0)
    flat[t] = reference.bf16(s * norm * (r * signal + noise))
  grads, start = {}, 0
  for name, (shape, *_) in LAYOUT.items():
    grads[name] = flat[:, start : start + size[name]].reshape((steps, *shape))
    start += size[name]
  if constant_lr is None:
    lrs = reference.cosine_schedule(steps, PEAK_LR, WARMUP, FINAL_LR_FRACTION)
  else:
    lrs = np.full(steps, constant_lr)
  return {"params0": params0, "decay_mask": mask, "grads": grads, "lrs": lrs, "constant_lr": constant_lr}


def run_float64(problem: dict[str, Any]) -> dict[str, np.ndarray]:
  """Final params of float64 AdamW (numpy, independent of optax and of us)."""
  names = list(LAYOUT)
  sizes = [problem["params0"][k].size for k in names]
  p0 = np.concatenate([problem["params0"][k].astype(np.float64).ravel() for k in names])
  mask = np.concatenate([np.full(n, problem["decay_mask"][k]) for k, n in zip(names, sizes)])
  steps = len(problem["lrs"])
  grads = np.concatenate([problem["grads"][k].reshape(steps, -1) for k in names], axis=1)
  final = reference.adamw_trajectory(
    p0, grads, problem["lrs"], b1=B1, b2=B2, eps=EPS, weight_decay=WEIGHT_DECAY, decay_mask=mask
  )
  out, start = {}, 0
  for k, n in zip(names, sizes):
    out[k] = final[start : start + n].reshape(problem["params0"][k].shape)
    start += n
  return out


def make_optimizer(strategy: str, problem: dict[str, Any]) -> Any:
  """The optimizer of one strategy; the learning rate is a schedule that looks
  up ``problem["lrs"]``, or the Python float ``problem["constant_lr"]``.

  An optax ``GradientTransformation``, or for FlashOptim a
  ``FlashOptimizer(init, step)``: its weight-decay mask is ``param_groups``
  giving the undecayed leaves (by their ``"outer/inner"`` paths) weight decay 0.
  """
  learning_rate: optax.ScalarOrSchedule
  if problem["constant_lr"] is None:
    table = jnp.asarray(problem["lrs"], jnp.float32)
    learning_rate = lambda count: table[count]
  else:
    learning_rate = float(problem["constant_lr"])
  mask = _unflatten({k: v[3] for k, v in LAYOUT.items()})
  if strategy in strategies.REGISTRY:
    hp = strategies.AdamW(learning_rate, B1, B2, EPS, WEIGHT_DECAY, mask=mask)
    return strategies.REGISTRY[strategy].optimizer(hp)
  if strategy in FLASH:
    undecayed = [k for k, v in LAYOUT.items() if not v[3]]
    return _common.flash_adamw(
      strategy,
      learning_rate,
      WEIGHT_DECAY,
      b1=B1,
      b2=B2,
      eps=EPS,
      param_groups=[{"params": undecayed, "weight_decay": 0.0}],
    )
  raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(KNOWN)}")


def _master(strategy: str, params: Any, state: Any) -> Any:
  """The float32 values a strategy holds: ``master_params`` for COLLAGE, FlashOptim's
  ``reconstruct_weights`` (bf16 + its ECC correction), the params themselves for optax."""
  if _collage(strategy):
    return collage_optax.master_params(params, state)
  if strategy in FLASH:
    import flashoptim_jax  # pylint: disable=import-outside-toplevel

    return flashoptim_jax.reconstruct_weights(params, state.ecc)
  return params


def run_strategy(strategy: str, problem: dict[str, Any], info: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
  """Final params of one strategy (float32 values of ``hi + lo`` for COLLAGE).

  With ``info`` (a dict), ``info["bytes_per_param"]`` is filled in from the
  initial params and state arrays (the state keeps its shapes and dtypes).
  """
  dtype = strategies.REGISTRY[strategy].param_dtype if strategy in strategies.REGISTRY else jnp.bfloat16
  init, step = step_benchmark.step_function(make_optimizer(strategy, problem))
  params0 = _unflatten({k: jnp.asarray(v, dtype) for k, v in problem["params0"].items()})
  grads = _unflatten({k: jnp.asarray(v, dtype) for k, v in problem["grads"].items()})
  if info is not None:
    b = strategies.bytes_per_param(params0, init(params0), jax.tree.map(lambda g: g[0], grads))
    info["bytes_per_param"] = {k: round(v, 4) for k, v in b.items() if k != "n_params"}

  @jax.jit
  def replay(params, grads):
    def one(carry, g):
      return step(*carry, g), None

    (params, state), _ = jax.lax.scan(one, (params, init(params)), grads)
    return _master(strategy, params, state)

  final = jax.device_get(replay(params0, grads))
  return {k: np.asarray(v, np.float64) for k, v in _flatten(final).items()}


def available(strategies) -> tuple[list[str], dict[str, str]]:
  """``strategies`` less FlashOptim's when ``flashoptim_jax`` is not importable, and why those are skipped."""
  flash = [s for s in strategies if s in FLASH]
  why = _common.flash_unavailable() if flash else None
  skipped = {s: why for s in flash} if why else {}
  return [s for s in strategies if s not in skipped], skipped


def relative_error(
  final: dict[str, np.ndarray], ref: dict[str, np.ndarray], params0: dict[str, np.ndarray], names=None
) -> float:
  """``||θ_T − θ64_T|| / ||θ64_T − θ_0||`` over the leaves ``names`` (all by default)."""
  names = list(ref) if names is None else names
  cat = lambda d: np.concatenate([np.asarray(d[k], np.float64).ravel() for k in names])
  return float(np.linalg.norm(cat(final) - cat(ref)) / np.linalg.norm(cat(ref) - cat(params0)))


def run(
  steps: int = STEPS, seed: int = SEED, strategies=STRATEGIES, constant_lr: float | None = None
) -> dict[str, Any]:
  """The ``strategies`` on one stream; returns the errors, per leaf too, bytes per param and timings.

  FlashOptim's strategies are skipped, with the reason in ``"skipped"``, when it is not importable.
  """
  unknown = [s for s in strategies if s not in KNOWN]
  if unknown:
    raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(KNOWN)}")
  strategies, skipped = available(strategies)
  t0 = time.perf_counter()
  problem = make_problem(steps, seed, constant_lr)
  ref = run_float64(problem)
  seconds = {"stream+float64": time.perf_counter() - t0}
  errors, per_leaf, memory = {"float64": 0.0}, {}, {}
  for strategy in strategies:
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    final = run_strategy(strategy, problem, info)
    seconds[strategy] = time.perf_counter() - t0
    memory[strategy] = info["bytes_per_param"]
    errors[strategy] = relative_error(final, ref, problem["params0"])
    per_leaf[strategy] = {k: relative_error(final, ref, problem["params0"], [k]) for k in LAYOUT}
  return {
    "metric": "||theta_T - theta64_T|| / ||theta64_T - theta_0||",
    "config": {
      "steps": steps,
      "seed": seed,
      "constant_lr": constant_lr,
      "peak_lr": PEAK_LR,
      "warmup": WARMUP,
      "final_lr_fraction": FINAL_LR_FRACTION,
      "b1": B1,
      "b2": B2,
      "eps": EPS,
      "weight_decay": WEIGHT_DECAY,
      "params": {k: list(v[0]) for k, v in LAYOUT.items()},
      "backend": jax.default_backend(),
    },
    "strategies": {s: describe(s) for s in strategies},
    "relative_error": errors,
    "relative_error_per_leaf": per_leaf,
    "bytes_per_param": memory,
    "skipped": skipped,
    "seconds": seconds,
  }


def describe(strategy: str) -> dict[str, Any]:
  """What a strategy is, and for FlashOptim how its replay differs from the others'."""
  if _collage(strategy):
    kwargs = strategies.REGISTRY[strategy].collage
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return {
      "label": f"collage_optax.adamw({args})",
      "kind": "collage_optax",
      "formats": dict(zip(("param", "mu", "nu"), _formats(kwargs))),
    }
  if strategy in ("fp32", "bf16"):
    dtype = jnp.dtype(strategies.REGISTRY[strategy].param_dtype).name
    return {"label": f"optax.adamw, {dtype} params", "kind": "optax"}
  label, kwargs = _common.FLASH_VARIANTS[strategy]
  return {
    "label": label,
    "kind": "flashoptim_jax",
    "flash_adamw_kwargs": {"fused": False, **kwargs},
    "differences": (
      "weight-decay mask given as param_groups (weight_decay 0 on ln/scale, ln/bias): the same decay; "
      "schedule called with the pre-step count, as optax; master read with reconstruct_weights(params, "
      "state.ecc); its 8-bit moment scales are float16, one per 32 elements of the flattened leaf"
    ),
  }


def _collage(strategy: str) -> bool:
  """Whether ``strategy`` is a ``collage_optax.adamw`` of the registry."""
  return strategy in strategies.REGISTRY and bool(strategies.REGISTRY[strategy].collage)


def _formats(kwargs: Mapping[str, str]) -> tuple[str, str, str]:
  preset = collage_optax.PRESETS[kwargs["mode"]]
  return (kwargs.get("param_format", preset[0]), kwargs.get("mu_format", preset[1]), kwargs.get("nu_format", preset[2]))


def format_table(result: dict[str, Any]) -> str:
  leaves = list(LAYOUT)
  w = max(9, *(len(s) for s in result["relative_error"]))
  head = f"{'strategy':<{w}} {'all params':>11} " + " ".join(f"{k:>12}" for k in leaves) + f" {'B/param':>8}"
  rows = [head, "-" * len(head)]
  for s, e in result["relative_error"].items():
    per = result["relative_error_per_leaf"].get(s, {})
    b = result.get("bytes_per_param", {}).get(s, {}).get("params_plus_state")
    rows.append(
      f"{s:<{w}} {e:>11.3e} "
      + " ".join(f"{per.get(k, 0.0):>12.3e}" for k in leaves)
      + (f" {b:>8.3f}" if b is not None else f" {'':>8}")
    )
  for s, why in result.get("skipped", {}).items():
    rows.append(f"{s:<{w}} skipped: {why}")
  return "\n".join(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--seed", type=int, default=SEED)
  parser.add_argument(
    "--constant-lr",
    type=float,
    default=CONSTANT_LR,
    help="also replay the stream with this constant (Python float) learning rate",
  )
  parser.add_argument(
    "--strategies",
    default=",".join(ALL),
    help=f"comma-separated strategies among {', '.join(KNOWN)} (the probes {', '.join(PROBES)} are not in the default)",
  )
  parser.add_argument("--out", type=Path, default=RESULTS)
  args = parser.parse_args(argv)
  strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
  unknown = [s for s in strategies if s not in KNOWN]
  if unknown:
    parser.error(f"unknown strategies {unknown}; choose from {', '.join(KNOWN)}")
  started = time.perf_counter()
  result = run(args.steps, args.seed, strategies)
  print(
    f"relative trajectory error, {args.steps} steps, warmup + cosine learning rate (||θ_T − θ64_T|| / ||θ64_T − θ_0||):"
  )
  print(format_table(result))
  if args.constant_lr:
    result["constant_lr"] = run(args.steps, args.seed, strategies, constant_lr=args.constant_lr)
    print(f"\nthe same stream with a constant learning rate {args.constant_lr}:")
    print(format_table(result["constant_lr"]))
  result["wall_s"] = round(time.perf_counter() - started, 1)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
