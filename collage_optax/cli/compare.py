"""Train one GPT under several precision strategies, side by side.

The engine behind ``collage-optax compare`` (DESIGN §1): every strategy starts
from the same float32 initialisation (cast to bfloat16 for the bfloat16 ones),
sees the same batches and the same AdamW schedule (linear warmup, cosine decay
to zero), and computes in bfloat16. Only what the optimizer stores differs:

* ``fp32``: float32 params and moments (``optax.adamw``), bfloat16 compute;
* ``bf16``: ``optax.adamw`` on bfloat16 params, everything rounded to bfloat16;
* ``light``, ``plus``, ``full``: :func:`collage_optax.adamw` with that ``mode``.

EDQ and lost fraction come from :func:`collage_optax.measure_precision` (the
last link of the ``fp32``/``bf16`` chains) and from ``track_metrics=True``.
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
  "plot",
  "run",
  "train_strategy",
]

STRATEGIES = ("fp32", "bf16", "light", "plus", "full")
DEFAULT_STRATEGIES = ("fp32", "bf16", "light", "plus")


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
  seed: int = 0
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
  """Global ``(edq, lost_fraction)`` of the one tracked transformation in a state (jittable)."""
  is_metrics = lambda x: isinstance(x, collage_optax.PrecisionMetrics)
  (m,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_metrics) if is_metrics(x)]
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
  """The jitted training step ``(params, opt_state, train, step) -> (params, opt_state, [loss, edq, lost])``."""

  def step_fn(params, opt_state, train, step):
    windows = _batch(train, step, cfg.seed, cfg.batch, length)
    loss, grads = jax.value_and_grad(gpt.loss, argnums=1)(graphdef, params, windows)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    edq, lost = _precision(opt_state)
    return params, opt_state, jnp.stack([loss, edq, lost])

  return jax.jit(step_fn, donate_argnums=(0, 1))


def train_strategy(
  strategy: str,
  graphdef: Any,
  init_params: Any,
  corpus: Corpus,
  context: int,
  cfg: TrainConfig,
  progress: Callable[..., Any] | None = None,
  shared: _Shared | None = None,
) -> dict[str, Any]:
  """Trains one strategy; returns its results (losses, metrics, bytes, timings, curves)."""
  length = context + 1
  shared = shared or _shared(graphdef, corpus, context, cfg)
  tx = make_optimizer(strategy, cfg)
  # A fresh copy: the training step donates (and so deletes) its inputs.
  params = jax.tree.map(lambda p: jnp.array(p, param_dtype(strategy), copy=True), init_params)
  opt_state = tx.init(params)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  state_bytes = _nbytes(params) + _nbytes(opt_state)
  grad_bytes = _nbytes(params)  # Gradients have the params' dtypes.

  step_jit = _make_step(graphdef, tx, cfg, length)
  eval_at = sorted({round(i * cfg.steps / cfg.evals) for i in range(cfg.evals + 1)})
  curves: dict[str, list] = {"train_loss": [], "edq": [], "lost_fraction": [], "val_step": [], "val_loss": []}
  step_times, step_cpu = [], []
  bar = progress(total=cfg.steps, desc=f"{strategy:>5}", unit="step") if progress else None
  t_start = time.perf_counter()
  for step in range(cfg.steps + 1):
    if step in eval_at:
      curves["val_step"].append(step)
      curves["val_loss"].append(float(shared.evaluate(params, shared.val, shared.starts)))
    if step == cfg.steps:
      break
    t0, c0 = time.perf_counter(), time.process_time()
    params, opt_state, out = step_jit(params, opt_state, shared.train, jnp.int32(step))
    loss, edq, lost = (float(x) for x in np.asarray(out))
    step_times.append(time.perf_counter() - t0)
    step_cpu.append(time.process_time() - c0)
    if not math.isfinite(loss):
      raise FloatingPointError(f"{strategy}: the training loss is {loss} at step {step}; try a smaller --lr.")
    curves["train_loss"].append(loss)
    curves["edq"].append(edq)
    curves["lost_fraction"].append(lost)
    if bar is not None:
      bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
      bar.update(1)
  if bar is not None:
    bar.close()
  val_loss = curves["val_loss"][-1]
  return {
    "val_loss": val_loss,
    "val_ppl": math.exp(min(val_loss, 700.0)),
    "edq": float(np.mean(curves["edq"])) if curves["edq"] else 1.0,
    "lost_fraction": float(np.mean(curves["lost_fraction"])) if curves["lost_fraction"] else 0.0,
    "bytes_per_param": state_bytes / n_params,
    "bytes_per_param_with_grads": (state_bytes + grad_bytes) / n_params,
    "n_params": n_params,
    "step_time_s": _sustained(step_times),
    "step_cpu_s": float(np.median(step_cpu[2:] or step_cpu)) if step_cpu else 0.0,
    "train_time_s": time.perf_counter() - t_start,
    "curves": curves,
  }


def run(
  strategies: Sequence[str],
  model: gpt.GPTConfig,
  cfg: TrainConfig,
  corpus: Corpus,
  progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
  """Trains every strategy from the same init on the same batches; the results dict."""
  graphdef, init_params = gpt.init_params(model, cfg.seed)
  shared = _shared(graphdef, corpus, model.context, cfg)
  results = {}
  for s in strategies:
    results[s] = train_strategy(s, graphdef, init_params, corpus, model.context, cfg, progress, shared)
  ref = results.get("fp32")
  # On a CPU, other processes sharing the cores slow the wall clock by the
  # minute; the CPU time a step takes does not depend on them. On an
  # accelerator, the host's CPU time means nothing: wall clock it is.
  basis = "cpu" if jax.default_backend() == "cpu" else "wall"
  for r in results.values():
    r["delta_vs_fp32"] = (r["val_loss"] / ref["val_loss"] - 1.0) if ref else None
    r["step_wall_ratio"] = (r["step_time_s"] / ref["step_time_s"]) if ref and ref["step_time_s"] > 0 else None
    r["step_cpu_ratio"] = (r["step_cpu_s"] / ref["step_cpu_s"]) if ref and ref["step_cpu_s"] > 0 else None
    r["step_time_ratio"] = r[f"step_{basis}_ratio"]
  config = {
    "model": {k: v for k, v in dataclasses.asdict(model).items() if k != "dtype"} | {"compute_dtype": "bfloat16"},
    "train": dataclasses.asdict(cfg) | {"schedule": "linear warmup, cosine decay to 0"},
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
    }[basis],
    "device": str(jax.devices()[0].device_kind),
    "versions": {"jax": jax.__version__, "optax": optax.__version__},
  }
  return {"config": config, "strategies": results}


def _fmt_delta(d: float | None) -> str:
  return "—" if d is None else f"{100 * d:+.2f}%"


def _fmt_ratio(r: float | None) -> str:
  return "—" if r is None else f"{r:.2f}×"


def format_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table (readable in a terminal too)."""
  cpu = results["config"].get("backend") == "cpu"
  head = [
    "strategy",
    "val loss",
    "perplexity",
    "Δ vs fp32",
    "mean EDQ",
    "lost fraction",
    "bytes/param",
    "step time (CPU)" if cpu else "step time",
  ]
  rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
  for name, r in results["strategies"].items():
    rows.append(
      [
        name,
        f"{r['val_loss']:.4f}",
        f"{r['val_ppl']:.3f}",
        _fmt_delta(r["delta_vs_fp32"]),
        f"{r['edq']:.3f}",
        f"{r['lost_fraction']:.3f}",
        f"{r['bytes_per_param']:.1f}",
        _fmt_ratio(r["step_time_ratio"]),
      ]
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = []
  for row in rows:
    cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
    lines.append("| " + " | ".join(cells) + " |")
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


def _smooth(y: Sequence[float], width: int) -> np.ndarray:
  """Trailing moving average (shorter at the start)."""
  a = np.asarray(y, np.float64)
  if width <= 1 or len(a) == 0:
    return a
  c = np.cumsum(np.insert(a, 0, 0.0))
  idx = np.arange(1, len(a) + 1)
  lo = np.maximum(idx - width, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def plot(results: dict[str, Any], path: Path) -> None:
  """``loss.png``: validation and (smoothed) training loss per strategy; EDQ over steps."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  cfg = results["config"]
  fig, (ax_loss, ax_edq) = plt.subplots(1, 2, figsize=(13, 4.8))
  colors = {"fp32": "black", "bf16": "tab:red", "light": "tab:orange", "plus": "tab:blue", "full": "tab:green"}
  tops, bottoms = [], []
  for name, r in results["strategies"].items():
    c = r["curves"]
    n = len(c["train_loss"])
    steps = np.arange(1, n + 1)
    width = max(1, n // 40)
    color = colors.get(name)
    train = _smooth(c["train_loss"], width)
    ax_loss.plot(steps, train, color=color, alpha=0.35, lw=1)
    ax_loss.plot(
      c["val_step"], c["val_loss"], "o-", color=color, ms=3.5, lw=1.6, label=f"{name}: val {r['val_loss']:.3f}"
    )
    ax_edq.plot(steps, _smooth(c["edq"], width), color=color, lw=1.4, label=name)
    if n:
      tops.append(max(train[n // 5 :].max(), max(v for s, v in zip(c["val_step"], c["val_loss"]) if s >= n // 5)))
      bottoms.append(min(train.min(), min(c["val_loss"])))
  if tops:  # Zoom on the last 80% of the run, where the strategies part.
    lo, hi = min(bottoms), max(tops)
    ax_loss.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  m, t = cfg["model"], cfg["train"]
  ax_loss.set(
    xlabel="step",
    ylabel="loss (nats/byte)",
    title=f"GPT {m['layers']}×{m['width']}, context {m['context']}: val (dots) and train (faint) loss",
  )
  ax_loss.legend(loc="upper right")
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
  ax_edq.legend(loc="lower left")
  ax_edq.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
