"""Train one GPT under several precision strategies, side by side.

The engine behind ``collage-optax compare`` (DESIGN §1): every strategy starts
from the same float32 initialisation (cast to bfloat16 for the bfloat16 ones),
sees the same batches and the same AdamW schedule (linear warmup, cosine decay
to zero), and computes in bfloat16. Only what the optimizer stores differs:

* ``fp32``: float32 params and moments (``optax.adamw``), bfloat16 compute;
* ``bf16``: ``optax.adamw`` on bfloat16 params, everything rounded to bfloat16;
* ``light``, ``plus``, ``full``, ``exact``, ``compact``:
  :func:`collage_optax.adamw` with that ``mode``;
* ``sr``: ``optax.adamw`` on bfloat16 params and moments, the update added
  with stochastic rounding (:func:`collage_optax.stochastic_rounding`).

Every strategy trains on several seeds (each seed: the init and the batch
order), and the final validation losses are compared to fp32's seed by seed:
the mean of the paired relative differences with a 95% Student-t interval.

EDQ and lost fraction come from :func:`collage_optax.measure_precision` (the
last link of the ``fp32``/``bf16`` chains) and from ``track_metrics=True``
(``sr`` records none: its landing is random by design).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import collage_optax
from collage_optax.cli import gpt
from collage_optax.cli.corpus import Corpus

__all__ = [
  "DEFAULT_STRATEGIES",
  "STRATEGIES",
  "TrainConfig",
  "format_table",
  "make_optimizer",
  "paired_interval",
  "plot",
  "plot_frontier",
  "run",
  "summarize",
]

STRATEGIES = ("fp32", "bf16", "light", "plus", "full", "exact", "compact", "sr")
DEFAULT_STRATEGIES = STRATEGIES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """AdamW and the run: peak ``lr`` after ``warmup`` steps, cosine decay to 0 at ``steps``."""

  steps: int = 1000
  batch: int = 16
  lr: float = 2e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.1
  warmup: int = 50
  seed: int = 0  # The first seed; a run with N seeds uses seed, seed + 1, ..., seed + N - 1.
  evals: int = 10  # Validation points along the run (plus step 0).
  eval_windows: int = 128  # Fixed validation windows per evaluation.

  def schedule(self) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
      0.0, self.lr, min(self.warmup, self.steps - 1), max(self.steps, 1), end_value=0.0
    )


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (not on LayerNorm gains and biases), as in GPT-2."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(strategy: str, cfg: TrainConfig) -> optax.GradientTransformation:
  """The optimizer of one strategy; every one records EDQ and lost fraction."""
  if strategy in ("fp32", "bf16"):
    return optax.chain(
      optax.adamw(cfg.schedule(), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask),
      collage_optax.measure_precision(),
    )
  if strategy == "sr":
    return optax.chain(
      optax.adamw(cfg.schedule(), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask),
      collage_optax.stochastic_rounding(cfg.seed),
    )
  if strategy in collage_optax.MODES:
    return collage_optax.adamw(
      cfg.schedule(),
      cfg.b1,
      cfg.b2,
      cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=_decay_mask,
      mode=strategy,
      track_metrics=True,
    )
  raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")


def param_dtype(strategy: str) -> Any:
  return jnp.float32 if strategy == "fp32" else jnp.bfloat16


def _precision(opt_state: Any) -> tuple[jax.Array, jax.Array]:
  """Global ``(edq, lost_fraction)`` of the tracked transformation in a state (jittable; NaN if none)."""
  is_metrics = lambda x: isinstance(x, collage_optax.PrecisionMetrics)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_metrics) if is_metrics(x)]
  if not found:
    return jnp.float32(jnp.nan), jnp.float32(jnp.nan)
  (m,) = found
  return m.edq, m.lost_fraction


def _nbytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _windows(data: jax.Array, starts: jax.Array, length: int) -> jax.Array:
  return data[starts[:, None] + jnp.arange(length)]


def _batch(train: jax.Array, step: jax.Array, seed: int, batch: int, length: int) -> jax.Array:
  """The training windows of one step: a function of ``(seed, step)`` only, the same for every strategy."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  starts = jax.random.randint(key, (batch,), 0, train.shape[0] - length + 1)
  return _windows(train, starts, length)


