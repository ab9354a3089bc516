"""orbax checkpoints of COLLAGE training (issue 5): exact, resumable, any mesh.

Runs ``examples/checkpoint_resume.py``: ``train`` in one subprocess (8
simulated CPU devices, FSDP) saves params and the whole optimizer state after
5 of 10 steps; ``resume`` in fresh subprocesses restores it onto a 4x2
(data x fsdp) mesh and onto 2 devices and trains the remaining 5 steps. The
references are the arrays the trainer saved and its uninterrupted run;
``master_params``' export is checked against hi + lo summed in float64 by numpy.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import multidevice

MESHES = {"4x2": 8, "2": 2}  # mesh -> simulated devices of its process


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


@pytest.mark.parametrize("mesh", list(MESHES))
def test_restored_state_is_exactly_the_saved_one(ckpt, mesh):
  """Params and every state array (count, mu, nu, lo) come back bit for bit."""
  _assert_bitwise(ckpt / f"restored_{mesh}.npz", ckpt / "saved.npz")
  saved = multidevice.load_npz(ckpt / "saved.npz")
  # The comparison covers the low components, and they carry something: the
  # params' lo (bf16) and mode "plus"'s MCF v (hi << 16 | lo packed in a uint32).
  lo = [k for k in saved if ".lo[" in k]
  nu = [k for k in saved if ".nu[" in k and saved[k].dtype == np.uint32]
  assert len(lo) == len(nu) == 4, sorted(saved)
  assert all(np.any(saved[k].view(np.uint16) & 0x7FFF) for k in lo)
  assert all(np.any(saved[k] & 0x7FFF) for k in nu)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_resumed_run_is_bitwise_the_uninterrupted_one(ckpt, mesh):
  _assert_bitwise(ckpt / f"resumed_{mesh}.npz", ckpt / "uninterrupted.npz")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_restored_state_is_sharded_for_the_new_mesh(ckpt, mesh):
  rec = json.loads((ckpt / f"shardings_{mesh}.json").read_text())
  params = rec["params"]
  # 2-way FSDP on both meshes: each device holds half of dense1's kernel.
  assert params["['dense1']['kernel']"]["shard_shape"] == [24, 32]
  for source in ("restored", "from_bf16_init"):
    found = set()
    for path, leaf in rec[source].items():
      owner = [p for p in params if path.endswith(p)]
      if not owner:
        assert leaf["shard_shape"] == [], (source, path)  # the step count
        continue
      ppath = max(owner, key=len)
      p = params[ppath]
      # mode "plus" on a bf16 param: mu and lo bf16, nu an MCF packed in a uint32.
      packed = ".nu[" in path and p["dtype"] == "bfloat16"
      assert (leaf["spec"], leaf["shard_shape"], leaf["dtype"]) == (
          p["spec"], p["shard_shape"], "uint32" if packed else p["dtype"]), (mesh, source, path)
      found.add(path[: len(path) - len(ppath)])
    state = "['opt_state']" if source == "restored" else ""
    assert found == {f"{state}.{k}" for k in ("mu", "nu", "lo")} | (
        {"['params']"} if source == "restored" else set()), (source, found)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_a_plain_bf16_checkpoint_starts_collage_with_lo_zero(ckpt, mesh):
  init = multidevice.load_npz(ckpt / f"from_bf16_init_{mesh}.npz")
  plain = multidevice.load_npz(ckpt / "bf16_model.npz")
  for key in plain:  # the restored params are the bf16 model's
    assert init[f"[0]{key}"].tobytes() == plain[key].tobytes(), key
  lo = [k for k in init if ".lo[" in k]
  assert len(lo) == 4 and all(not np.any(init[k].view(np.uint16)) for k in lo)
  # ... and training from it equals training from the in-memory model.
  _assert_bitwise(ckpt / f"from_bf16_{mesh}.npz", ckpt / "from_bf16_reference.npz")


@pytest.mark.parametrize("mesh", list(MESHES))
def test_exported_fp32_model_is_hi_plus_lo(ckpt, mesh):
  final = multidevice.load_npz(ckpt / "uninterrupted.npz")
  fp32 = multidevice.load_npz(ckpt / f"fp32_model_{mesh}.npz")
  assert len(fp32) == 5
  for key in fp32:
    hi = _as_float64(final[f"[0]{key}"])
    lo_key = f"[1].lo{key}"  # (params, AdamWState(count, mu, nu, lo, metrics))
    lo = _as_float64(final[lo_key]) if lo_key in final else 0.0
    want = (hi + lo).astype(np.float32)
    assert fp32[key].dtype == np.float32
    np.testing.assert_array_equal(fp32[key], want, err_msg=key)
    if lo_key in final:  # the export carries more than the bf16 params
      assert np.any(fp32[key] != hi.astype(np.float32)), key
