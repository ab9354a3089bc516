"""The ``collage-optax`` command line.

``collage-optax compare`` trains one small GPT under every precision strategy
(fp32 master weights, naive bf16, COLLAGE light/plus/full, exact, compact and
stochastic rounding) on several seeds, each strategy from the same init on the
same batches as the others, and reports validation loss (mean ± sd, Δ vs fp32
with a 95% interval), effective descent quality, lost updates, memory and
speed side by side.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from collage_optax.cli import corpus, experiment, gpt, plots, report, strategies

__all__ = ["MODEL_SIZES", "main"]

# Model and run sizes (--size; not collage_optax.PRESETS, the formats of
# adamw's modes). "default" (every strategy, 3 seeds) finishes in about 10
# minutes on 2 CPU cores, "quick" (--quick) in about 2; "large" is for an
# accelerator (or patience); "tiny" is a smoke test.
MODEL_SIZES = {
  "default": dict(layers=2, width=64, heads=2, context=64, steps=800, batch=16, lr=2e-3, warmup=40),
  "quick": dict(layers=1, width=64, heads=2, context=32, steps=150, batch=8, lr=3e-3, warmup=10),
  "tiny": dict(layers=1, width=32, heads=2, context=32, steps=20, batch=4, lr=2e-3, warmup=2),
  "large": dict(layers=6, width=384, heads=6, context=256, steps=5000, batch=32, lr=1e-3, warmup=200),
}


def _int_at_least(low: int):
  """An integer parser for ``low, low + 1, ...``."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
      message = f"{value} must be a positive integer" if low == 1 else f"{value} must be >= {low}"
      raise argparse.ArgumentTypeError(message)
    return value

  return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = True):
  """A float parser for the interval between ``low`` and ``high``."""

  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    ok = (
      math.isfinite(value)
      and (value > low if low_open else value >= low)
      and (value < high if high_open else value <= high)
    )
    if not ok:
      interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
      raise argparse.ArgumentTypeError(f"{text} must be in {interval}")
    return value

  return parse


def _strategies(text: str) -> tuple[str, ...]:
  """``"fp32,plus"`` -> ``("fp32", "plus")``, each a known strategy, none twice."""
  names = tuple(s.strip() for s in text.split(",") if s.strip())
  unknown = [s for s in names if s not in strategies.REGISTRY]
  if unknown or not names:
    what = f"unknown strategy {unknown[0]!r}" if unknown else "no strategy given"
    raise argparse.ArgumentTypeError(f"{what}; choose from {','.join(strategies.REGISTRY)} (comma-separated)")
  if len(set(names)) != len(names):
    raise argparse.ArgumentTypeError(f"{text!r} names a strategy twice")
  return names


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="collage-optax", description="COLLAGE for optax: bfloat16 training without fp32 master weights."
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  p = sub.add_parser(
    "compare",
    help="train a small GPT under every precision strategy and compare them",
    description=(
      "Train the same byte-level GPT (bfloat16 compute) from the same init on the same "
      "batches under each precision strategy, on several seeds: fp32 (fp32 params, optax.adamw), "
      "bf16 (optax.adamw on bf16 params), light, plus, full, exact and compact (collage_optax.adamw), "
      "sr (bf16 with stochastic rounding). Prints a table; with --out, writes results.json, "
      "table.md, loss.png and frontier.png. Ctrl-C writes what finished."
    ),
  )
  d = lambda name: f"(default: {MODEL_SIZES['default'][name]:g} with --size default)"
  p.add_argument(
    "--size",
    "--preset",
    dest="size",
    choices=sorted(MODEL_SIZES),
    default="default",
    help="model and run size (--preset: the same); the flags below override it (default: default)",
  )
  p.add_argument("--quick", action="store_true", help="a smoke run of about 2 minutes: --size quick")
  p.add_argument(
    "--seeds",
    type=_positive_int,
    default=3,
    help="seeds per strategy (each: init and batch order), for the mean, sd and 95%% interval (default: 3)",
  )
  model = p.add_argument_group("model")
  model.add_argument("--layers", type=_positive_int, help=f"transformer blocks {d('layers')}")
  model.add_argument("--width", type=_positive_int, help=f"channels, a multiple of --heads {d('width')}")
  model.add_argument("--heads", type=_positive_int, help=f"attention heads {d('heads')}")
  model.add_argument("--context", type=_positive_int, help=f"context length in bytes {d('context')}")
  train = p.add_argument_group("training")
  train.add_argument("--steps", type=_positive_int, help=f"optimizer steps {d('steps')}")
  train.add_argument("--batch", type=_positive_int, help=f"sequences per step {d('batch')}")
  train.add_argument(
    "--lr",
    type=_float_in(0.0, math.inf, low_open=True),
    help=f"peak learning rate; linear warmup, cosine decay to 0 {d('lr')}",
  )
  train.add_argument("--warmup", type=_nonnegative_int, help=f"warmup steps {d('warmup')}")
  train.add_argument("--b2", type=_float_in(0.0, 1.0), default=0.999, help="Adam's beta2 (default: 0.999)")
  train.add_argument(
    "--weight-decay",
    type=_float_in(0.0, math.inf),
    default=0.1,
    help="decoupled weight decay, matrices only (default: 0.1)",
  )
  train.add_argument(
    "--seed", type=_nonnegative_int, default=0, help="the first seed: --seeds N uses seed, seed+1, ... (default: 0)"
  )
  p.add_argument(
    "--strategies",
    type=_strategies,
    default=",".join(strategies.COMPARE),
    help=f"comma-separated strategies (default: {','.join(strategies.COMPARE)}; any of the registry: "
    f"{','.join(n for n in strategies.REGISTRY if n not in strategies.COMPARE)})",
  )
  p.add_argument(
    "--corpus",
    metavar="PATH",
    help="a text file or directory to train on (default: the Python standard library's .py files)",
  )
  p.add_argument("--out", metavar="DIR", type=Path, help="write results.json, table.md, loss.png and frontier.png here")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.set_defaults(run=_compare, error=p.error)
  return parser