def eval_starts(n_val: int, length: int, count: int, chunk: int) -> np.ndarray:
  """About ``count`` validation windows, evenly spaced, as ``[count // chunk, chunk]`` starts."""
  count = max(1, min(count, n_val - length + 1))
  chunk = min(chunk, count)
  starts = np.linspace(0, n_val - length, count).astype(np.int32)
  return starts[: count // chunk * chunk].reshape(-1, chunk)


class _Shared(NamedTuple):
  """What every strategy of a run shares: the data on device and the evaluator."""

  train: jax.Array
  val: jax.Array
  starts: jax.Array
  evaluate: Callable[..., jax.Array]  # (params, val, starts) -> mean validation loss.


def _sustained(times: Sequence[float], block: int = 10) -> float:
  """Seconds per step at the fastest sustained rate: the best mean over ``block`` consecutive steps.

  The first two steps (compilation) are left out. On a shared machine, other
  processes only ever slow steps down, so the fastest stretch is the closest
  to the step's own cost.
  """
  t = np.asarray(times[2:] or times, np.float64)
  if len(t) == 0:
    return 0.0
  if len(t) <= block:
    return float(t.mean())
  c = np.cumsum(np.insert(t, 0, 0.0))
  return float(((c[block:] - c[:-block]) / block).min())


def _shared(graphdef: Any, corpus: Corpus, context: int, cfg: TrainConfig) -> _Shared:
  length = context + 1

  def evaluate(params, val, starts):
    return jax.lax.map(lambda s: gpt.loss(graphdef, params, _windows(val, s, length)), starts).mean()

  # One jitted evaluator for all strategies: it compiles once per params dtype.
  return _Shared(
    jnp.asarray(corpus.train),
    jnp.asarray(corpus.val),
    jnp.asarray(eval_starts(len(corpus.val), length, cfg.eval_windows, cfg.batch)),
    jax.jit(evaluate),
  )


def _make_step(graphdef: Any, tx: optax.GradientTransformation, cfg: TrainConfig, length: int) -> Callable:
  """The jitted step ``(params, opt_state, train, step, seed) -> (params, opt_state, [loss, edq, lost])``.

  The seed is an argument, so that one compilation serves every seed.
  """

  def step_fn(params, opt_state, train, step, seed):
    windows = _batch(train, step, seed, cfg.batch, length)
    loss, grads = jax.value_and_grad(gpt.loss, argnums=1)(graphdef, params, windows)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    edq, lost = _precision(opt_state)
    return params, opt_state, jnp.stack([loss, edq, lost])

  return jax.jit(step_fn, donate_argnums=(0, 1))


def _train_seed(
  strategy: str,
  tx: optax.GradientTransformation,
  step_jit: Callable,
  init_params: Any,
  shared: _Shared,
  cfg: TrainConfig,
  seed: int,
  bar: Any,
) -> dict[str, Any]:
  """Trains one strategy on one seed; its final loss, curves, metrics and timings."""
  # A fresh copy: the training step donates (and so deletes) its inputs.
  params = jax.tree.map(lambda p: jnp.array(p, param_dtype(strategy), copy=True), init_params)
  opt_state = tx.init(params)
  eval_at = sorted({round(i * cfg.steps / cfg.evals) for i in range(cfg.evals + 1)})
  curves: dict[str, list] = {"train_loss": [], "edq": [], "lost_fraction": [], "val_step": [], "val_loss": []}
  step_times, step_cpu = [], []
  t_start = time.perf_counter()
  for step in range(cfg.steps + 1):
    if step in eval_at:
      curves["val_step"].append(step)
      curves["val_loss"].append(float(shared.evaluate(params, shared.val, shared.starts)))
    if step == cfg.steps:
      break
    t0, c0 = time.perf_counter(), time.process_time()
    params, opt_state, out = step_jit(params, opt_state, shared.train, jnp.int32(step), jnp.int32(seed))
    loss, edq, lost = (float(x) for x in np.asarray(out))
    step_times.append(time.perf_counter() - t0)
    step_cpu.append(time.process_time() - c0)
    if not math.isfinite(loss):
      raise FloatingPointError(
        f"{strategy}: the training loss is {loss} at step {step} (seed {seed}); try a smaller --lr."
      )
    curves["train_loss"].append(loss)
    curves["edq"].append(edq if math.isfinite(edq) else None)
    curves["lost_fraction"].append(lost if math.isfinite(lost) else None)
    if bar is not None:
      bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
      bar.update(1)
  mean = lambda xs: float(np.mean(xs)) if xs and xs[0] is not None else None
  return {
    "seed": seed,
    "val_loss": curves["val_loss"][-1],
    "edq": mean(curves["edq"]),
    "lost_fraction": mean(curves["lost_fraction"]),
    "step_time_s": _sustained(step_times),
    "step_cpu_s": float(np.median(step_cpu[2:] or step_cpu)) if step_cpu else 0.0,
    "train_time_s": time.perf_counter() - t_start,
    "curves": curves,
  }


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


def summarize(runs: dict[str, list[dict[str, Any]]], sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Per strategy: mean ± sd of the final validation loss over its seeds, Δ vs fp32 (paired), metrics.

  ``runs[strategy]`` is the list of per-seed results; Δ pairs each seed with
  fp32's same seed (only seeds both finished). A strategy whose interval
  contains 0 is ``approx_fp32``.
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
  basis = "cpu" if jax.default_backend() == "cpu" else "wall"
  base = out.get("fp32")
  for r in out.values():
    r["step_wall_ratio"] = r["step_time_s"] / base["step_time_s"] if base and base["step_time_s"] > 0 else None
    r["step_cpu_ratio"] = r["step_cpu_s"] / base["step_cpu_s"] if base and base["step_cpu_s"] > 0 else None
    r["step_time_ratio"] = r[f"step_{basis}_ratio"]
  return out


def _sizes(strategy: str, tx: optax.GradientTransformation, init_params: Any) -> dict[str, Any]:
  """Bytes per param of params + optimizer state (and with the gradients, of the params' dtypes)."""
  params = jax.eval_shape(lambda p: jax.tree.map(lambda x: x.astype(param_dtype(strategy)), p), init_params)
  state = jax.eval_shape(tx.init, params)
  n = sum(p.size for p in jax.tree.leaves(params))
  nbytes = _nbytes(params) + _nbytes(state)
  return {
    "n_params": n,
    "bytes_per_param": nbytes / n,
    "bytes_per_param_with_grads": (nbytes + _nbytes(params)) / n,
  }


def run(
  strategies: Sequence[str],
  model: gpt.GPTConfig,
  cfg: TrainConfig,
  corpus: Corpus,
  seeds: int = 3,
  progress: Callable[..., Any] | None = None,
  log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
  """Trains every strategy on ``seeds`` seeds (seed by seed, every strategy from the same init and batches).

  A ``KeyboardInterrupt`` (or a diverged run: ``"error"``) stops the run
  after what finished: the results are then marked ``"partial": true``
  (with the seeds each strategy finished).
  """
  graphdef, _ = gpt.init_params(model, cfg.seed)
  shared = _shared(graphdef, corpus, model.context, cfg)
  length = model.context + 1
  # One optimizer and one compiled step per strategy; sr's own per seed (below).
  txs = {s: make_optimizer(s, cfg) for s in strategies if s != "sr"}
  steps = {s: _make_step(graphdef, txs[s], cfg, length) for s in txs}
  runs: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
  sizes: dict[str, dict[str, Any]] = {}
  partial, error = False, None
  t0 = time.perf_counter()
  try:
    for seed in range(cfg.seed, cfg.seed + seeds):
      _, init_params = gpt.init_params(model, seed)
      for s in strategies:
        if s == "sr":  # its rounding's own random stream: one per seed (and so one compilation per seed)
          tx = make_optimizer(s, dataclasses.replace(cfg, seed=seed))
          step = _make_step(graphdef, tx, cfg, length)
        else:
          tx, step = txs[s], steps[s]
        if s not in sizes:
          sizes[s] = _sizes(s, tx, init_params)
        bar = progress(total=cfg.steps, desc=f"{s:>7} seed {seed}", unit="step") if progress else None
        try:
          runs[s].append(_train_seed(s, tx, step, init_params, shared, cfg, seed, bar))
        finally:
          if bar is not None:
            bar.close()
        if log is not None:
          r = runs[s][-1]
          log(f"{s} seed {seed}: val loss {r['val_loss']:.4f} ({r['train_time_s']:.0f} s)")
  except KeyboardInterrupt:
    partial = True
  except FloatingPointError as e:  # a diverged run: report what finished, and why it stopped
    partial, error = True, str(e)
  config = {
    "model": {k: v for k, v in dataclasses.asdict(model).items() if k != "dtype"} | {"compute_dtype": "bfloat16"},
    "train": dataclasses.asdict(cfg) | {"schedule": "linear warmup, cosine decay to 0"},
    "seeds": list(range(cfg.seed, cfg.seed + seeds)),
    "corpus": {
      "source": corpus.source,
      "files": corpus.n_files,
      "train_bytes": len(corpus.train),
      "val_bytes": len(corpus.val),
    },
    "strategies": list(strategies),
    "backend": jax.default_backend(),
    "step_time_basis": {
      "cpu": "CPU time per step (median; immune to other processes sharing the CPU)",
      "wall": "wall-clock time per step (fastest 10-step stretch)",
    }["cpu" if jax.default_backend() == "cpu" else "wall"],
    "device": str(jax.devices()[0].device_kind),
    "versions": {"jax": jax.__version__, "optax": optax.__version__},
    "wall_time_s": time.perf_counter() - t0,
  }
  out = {"config": config, "partial": partial, "strategies": summarize(runs, sizes)}
  if error is not None:
    out["error"] = error
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


def _rounded(x: Any) -> Any:
  """Floats to 6 significant digits, for a compact JSON file."""
  if isinstance(x, float):
    return float(f"{x:.6g}") if math.isfinite(x) else None
  if isinstance(x, dict):
    return {k: _rounded(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_rounded(v) for v in x]
  return x


def write_json(results: dict[str, Any], path: Path) -> None:
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
