"""``collage-optax compare``: an end-to-end tiny run, the corpus loader, flag errors."""

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from collage_optax import cli
from collage_optax.cli import corpus, experiment, report, strategies

STRATEGIES = ("fp32", "bf16", "light", "plus", "full", "exact", "compact", "lean", "sr")
# results.json keeps report.SIGNIFICANT_DIGITS significant digits: each float read
# back is within this relative error of the value computed, on any machine.
ROUNDING = 0.5 * 10.0 ** (1 - report.SIGNIFICANT_DIGITS)
# Optimizer + param bytes per param (the README's strategy table without the bf16 gradients):
# fp32 params, m, v = 12; bf16 params, m, v = 6 (sr too: no residual); + lo(params) = 8;
# + lo(v) = 10; + lo(m) = 12; exact: bf16 + int16, bf16 m, float32 v = 10; compact: bf16 + int8,
# and 8-bit m and v with a bf16 scale per 32 = 3 + 2·(1 + 2/32) = 5.125 (a bit more where a
# row is shorter than 32 and its scale covers fewer values); lean: bf16 + int8, bf16 m, and a 16-bit
# log-domain v with a float32 scale per 32 = 3 + 2 + 2 + 4/32 = 7.125.
BYTES_PER_PARAM = {
  "fp32": 12, "bf16": 6, "light": 8, "plus": 10, "full": 12, "exact": 10, "compact": 5.125, "lean": 7.125, "sr": 6,
}


def _text(n: int) -> bytes:
  """``n`` bytes of varied, deterministic, Python-like text."""
  rng = np.random.default_rng(0)
  words = [b"def", b"return", b"self", b"import", b"x", b"for", b"in", b"range", b"(", b")", b":", b"\n    "]
  out = b" ".join(words[i] for i in rng.integers(0, len(words), n))
  return out[:n]


def _rounded_bound(value: float) -> float:
  """How far the unrounded value of a float read back from results.json can be from it."""
  return abs(value) * ROUNDING / (1 - ROUNDING)


def _ratio_bound(x: float, r: float) -> float:
  """How far ``x / r``, both read back from results.json, can be from the unrounded ratio.

  ``x = x₀(1 + a)``, ``r = r₀(1 + b)`` with ``|a|, |b| ≤ u``: ``x/r = (x₀/r₀)(1 + a)/(1 + b)``,
  and ``|(1 + a)/(1 + b) − 1| ≤ 2u/(1 − u)``, of ``x₀/r₀ ≤ (x/r)(1 + u)/(1 − u)``.
  """
  u = ROUNDING
  return abs(x / r) * (1 + u) / (1 - u) * 2 * u / (1 - u)


def _std_bound(values: list[float], std: float) -> float:
  """How far ``std``, read back from results.json, can be from the standard deviation of ``values``
  (also read back): ``|sd(x₀ + δ) − sd(x₀)| ≤ ‖δ‖/√(n − 1)`` with ``|δᵢ| ≤ u|x₀ᵢ|``, plus ``std``'s
  own rounding."""
  n = len(values)
  return float(np.linalg.norm([_rounded_bound(v) for v in values])) / math.sqrt(n - 1) + _rounded_bound(std)


def _run(argv, capsys):
  """``main(argv)`` in-process: (exit code, stdout, stderr)."""
  try:
    code = cli.main(argv)
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


# ---------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------


