"""``benchmarks/device_check.py --quick`` runs end to end on this backend and writes its JSON.

The real check is for an accelerator (one command, under 4 minutes); here it
runs at tiny sizes in a subprocess (it sets JAX's memory flags before JAX
starts) and the JSON's structure is checked, with one number that must hold
on every backend: ``collage_optax.mcf.two_sum`` is exact, bit for bit.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_device_check_quick(tmp_path):
  out = tmp_path / "device_check.json"
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=180
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["quick"] is True
  for key in ("machine", "budget_s", "env", "xla_trap", "kernel", "step", "compare", "errors", "wall_s"):
    assert key in res, key
  assert res["errors"] == {}, res["errors"]

  trap = res["xla_trap"]
  assert trap["n_pairs"] > 0 and trap["true_error_nonzero"] > 0
  assert trap["reference_inexact_pairs"] == 0
  for name in ("naive", "ours"):
    for key in (
      "sum_bits_wrong",
      "error_bits_wrong",
      "error_zero_where_true_nonzero",
      "float64_inexact_pairs",
      "exact",
    ):
      assert key in trap[name], (name, key)
  ours = trap["ours"]
  assert ours["exact"] is True
  assert ours["sum_bits_wrong"] == ours["error_bits_wrong"] == ours["float64_inexact_pairs"] == 0
  assert ours["error_zero_where_true_nonzero"] == 0

  # On CPU both runs are the jnp path: bit for bit, or the comparison is broken.
  for key in ("kernel", "kernel_update", "kernel_lean"):
    kernel = res[key]
    assert kernel["bit_for_bit"] is True and kernel["elements_differing"], kernel
    assert set(kernel["elements_differing"].values()) == {0}

  step = res["step"]
  assert step["strategies"][0] == "fp32" and len(step["strategies"]) >= 2
  (size,) = step["sizes"].values()
  for name in step["strategies"]:
    s = size["strategies"][name]
    assert s["median_ms"] > 0
    assert s["ratio_to_fp32_nondonated"] > 0 and math.isfinite(s["ratio_to_fp32_nondonated"])
    leaf = step["per_leaf_hlo"][name]
    assert leaf["loop_kernels"] >= 1 and leaf["copies"] >= 0
  assert size["strategies"]["fp32"]["ratio_to_fp32"] == 1.0
  (ratios,) = step["ratios"].values()
  assert set(ratios) == set(step["strategies"])

  cmp = res["compare"]
  assert cmp["returncode"] == 0 and "--steps" in cmp["command"]
  assert cmp["strategies"]
  for r in cmp["strategies"].values():
    assert 0 < r["val_loss"] < math.log(256)
