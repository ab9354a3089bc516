"""The performance benchmarks run end to end on a tiny size and write valid JSON.

Nothing here is timed: the checks are on structure and on the byte counts,
which follow from the dtypes (the README's strategy table) and must not drift.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import bench
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"




@pytest.fixture(scope="module")
def step_json(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "step.json"
  bench.load("step").main(["--quick", "--strategies", "fp32,plus", "--out", str(out)])
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def memory_json(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "memory.json"
  bench.load("memory").main(["--quick", "--strategies", "fp32,bf16,light,plus,full", "--out", str(out)])
  return json.loads(out.read_text())


def test_step_json_has_times_ratios_and_bandwidth(step_json):
  assert step_json["machine"]["cpu_count"] >= 1
  assert "jax" in step_json["machine"]
  (size,) = step_json["sizes"]
  assert 10_000 <= size["n_params"] <= 40_000
  assert size["copy"]["GBps"] > 0 and math.isfinite(size["copy"]["GBps"])
  for name in ("fp32", "plus"):
    s = size["strategies"][name]
    assert 0 < s["q1_ms"] <= s["median_ms"] <= s["q3_ms"]
    assert s["ratio_to_fp32"] > 0 and math.isfinite(s["ratio_to_fp32"])
    assert s["achieved_GBps"] > 0 and s["fraction_of_copy_bandwidth"] > 0
    assert s["hlo"]["xla_bytes_accessed_per_param"] > 0
    assert step_json["per_leaf_hlo"][name]["loop_kernels"] >= 1
  assert size["strategies"]["fp32"]["ratio_to_fp32"] == 1.0


def test_step_bytes_follow_the_dtypes(step_json):
  """D reads params, grads, m, v in fp32 and writes three; plus reads bf16 θ, lo, g, m, v, v_lo and writes five."""
  (size,) = step_json["sizes"]
  fp32 = size["strategies"]["fp32"]["bytes_per_param"]
  plus = size["strategies"]["plus"]["bytes_per_param"]
  assert fp32["read"] == pytest.approx(16, abs=0.01) and fp32["written"] == pytest.approx(12, abs=0.01)
  assert plus["read"] == pytest.approx(12, abs=0.01) and plus["written"] == pytest.approx(10, abs=0.01)


def test_memory_persistent_bytes_match_design_table(memory_json):
  table = memory_json["persistent_bytes_per_param"]
  expected = {"bf16": 8, "light": 10, "plus": 12, "full": 14, "fp32": 16}  # incl. grads, as the README's table
  for name, total in expected.items():
    assert table[name]["total_with_gradients"] == pytest.approx(total, abs=0.01), name
  assert table["plus"]["params"] == pytest.approx(2)


def test_memory_train_step_is_compiled_and_donated(memory_json):
  (step,) = memory_json["train_step"]
  step = step["strategies"]
  for name, entry in step.items():
    b = entry["bytes"]
    assert b["arguments"] > 0 and b["outputs"] > 0, name
    assert b["aliased"] > 0, f"{name}: donated params/state were not aliased to the outputs"
    assert b["peak"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"]
  # Persistent state: the bf16 strategies take fewer argument bytes than fp32 (D).
  assert step["plus"]["bytes"]["arguments"] < step["fp32"]["bytes"]["arguments"]
  assert step["bf16"]["bytes"]["arguments"] < step["light"]["bytes"]["arguments"] < step["plus"]["bytes"]["arguments"]


# ---------------------------------------------------------------------------
# trajectory.py (a short replay) and frontier.py (on the committed JSON).
# ---------------------------------------------------------------------------

RESULTS = BENCH / "results"


def test_trajectory_short_run_writes_every_strategy_or_why_it_is_skipped(tmp_path):
  """A 20-step replay of fp32, compact and FlashOptim's default: FlashOptim runs where it is
  importable, else it is skipped with a reason; every strategy that ran has its error and bytes."""
  out = tmp_path / "trajectory.json"
  bench.load("trajectory").main(["--steps", "20", "--constant-lr", "0", "--strategies", "fp32,compact,flash_adamw",
                            "--out", str(out)])
  result = json.loads(out.read_text())
  ran = [s for s in ("fp32", "compact", "flash_adamw") if s not in result["skipped"]]
  assert set(result["skipped"]) <= {"flash_adamw"}
  assert set(ran) >= {"fp32", "compact"}
  for name in ran:
    assert 0 <= result["relative_error"][name] < 1, name
    b = result["bytes_per_param"][name]
    # Each of the three is rounded to 4 decimals in the JSON: within 0.5e-4 of its value.
    assert b["total_with_gradients"] == pytest.approx(b["params_plus_state"] + b["gradients"], abs=3 * 0.5e-4), name
    assert result["strategies"][name]["label"], name
  assert result["bytes_per_param"]["compact"]["params_plus_state"] < 6


def test_the_benchmarks_name_the_registry_s_strategies():
  """benchmarks/ defines no strategy of its own but FlashOptim's: the others are collage_optax.cli.strategies'."""
  from collage_optax.cli import strategies

  common, trajectory = bench.load("_common"), bench.load("trajectory")
  for name, (label, dtype, _) in common.STRATEGIES.items():
    assert (label, dtype) == (strategies.REGISTRY[name].label, strategies.REGISTRY[name].param_dtype), name
  assert set(trajectory.KNOWN) - set(trajectory.FLASH) <= set(strategies.REGISTRY)


def test_trajectory_skips_flashoptim_when_it_is_not_importable(monkeypatch):
  trajectory = bench.load("trajectory")
  monkeypatch.setattr(trajectory._common, "flash_unavailable", lambda: "not installed (test)")  # pylint: disable=protected-access
  result = trajectory.run(steps=5, strategies=("fp32", *trajectory.FLASH))
  assert result["skipped"] == {name: "not installed (test)" for name in trajectory.FLASH}
  assert set(result["relative_error"]) == {"float64", "fp32"}


def _table_rows(table: str) -> list[str]:
  """The first cell of each body row of a markdown table."""
  return [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]


def test_frontier_on_the_committed_json(tmp_path, capsys):
  """frontier.py reads results/trajectory.json (and step.json, memory.json): a row per strategy."""
  frontier = bench.load("frontier")
  trajectory = json.loads((RESULTS / "trajectory.json").read_text())
  names = [s for s in trajectory["relative_error"] if s != "float64"]
  result = frontier.main(["--out", str(tmp_path / "frontier.json")])
  assert list(result["strategies"]) == names
  assert _table_rows(frontier.table(result)) == names
  assert json.loads((tmp_path / "frontier.json").read_text())["strategies"].keys() == set(names)
  assert "| fp32 " in capsys.readouterr().out
  fp32 = result["strategies"]["fp32"]
  assert fp32["relative_error"] < 1e-4 and fp32["bytes_per_param_with_gradients"] == pytest.approx(16, abs=0.01)


def test_frontier_without_step_json_shows_dashes(tmp_path):
  frontier = bench.load("frontier")
  result = frontier.main(["--step", str(tmp_path / "missing.json"), "--out", str(tmp_path / "frontier.json")])
  assert all(r["step"]["ratio_to_fp32"] is None for r in result["strategies"].values())
  for line in frontier.table(result).splitlines()[2:]:
    assert line.count(frontier.DASH) == 2, line
