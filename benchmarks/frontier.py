"""The memory / precision / speed frontier of the strategies, from the benchmarks' JSON.

Reads (nothing is run here)

* ``results/trajectory.json`` (``benchmarks/trajectory.py``): per strategy the
  bytes per parameter of its params + optimizer state (from the arrays), with
  the gradients on top (bfloat16, 2 B/param; float32 for fp32), and the
  relative trajectory error against float64 AdamW,
  ``||θ_T − θ64_T|| / ||θ64_T − θ_0||``, with the warmup + cosine schedule and
  with a constant learning rate;
* ``results/step.json`` (``benchmarks/step.py``), when present: the step time
  relative to ``optax.adamw`` on float32 params at one size (the largest by
  default), both steps donated (``ratio_to_fp32``), and both not donated
  (``ratio_to_fp32_nondonated``). FlashOptim's step cannot be donated: its
  "donated" column is its non-donated median over fp32's donated median (marked
  ``*``). A strategy that step.json lacks (or a missing step.json) shows "—";
* ``results/memory.json`` (``benchmarks/memory.py``), when present: the same
  persistent bytes per parameter on the 19M-parameter GPT, where it has the
  strategy (the trajectory's tree is small, so its per-32 scales cost a little
  more there), recorded in the JSON.

A row is on the frontier (``frontier: true``) when no other strategy has at
most its bytes per parameter (with gradients) and at most its trajectory error,
one of them strictly less, and its error is below 1 (not training at all,
``θ_T = θ_0``, has error 1).

Run: ``python benchmarks/frontier.py`` (writes ``benchmarks/results/frontier.json``
and prints the markdown table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

OUT = _common.RESULTS / "frontier.json"
DASH = "—"


def _load(path: Path | None) -> dict[str, Any] | None:
  if path is None or not path.exists():
    return None
  return json.loads(path.read_text())


def _pick_size(step: dict[str, Any] | None, n_params: int | None) -> dict[str, Any] | None:
  """The step.json size entry nearest ``n_params`` (the largest when ``None``)."""
  sizes = (step or {}).get("sizes") or []
  if not sizes:
    return None
  if n_params is None:
    return max(sizes, key=lambda s: s["n_params"])
  return min(sizes, key=lambda s: abs(s["n_params"] - n_params))


def step_ratios(size: dict[str, Any] | None, name: str) -> dict[str, Any]:
  """One strategy's step-time ratios to fp32 at one step.json size (``None`` where unknown)."""
  entries = (size or {}).get("strategies", {})
  s, base = entries.get(name), entries.get(_common.BASELINE)
  if s is None:
    return {"donated": None, "ratio_to_fp32": None, "ratio_to_fp32_nondonated": None}
  donated = s.get("donated", True)
  ratio = s.get("ratio_to_fp32")
  if ratio is None and not donated and base is not None:
    ratio = s["median_ms"] / base["median_ms"]  # its non-donated step against fp32's donated one
  return {"donated": donated, "ratio_to_fp32": ratio, "ratio_to_fp32_nondonated": s.get("ratio_to_fp32_nondonated")}


def frontier(
  trajectory: dict[str, Any],
  step: dict[str, Any] | None = None,
  memory: dict[str, Any] | None = None,
  n_params: int | None = None,
) -> dict[str, Any]:
  """One row per strategy of ``trajectory`` (float64, the reference, excluded), in its order."""
  size = _pick_size(step, n_params)
  constant = trajectory.get("constant_lr", {}).get("relative_error", {})
  persistent = (memory or {}).get("persistent_bytes_per_param", {})
  rows: dict[str, Any] = {}
  for name, error in trajectory["relative_error"].items():
    if name == "float64":
      continue
    b = trajectory.get("bytes_per_param", {}).get(name, {})
    rows[name] = {
      "label": trajectory.get("strategies", {}).get(name, {}).get("label", name),
      "bytes_per_param": b.get("params_plus_state"),
      "bytes_per_param_with_gradients": b.get("total_with_gradients"),
      "gradient_bytes_per_param": b.get("gradients"),
      "relative_error": error,
      "relative_error_constant_lr": constant.get(name),
      "step": step_ratios(size, name),
      "step_all_sizes": {str(s["n_params"]): step_ratios(s, name) for s in (step or {}).get("sizes", [])},
      "memory_json": persistent.get(name),
    }
  for name, row in rows.items():
    row["frontier"] = _on_frontier(name, rows)
  return {
    "metric": trajectory.get("metric"),
    "trajectory_config": trajectory.get("config"),
    "step_size_n_params": size["n_params"] if size else None,
    "step_machine": (step or {}).get("machine"),
    "skipped": trajectory.get("skipped", {}),
    "strategies": rows,
  }


def _on_frontier(name: str, rows: dict[str, Any]) -> bool | None:
  key = lambda r: (r["bytes_per_param_with_gradients"], r["relative_error"])
  mine = key(rows[name])
  if None in mine:
    return None
  if mine[1] >= 1.0:
    return False
  for other, row in rows.items():
    theirs = key(row)
    if other != name and None not in theirs and theirs[0] <= mine[0] and theirs[1] <= mine[1] and theirs != mine:
      return False
  return True


def _fmt(x: float | None, spec: str) -> str:
  return DASH if x is None else format(x, spec)


def table(result: dict[str, Any]) -> str:
  """The markdown table: one row per strategy."""
  n = result["step_size_n_params"]
  at = f" ({n / 1e6:.0f}M)" if n else ""
  rows = []
  for name, r in result["strategies"].items():
    st = r["step"]
    ratio = _fmt(st["ratio_to_fp32"], ".2f")
    if st["donated"] is False and st["ratio_to_fp32"] is not None:
      ratio += "*"
    rows.append(
      [
        name,
        _fmt(r["bytes_per_param"], ".2f"),
        _fmt(r["bytes_per_param_with_gradients"], ".2f"),
        _fmt(r["relative_error"], ".2e"),
        _fmt(r["relative_error_constant_lr"], ".2e"),
        ratio,
        _fmt(st["ratio_to_fp32_nondonated"], ".2f"),
        "✓" if r["frontier"] else "",
      ]
    )
  return _common.format_table(
    [
      "strategy",
      "B/param params+state",
      "B/param + grads",
      "error vs float64",
      "error, constant lr",
      f"step × fp32{at}",
      "step × fp32, not donated",
      "frontier",
    ],
    rows,
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trajectory", type=Path, default=_common.RESULTS / "trajectory.json")
  parser.add_argument("--step", type=Path, default=_common.RESULTS / "step.json")
  parser.add_argument("--memory", type=Path, default=_common.RESULTS / "memory.json")
  parser.add_argument("--size", default=None, help="step.json size to read (nearest, e.g. 16M); the largest by default")
  parser.add_argument("--out", type=Path, default=OUT)
  args = parser.parse_args(argv)
  trajectory = _load(args.trajectory)
  if trajectory is None:
    parser.error(f"{args.trajectory} not found: run benchmarks/trajectory.py first")
  result = frontier(
    trajectory, _load(args.step), _load(args.memory), _common.parse_count(args.size) if args.size else None
  )
  result["sources"] = {
    k: str(p) if p.exists() else None
    for k, p in (("trajectory", args.trajectory), ("step", args.step), ("memory", args.memory))
  }
  _common.write_json(result, args.out)
  print(table(result))
  print(
    "\n* FlashOptim's step cannot be donated (its state shares buffers): its non-donated step over fp32's donated one."
  )
  print(f"{DASH}: not in {args.step.name}.")
  for name, why in result["skipped"].items():
    print(f"skipped {name}: {why}")
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
