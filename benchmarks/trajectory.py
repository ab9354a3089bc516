"""Trajectory quality: how far bf16 AdamW variants drift from float64 AdamW.

One fixed, seeded stream of bfloat16 gradients is replayed through

* ``float64``: AdamW in numpy float64 (``tests/reference.py``), the reference;
* ``fp32``: ``optax.adamw`` on float32 params (the fp32-master recipe, D);
* ``bf16``: ``optax.adamw`` on bfloat16 params (naive, A);
* ``light`` / ``plus`` / ``full``: ``collage_optax.adamw(mode=...)`` on
  bfloat16 params (B, C, C+), read out with ``collage_optax.master_params``.

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

Run: ``python benchmarks/trajectory.py`` (writes
``benchmarks/results/trajectory.json`` and prints the tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import collage_optax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import reference  # noqa: E402  (tests/reference.py: numpy float64 AdamW)

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
STRATEGIES = ("fp32", "bf16", "light", "plus", "full")


def _unflatten(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
  tree: dict[str, dict[str, Any]] = {}
  for name, x in flat.items():
    outer, inner = name.split("/")
    tree.setdefault(outer, {})[inner] = x
  return tree


def _flatten(tree: dict[str, dict[str, Any]]) -> dict[str, Any]:
  return {f"{o}/{i}": tree[o][i] for o in tree for i in tree[o]}


def make_problem(steps: int = STEPS, seed: int = SEED,
                 constant_lr: Optional[float] = None) -> dict[str, Any]:
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
    grads[name] = flat[:, start:start + size[name]].reshape((steps,) + shape)
    start += size[name]
  if constant_lr is None:
    lrs = reference.cosine_schedule(steps, PEAK_LR, WARMUP, FINAL_LR_FRACTION)
  else:
    lrs = np.full(steps, constant_lr)
  return {"params0": params0, "decay_mask": mask, "grads": grads, "lrs": lrs,
          "constant_lr": constant_lr}


def run_float64(problem: dict[str, Any]) -> dict[str, np.ndarray]:
  """Final params of float64 AdamW (numpy, independent of optax and of us)."""
  names = list(LAYOUT)
  sizes = [problem["params0"][k].size for k in names]
  p0 = np.concatenate([problem["params0"][k].astype(np.float64).ravel() for k in names])
  mask = np.concatenate([np.full(n, problem["decay_mask"][k]) for k, n in zip(names, sizes)])
  steps = len(problem["lrs"])
  grads = np.concatenate(
      [problem["grads"][k].reshape(steps, -1) for k in names], axis=1)
  final = reference.adamw_trajectory(
      p0, grads, problem["lrs"], b1=B1, b2=B2, eps=EPS,
      weight_decay=WEIGHT_DECAY, decay_mask=mask)
  out, start = {}, 0
  for k, n in zip(names, sizes):
    out[k] = final[start:start + n].reshape(problem["params0"][k].shape)
    start += n
  return out


def make_optimizer(strategy: str, problem: dict[str, Any]) -> optax.GradientTransformation:
  """The optimizer of one strategy; the learning rate is a schedule that looks
  up ``problem["lrs"]``, or the Python float ``problem["constant_lr"]``."""
  if problem["constant_lr"] is None:
    table = jnp.asarray(problem["lrs"], jnp.float32)
    learning_rate = lambda count: table[count]
  else:
    learning_rate = float(problem["constant_lr"])
  mask = _unflatten({k: v[3] for k, v in LAYOUT.items()})
  if strategy in ("fp32", "bf16"):
    return optax.adamw(learning_rate, B1, B2, EPS, weight_decay=WEIGHT_DECAY, mask=mask)
  return collage_optax.adamw(
      learning_rate, B1, B2, EPS, weight_decay=WEIGHT_DECAY, mask=mask, mode=strategy)


def run_strategy(strategy: str, problem: dict[str, Any]) -> dict[str, np.ndarray]:
  """Final params of one strategy (float32 values of ``hi + lo`` for COLLAGE)."""
  dtype = jnp.float32 if strategy == "fp32" else jnp.bfloat16
  tx = make_optimizer(strategy, problem)
  params0 = _unflatten({k: jnp.asarray(v, dtype) for k, v in problem["params0"].items()})
  grads = _unflatten({k: jnp.asarray(v, dtype) for k, v in problem["grads"].items()})

  @jax.jit
  def replay(params, grads):
    def step(carry, g):
      p, state = carry
      u, state = tx.update(g, state, p)
      return (optax.apply_updates(p, u), state), None

    (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), grads)
    if strategy in collage_optax.MODES:
      return collage_optax.master_params(params, state)
    return params

  final = jax.device_get(replay(params0, grads))
  return {k: np.asarray(v, np.float64) for k, v in _flatten(final).items()}


def relative_error(final: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                   params0: dict[str, np.ndarray], names=None) -> float:
  """``||θ_T − θ64_T|| / ||θ64_T − θ_0||`` over the leaves ``names`` (all by default)."""
  names = list(ref) if names is None else names
  cat = lambda d: np.concatenate([np.asarray(d[k], np.float64).ravel() for k in names])
  return float(np.linalg.norm(cat(final) - cat(ref)) / np.linalg.norm(cat(ref) - cat(params0)))


def run(steps: int = STEPS, seed: int = SEED, strategies=STRATEGIES,
        constant_lr: Optional[float] = None) -> dict[str, Any]:
  """All strategies on one stream; returns the errors, per leaf too, and timings."""
  t0 = time.perf_counter()
  problem = make_problem(steps, seed, constant_lr)
  ref = run_float64(problem)
  seconds = {"stream+float64": time.perf_counter() - t0}
  errors, per_leaf = {"float64": 0.0}, {}
  for strategy in strategies:
    t0 = time.perf_counter()
    final = run_strategy(strategy, problem)
    seconds[strategy] = time.perf_counter() - t0
    errors[strategy] = relative_error(final, ref, problem["params0"])
    per_leaf[strategy] = {
        k: relative_error(final, ref, problem["params0"], [k]) for k in LAYOUT}
  return {
      "metric": "||theta_T - theta64_T|| / ||theta64_T - theta_0||",
      "config": {
          "steps": steps, "seed": seed, "constant_lr": constant_lr,
          "peak_lr": PEAK_LR, "warmup": WARMUP,
          "final_lr_fraction": FINAL_LR_FRACTION, "b1": B1, "b2": B2, "eps": EPS,
          "weight_decay": WEIGHT_DECAY,
          "params": {k: list(v[0]) for k, v in LAYOUT.items()},
          "backend": jax.default_backend(),
      },
      "relative_error": errors,
      "relative_error_per_leaf": per_leaf,
      "seconds": seconds,
  }


def format_table(result: dict[str, Any]) -> str:
  leaves = list(LAYOUT)
  head = f"{'strategy':<9} {'all params':>11} " + " ".join(f"{k:>12}" for k in leaves)
  rows = [head, "-" * len(head)]
  for s, e in result["relative_error"].items():
    per = result["relative_error_per_leaf"].get(s, {})
    rows.append(f"{s:<9} {e:>11.3e} " + " ".join(f"{per.get(k, 0.0):>12.3e}" for k in leaves))
  return "\n".join(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--seed", type=int, default=SEED)
  parser.add_argument("--constant-lr", type=float, default=CONSTANT_LR,
                      help="also replay the stream with this constant (Python float) learning rate")
  parser.add_argument("--out", type=Path, default=RESULTS)
  args = parser.parse_args(argv)
  result = run(args.steps, args.seed)
  print(f"relative trajectory error, {args.steps} steps, warmup + cosine learning rate "
        "(||θ_T − θ64_T|| / ||θ64_T − θ_0||):")
  print(format_table(result))
  if args.constant_lr:
    result["constant_lr"] = run(args.steps, args.seed, constant_lr=args.constant_lr)
    print(f"\nthe same stream with a constant learning rate {args.constant_lr}:")
    print(format_table(result["constant_lr"]))
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
