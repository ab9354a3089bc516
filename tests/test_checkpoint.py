"""orbax checkpoints of COLLAGE training: exact, resumable, any mesh.

Runs ``examples/checkpoint_resume.py``: ``train`` in one subprocess (8
simulated CPU devices, FSDP) saves params and the whole optimizer state after
5 of 10 steps, for modes "plus" and "compact" (whose q8 moments are
``formats.Q8(codes, scales)`` NamedTuples: two arrays each in the checkpoint);
``resume`` in fresh subprocesses restores it onto a 4x2 (data x fsdp) mesh and
onto 2 devices and trains the remaining 5 steps. The references are the arrays
the trainer saved and its uninterrupted run; ``master_params``' export is
checked against the params' value (hi + lo) computed in float64 by numpy.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import multidevice

MESHES = {"4x2": 8, "2": 2}  # mesh -> simulated devices of its process
MODES = ("plus", "compact")  # the example's default modes (compact: q8 moments, int8 residuals)


def _train_and_resume(d: Path) -> None:
  multidevice.run_example("checkpoint_resume.py", "train", "--dir", str(d), devices=8)
  resumes = []
  for mesh, devices in MESHES.items():  # fresh processes, side by side
    argv, env = multidevice.command("checkpoint_resume.py", "resume", "--dir", str(d), "--mesh", mesh,
                                    devices=devices)
    resumes.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for proc in resumes:
    multidevice.check(proc, *proc.communicate(timeout=600))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
  return multidevice.shared_dir(tmp_path_factory, "checkpoint_resume", _train_and_resume)


def _assert_bitwise(got: Path, want: Path) -> None:
  a, b = multidevice.load_npz(got), multidevice.load_npz(want)
  assert sorted(a) == sorted(b), (got.name, sorted(set(a) ^ set(b)))
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (got.name, key)
    assert a[key].tobytes() == b[key].tobytes(), f"{got.name}: {key} differs from {want.name}"


def _as_float64(a: np.ndarray) -> np.ndarray:
  """npz stores bfloat16 as 2-byte void: view it back."""
  return (a.view(ml_dtypes.bfloat16) if a.dtype.kind == "V" else a).astype(np.float64)


def _nonzero(a: np.ndarray) -> bool:
  """Any element of nonzero magnitude (npz stores bfloat16 as 2-byte void: its bits without the sign)."""
  return bool(np.any(a.view(np.uint16) & 0x7FFF if a.dtype.kind == "V" else a))


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("mode", MODES)
def test_restored_state_is_exactly_the_saved_one(ckpt, mode, mesh):
  """Params and every state array (count, mu, nu, lo; a q8 moment's codes and scales) come back bit for bit."""
  _assert_bitwise(ckpt / mode / f"restored_{mesh}.npz", ckpt / mode / "saved.npz")
  saved = multidevice.load_npz(ckpt / mode / "saved.npz")
  # The comparison covers the low components, and they carry something: the
  # params' lo (bf16 for "plus", int8 for "compact"); mode "plus"'s MCF v (hi << 16
  # | lo packed in a uint32), mode "compact"'s q8 m and v (int8/uint8 codes, bf16 scales).
  lo = [k for k in saved if ".lo[" in k]
  assert len(lo) == 4 and all(_nonzero(saved[k]) for k in lo), sorted(saved)
  assert {saved[k].dtype.itemsize for k in lo} == {2 if mode == "plus" else 1}
  if mode == "plus":
    nu = [k for k in saved if ".nu[" in k and saved[k].dtype == np.uint32]
    assert len(nu) == 4 and all(np.any(saved[k] & 0x7FFF) for k in nu), sorted(saved)
  else:
    q8 = {k: saved[k] for k in saved if k.endswith((".codes", ".scales"))}
    assert len(q8) == 16 and all(_nonzero(a) for a in q8.values()), sorted(saved)
    assert {str(a.dtype) for k, a in q8.items() if k.endswith(".codes")} == {"int8", "uint8"}


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("mode", MODES)
def test_resumed_run_is_bitwise_the_uninterrupted_one(ckpt, mode, mesh):
  _assert_bitwise(ckpt / mode / f"resumed_{mesh}.npz", ckpt / mode / "uninterrupted.npz")


# The state arrays of a bf16 param, by mode: (kind, dtype). A q8 moment is two arrays.
STATE = {
    "plus": {".mu": "bfloat16", ".nu": "uint32", ".lo": "bfloat16"},  # nu: an MCF packed in a uint32
    "compact": {".mu.codes": "int8", ".mu.scales": "bfloat16", ".nu.codes": "uint8", ".nu.scales": "bfloat16",
                ".lo": "int8"},
}


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("mode", MODES)
def test_restored_state_is_sharded_for_the_new_mesh(ckpt, mode, mesh):
  """Every state array gets its param's sharding; a q8 moment's scales (one per
  32 along the last axis) too, with every dimension that 2-way FSDP divides
  split: here all of them (2 groups per row or bias)."""
  rec = json.loads((ckpt / mode / f"shardings_{mesh}.json").read_text())
  params = rec["params"]
  # 2-way FSDP on both meshes: each device holds half of dense1's kernel.
  assert params["['dense1']['kernel']"]["shard_shape"] == [24, 32]
  for source in ("restored", "from_bf16_init"):
    found = set()
    for path, leaf in rec[source].items():
      base, part = re.fullmatch(r"(.*?)((?:\.codes|\.scales)?)", path).groups()
      owner = [p for p in params if base.endswith(p)]
      if not owner:
        assert leaf["shard_shape"] == [], (source, path)  # the step count
        continue
      ppath = max(owner, key=len)
      p = params[ppath]
      kind = base[: len(base) - len(ppath)].removeprefix("['opt_state']") + part
      bf16_state = p["dtype"] == "bfloat16" and kind != "['params']"
      want = (p["spec"], p["shard_shape"], STATE[mode][kind] if bf16_state else p["dtype"])
      if part == ".scales":
        shape = [*p["shape"][:-1], -(-p["shape"][-1] // 32)]
        assert leaf["shape"] == shape, (mesh, source, path)
        halved = [n // 2 if n_p != s_p else n for n, n_p, s_p in zip(shape, p["shape"], p["shard_shape"])]
        want = (p["spec"], halved, "bfloat16")
      assert (leaf["spec"], leaf["shard_shape"], leaf["dtype"]) == want, (mesh, source, path)
      found.add(kind)
    assert found - {"['params']"} == set(STATE[mode]) | {".mu", ".nu"}, (source, found)  # (+ fp32 temperature's)
    assert ("['params']" in found) == (source == "restored")


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("mode", MODES)
def test_a_plain_bf16_checkpoint_starts_collage_with_lo_zero(ckpt, mode, mesh):
  init = multidevice.load_npz(ckpt / mode / f"from_bf16_init_{mesh}.npz")
  plain = multidevice.load_npz(ckpt / "bf16_model.npz")
  for key in plain:  # the restored params are the bf16 model's
    assert init[f"[0]{key}"].tobytes() == plain[key].tobytes(), key
  lo = [k for k in init if ".lo[" in k]
  assert len(lo) == 4 and not any(np.any(init[k].view(np.uint8)) for k in lo)  # +0 (all bits clear)
  # ... and training from it equals training from the in-memory model.
  _assert_bitwise(ckpt / mode / f"from_bf16_{mesh}.npz", ckpt / mode / "from_bf16_reference.npz")


def _compact_value(hi: np.ndarray, r: np.ndarray) -> np.ndarray:
  """``hi + r·(ulp(hi)/2)/127`` in float64, ``ulp(hi)/2`` held at ``2**-126`` or above (formats' ``compact``)."""
  _, e = np.frexp(hi)  # |hi| = m·2**e, m in [0.5, 1): ulp(hi)/2 = 2**(e - 1 - 8)
  k = np.where(hi == 0, -126, np.maximum(e - 9, -126))
  return hi + r.astype(np.float64) * np.exp2(k.astype(np.float64)) / 127


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("mode", MODES)
def test_exported_fp32_model_is_hi_plus_lo(ckpt, mode, mesh):
  """``master_params``' export, restored onto another mesh: ``hi + lo`` ("plus",
  exact in float32) or ``hi + r·ulp(hi)/254`` ("compact", within a float32 ulp
  of numpy's float64 value)."""
  final = multidevice.load_npz(ckpt / mode / "uninterrupted.npz")
  fp32 = multidevice.load_npz(ckpt / mode / f"fp32_model_{mesh}.npz")
  assert len(fp32) == 5
  for key in fp32:
    hi = _as_float64(final[f"[0]{key}"])
    lo_key = f"[1].lo{key}"  # (params, AdamWState(count, mu, nu, lo, metrics))
    assert fp32[key].dtype == np.float32
    if lo_key not in final:  # the float32 leaf: no residual
      np.testing.assert_array_equal(fp32[key], hi.astype(np.float32), err_msg=key)
      continue
    if mode == "plus":
      np.testing.assert_array_equal(fp32[key], (hi + _as_float64(final[lo_key])).astype(np.float32), err_msg=key)
    else:
      want = _compact_value(hi, final[lo_key])
      err = np.abs(fp32[key].astype(np.float64) - want)
      assert np.all(err <= np.spacing(np.abs(want).astype(np.float32))), (key, err.max())
    # The export carries more than the bf16 params.
    assert np.any(fp32[key] != hi.astype(np.float32)), key
