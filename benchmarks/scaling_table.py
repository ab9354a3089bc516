"""Memory per device of each strategy at 1B/7B/70B parameters, replicated or FSDP-sharded.

Bytes per parameter are counted from the pytrees, not assumed: params of the
strategy's dtype, ``jax.eval_shape(tx.init, params)`` (nothing allocated) and
gradients of the params' dtypes (the README's table: A 8, B 10, C 12, C+ 14, D 16).
Per device:

* data parallel (``dp``): every device holds everything: ``bytes/param × N``;
* FSDP / ZeRO-3 over ``n`` devices (``fsdp-n``): params, gradients and
  optimizer state are all sharded, and COLLAGE's state follows its params
  (``collage_optax.state_shardings``): ``bytes/param × N / n``.

Not included: activations, and the weights FSDP all-gathers for one layer at a
time (they are bf16 for A, B, C, C+ and for D's bf16 compute alike).

Run: ``python benchmarks/scaling_table.py`` (writes
``benchmarks/results/scaling.json`` and prints the markdown table of
``docs/scaling.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from collage_optax.cli import strategies

OUT = _common.RESULTS / "scaling.json"
MODEL_SIZES = {"1B": 10**9, "7B": 7 * 10**9, "70B": 70 * 10**9}
SHARDINGS = {"dp": 1, "fsdp-8": 8, "fsdp-64": 64, "fsdp-256": 256}
#: strategy letter (the README's table) -> name in ``_common.STRATEGIES``.
STRATEGIES = {"A": "bf16", "B": "light", "C": "plus", "C+": "full", "D": "fp32"}
GIB = 2**30


def bytes_per_param(name: str) -> float:
  """Params + optimizer state (but its step counts) + gradients of one strategy, per parameter."""
  _, dtype, make = _common.STRATEGIES[name]
  params = {"w": jax.ShapeDtypeStruct((256, 512), dtype), "b": jax.ShapeDtypeStruct((512,), dtype)}
  return strategies.bytes_per_param(params, jax.eval_shape(make().init, params), scalars=False)["total_with_gradients"]


def compute() -> dict[str, Any]:
  per_param = {letter: bytes_per_param(name) for letter, name in STRATEGIES.items()}
  gib = {
    size: {letter: {s: round(b * n / d / GIB, 2) for s, d in SHARDINGS.items()} for letter, b in per_param.items()}
    for size, n in MODEL_SIZES.items()
  }
  saved = {
    size: {
      letter: {s: round((per_param["D"] - b) * n / d / GIB, 2) for s, d in SHARDINGS.items()}
      for letter, b in per_param.items()
      if letter != "D"
    }
    for size, n in MODEL_SIZES.items()
  }
  return {
    "bytes_per_param": per_param,
    "model_sizes": MODEL_SIZES,
    "devices": SHARDINGS,
    "gib_per_device": gib,
    "gib_saved_per_device_vs_D": saved,
    "labels": {letter: _common.STRATEGIES[name][0] for letter, name in STRATEGIES.items()},
  }


def markdown(data: dict[str, Any]) -> str:
  """The table of ``docs/scaling.md``: GiB per device; C's saving against D."""
  header = ["params", "strategy", "bytes/param"] + [
    "replicated (DP)" if s == "dp" else f"FSDP {d}-way" for s, d in data["devices"].items()
  ]
  rows = []
  for size, by_letter in data["gib_per_device"].items():
    for letter, by_sharding in by_letter.items():
      rows.append([size, letter, f"{data['bytes_per_param'][letter]:g}"] + [f"{v:,.2f}" for v in by_sharding.values()])
    saved = data["gib_saved_per_device_vs_D"][size]["C"]
    rows.append(
      [size, "**saved by C vs D**", f"{data['bytes_per_param']['D'] - data['bytes_per_param']['C']:g}"]
      + [f"**{v:,.2f}**" for v in saved.values()]
    )
  return _common.format_table(header, rows)


def main() -> None:
  data = compute()
  _common.write_json(data, OUT)
  print(markdown(data))


if __name__ == "__main__":
  main()