def test_compare_tiny_end_to_end(tmp_path, capsys):
  text = tmp_path / "corpus.txt"
  text.write_bytes(_text(40_000))
  out = tmp_path / "out"
  steps = 8
  code, stdout, stderr = _run(
      ["compare", "--size", "tiny", "--steps", str(steps), "--seeds", "2", "--corpus", str(text), "--out", str(out),
       "--no-progress"], capsys)
  assert code == 0, stderr
  # Progress per strategy and seed.
  assert "plus seed 1: val loss" in stderr and "fp32 seed 0: val loss" in stderr

  # The table: a header and one row per strategy, with finite numbers.
  rows = [line for line in stdout.splitlines() if line.startswith("|")]
  assert "val loss (mean ± sd, 2 seeds)" in rows[0] and "Δ vs fp32 [95% CI]" in rows[0]
  assert "lost fraction" in rows[0]
  names = [r.split("|")[1].strip() for r in rows[2:]]
  assert names == list(STRATEGIES)
  table_md = (out / "table.md").read_text().strip()
  assert [line for line in table_md.splitlines() if line.startswith("|")] == rows
  # Then the audit: the leaves each tracked strategy froze (precision_report), as printed.
  audit = [line for line in table_md.splitlines() if line and not line.startswith("|")]
  assert audit and all(line in stdout for line in audit)

  res = json.loads((out / "results.json").read_text())
  assert res["partial"] is False and res["config"]["seeds"] == [0, 1]
  # COLLAGE keeps every leaf moving; sr's landing is random, so it tracks nothing.
  assert res["strategies"]["plus"]["frozen"] == [] and res["strategies"]["exact"]["frozen"] == []
  assert res["strategies"]["sr"]["frozen"] is None and isinstance(res["strategies"]["bf16"]["frozen"], list)
  assert res["config"]["train"]["steps"] == steps
  assert res["config"]["model"]["layers"] == cli.MODEL_SIZES["tiny"]["layers"]
  assert set(res["strategies"]) == set(STRATEGIES)
  fp32 = res["strategies"]["fp32"]
  for name, r in res["strategies"].items():
    assert r["n_seeds"] == 2 and [s["seed"] for s in r["seeds"]] == [0, 1], name
    losses = [s["val_loss"] for s in r["seeds"]]
    # Trained a little below the uniform byte distribution's ln(256) nats.
    assert all(0 < v < math.log(256) for v in losses), name
    # Every float is read back rounded: the bounds follow from the rounding, not from a machine's numbers.
    mean_bound = _rounded_bound(r["val_loss"]) + max(_rounded_bound(v) for v in losses)
    assert r["val_loss"] == pytest.approx(np.mean(losses), rel=0, abs=mean_bound)
    assert r["val_loss_std"] == pytest.approx(np.std(losses, ddof=1), rel=0, abs=_std_bound(losses, r["val_loss_std"]))
    assert r["bytes_per_param"] == pytest.approx(BYTES_PER_PARAM[name], abs=0.1), name
    assert r["step_time_ratio"] > 0
    for s, f in zip(r["seeds"], fp32["seeds"]):
      curves = s["curves"]
      assert len(curves["train_loss"]) == len(curves["edq"]) == len(curves["lost_fraction"]) == steps
      assert curves["val_step"][0] == 0 and curves["val_step"][-1] == steps
      assert curves["val_loss"][-1] == s["val_loss"]
      # Same init per seed (the fp32 init cast to bf16, computing in bf16) and the same first batch.
      assert curves["val_loss"][0] == f["curves"]["val_loss"][0]
      assert curves["train_loss"][0] == f["curves"]["train_loss"][0]
      bound = _rounded_bound(s["delta_vs_fp32"]) + _ratio_bound(s["val_loss"], f["val_loss"])
      assert s["delta_vs_fp32"] == pytest.approx(s["val_loss"] / f["val_loss"] - 1, rel=0, abs=bound)
    if name == "sr":
      assert r["edq"] is None and r["lost_fraction"] is None  # its landing is random: no metric
    else:
      assert 0.0 <= r["lost_fraction"] <= 1.0 and 0.0 <= r["edq"] <= 1.01, name
  # The seeds differ (init and batches), so fp32's two losses do.
  assert fp32["seeds"][0]["val_loss"] != fp32["seeds"][1]["val_loss"]
  assert fp32["step_time_ratio"] == 1.0 and fp32["delta_vs_fp32"] == 0.0 and fp32["approx_fp32"] is None
  bf16, plus = res["strategies"]["bf16"], res["strategies"]["plus"]
  # LayerNorm gains sit at 1.0, where bf16 rounds lr-sized updates away; fp32 and COLLAGE keep them.
  assert bf16["lost_fraction"] > 0.01 > fp32["lost_fraction"]
  assert plus["lost_fraction"] < bf16["lost_fraction"] and plus["edq"] > bf16["edq"]
  for png in ("loss.png", "frontier.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert (out / png).stat().st_size > 10_000, png


def test_paired_interval_against_a_hand_computed_example():
  """Three seeds: losses 2.2, 2.06, 2.42 against fp32's 2.0, 2.0, 2.2: d = 10%, 3%, 10%;
  mean 7.667%, sd = √(((2.333)² + (4.667)² + (2.333)²)/2)% = 4.0415%; t(0.975, 2) = 4.303;
  half-width 4.303·4.0415/√3 = 10.040%: [−2.374%, +17.707%], which contains 0."""
  mean, (lo, hi) = report.paired_interval([2.2, 2.06, 2.42], [2.0, 2.0, 2.2])
  assert mean == pytest.approx(0.076667, abs=1e-6)
  assert lo == pytest.approx(-0.023742, abs=1e-5) and hi == pytest.approx(0.177075, abs=1e-5)
  assert report.paired_interval([1.1], [1.0]) == (pytest.approx(0.1), None)
  seeds = lambda xs: [{"seed": i, "val_loss": x, "edq": 1.0, "lost_fraction": 0.0, "step_time_s": 1.0,
                       "step_cpu_s": 1.0} for i, x in enumerate(xs)]
  size = {"n_params": 1, "bytes_per_param": 1.0, "bytes_per_param_with_grads": 1.0}
  out = report.summarize({"fp32": seeds([2.0, 2.0, 2.2]), "a": seeds([2.2, 2.06, 2.42]),
                           "b": seeds([2.2, 2.2, 2.42])}, {"fp32": size, "a": size, "b": size})
  assert out["a"]["approx_fp32"] is True and report.format_delta(out["a"], "a").startswith("≈ fp32 [−2.37%, +17.71%]")
  # b: +10% on every seed, sd 0: an interval of width 0 that excludes 0.
  assert out["b"]["approx_fp32"] is False and report.format_delta(out["b"], "b").startswith("+10.00% [")
  assert out["a"]["val_loss_std"] == pytest.approx(np.std([2.2, 2.06, 2.42], ddof=1))


def _fail_run(monkeypatch, n: int, error: BaseException) -> None:
  """Makes the experiment's ``n``-th (strategy, seed) run raise ``error`` instead of training."""
  real, calls = experiment._train_seed, []

  def failing(*args, **kwargs):
    calls.append(args[0])
    if len(calls) == n:
      raise error
    return real(*args, **kwargs)

  monkeypatch.setattr(experiment, "_train_seed", failing)


def test_ctrl_c_writes_what_finished(tmp_path, capsys, monkeypatch):
  """An interrupt during the third run: the two finished runs are written, marked partial; exit 130."""
  text = tmp_path / "corpus.txt"
  text.write_bytes(_text(40_000))
  _fail_run(monkeypatch, 3, KeyboardInterrupt())
  out = tmp_path / "out"
  code, stdout, stderr = _run(["compare", "--size", "tiny", "--steps", "4", "--strategies", "fp32,bf16,plus",
                               "--corpus", str(text), "--out", str(out), "--no-progress"], capsys)
  assert code == 130, stderr
  assert "interrupted: partial results" in stderr and "partial" in stdout
  res = json.loads((out / "results.json").read_text())
  assert res["partial"] is True
  assert set(res["strategies"]) == {"fp32", "bf16"} and res["strategies"]["bf16"]["n_seeds"] == 1
  assert (out / "loss.png").is_file() and (out / "frontier.png").is_file()


def test_every_strategy_stores_what_design_says():
  """Optimizer + param bytes per param of every strategy, from their initial pytrees."""
  import jax
  from collage_optax.cli import gpt
  _, params = gpt.init_params(gpt.GPTConfig(layers=1, width=32, heads=2, context=8), seed=0)
  n = sum(p.size for p in jax.tree.leaves(params))
  assert set(BYTES_PER_PARAM) == set(strategies.COMPARE)
  for name in strategies.COMPARE:
    p = jax.tree.map(lambda x: x.astype(experiment.param_dtype(name)), params)
    state = experiment.make_optimizer(name, experiment.TrainConfig()).init(p)
    nbytes = sum(x.nbytes for x in jax.tree.leaves((p, state)))
    assert nbytes / n == pytest.approx(BYTES_PER_PARAM[name], abs=0.1), name
    counted = strategies.bytes_per_param(p, state)
    assert counted["n_params"] == n and counted["params_plus_state"] == pytest.approx(nbytes / n), name


# ---------------------------------------------------------------------------
# Corpus.
# ---------------------------------------------------------------------------


def test_default_corpus_is_the_stdlib_without_tests():
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  files = corpus.stdlib_files()
  assert files == corpus.stdlib_files()  # Deterministic.
  rel = [f.relative_to(stdlib).as_posix() for f in files]
  assert rel == sorted(rel)
  assert "os.py" in rel and "json/decoder.py" in rel
  for r in rel:
    parts = r.split("/")
    assert r.endswith(".py")
    assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(parts), r
  data, source, n = corpus.read(None)
  assert n == len(files) and len(data) > 1_000_000
  assert data.startswith(files[0].read_bytes())
  assert "standard library" in source


def test_split_is_every_tenth_block():
  data = _text(2_000)
  train, val = corpus.split(data, min_len=5, val_every=10, block=10)
  want_val = b"".join(data[i:i + 10] for i in range(90, 2_000, 100))
  want_train = b"".join(data[i:i + 10] for i in range(0, 2_000, 10) if i % 100 != 90)
  assert val.tobytes() == want_val and train.tobytes() == want_train
  again = corpus.split(data, min_len=5, val_every=10, block=10)
  assert again[0].tobytes() == want_train and again[1].tobytes() == want_val


def test_split_of_a_small_corpus_uses_small_blocks():
  data = _text(5_000)  # Below the 64 KiB block: blocks shrink so both parts get text.
  train, val = corpus.split(data, min_len=33)
  assert len(train) + len(val) == len(data)
  assert 0.05 < len(val) / len(data) < 0.15


def test_corpus_file(tmp_path):
  f = tmp_path / "my text.txt"
  f.write_bytes(_text(30_000))
  c = corpus.load(str(f), context=32)
  assert c.n_files == 1 and c.source == str(f)
  assert len(c.train) + len(c.val) == 30_000
  assert c.train.dtype == np.uint8


def test_corpus_directory_reads_text_files_in_order(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / ".git").mkdir()
  (tmp_path / "b" / "z.txt").write_bytes(b"zzz\n")
  (tmp_path / "a.py").write_bytes(b"aaa\n")
  (tmp_path / "c.md").write_bytes(b"ccc\n")
  (tmp_path / ".hidden").write_bytes(b"hidden\n")
  (tmp_path / ".git" / "HEAD").write_bytes(b"ref\n")
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
  data, source, n = corpus.read(str(tmp_path))
  assert data == b"aaa\nzzz\nccc\n" and n == 3 and source == str(tmp_path)


def _bad_corpus(root: Path, kind: str) -> Path:
  """A corpus path that cannot be used, of one kind."""
  if kind == "missing":
    return root / "missing.txt"
  if kind == "empty":
    (root / "empty.txt").write_bytes(b"")
    return root / "empty.txt"
  if kind == "binary only":
    (root / "only").mkdir()
    (root / "only" / "x.bin").write_bytes(b"\0\0data")
    return root / "only"
  (root / "short.txt").write_bytes(b"tiny text")
  return root / "short.txt"


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file or directory"),
    ("empty", "is empty"),
    ("binary only", "has no text files"),
    ("short", "too small for windows of 33 bytes"),
])
def test_bad_corpus_is_a_clear_error(tmp_path, kind, message):
  with pytest.raises(corpus.CorpusError, match=message):
    corpus.load(str(_bad_corpus(tmp_path, kind)), context=32)


