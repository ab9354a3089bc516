"""The report of a ``collage-optax compare`` run: statistics, the table and the JSON.

Reads what :func:`collage_optax.cli.experiment.run` returns. The final
validation losses are compared to fp32's seed by seed: the mean of the paired
relative differences with a 95% Student-t interval (:func:`paired_interval`);
:func:`summarize` adds, per strategy, the mean ± sd of the loss, the metrics,
the bytes per parameter and the step time relative to fp32's. The plots are
:mod:`collage_optax.cli.plots`'.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
  "SIGNIFICANT_DIGITS",
  "format_delta",
  "format_table",
  "from_run",
  "paired_interval",
  "summarize",
  "write_json",
]

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom.
_T975 = (
  12.706,
  4.303,
  3.182,
  2.776,
  2.571,
  2.447,
  2.365,
  2.306,
  2.262,
  2.228,
  2.201,
  2.179,
  2.160,
  2.145,
  2.131,
  2.120,
  2.110,
  2.101,
  2.093,
  2.086,
  2.080,
  2.074,
  2.069,
  2.064,
  2.060,
  2.056,
  2.052,
  2.048,
  2.045,
  2.042,
)


def paired_interval(values: Sequence[float], reference: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
  """The mean relative difference ``values/reference − 1`` over paired seeds, with its 95% interval.

  ``d_i = x_i / r_i − 1``; the interval is ``mean(d) ± t(0.975, n − 1)·sd(d)/√n``
  (Student's t, ``sd`` with ``n − 1``). One pair has no interval (``None``).
  """
  d = np.asarray(values, np.float64) / np.asarray(reference, np.float64) - 1.0
  n, mean = len(d), float(np.mean(d))
  if n < 2:
    return mean, None
  df = n - 1
  # Beyond the table: the Cornish–Fisher expansion of t around z = 1.96 (error < 1e-4 for df > 30).
  t = (
    _T975[df - 1]
    if df <= len(_T975)
    else 1.96 + (1.96**3 + 1.96) / (4 * df) + (5 * 1.96**5 + 16 * 1.96**3 + 3 * 1.96) / (96 * df**2)
  )
  half = t * float(np.std(d, ddof=1)) / math.sqrt(n)
  return mean, (mean - half, mean + half)


def summarize(
  runs: dict[str, list[dict[str, Any]]], sizes: dict[str, dict[str, Any]], backend: str = "cpu"
) -> dict[str, Any]:
  """Per strategy: mean ± sd of the final validation loss over its seeds, Δ vs fp32 (paired), metrics.

  ``runs[strategy]`` is the list of per-seed results; Δ pairs each seed with
  fp32's same seed (only seeds both finished). A strategy whose interval
  contains 0 is ``approx_fp32``. ``backend``: where it ran (the step time
  ratio is of CPU time on a CPU, of wall-clock time elsewhere).
  """
  ref = {r["seed"]: r for r in runs.get("fp32", [])}
  out = {}
  for name, seeds in runs.items():
    if not seeds:
      continue
    losses = [r["val_loss"] for r in seeds]
    paired = [(r["val_loss"], ref[r["seed"]]["val_loss"]) for r in seeds if r["seed"] in ref]
    delta, ci = paired_interval(*zip(*paired)) if paired else (None, None)
    for r in seeds:
      r["delta_vs_fp32"] = r["val_loss"] / ref[r["seed"]]["val_loss"] - 1.0 if r["seed"] in ref else None
    mean = lambda key: float(np.mean([r[key] for r in seeds])) if seeds[0][key] is not None else None
    val = float(np.mean(losses))
    out[name] = {
      "val_loss": val,
      "val_loss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else None,
      "val_ppl": math.exp(min(val, 700.0)),
      "delta_vs_fp32": delta,
      "delta_ci95": list(ci) if ci else None,
      "approx_fp32": (ci[0] <= 0.0 <= ci[1]) if ci and name != "fp32" else None,
      "n_seeds": len(seeds),
      "edq": mean("edq"),
      "lost_fraction": mean("lost_fraction"),
      "frozen": _frozen_in_any(seeds),
      **sizes[name],
      "step_time_s": float(np.median([r["step_time_s"] for r in seeds])),
      "step_cpu_s": float(np.median([r["step_cpu_s"] for r in seeds])),
      "seeds": seeds,
    }
  # On a CPU, other processes sharing the cores slow the wall clock by the
  # minute; the CPU time a step takes does not depend on them. On an
  # accelerator, the host's CPU time means nothing: wall clock it is.
  basis = "cpu" if backend == "cpu" else "wall"
  base = out.get("fp32")
  for r in out.values():
    r["step_wall_ratio"] = r["step_time_s"] / base["step_time_s"] if base and base["step_time_s"] > 0 else None
    r["step_cpu_ratio"] = r["step_cpu_s"] / base["step_cpu_s"] if base and base["step_cpu_s"] > 0 else None
    r["step_time_ratio"] = r[f"step_{basis}_ratio"]
  return out


def _frozen_in_any(seeds: list[dict[str, Any]]) -> list[str] | None:
  """The leaves frozen at the end of at least one seed (``None`` when the strategy tracks no metrics)."""
  found = [r.get("frozen") for r in seeds]
  if all(f is None for f in found):
    return None
  return sorted({leaf for f in found if f for leaf in f})


def format_frozen(results: dict[str, Any]) -> str:
  """One line per strategy that froze leaves (``collage_optax.precision_report`` at the end of training)."""
  lines = []
  for name, r in results["strategies"].items():
    if r.get("frozen"):
      lines.append(f"{name} froze {len(r['frozen'])} leaves (most updates rounded away): {', '.join(r['frozen'])}")
  tracked = [n for n, r in results["strategies"].items() if r.get("frozen") == []]
  if tracked:
    lines.append(f"no frozen leaf: {', '.join(tracked)}")
  return "\n".join(lines)


def from_run(run: dict[str, Any]) -> dict[str, Any]:
  """The results of a run (:func:`collage_optax.cli.experiment.run`): its config, ``partial``, the
  per-strategy summary (:func:`summarize`) and the ``error`` that stopped it, if one did."""
  summary = summarize(run["runs"], run["sizes"], run["config"]["backend"])
  out = {"config": run["config"], "partial": run["partial"], "strategies": summary}
  if "error" in run:
    out["error"] = run["error"]
  return out


def _pct(d: float) -> str:
  return f"{100 * d:+.2f}%".replace("-", "−")


def format_delta(r: dict[str, Any], name: str = "") -> str:
  """Δ vs fp32 as the table shows it: ``≈ fp32`` when the 95% interval contains 0."""
  if name == "fp32" or r["delta_vs_fp32"] is None:
    return "—"
  ci = r.get("delta_ci95")
  if not ci:
    return _pct(r["delta_vs_fp32"])
  span = f"[{_pct(ci[0])}, {_pct(ci[1])}]"
  return f"≈ fp32 {span}" if r.get("approx_fp32") else f"{_pct(r['delta_vs_fp32'])} {span}"


def _fmt_ratio(r: float | None) -> str:
  return "—" if r is None else f"{r:.2f}×"


def _fmt(x: float | None, spec: str = ".3f") -> str:
  return "—" if x is None else format(x, spec)


def format_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table (readable in a terminal too)."""
  cpu = results["config"].get("backend") == "cpu"
  n = max((r["n_seeds"] for r in results["strategies"].values()), default=0)
  head = [
    "strategy",
    f"val loss (mean ± sd, {n} seeds)" if n > 1 else "val loss",
    "Δ vs fp32 [95% CI]" if n > 1 else "Δ vs fp32",
    "mean EDQ",
    "lost fraction",
    "bytes/param",
    "step time (CPU)" if cpu else "step time",
  ]
  rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
  for name, r in results["strategies"].items():
    loss = f"{r['val_loss']:.4f}" + (f" ± {r['val_loss_std']:.4f}" if r["val_loss_std"] is not None else "")
    rows.append(
      [
        name,
        loss,
        format_delta(r, name),
        _fmt(r["edq"]),
        _fmt(r["lost_fraction"]),
        f"{r['bytes_per_param']:.1f}",
        _fmt_ratio(r["step_time_ratio"]),
      ]
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = []
  for row in rows:
    cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
    lines.append("| " + " | ".join(cells) + " |")
  if results.get("partial"):
    lines.append("")
    lines.append("(partial: interrupted; each strategy over the seeds it finished)")
  return "\n".join(lines)


#: The significant digits of the floats in ``results.json``: each is within a
#: relative ``0.5·10**(1 − SIGNIFICANT_DIGITS)`` of the value computed.
SIGNIFICANT_DIGITS = 6


def _rounded(x: Any) -> Any:
  """Floats to :data:`SIGNIFICANT_DIGITS` significant digits, for a compact JSON file."""
  if isinstance(x, float):
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _rounded(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_rounded(v) for v in x]
  return x


def write_json(results: dict[str, Any], path: Path) -> None:
  """``results`` as JSON, its floats rounded to :data:`SIGNIFICANT_DIGITS` significant digits."""
  path.write_text(json.dumps(_rounded(results), indent=1, ensure_ascii=False) + "\n")
