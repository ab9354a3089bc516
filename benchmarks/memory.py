"""Memory of each strategy: persistent bytes per parameter, and a GPT training step compiled.

1. Persistent bytes per parameter, counted from the pytrees (``jax.eval_shape``
   of ``tx.init``, nothing allocated): params + optimizer state, and the
   gradients (which have the params' dtypes) on top. Compare the README's strategy table:
   A 8, B 10, C 12, C+ 14, D 16 bytes/param including gradients.
2. A full training step of the GPT of ``collage-optax compare``
   (``collage_optax.cli.gpt``): ``loss, grads = value_and_grad(loss)``, the optimizer
   update and ``apply_updates`` (``collage_optax.apply_gradients``), jitted with params and state donated, and
   ``jax.jit(step).lower(...).compile().memory_analysis()``: the bytes of the
   arguments (params, state, batch), outputs, outputs aliased to donated
   arguments, and temporaries (activations, gradients, optimizer scratch); peak
   = arguments + outputs − aliased + temporaries.

The fp32 strategy (D) keeps float32 params and computes in bfloat16 (the model's
``dtype``), JAX's usual mixed-precision recipe; the others keep bfloat16 params.

Run: ``python benchmarks/memory.py`` (writes ``benchmarks/results/memory.json``),
``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import collage_optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from collage_optax.cli import gpt, strategies

OUT = _common.RESULTS / "memory.json"


def _abstract_params(cfg: gpt.GPTConfig, dtype: Any) -> tuple[Any, Any]:
  """The GPT's graphdef and its params as ``ShapeDtypeStruct``s of ``dtype`` (nothing allocated)."""
  out = {}

  def init():
    graphdef, params = gpt.init_params(cfg, 0)
    out["graphdef"] = graphdef
    return params

  params = jax.eval_shape(init)
  return out["graphdef"], jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), params)


def persistent(cfg: gpt.GPTConfig, names: list[str]) -> dict[str, Any]:
  """Bytes per parameter of params, optimizer state and gradients, from the pytrees."""
  out: dict[str, Any] = {}
  for name in names:
    label, dtype, make = _common.STRATEGIES[name]
    _, params = _abstract_params(cfg, dtype)
    b = strategies.bytes_per_param(params, jax.eval_shape(make().init, params))
    out[name] = {"label": label, "n_params": b.pop("n_params")} | {k: round(v, 4) for k, v in b.items()}
  return out


def train_step_memory(cfg: gpt.GPTConfig, batch: int, context: int, names: list[str]) -> dict[str, Any]:
  """``memory_analysis()`` of a jitted GPT training step on ``batch`` windows of ``context`` bytes, per strategy."""
  out: dict[str, Any] = {"batch": batch, "context": context, "strategies": {}}
  windows = jax.ShapeDtypeStruct((batch, context + 1), jnp.uint8)
  for name in names:
    label, dtype, make = _common.STRATEGIES[name]
    tx = make()
    graphdef, params = _abstract_params(cfg, dtype)
    state = jax.eval_shape(tx.init, params)
    n = sum(p.size for p in jax.tree.leaves(params))

    def step(params, state, windows, tx=tx, graphdef=graphdef):
      loss, grads = jax.value_and_grad(gpt.loss, argnums=1)(graphdef, params, windows)
      params, state = collage_optax.apply_gradients(tx, grads, state, params)
      return params, state, loss

    mem = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, windows).compile().memory_analysis()
    assert mem is not None, "this backend reports no memory_analysis()"
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    peak = args + outs - alias + temp
    out["strategies"][name] = {
      "label": label,
      "n_params": n,
      "bytes": {"arguments": args, "outputs": outs, "aliased": alias, "temporaries": temp, "peak": peak},
      "per_param": {
        "arguments": args / n,
        "outputs": outs / n,
        "aliased": alias / n,
        "temporaries": temp / n,
        "peak": peak / n,
      },
    }
  return out


def tables(result: dict[str, Any]) -> str:
  rows = [
    [
      k,
      f"{v['params']:g}",
      f"{v['optimizer_state']:g}",
      f"{v['params_plus_state']:g}",
      f"{v['gradients']:g}",
      f"{v['total_with_gradients']:g}",
    ]
    for k, v in result["persistent_bytes_per_param"].items()
  ]
  first = _common.format_table(["strategy", "params", "opt state", "params+state", "grads", "total incl. grads"], rows)
  out = f"Persistent bytes per parameter (from the pytrees)\n{first}"
  for step in result["train_step"]:
    base = step["strategies"].get(_common.BASELINE)
    rows = []
    for k, v in step["strategies"].items():
      b = v["bytes"]
      mib = lambda x: f"{x / 2**20:.1f}"
      rel = f"{b['peak'] / base['bytes']['peak']:.2f}" if base else ""
      rows.append(
        [
          k,
          mib(b["arguments"]),
          mib(b["outputs"]),
          mib(b["aliased"]),
          mib(b["temporaries"]),
          mib(b["peak"]),
          f"{v['per_param']['peak']:.1f}",
          rel,
        ]
      )
    table = _common.format_table(
      [
        "strategy",
        "arguments MiB",
        "outputs MiB",
        "aliased MiB",
        "temporaries MiB",
        "peak MiB",
        "peak B/param",
        "peak × fp32",
      ],
      rows,
    )
    out += (
      f"\n\nGPT training step, compiled memory_analysis ({result['model']}; "
      f"batch {step['batch']} x context {step['context']})\n{table}"
    )
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument(
    "--steps", default="8x256,1x32", help="comma-separated batch x context of the compiled training steps"
  )
  parser.add_argument("--strategies", default=",".join(_common.STRATEGIES))
  parser.add_argument("--out", type=Path, default=OUT)
  parser.add_argument("--quick", action="store_true", help="tiny smoke run (1 layer, width 32)")
  args = parser.parse_args(argv)
  if args.quick:
    args.layers, args.width, args.heads, args.steps = 1, 32, 2, "2x16"
  names = [s.strip() for s in args.strategies.split(",") if s.strip()]
  unknown = [s for s in names if s not in _common.STRATEGIES]
  if unknown:
    parser.error(f"unknown strategies {unknown}; choose from {', '.join(_common.STRATEGIES)}")
  steps = [tuple(int(v) for v in s.split("x")) for s in args.steps.split(",")]
  context = max(c for _, c in steps)
  cfg = gpt.GPTConfig(layers=args.layers, width=args.width, heads=args.heads, context=context)
  started = time.time()
  result: dict[str, Any] = {
    "benchmark": "persistent bytes/param and compiled memory of a GPT training step",
    "machine": _common.machine(),
    "model": f"collage_optax.cli.gpt GPT: {cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, "
    f"compute dtype {jnp.dtype(cfg.dtype).name}",
    "config": {"layers": cfg.layers, "width": cfg.width, "heads": cfg.heads, "max_context": cfg.context},
    "persistent_bytes_per_param": persistent(cfg, names),
    "train_step": [train_step_memory(cfg, b, c, names) for b, c in steps],
  }
  result["wall_s"] = round(time.time() - started, 1)
  _common.write_json(result, args.out)
  print(tables(result))
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
