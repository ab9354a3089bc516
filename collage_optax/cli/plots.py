"""The plots of a ``collage-optax compare`` run (matplotlib, imported when a plot is drawn).

Each reads the results of :func:`collage_optax.cli.report.from_run` (or their
JSON) and writes one PNG.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from collage_optax.cli.experiment import TrainConfig

__all__ = ["COLORS", "plot", "plot_frontier"]


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


def _label(ax: Any, xlabel: str, ylabel: str, title: str, legend: str | None = None) -> None:
  """Axis labels, title, a light grid, and the legend at ``legend`` (none if ``None``)."""
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  if legend is not None:
    ax.legend(loc=legend, fontsize=8)
  ax.grid(alpha=0.3)


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
  _label(
    ax_loss,
    "step",
    "loss (nats/byte)",
    f"GPT {m['layers']}×{m['width']}, context {m['context']}, {n_seeds} seed(s): val (dots, band) and train",
    legend="upper right",
  )
  if tops:  # The learning rate, to show where the updates get small.
    ax_lr = ax_edq.twinx()
    sched = TrainConfig(**{f.name: t[f.name] for f in dataclasses.fields(TrainConfig)}).schedule()
    steps = np.arange(t["steps"])
    ax_lr.plot(steps, [float(sched(i)) for i in steps], color="gray", lw=1, ls="--", alpha=0.6)
    ax_lr.set_ylabel("learning rate (dashed)", color="gray")
    ax_lr.tick_params(axis="y", colors="gray")
    ax_lr.set_ylim(0, 1.05 * t["lr"])
  ax_edq.axhline(1.0, color="gray", lw=0.8, ls=":")
  _label(
    ax_edq,
    "step",
    "EDQ  <Δθ_eff, u> / ||u||²",
    f"effective descent quality (1 = no update lost); β2={t['b2']}, peak lr {t['lr']:g}",
    legend="lower left",
  )
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
  _label(
    ax,
    "bytes per parameter (params + optimizer state + gradients)",
    "Δ final validation loss vs fp32 (%)",
    f"memory vs quality, {n_seeds} seed(s), 95% CI; label: step time vs fp32",
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
