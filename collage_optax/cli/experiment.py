"""Train one GPT under several precision strategies, side by side: the experiment.

The engine behind ``collage-optax compare``: every strategy (of
:mod:`collage_optax.cli.strategies`) starts from the same float32
initialisation (cast to bfloat16 for the bfloat16 ones), sees the same batches
and the same AdamW schedule (linear warmup, cosine decay to zero), and
computes in bfloat16. Only what the optimizer stores differs.

Every strategy trains on several seeds (each seed: the init and the batch
order); :func:`run` returns each seed's final validation loss, curves, metrics
and timings, and each strategy's bytes per parameter. The statistics, the
table and the plots are :mod:`collage_optax.cli.report`'s.

EDQ and lost fraction come from :func:`collage_optax.measure_precision` (the
last link of the ``fp32``/``bf16`` chains) and from ``track_metrics=True``
(``sr`` records none: its landing is random by design).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import collage_optax
from collage_optax.cli import gpt, strategies
from collage_optax.cli.corpus import Corpus

__all__ = ["TrainConfig", "eval_starts", "make_optimizer", "param_dtype", "run"]


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
  """The optimizer of one strategy with ``cfg``'s AdamW; every one but ``sr`` records EDQ and lost fraction."""
  hp = strategies.AdamW(
    cfg.schedule(), cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, mask=_decay_mask, metrics=True, seed=cfg.seed
  )
  return strategies.get(strategy).optimizer(hp)


def param_dtype(strategy: str) -> Any:
  """The dtype a strategy stores its params in."""
  return strategies.get(strategy).param_dtype


def _precision(opt_state: Any) -> tuple[jax.Array, jax.Array]:
  """Global ``(edq, lost_fraction)`` of the tracked transformation in a state (jittable; NaN if none)."""
  is_metrics = lambda x: isinstance(x, collage_optax.PrecisionMetrics)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_metrics) if is_metrics(x)]
  if not found:
    return jnp.float32(jnp.nan), jnp.float32(jnp.nan)
  (m,) = found
  return m.edq, m.lost_fraction


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
    params, opt_state = collage_optax.apply_gradients(tx, grads, opt_state, params)
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
    "frozen": _frozen(opt_state),
    "val_loss": curves["val_loss"][-1],
    "edq": mean(curves["edq"]),
    "lost_fraction": mean(curves["lost_fraction"]),
    "step_time_s": _sustained(step_times),
    "step_cpu_s": float(np.median(step_cpu[2:] or step_cpu)) if step_cpu else 0.0,
    "train_time_s": time.perf_counter() - t_start,
    "curves": curves,
  }


def _frozen(opt_state: Any) -> list[str] | None:
  """The leaves whose updates were mostly rounded away over the last ~100 steps (``None``: not tracked)."""
  try:
    return collage_optax.precision_report(opt_state).frozen
  except ValueError:
    return None


def _sizes(strategy: str, tx: optax.GradientTransformation, init_params: Any) -> dict[str, Any]:
  """Bytes per param of params + optimizer state (and with the gradients, of the params' dtypes)."""
  params = jax.eval_shape(lambda p: jax.tree.map(lambda x: x.astype(param_dtype(strategy)), p), init_params)
  b = strategies.bytes_per_param(params, jax.eval_shape(tx.init, params))
  return {
    "n_params": b["n_params"],
    "bytes_per_param": b["params_plus_state"],
    "bytes_per_param_with_grads": b["total_with_gradients"],
  }


def run(
  names: Sequence[str],
  model: gpt.GPTConfig,
  cfg: TrainConfig,
  corpus: Corpus,
  seeds: int = 3,
  progress: Callable[..., Any] | None = None,
  log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
  """Trains the strategies ``names`` on ``seeds`` seeds (seed by seed, every strategy from the same init and batches).

  Returns ``config`` (what ran), ``runs`` (per strategy, the list of its
  seeds' results), ``sizes`` (per strategy, its bytes per parameter) and
  ``partial``. A ``KeyboardInterrupt`` (or a diverged run: ``"error"``) stops
  the run after what finished: the results are then marked ``"partial": true``
  (with the seeds each strategy finished).
  """
  graphdef, _ = gpt.init_params(model, cfg.seed)
  shared = _shared(graphdef, corpus, model.context, cfg)
  length = model.context + 1
  # One optimizer and one compiled step per strategy; sr's own per seed (below).
  txs = {s: make_optimizer(s, cfg) for s in names if s != "sr"}
  steps = {s: _make_step(graphdef, txs[s], cfg, length) for s in txs}
  runs: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
  sizes: dict[str, dict[str, Any]] = {}
  partial, error = False, None
  t0 = time.perf_counter()
  try:
    for seed in range(cfg.seed, cfg.seed + seeds):
      _, init_params = gpt.init_params(model, seed)
      for s in names:
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
  backend = jax.default_backend()
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
    "strategies": list(names),
    "backend": backend,
    "step_time_basis": {
      "cpu": "CPU time per step (median; immune to other processes sharing the CPU)",
      "wall": "wall-clock time per step (fastest 10-step stretch)",
    }["cpu" if backend == "cpu" else "wall"],
    "device": str(jax.devices()[0].device_kind),
    "versions": {"jax": jax.__version__, "optax": optax.__version__},
    "wall_time_s": time.perf_counter() - t0,
  }
  out = {"config": config, "partial": partial, "runs": runs, "sizes": sizes}
  if error is not None:
    out["error"] = error
  return out