def test_unreadable_corpus_is_a_clear_error(tmp_path, monkeypatch):
  f = tmp_path / "locked.txt"
  f.write_bytes(_text(10_000))

  def deny(self):
    raise PermissionError(13, "Permission denied", str(self))

  monkeypatch.setattr(Path, "read_bytes", deny)
  with pytest.raises(corpus.CorpusError, match=r"cannot read corpus file .*locked\.txt: Permission denied"):
    corpus.read(str(f))


def test_unreadable_corpus_exits_2(tmp_path, capsys, monkeypatch):
  f = tmp_path / "locked.txt"
  f.write_bytes(_text(10_000))

  def deny(self):
    raise PermissionError(13, "Permission denied", str(self))

  monkeypatch.setattr(Path, "read_bytes", deny)
  code, _, err = _run(["compare", "--corpus", str(f), "--no-progress"], capsys)
  assert code == 2 and "Permission denied" in err and "Traceback" not in err


def test_bad_corpus_exits_2_without_traceback(tmp_path, capsys):
  code, _, err = _run(["compare", "--corpus", str(tmp_path / "nope"), "--no-progress"], capsys)
  assert code == 2
  assert "no such file or directory" in err and "Traceback" not in err
  (tmp_path / "empty").mkdir()
  code, _, err = _run(["compare", "--corpus", str(tmp_path / "empty"), "--no-progress"], capsys)
  assert code == 2 and "has no text files" in err


