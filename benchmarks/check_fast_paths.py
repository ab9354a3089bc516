"""Exhaustive bit-equality of the step's fast paths with the plain operation sequences.

Over all 2**32 pairs of bfloat16 (and float16) bit patterns, under ``jit`` on
this backend (float32 flush-to-zero included), compares bit for bit, NaN for
NaN:

* ``mcf._two_sum`` (only the roundings of ``a ⊕ b`` and ``s ⊖ a``) with
  Knuth's TwoSum with every operation rounded by ``reduce_precision``, for
  ``mcf.round_to`` and, in bfloat16, for ``mcf._round_bf16_bits``;
* ``mcf._split(a + b)`` with ``_round_bf16_bits`` (the rounding ``mcf.grow`` uses)
  with ``from_float``'s rounding by ``round_to``.

``tests/test_fast_paths.py`` checks the same on landmarks and random samples;
this script is the full proof on one machine (a few minutes per check on 2
CPU cores). Writes ``benchmarks/results/fast_paths.json``.

Run: ``python benchmarks/check_fast_paths.py`` (``--rows 8`` for a partial run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from collage_optax import mcf  # noqa: E402

OUT = _common.RESULTS / "fast_paths.json"
ROWS = 256  # first operands per jitted block: 256 x 65536 pairs.


def _operands(block: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  a16 = (block * ROWS + lax.iota(jnp.uint32, ROWS)).astype(jnp.uint16)
  b16 = lax.iota(jnp.uint32, 1 << 16).astype(jnp.uint16)
  a = lax.bitcast_convert_type(a16, dtype).astype(jnp.float32)[:, None]
  b = lax.bitcast_convert_type(b16, dtype).astype(jnp.float32)[None, :]
  return jnp.broadcast_arrays(a, b)


def _differ(x: jax.Array, y: jax.Array) -> jax.Array:
  same = (lax.bitcast_convert_type(x, jnp.uint32) == lax.bitcast_convert_type(y, jnp.uint32))
  return ~(same | (jnp.isnan(x) & jnp.isnan(y)))


def _plain_two_sum(dtype) -> Callable[..., Any]:
  r = lambda x: mcf.round_to(x, dtype)

  def f(a, b):
    s = r(a + b)
    bb = r(s - a)
    aa = r(s - bb)
    return s, r(r(a - aa) + r(b - bb))

  return f


def _plain_split(a, b):
  return mcf._split(a + b, lambda v: mcf.round_to(v, jnp.bfloat16))


CHECKS: dict[str, tuple[Any, Callable[..., Any], Callable[..., Any]]] = {
    "two_sum bf16, round_to": (jnp.bfloat16, _plain_two_sum(jnp.bfloat16),
                               lambda a, b: mcf._two_sum(a, b, mcf._rounder(jnp.bfloat16))),
    "two_sum bf16, _round_bf16_bits": (jnp.bfloat16, _plain_two_sum(jnp.bfloat16),
                                       lambda a, b: mcf._two_sum(a, b, mcf._round_bf16_bits)),
    "two_sum f16, round_to": (jnp.float16, _plain_two_sum(jnp.float16),
                              lambda a, b: mcf._two_sum(a, b, mcf._rounder(jnp.float16))),
    "split(a + b) bf16, _round_bf16_bits": (jnp.bfloat16, _plain_split,
                                            lambda a, b: mcf._split(a + b, mcf._round_bf16_bits)),
}


def check(name: str, blocks: int) -> dict[str, Any]:
  dtype, plain, fast = CHECKS[name]

  @jax.jit
  def count(block):
    a, b = _operands(block, dtype)
    bad = jnp.zeros(a.shape, bool)
    for x, y in zip(plain(a, b), fast(a, b)):
      bad |= _differ(x, y)
    return bad.sum(dtype=jnp.int32)

  start = time.time()
  mismatches = sum(int(count(jnp.uint32(i))) for i in range(blocks))
  return {"pairs": blocks * ROWS * (1 << 16), "mismatches": mismatches, "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=(1 << 16) // ROWS, help="blocks of 256 first operands (256 = all)")
  parser.add_argument("--out", type=Path, default=OUT)
  args = parser.parse_args(argv)
  result: dict[str, Any] = {"machine": _common.machine(), "checks": {}}
  for name in CHECKS:
    result["checks"][name] = check(name, args.rows)
    print(f"{name}: {result['checks'][name]}", flush=True)
  _common.write_json(result, args.out)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
