"""The report of a ``collage-optax compare`` run: statistics, the table, the JSON and the plots.

Reads what :func:`collage_optax.cli.experiment.run` returns. The final
validation losses are compared to fp32's seed by seed: the mean of the paired
relative differences with a 95% Student-t interval (:func:`paired_interval`);
:func:`summarize` adds, per strategy, the mean ± sd of the loss, the metrics,
the bytes per parameter and the step time relative to fp32's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from collage_optax.cli.experiment import TrainConfig

__all__ = [
  "COLORS",
  "SIGNIFICANT_DIGITS",
  "format_delta",
  "format_table",
  "from_run",
  "paired_interval",
  "plot",
  "plot_frontier",
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


def _smooth(y: Sequence[float] | np.ndarray, width: int) -> np.ndarray:
  """Trailing moving average (shorter at the start)."""
  a = np.asarray(y, np.float64)
  if width <= 1 or len(a) == 0:
    return a
  c = np.cumsum(np.insert(a, 0, 0.0))
  idx = np.arange(1, len(a) + 1)
  lo = np.maximum(idx - width, 0)
  return (c[idx] - c[lo]) / (idx - lo)


COLORS = {
  "fp32": "black",
  "bf16": "tab:red",
  "light": "tab:orange",
  "plus": "tab:blue",
  "full": "tab:green",
  "exact": "tab:purple",
  "compact": "tab:brown",
  "sr": "tab:pink",
}


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def _mean_curve(seeds: list[dict[str, Any]], key: str) -> np.ndarray:
  """The mean over seeds of a per-step curve (``None`` entries as NaN)."""
  return np.nanmean([np.asarray([np.nan if v is None else v for v in r["curves"][key]], np.float64) for r in seeds], 0)


def plot(results: dict[str, Any], path: Path) -> None:
  """``loss.png``: validation loss (mean over seeds, band: min to max) and smoothed training loss; EDQ."""
  plt = _pyplot()
  cfg = results["config"]
  fig, (ax_loss, ax_edq) = plt.subplots(1, 2, figsize=(13, 4.8))
  tops, bottoms = [], []
  for name, r in results["strategies"].items():
    seeds = r["seeds"]
    color = COLORS.get(name)
    train = _mean_curve(seeds, "train_loss")
    n = len(train)
    steps = np.arange(1, n + 1)
    width = max(1, n // 40)
    train = _smooth(train, width)
    val_steps = seeds[0]["curves"]["val_step"]
    vals = np.asarray([s["curves"]["val_loss"] for s in seeds], np.float64)
    ax_loss.plot(steps, train, color=color, alpha=0.3, lw=1)
    label = f"{name}: {r['val_loss']:.3f}" + (f" ± {r['val_loss_std']:.3f}" if r["val_loss_std"] else "")
    ax_loss.plot(val_steps, vals.mean(0), "o-", color=color, ms=3, lw=1.5, label=label)
    if len(seeds) > 1:
      ax_loss.fill_between(val_steps, vals.min(0), vals.max(0), color=color, alpha=0.12, lw=0)
    if r["edq"] is not None:
      ax_edq.plot(steps, _smooth(_mean_curve(seeds, "edq"), width), color=color, lw=1.4, label=name)
    if n:
      late = [v for s, v in zip(val_steps, vals.max(0)) if s >= n // 5]
      tops.append(max(train[n // 5 :].max(), max(late)))
      bottoms.append(min(train.min(), vals.min()))
  if tops:  # Zoom on the last 80% of the run, where the strategies part.
    lo, hi = min(bottoms), max(tops)
    ax_loss.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  m, t = cfg["model"], cfg["train"]
  n_seeds = len(cfg.get("seeds", [0]))
  ax_loss.set(
    xlabel="step",
    ylabel="loss (nats/byte)",
    title=f"GPT {m['layers']}×{m['width']}, context {m['context']}, {n_seeds} seed(s): val (dots, band) and train",
  )
  ax_loss.legend(loc="upper right", fontsize=8)
  ax_loss.grid(alpha=0.3)
  if tops:  # The learning rate, to show where the updates get small.
    ax_lr = ax_edq.twinx()
    sched = TrainConfig(**{f.name: t[f.name] for f in dataclasses.fields(TrainConfig)}).schedule()
    steps = np.arange(t["steps"])
    ax_lr.plot(steps, [float(sched(i)) for i in steps], color="gray", lw=1, ls="--", alpha=0.6)
    ax_lr.set_ylabel("learning rate (dashed)", color="gray")
    ax_lr.tick_params(axis="y", colors="gray")
    ax_lr.set_ylim(0, 1.05 * t["lr"])
  ax_edq.axhline(1.0, color="gray", lw=0.8, ls=":")
  ax_edq.set(
    xlabel="step",
    ylabel="EDQ  <Δθ_eff, u> / ||u||²",
    title=f"effective descent quality (1 = no update lost); β2={t['b2']}, peak lr {t['lr']:g}",
  )
  ax_edq.legend(loc="lower left", fontsize=8)
  ax_edq.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_frontier(results: dict[str, Any], path: Path) -> None:
  """``frontier.png``: bytes per param (params + state + gradients) vs Δ validation loss vs fp32, with 95% CIs."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 5))
  for name, r in results["strategies"].items():
    if r["delta_vs_fp32"] is None:
      continue
    x, y = r["bytes_per_param_with_grads"], 100 * r["delta_vs_fp32"]
    ci = r.get("delta_ci95")
    err = [[y - 100 * ci[0]], [100 * ci[1] - y]] if ci else None
    ax.errorbar([x], [y], yerr=err, fmt="o", color=COLORS.get(name), capsize=4, ms=6)
    ratio = r.get("step_time_ratio")
    ax.annotate(
      f"{name}" + (f" ({ratio:.2f}×)" if ratio else ""), (x, y), xytext=(6, 4), textcoords="offset points", fontsize=9
    )
  ax.axhline(0.0, color="gray", lw=0.8, ls=":")
  n_seeds = len(results["config"].get("seeds", [0]))
  ax.set(
    xlabel="bytes per parameter (params + optimizer state + gradients)",
    ylabel="Δ final validation loss vs fp32 (%)",
    title=f"memory vs quality, {n_seeds} seed(s), 95% CI; label: step time vs fp32",
  )
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
