"""Probes of the ``log16`` second moment and the ``lean`` preset's formats.

Replays ``benchmarks/trajectory.py``'s stream (same problem, same metric, same
float64 reference) through extra ``collage_optax.adamw`` format combinations;
the existing strategies' numbers are not touched (nothing is written to
``benchmarks/results/trajectory.json``). ``--variant`` runs the ``log16``
probes with a changed format, to choose its design:

* ``lossy``: the step uses ``v`` before the ``log16`` rounding (a ``coarse``
  format, as ``bf16``/``q8`` are), instead of the decoded stored value;
* ``nearest`` (``nearest10``): codes rounded to nearest (ties down) instead of stochastically (with ``m10``'s steps);
* ``m10``: steps of 2**13 float32 bit-units (2**10 per octave, 64 octaves) instead of 2**12 (2**11, 32).

Run: ``python benchmarks/lean_probe.py [--strategies a,b] [--variant lossy|m10] [--out file.json]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import MappingProxyType

import jax.numpy as jnp
import trajectory  # benchmarks/trajectory.py

from collage_optax import formats
from collage_optax.cli import strategies as registry
from collage_optax.formats import _log16  # the variants patch its step and rounding

#: name -> (param_format, mu_format, nu_format), all passed explicitly to adamw.
PROBES = {
  "exact_f32_nu": ("exact", "f32", "f32"),  # float32 v: the floor of the 'only v differs' probes
  "exact_log16_nu": ("exact", "f32", "log16"),  # log16 v alone
  "exact_bf16_nu": ("exact", "f32", "bf16"),
  "exact_q8_nu": ("exact", "f32", "q8"),
  "compact_log16": ("compact", "q8", "log16"),  # compact with nu_format='log16'
  "compact_bf16_log16": ("compact", "bf16", "log16"),  # the lean candidate of the issue
  "compact_f32m_log16": ("compact", "f32", "log16"),
  "mcf_q8_log16": ("mcf", "q8", "log16"),
  "exact_q8_log16": ("exact", "q8", "log16"),
  "exact_bf16_log16": ("exact", "bf16", "log16"),
  "mcf_bf16_log16": ("mcf", "bf16", "log16"),
  "compact_bf16_mcf": ("compact", "bf16", "mcf"),
  "compact_bf16_bf16": ("compact", "bf16", "bf16"),
}
registry.REGISTRY = MappingProxyType(
  {
    **registry.REGISTRY,
    **{
      name: registry.collage(name, mode="plus", param_format=p, mu_format=m, nu_format=v)
      for name, (p, m, v) in PROBES.items()
    },
  }
)
trajectory.KNOWN = trajectory.KNOWN + tuple(PROBES) + ("lean",)


def _variant_lossy() -> None:
  """log16 as a ``coarse`` format: the step uses ``v`` before its rounding."""
  lossy = formats.LOG16._replace(coarse=True)
  formats.MOMENT_FORMATS["log16"] = formats.LOG16 = lossy  # what moment_format resolves and recognises


def _variant_m10() -> None:
  """log16 with steps of 2**13 bit-units: 2**10 per octave, 64 octaves below the group's largest."""
  _log16._SHIFT = 13


def _variant_nearest() -> None:
  """Round the codes to nearest (ties down): a constant dither of half a step less one."""
  _log16._dither = lambda b: jnp.full_like(b, (1 << (_log16._SHIFT - 1)) - 1)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--strategies", default="light,plus,compact,lean," + ",".join(PROBES))
  parser.add_argument("--variant", default="", choices=["", "lossy", "m10", "nearest", "nearest10"])
  parser.add_argument("--steps", type=int, default=trajectory.STEPS)
  parser.add_argument("--out", type=Path, default=None)
  args = parser.parse_args(argv)
  if args.variant == "lossy":
    _variant_lossy()
  elif args.variant == "m10":
    _variant_m10()
  elif args.variant in ("nearest", "nearest10"):
    _variant_nearest()
    if args.variant == "nearest10":
      _variant_m10()
  strategies = [s for s in args.strategies.split(",") if s]
  t0 = time.perf_counter()
  result = trajectory.run(args.steps, trajectory.SEED, strategies)
  print(f"variant={args.variant or 'default'}, {args.steps} steps:")
  print(trajectory.format_table(result))
  rows = []
  for s in strategies:
    b = result["bytes_per_param"][s]
    rows.append(
      f"{s:<22} {result['relative_error'][s]:.3e}  {b['params_plus_state']:.3f} B  "
      f"{b['total_with_gradients']:.3f} B with grads"
    )
  print("\n".join(rows))
  print(f"{time.perf_counter() - t0:.0f} s")
  if args.out:
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