# ---------------------------------------------------------------------------
# Flags.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--strategies", "fp32,fp16"], "unknown strategy 'fp16'; choose from fp32,bf16,light,plus,full,exact,compact,"),
    (["--seeds", "0"], "--seeds: 0 must be a positive integer"),
    (["--strategies", "plus,plus"], "names a strategy twice"),
    (["--steps", "-5"], "--steps: -5 must be a positive integer"),
    (["--steps", "ten"], "--steps: 'ten' is not an integer"),
    (["--lr", "0"], "--lr: 0 must be in (0, inf)"),
    (["--b2", "1.0"], "--b2: 1.0 must be in [0, 1)"),
    (["--width", "30", "--heads", "4"], "--width 30 must be a multiple of --heads 4"),
    (["--size", "huge"], "invalid choice: 'huge'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
])
def test_flag_errors_exit_2_with_a_message(flags, message, capsys):
  code, _, err = _run(["compare", *flags], capsys)
  assert code == 2
  assert message in err and "Traceback" not in err


def test_out_must_be_a_directory(tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("x")
  code, _, err = _run(["compare", "--out", str(f), "--no-progress"], capsys)
  assert code == 2 and "is not a directory" in err


def test_python_dash_m_entry_point():
  proc = subprocess.run(
      [sys.executable, "-m", "collage_optax", "compare", "--steps", "0"],
      capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert "collage-optax compare: error: argument --steps: 0 must be a positive integer" in proc.stderr


def test_the_tool_is_a_subpackage_on_the_public_api():
  """cli, compare, gpt and corpus live in ``collage_optax.cli`` and use only ``collage_optax.__all__``
  (its own subpackage); importing the library does not import the tool (nor matplotlib, tqdm, flax's GPT)."""
  import ast
  import subprocess
  import sys
  from pathlib import Path

  import collage_optax

  pkg = Path(collage_optax.__file__).parent / "cli"
  files = sorted(pkg.glob("*.py"))
  assert {f.name for f in files} >= {"__init__.py", "experiment.py", "report.py", "plots.py", "strategies.py", "gpt.py",
                                          "corpus.py"}
  public = set(collage_optax.__all__) | {"cli"}
  for f in files:
    for node in ast.walk(ast.parse(f.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("collage_optax"):
        if node.module == "collage_optax":
          bad = [a.name for a in node.names if a.name not in public]
          assert not bad, f"{f.name} imports {bad} from collage_optax (not public)"
        else:
          assert node.module.startswith("collage_optax.cli"), f"{f.name} imports {node.module}"
      if isinstance(node, ast.Import):
        for a in node.names:
          assert a.name == "collage_optax" or not a.name.startswith("collage_optax.") or a.name.startswith(
              "collage_optax.cli"), f"{f.name} imports {a.name}"
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "collage_optax":
        assert node.attr in public, f"{f.name} uses collage_optax.{node.attr} (not public)"
  code = "import sys, collage_optax; print(sorted(m for m in sys.modules if m.startswith('collage_optax')))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert "collage_optax.cli" not in out and "collage_optax.alias" in out, out


def test_a_diverged_run_keeps_what_finished(tmp_path, capsys, monkeypatch):
  """A strategy whose loss goes non-finite stops the run like Ctrl-C does, with the reason: exit 1."""
  text = tmp_path / "corpus.txt"
  text.write_bytes(_text(40_000))
  _fail_run(monkeypatch, 2, FloatingPointError("bf16: the training loss is nan at step 3 (seed 0); try a smaller --lr."))
  out = tmp_path / "out"
  code, _, stderr = _run(["compare", "--size", "tiny", "--steps", "4", "--strategies", "fp32,bf16",
                          "--corpus", str(text), "--out", str(out), "--no-progress"], capsys)
  assert code == 1 and "training loss is nan" in stderr
  res = json.loads((out / "results.json").read_text())
  assert res["partial"] is True and "nan" in res["error"] and set(res["strategies"]) == {"fp32"}