def _compare(args: argparse.Namespace) -> int:
  """Runs ``compare``; bad flag combinations and corpora exit with code 2 and a message."""
  error = args.error
  size = MODEL_SIZES["quick" if args.quick else args.size]
  pick = lambda name: getattr(args, name) if getattr(args, name) is not None else size[name]
  if args.out is not None and args.out.exists() and not args.out.is_dir():
    error(f"--out {args.out} exists and is not a directory")
  if pick("width") % pick("heads"):
    error(f"--width {pick('width')} must be a multiple of --heads {pick('heads')}")
  # MODEL_SIZES mixes ints and floats (so mypy types its values as float); the int fields are ints.
  pick_int = lambda name: int(pick(name))
  model = gpt.GPTConfig(
    layers=pick_int("layers"), width=pick_int("width"), heads=pick_int("heads"), context=pick_int("context")
  )
  cfg = experiment.TrainConfig(
    steps=pick_int("steps"),
    batch=pick_int("batch"),
    lr=pick("lr"),
    b2=args.b2,
    weight_decay=args.weight_decay,
    warmup=pick_int("warmup"),
    seed=args.seed,
  )
  try:
    data = corpus.load(args.corpus, model.context)
  except corpus.CorpusError as e:
    error(str(e))
  print(
    f"corpus: {data.source}: {data.n_files} files, {len(data.train):,} training and {len(data.val):,} validation bytes",
    file=sys.stderr,
  )
  progress = None
  if not args.no_progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    progress = tqdm
  log = (lambda line: print(line, file=sys.stderr)) if progress is None else (lambda line: progress.write(line))
  run = experiment.run(args.strategies, model, cfg, data, seeds=args.seeds, progress=progress, log=log)
  results = report.from_run(run)
  if "error" in results:
    print(f"collage-optax compare: {results['error']}", file=sys.stderr)
  done = sum(r["n_seeds"] for r in results["strategies"].values())
  if not done:
    print("collage-optax compare: stopped before any strategy finished a seed; nothing to report", file=sys.stderr)
    return 1 if "error" in results else 130
  print(
    f"trained {done} strategy-seed runs in {results['config']['wall_time_s']:.0f} s"
    + (" (interrupted: partial results)" if results["partial"] else ""),
    file=sys.stderr,
  )
  table = report.format_table(results)
  frozen = report.format_frozen(results)
  table += f"\n\n{frozen}" if frozen else ""
  print(table)
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / "results.json")
    (args.out / "table.md").write_text(table + "\n")
    plots.plot(results, args.out / "loss.png")
    plots.plot_frontier(results, args.out / "frontier.png")
    print(f"wrote results.json, table.md, loss.png and frontier.png to {args.out}", file=sys.stderr)
  return 1 if "error" in results else 130 if results["partial"] else 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``collage-optax`` console script; returns the exit code."""
  parser = build_parser()
  args = parser.parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
