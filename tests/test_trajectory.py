"""Optimizer quality over many steps, against float64 (tests/reference.py).

* β2 really is 0.999: a second moment fed ``g`` for a while and then zeros must
  decay like ``0.999**t`` in float64. With ``mcf_nu`` it does; without it, and
  in plain ``optax.scale_by_adam`` / ``optax.adamw`` on bfloat16 params, it does
  not (``0.999·v`` rounds back to ``v`` in bfloat16), and both directions are
  asserted.
* Trajectory quality: ``benchmarks/trajectory.py`` replays one fixed,
  seeded stream of bfloat16 gradients (4000 steps, warmup + cosine learning
  rate with peak 1e-3, LayerNorm-like gains at 1.0, weights ~N(0, 0.02) and
  ~N(0, 0.5); see its docstring) through float64 AdamW (numpy, the reference),
  ``optax.adamw`` on float32 and on bfloat16 params, and ``collage_optax.adamw``
  light / plus / full / exact / compact, and exact with float32 moments
  (``exact_m``), on bfloat16 params (read with ``master_params``).

  Metric: the relative error of the trajectory,
  ``||θ_T − θ64_T|| / ||θ64_T − θ_0||``: the distance between the final params
  and float64's final params, relative to the distance float64 travelled from
  the common start ``θ_0`` (2-norms over all params). Requirements: plus
  <= 1e-3, full <= 5e-4, both at least 100× below naive bfloat16, light below
  naive bfloat16; exact <= 7e-4; exact_m <= 2e-5 (float32's own precision:
  float32 AdamW on the exact master); compact <= 1e-2 is a target it misses
  (a strict xfail, see the test). ``pytest -s`` prints the numbers;
  ``python benchmarks/trajectory.py`` writes them to
  ``benchmarks/results/trajectory.json``.

  The floor of plus and full is the MCF precision itself (about ``2**-16`` of
  each parameter per step, a random walk over the run), plus, for plus, the
  bfloat16 first moment: the bounds respect it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import collage_optax
from collage_optax import formats
import reference

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
  spec = importlib.util.spec_from_file_location(
      "benchmark_trajectory", ROOT / "benchmarks" / "trajectory.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


trajectory = _load_benchmark()
sys.path.insert(0, str(ROOT / "benchmarks"))
import scaling_table  # noqa: E402


# ---------------------------------------------------------------------------
# β2 = 0.999: the second moment decays like float64's.
# ---------------------------------------------------------------------------

B2 = 0.999
WARM, DECAY = 300, 3000  # constant g for WARM steps, then zeros for DECAY steps.
G = np.array([1.0, 3.0, 0.37, 0.01, 1e-4, 250.0])


def _stream() -> np.ndarray:
  """``(WARM + DECAY, len(G))`` bfloat16 gradients: ``G`` then zeros."""
  g = np.zeros((WARM + DECAY, G.size))
  g[:WARM] = G
  return reference.bf16(g)


def _second_moments(tx: optax.GradientTransformation, read_nu) -> np.ndarray:
  """``read_nu(state)`` after every step of ``tx`` on bfloat16 params (float64)."""
  params = jnp.zeros(G.size, jnp.bfloat16)
  grads = jnp.asarray(_stream())

  @jax.jit
  def replay(grads):
    def step(state, g):
      _, state = tx.update(g, state, params)
      return state, read_nu(state)

    return jax.lax.scan(step, tx.init(params), grads)[1]

  return np.asarray(replay(grads), np.float64)


def _float64_second_moment() -> np.ndarray:
  g = _stream().astype(np.float64)
  return reference.ema_trajectory(g * g, B2)


def _mcf_nu(state):
  """The value ``hi + lo`` of the MCF second moment (packed uint32 storage)."""
  assert state.nu.dtype == jnp.uint32, state.nu.dtype
  return formats.MOMENT_FORMATS["mcf"].decode(state.nu)


def test_mcf_second_moment_decays_like_float64():
  """With ``mcf_nu`` the bf16 second moment follows float64's ``0.999**t``
  through the whole run: it grows for WARM steps, then decays 20-fold.

  Each step computes ``(1−β2)·g² + β2·v`` in float32 from the decoded MCF and
  stores it again by two bfloat16 roundings: at most ``2**-16`` of ``v`` (16
  significant bits), about ``2**-18`` on average, a random walk of ~2e-4
  relative over these 3300 steps (measured 2.1e-4; the worst case, every
  rounding one way, would be 5e-2). The bound 1e-3 fails a stuck β2 (20-fold)
  and also the product form ``mul(v, c + d)`` with β2 split into two bf16
  numbers (``c + d = 0.99900055``, measured 3.3e-3 here).
  """
  v = _second_moments(collage_optax.scale_by_adam(b2=B2, nu_format="mcf"), _mcf_nu)
  v64 = _float64_second_moment()
  assert v64[-1, 0] / v64[WARM - 1, 0] == pytest.approx(B2**DECAY)  # the reference decays 20x
  rel = np.abs(v - v64) / v64
  assert rel.max() < 1e-3, f"max relative error {rel.max():.2e} at step {rel.argmax() // G.size}"
  ratio = v[-1] / v[WARM - 1]
  np.testing.assert_allclose(ratio, B2**DECAY, rtol=1e-3)


@pytest.mark.parametrize(
    "name, tx, read_nu",
    [
        pytest.param(name, tx, read, id=name) for name, tx, read in [
            ("collage_mcf_nu=False", collage_optax.scale_by_adam(b2=B2, nu_format="bf16"), lambda s: s.nu),
            ("optax.scale_by_adam", optax.scale_by_adam(b2=B2), lambda s: s.nu),
            ("optax.adamw", optax.adamw(1e-3, b2=B2), lambda s: s[0].nu),
        ]
    ],
)
def test_bf16_second_moment_does_not_decay(name, tx, read_nu):
  """A plain bf16 second moment is stuck: ``0.999·v`` rounds back to ``v``
  (the relative change 1e-3 is below half a bf16 ulp, 2**-9), so after 3000
  zero gradients it is still at its peak where float64 has fallen to 5%."""
  v = _second_moments(tx, read_nu)
  assert v.dtype == np.float64 and np.all(v[WARM - 1] > 0)
  v64 = _float64_second_moment()
  assert np.all(v64[-1] < 0.06 * v64[WARM - 1])
  np.testing.assert_array_equal(v[-1], v[WARM - 1], err_msg=f"{name}: the bf16 moment moved")
  assert np.all(v[-1] > 10 * v64[-1]), name


# ---------------------------------------------------------------------------
# Trajectory quality against float64 AdamW.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cosine_run_result():
  result = trajectory.run()
  print("\nrelative trajectory error ||θ_T − θ64_T|| / ||θ64_T − θ_0||, "
        f"{trajectory.STEPS} steps, warmup + cosine learning rate:")
  print(trajectory.format_table(result))
  return result


@pytest.fixture(scope="module")
def cosine_run(cosine_run_result):
  return cosine_run_result["relative_error"]


def test_fp32_agrees_with_float64_reference(cosine_run):
  """optax.adamw in float32 and the numpy float64 reference are independent
  implementations of the same AdamW: they agree to float32 precision, which
  validates the reference and the replay harness."""
  assert cosine_run["fp32"] < 1e-4


def test_plus_within_1e3(cosine_run):
  assert cosine_run["plus"] <= 1e-3


def test_full_within_5e4(cosine_run):
  assert cosine_run["full"] <= 5e-4


@pytest.mark.parametrize("mode", ["plus", "full"])
def test_compensated_is_100x_closer_than_naive_bf16(cosine_run, mode):
  assert 100 * cosine_run[mode] <= cosine_run["bf16"]


def test_light_beats_naive_bf16(cosine_run):
  assert cosine_run["light"] < cosine_run["bf16"]


def test_lean_within_3e3_and_far_below_light(cosine_run):
  """lean's 16-bit log-domain ``v`` decays (light's bfloat16 ``v`` stalls at b2 = 0.999) at less memory."""
  assert cosine_run["lean"] <= 3e-3
  assert 20 * cosine_run["lean"] <= cosine_run["light"]


def test_exact_within_7e4(cosine_run):
  """The int16 residual holds the float32 master; the bfloat16 first moment (read back rounded) is the floor."""
  assert cosine_run["exact"] <= 7e-4
  assert 100 * cosine_run["exact"] <= cosine_run["bf16"]


def test_exact_with_float32_moments_tracks_float64_like_fp32(cosine_run):
  """``mode="exact", mu_format="exact"`` is float32 AdamW on the exact master (but for the
  bfloat16 updates' rounding at binade crossings, tests/test_exact.py): float32's error."""
  assert cosine_run["exact_m"] <= 2e-5
  assert cosine_run["exact_m"] <= 3 * cosine_run["fp32"]


def test_compact_beats_naive_bf16(cosine_run):
  assert cosine_run["compact"] < cosine_run["bf16"]


@pytest.mark.xfail(strict=True, reason=(
    "compact misses its 1e-2 target (measured 0.20): its q8 second moment cannot follow b2=0.999. "
    "√v decays 0.05% a step, under half a code step for every 8-bit code and under the bfloat16 "
    "scale's half ulp (0.2%), so v only ratchets up (√v/√v64 median 1.32 by step 4000); the "
    "param format alone (compact_f32) is at 5e-4"))
def test_compact_within_1e2(cosine_run):
  assert cosine_run["compact"] <= 1e-2


def test_compact_param_format_alone_is_within_1e3():
  """The int8 residual itself: compact's param format with float32 moments (the ``compact_f32``
  probe) meets plus's bound, so compact's error comes from its q8 moments."""
  errors = trajectory.run(strategies=("compact_f32",))["relative_error"]
  assert errors["compact_f32"] <= 1e-3


# ---------------------------------------------------------------------------
# Memory: bytes per param of params + optimizer state, from the layout.
# ---------------------------------------------------------------------------

Q8 = 1 + 2 / 32  # an 8-bit code, plus a bfloat16 scale per group of 32 along the last axis
L16 = 2 + 4 / 32  # a 16-bit code, plus a float32 scale per group of 32 along the last axis
#: strategy -> bytes per param of (the param, its residual, m, v).
LAYOUT_BYTES = {
    "fp32": (4, 0, 4, 4),       # optax.adamw on float32 params
    "bf16": (2, 0, 2, 2),       # optax.adamw on bfloat16 params
    "light": (2, 2, 2, 2),      # bfloat16 θ and its bfloat16 low component; bfloat16 m, v
    "plus": (2, 2, 2, 4),       # v an MCF of two bfloat16s (packed in a uint32)
    "full": (2, 2, 4, 4),       # m an MCF too
    "exact": (2, 2, 2, 4),      # bfloat16 θ + int16 residual (a float32 master); float32 v
    "exact_m": (2, 2, 4, 4),    # exact with a float32 m
    "compact": (2, 1, Q8, Q8),  # bfloat16 θ + int8 residual; 8-bit m and v
    "lean": (2, 1, 2, L16),     # bfloat16 θ + int8 residual; bfloat16 m; 16-bit log-domain v
}


def _optimizer(name: str) -> optax.GradientTransformation:
  if name in ("fp32", "bf16"):
    return optax.adamw(1e-3)
  return collage_optax.adamw(1e-3, **({"mode": "exact", "mu_format": "exact"} if name == "exact_m" else {"mode": name}))


@pytest.mark.parametrize("name", list(LAYOUT_BYTES))
def test_bytes_per_param(name, cosine_run_result):
  """Bytes per param of params + optimizer state (the step count aside) are the sum of the
  layout's, and so are what the benchmarks report: ``benchmarks/trajectory.py``'s table (and the
  gradients, in the params' dtype) and ``benchmarks/scaling_table.py``'s (params, state and
  gradients: strategies A–D of Yu et al. 2024 and C+)."""
  param, want = LAYOUT_BYTES[name][0], sum(LAYOUT_BYTES[name])
  # The state's arrays, on rows of 64 (two q8 groups each).
  dtype = jnp.float32 if name == "fp32" else jnp.bfloat16
  params = {"w": jnp.zeros((8, 64), dtype), "b": jnp.zeros((64,), dtype)}
  arrays = [x for x in jax.tree.leaves((params, _optimizer(name).init(params))) if x.ndim > 0]
  assert sum(x.nbytes for x in arrays) / (8 * 64 + 64) == want
  # trajectory.py's params: ``mlp/kernel``'s rows of 16 get a q8 scale each.
  n = sum(int(np.prod(v[0])) for v in trajectory.LAYOUT.values())
  groups = sum(int(np.prod(v[0][:-1])) * -(-v[0][-1] // 32) for v in trajectory.LAYOUT.values())
  total = sum(1 + 2 * groups / n if b == Q8 else 2 + 4 * groups / n if b == L16 else b for b in LAYOUT_BYTES[name])
  table = cosine_run_result["bytes_per_param"]
  assert set(table) == set(trajectory.STRATEGIES) == set(LAYOUT_BYTES)
  assert table[name]["params_plus_state"] == pytest.approx(total, abs=0.01)  # + the step counts
  assert table[name]["gradients"] == param
  assert table[name]["total_with_gradients"] == pytest.approx(total + param, abs=0.01)
  letters = {s: letter for letter, s in scaling_table.STRATEGIES.items()}
  if name in letters:
    per_param = scaling_table.compute()["bytes_per_param"]
    assert set(per_param) == {"A", "B", "C", "C+", "D"}
    assert per_param[letters[name]] == want + param


def test_constant_python_float_learning_rate_is_not_rounded():
  """The same stream with ``learning_rate=3e-4`` as a Python float. optax
  multiplies bf16 updates by ``bfloat16(3e-4) = 2.9948e-4``, 0.17% short on
  every step; ``collage_optax.adamw`` applies it in float32, so plus and full
  meet the same targets as with the schedule."""
  result = trajectory.run(constant_lr=trajectory.CONSTANT_LR, strategies=("bf16", "plus", "full"))
  print(f"\nconstant learning rate {trajectory.CONSTANT_LR}:")
  print(trajectory.format_table(result))
  errors = result["relative_error"]
  assert errors["plus"] <= 1e-3
  assert errors["full"] <= 5e-4
  assert 100 * errors["plus"] <= errors["bf16"]
