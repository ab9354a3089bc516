"""optax's own optimizer tests, run against collage_optax.

The installed optax wheel ships its test modules ``optax/_src/alias_test.py``
and ``optax/_src/sharding_test.py``. Their common test *methods* are imported
and called here, unmodified, with our optimizers in place of optax's:

* every ``collage_optax.adamw(mode=m)`` for ``m`` in ``collage_optax.MODES``
  (new modes are picked up automatically), and
* ``optax.chain(optax.sgd(...), collage_optax.compensate())``.

How they are reused. absl's ``parameterized`` expands each decorated method
into ``test_x0, test_x1, ...``, each a ``functools.wraps`` wrapper whose
``__wrapped__`` is the method as written; :func:`_unparameterized` finds it and
we call it on a plain instance of their ``TestCase`` (outside a unittest run,
``subTest`` just runs its body, so failures surface as ordinary exceptions and
``SkipTest`` as a pytest skip). Their optimizers come from the module function
``alias_test._get_opt(self, opt_name)``, which is monkeypatched to return our
factories. Where a method hardcodes a dtype (named once in a module-level
setup function or as ``jnp.float16``/``jnp.float32``), that one name is
redirected to the dtype under test, so the cases run on float32, bfloat16 and
float16 params:

* ``test_optimizers_accept_extra_args``: ``_setup_rosenbrock`` is given the
  dtype under test;
* the sharding tests: their module's ``jnp.float16``/``jnp.float32`` name the
  dtype under test.

Not applicable, and why (each such case is a pytest skip with this reason):

* complex params: collage_optax refuses them by design (real float params only,
  ``_tree.check_supported_leaf``; the refusal itself is checked before skipping);
* ``test_explicit_dtype`` with a ``state_dtype`` for ``adamw``: ``mu_dtype``
  does not exist, per-parameter state is stored at the params' precision by
  design; the ``sgd_mom`` variant runs against our chain with every
  ``accumulator_dtype``;
* ``test_optimizers_can_be_wrapped_in_inject_hyperparams`` runs on float32 only:
  it builds its params inline with ``jnp.ones`` (float32), and with bfloat16
  params ``inject_hyperparams`` would cast ``b2=0.999`` to bfloat16 (1.0),
  which ``adamw`` refuses by design unless ``hyperparam_dtype=jnp.float32``;
* ``ShardingTest.test_microbatch_with_explicit_sharding`` tests
  ``optax.microbatching`` and takes no optimizer: nothing of ours to run;
* the LBFGS and algorithm-specific tests: not about our optimizers.

The sharding-in-types tests need 8 devices, which ``XLA_FLAGS`` grants only
before JAX starts: they run once, in a subprocess with 8 simulated CPU devices
(this file run as a script), and each case here reports its outcome. Their
gate ``jax.__version__ < '0.7.2'`` compares strings (true for '0.10.2'); the
worker gives their module a ``jax`` whose ``__version__`` is ``'0.7.2'`` when
the real version is at least that, so the tests run as intended.

Last, :func:`test_tree_shapes_and_leaf_dtypes`: every tree shape (bare array,
dict, list, nested, empty) times every leaf dtype class (float32, bfloat16,
float16, float64, int32, bool; and all of them in the nested tree), for every optimizer above: init,
two jitted updates and ``apply_updates``; structure and dtypes preserved,
float32/float64 leaves as ``optax.adamw``'s (or ``optax.sgd``'s), bfloat16 and
float16 leaves within one ulp of the float32 reference (and ``θ + lo`` much
closer), integer and boolean leaves unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import traceback
import types
import unittest
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import collage_optax as co

# ---------------------------------------------------------------------------
# Importing optax's test modules.
# ---------------------------------------------------------------------------


def _import_optax_test(name: str) -> types.ModuleType:
  """``optax._src.<name>``, imported without side effects on this process.

  ``alias_test`` imports scikit-learn at the top for its LBFGS tests, which we
  do not run: when it is not installed, empty stand-ins are put in
  ``sys.modules`` for the import only. ``sharding_test`` sets ``XLA_FLAGS``
  (8 host devices) at import; the previous value is restored, so this process
  keeps its devices.
  """
  stubs = {}
  try:
    import sklearn  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    for mod in ("sklearn", "sklearn.datasets", "sklearn.linear_model"):
      stubs[mod] = types.ModuleType(mod)
    stubs["sklearn"].datasets = stubs["sklearn.datasets"]
    stubs["sklearn"].linear_model = stubs["sklearn.linear_model"]
  flags = os.environ.get("XLA_FLAGS")
  try:
    sys.modules.update(stubs)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # optax.noisy_sgd(1.0) at import: "Specifying a key ...".
      return importlib.import_module(f"optax._src.{name}")
  finally:
    for mod in stubs:
      sys.modules.pop(mod, None)
    if flags is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = flags


try:
  alias_test = _import_optax_test("alias_test")
  sharding_test = _import_optax_test("sharding_test")
except ImportError as e:  # an optax wheel without its tests.
  pytest.skip(f"optax's test modules are not installed: {e}", allow_module_level=True)


def _unparameterized(cls: type, name: str):
  """The test method ``name`` of ``cls`` as written, before absl's parameterisation."""
  for attr in vars(cls).values():
    fn = getattr(attr, "__wrapped__", None)
    if fn is not None and getattr(fn, "__name__", None) == name:
      return fn
  fn = vars(cls).get(name)
  if callable(fn):  # not parameterised.
    return fn
  raise LookupError(f"{cls.__module__}.{cls.__name__} has no test method {name!r}")


class _ModuleProxy(types.ModuleType):
  """``module`` with some attributes replaced (for one optax test module's globals)."""

  def __init__(self, module: types.ModuleType, **overrides):
    super().__init__(module.__name__)
    self.__dict__.update(overrides)
    self.__dict__["_module"] = module

  def __getattr__(self, name):
    return getattr(self.__dict__["_module"], name)


# ---------------------------------------------------------------------------
# Our optimizers, in the format of optax's _OPTIMIZERS_UNDER_TEST.
# ---------------------------------------------------------------------------


def _sgd_compensate(learning_rate, momentum=None, nesterov=False, accumulator_dtype=None):
  """``optax.sgd`` with COLLAGE-light: ``optax.chain(optax.sgd(...), compensate())``."""
  return optax.chain(
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov,
                accumulator_dtype=accumulator_dtype),
      co.compensate())


_FACTORIES = {
    **{f"adamw_{mode}": functools.partial(co.adamw, mode=mode) for mode in co.MODES},
    "sgd_compensate": _sgd_compensate,
}

# Learning rates as optax's own list has them for adamw and sgd.
_OPTIMIZERS_UNDER_TEST = (
    *({"opt_name": f"adamw_{mode}", "opt_kwargs": {"learning_rate": 1e-1}} for mode in co.MODES),
    {"opt_name": "sgd_compensate", "opt_kwargs": {"learning_rate": 1e-3, "momentum": 0.9}},
)
_OPT_IDS = [o["opt_name"] for o in _OPTIMIZERS_UNDER_TEST]
_OPTS = pytest.mark.parametrize("opt", _OPTIMIZERS_UNDER_TEST, ids=_OPT_IDS)

_REAL = ("float32", "bfloat16", "float16")

_COMPLEX_REASON = (
    "complex params: collage_optax supports real float params only and refuses "
    "complex ones with a TypeError by design (_tree.check_supported_leaf); "
    "optimise complex leaves with a plain optax optimizer")


# The presets whose param formats keep bfloat16 params only (the upper half of a float32).
_BF16_ONLY = {f"adamw_{m}" for m, (pf, _, _) in co.PRESETS.items() if pf in ("exact", "compact")}


def _skip_if_float16_refused(opt_name: str, opt_kwargs: dict, dtype) -> None:
  """For an optimizer keeping bfloat16 params only: checks that float16 ones are refused, then skips."""
  if opt_name not in _BF16_ONLY or jnp.dtype(dtype) != jnp.float16:
    return
  with pytest.raises(TypeError, match=r"leaf .*keeps bfloat16 params.*param_format='mcf'"):
    _FACTORIES[opt_name](**opt_kwargs).init({"w": jnp.zeros([2], jnp.float16)})
  pytest.skip(f"{opt_name} keeps bfloat16 params only and refuses float16 ones with a TypeError (by design)")


def _skip_if_complex(opt_name: str, opt_kwargs: dict, dtype) -> None:
  """Checks that a complex dtype is refused, then skips with the documented reason."""
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating):
    return
  tx = _FACTORIES[opt_name](**opt_kwargs)
  with pytest.raises(TypeError, match="complex"):
    tx.init(jnp.zeros([2], jnp.complex64))
  pytest.skip(_COMPLEX_REASON)


@pytest.fixture
def alias_case(monkeypatch):
  """An ``alias_test.AliasTest`` whose ``_get_opt`` returns our optimizers."""
  monkeypatch.setattr(alias_test, "_get_opt", lambda self, opt_name: _FACTORIES[opt_name])
  return alias_test.AliasTest()


# ---------------------------------------------------------------------------
# alias_test.AliasTest's common tests.
# ---------------------------------------------------------------------------


@_OPTS
@pytest.mark.parametrize("target", ["parabola", "rosenbrock"])
@pytest.mark.parametrize("dtype", [*_REAL, "complex64"])
def test_optimization(alias_case, opt, target, dtype):
  _skip_if_complex(**opt, dtype=dtype)
  _skip_if_float16_refused(**opt, dtype=dtype)
  setup = {"parabola": alias_test._setup_parabola, "rosenbrock": alias_test._setup_rosenbrock}[target]
  method = _unparameterized(alias_test.AliasTest, "test_optimization")
  method(alias_case, **opt, target=setup, dtype=getattr(jnp, dtype))


@_OPTS
@pytest.mark.parametrize("dtype", _REAL)
def test_optimizers_accept_extra_args(alias_case, monkeypatch, opt, dtype):
  _skip_if_float16_refused(**opt, dtype=dtype)
  # The test sets up _setup_rosenbrock(jnp.float32): give it the dtype under test.
  rosenbrock = alias_test._setup_rosenbrock
  monkeypatch.setattr(alias_test, "_setup_rosenbrock", lambda _: rosenbrock(getattr(jnp, dtype)))
  method = _unparameterized(alias_test.AliasTest, "test_optimizers_accept_extra_args")
  method(alias_case, **opt)


@_OPTS
def test_optimizers_can_be_wrapped_in_inject_hyperparams(alias_case, opt):
  method = _unparameterized(alias_test.AliasTest, "test_optimizers_can_be_wrapped_in_inject_hyperparams")
  method(alias_case, **opt)


@pytest.mark.parametrize("opt_name", _OPT_IDS)
@pytest.mark.parametrize("state_dtype", ["bfloat16", "float32", "complex64", None])
@pytest.mark.parametrize("params_dtype", ["bfloat16", "float32", "complex64", None])
def test_explicit_dtype(alias_case, monkeypatch, opt_name, params_dtype, state_dtype):
  if params_dtype == "complex64":
    _skip_if_complex(opt_name, {"learning_rate": 0.1}, params_dtype)
  method = _unparameterized(alias_test.AliasTest, "test_explicit_dtype")
  if opt_name == "sgd_compensate":
    # Their 'sgd_mom' case calls alias.sgd(0.1, momentum=0.9, accumulator_dtype=...).
    monkeypatch.setattr(alias_test, "alias", _ModuleProxy(alias_test.alias, sgd=_sgd_compensate))
    method(alias_case, params_dtype=params_dtype, state_dtype=state_dtype, opt_name="sgd_mom")
    return
  if state_dtype == "complex64":
    pytest.skip("collage_optax.adamw stores moments as real floats (mu_dtype bfloat16 or float32)")
  mode = opt_name.removeprefix("adamw_")
  if state_dtype is None and params_dtype == "bfloat16" and co.PRESETS[mode][1] != "bf16":
    pytest.skip(
        f"mode={mode!r} stores m of bfloat16 params in format {co.PRESETS[mode][1]!r} (a packed uint32 "
        "or 8-bit codes and scales), not as a bfloat16 array; pass mu_dtype to choose its dtype")

  def factory(learning_rate, mu_dtype=None):
    return co.adamw(learning_rate, mode=mode, mu_dtype=mu_dtype)

  monkeypatch.setattr(alias_test, "_get_opt", lambda self, name: factory)
  method(alias_case, params_dtype=params_dtype, state_dtype=state_dtype, opt_name="adamw")


@_OPTS
@pytest.mark.parametrize("dtype", _REAL)
def test_preserve_dtype(alias_case, opt, dtype):
  _skip_if_float16_refused(**opt, dtype=dtype)
  method = _unparameterized(alias_test.AliasTest, "test_preserve_dtype")
  method(alias_case, **opt, dtype=dtype)


@_OPTS
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "complex64", "complex128"])
def test_state_shape_dtype_shard_stability(alias_case, opt, dtype):
  _skip_if_complex(**opt, dtype=dtype)
  _skip_if_float16_refused(**opt, dtype=dtype)
  method = _unparameterized(alias_test.AliasTest, "test_state_shape_dtype_shard_stability")
  method(alias_case, **opt, dtype=getattr(jnp, dtype))


@_OPTS
@pytest.mark.parametrize("dtype", _REAL)
def test_gradient_accumulation(alias_case, opt, dtype):
  _skip_if_float16_refused(**opt, dtype=dtype)
  method = _unparameterized(alias_test.AliasTest, "test_gradient_accumulation")
  method(alias_case, **opt, dtype=dtype)


# ---------------------------------------------------------------------------
# sharding_test.ShardingTest, in a subprocess with 8 CPU devices.
# ---------------------------------------------------------------------------

_SHARDING_METHODS = (
    "test_init_with_abstract_input",
    "test_state_sharding_type_init_match_update",
    "test_state_sharding_type_preserved_with_jit",
)
_SHARDING_DTYPES = ("float16", "bfloat16", "float32")


def _version_tuple(version: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _run_sharding_worker(out: Path) -> None:
  """Runs the sharding tests on every optimizer and dtype; writes ``{case: [status, detail]}``."""
  assert jax.device_count() >= 8, f"the sharding worker needs 8 devices, has {jax.device_count()}"
  if _version_tuple(jax.__version__) >= (0, 7, 2):
    # Their gate `jax.__version__ < '0.7.2'` compares strings; '0.10.2' < '0.7.2'.
    sharding_test.jax = _ModuleProxy(jax, __version__="0.7.2")
  results = {}
  for method_name in _SHARDING_METHODS:
    method = _unparameterized(sharding_test.ShardingTest, method_name)
    for opt in _OPTIMIZERS_UNDER_TEST:
      for dtype in _SHARDING_DTYPES:
        # They name the params' dtype jnp.float16 (sharding) or jnp.float32 (abstract input).
        sharding_test.jnp = _ModuleProxy(jnp, float16=getattr(jnp, dtype), float32=getattr(jnp, dtype))
        kwargs = dict(opt["opt_kwargs"], learning_rate=1.0)  # as their OPTIMIZERS
        if opt["opt_name"] in _BF16_ONLY and dtype == "float16":
          results[f"{method_name}/{opt['opt_name']}/{dtype}"] = ["skipped", "bfloat16 params only (by design)"]
          continue
        try:
          method(sharding_test.ShardingTest(), optimizer=_FACTORIES[opt["opt_name"]](**kwargs))
          status = ["passed", ""]
        except unittest.SkipTest as e:
          status = ["skipped", str(e)]
        except Exception:  # noqa: BLE001  (any failure is the case's result)
          status = ["failed", traceback.format_exc()]
        results[f"{method_name}/{opt['opt_name']}/{dtype}"] = status
  out.write_text(json.dumps(results))


class _ShardingWorker:
  """The subprocess running :func:`_run_sharding_worker`, started at most once."""

  def __init__(self, out: Path):
    self.out, self.proc = out, None

  def start(self) -> None:
    if self.proc is None:
      env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
      self.proc = subprocess.Popen(
          [sys.executable, __file__, "--sharding-worker", str(self.out)], env=env,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def results(self) -> dict:
    self.start()
    try:
      log, _ = self.proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      log, _ = self.proc.communicate()
    assert self.proc.returncode == 0 and self.out.exists(), (
        f"the sharding worker failed (rc={self.proc.returncode}):\n{log[-8000:]}")
    return json.loads(self.out.read_text())

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()
      self.proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def _sharding_worker(request, tmp_path_factory):
  """The sharding worker; started at this module's first test when a sharding case is selected.

  It then runs alongside the other tests (not under pytest-xdist, whose
  workers each see every collected item: there it starts when first needed).
  """
  worker = _ShardingWorker(tmp_path_factory.mktemp("optax_sharding_suite") / "results.json")
  if not os.environ.get("PYTEST_XDIST_WORKER") and any(
      getattr(item, "originalname", None) == "test_sharding" and item.module is request.module
      for item in request.session.items):
    worker.start()
  try:
    yield worker
  finally:
    worker.stop()


@pytest.fixture(scope="module")
def sharding_results(_sharding_worker):
  return _sharding_worker.results()


@pytest.mark.parametrize("dtype", _SHARDING_DTYPES)
@pytest.mark.parametrize("opt_name", _OPT_IDS)
@pytest.mark.parametrize("method", _SHARDING_METHODS)
def test_sharding(sharding_results, method, opt_name, dtype):
  status, detail = sharding_results[f"{method}/{opt_name}/{dtype}"]
  if status == "skipped":
    pytest.skip(f"optax's own skip: {detail}")
  assert status == "passed", detail


# ---------------------------------------------------------------------------
# Every tree shape × every leaf dtype class.
# ---------------------------------------------------------------------------

_LR, _WD = 1e-2, 1e-2
_LEAF_CLASSES = ("float32", "bfloat16", "float16", "float64", "int32", "bool")
_LEAF_SHAPES = ((3,), (2, 2), (), (4,))


def _leaf(kind: str, i: int, grad: bool, for_sgd: bool):
  """The ``i``-th leaf (param or gradient) of dtype class ``kind``."""
  shape = _LEAF_SHAPES[i % len(_LEAF_SHAPES)]
  rng = np.random.default_rng(2 * i + grad)
  if kind in ("int32", "bool"):
    # adamw freezes non-float leaves whatever their gradient; optax.sgd would
    # move an int param by a nonzero one (optax's doing, not compensate's).
    if grad:
      return jnp.full(shape, 0 if for_sgd else 1, kind)
    return jnp.asarray(rng.integers(-5, 6, shape) if kind == "int32" else rng.random(shape) < 0.5, kind)
  if grad:
    # |g| >= 0.05: float16 Adam needs |g| above ~1e-2, or (1 - b2)·g² underflows
    # (collage_optax.adamw's documented range).
    n = rng.normal(size=shape)
    return jnp.asarray(np.sign(n) * (0.05 + np.abs(n)), kind)
  return jnp.asarray(1.0 + 0.5 * rng.normal(size=shape), kind)


def _tree(shape: str, kinds: tuple[str, ...], grad: bool, for_sgd: bool):
  """A params (or grads) tree of ``shape``; leaf ``i`` is of class ``kinds[i % len(kinds)]``.

  Containers hold at least one leaf of every class in ``kinds``.
  """
  leaf = lambda i: _leaf(kinds[i % len(kinds)], i, grad, for_sgd)
  if shape == "bare":
    return leaf(0)
  if shape == "dict":
    return {f"p{i}": leaf(i) for i in range(max(2, len(kinds)))}
  if shape == "list":
    return [leaf(i) for i in range(max(2, len(kinds)))]
  if shape == "nested":
    tree = {"layers": [{"w": leaf(0)}, (leaf(1),)], "head": leaf(2)}
    if len(kinds) > 3:
      tree["layers"].append([leaf(i) for i in range(3, len(kinds))])
    return tree
  if shape == "empty_dict":
    return {}
  if shape == "empty_list":
    return []
  raise ValueError(shape)


_TREE_CASES = [
    *(pytest.param(s, k, id=f"{s}-{k}") for s in ("bare", "dict", "list", "nested") for k in _LEAF_CLASSES),
    # All classes in one tree: the nested one, which has dict, list and tuple nodes.
    pytest.param("nested", "mixed", id="nested-mixed"),
    pytest.param("empty_dict", "none", id="empty_dict"),
    pytest.param("empty_list", "none", id="empty_list"),
]


def _spec(tree):
  """Structure, shapes and dtypes of a tree."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, [(jnp.shape(x), jnp.dtype(x.dtype)) for x in leaves]


def _plain(for_sgd: bool) -> optax.GradientTransformation:
  """The plain optax optimizer with the same hyperparameters."""
  return optax.sgd(_LR, momentum=0.9) if for_sgd else optax.adamw(_LR, weight_decay=_WD)


@functools.cache
def _reference(for_sgd: bool, shape: str, kinds: tuple[str, ...]) -> list:
  """Two jitted steps of the plain optax optimizer on the float leaves (float32 for bf16/fp16).

  One entry per leaf: the float64 NumPy value, or ``None`` for a non-float leaf.
  """
  def wide(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return None
    return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x

  params = jax.tree.map(wide, _tree(shape, kinds, grad=False, for_sgd=for_sgd))
  grads = jax.tree.map(wide, _tree(shape, kinds, grad=True, for_sgd=for_sgd))
  if not jax.tree.leaves(params):  # no float leaf (a bare int, an empty tree).
    return [None] * len(jax.tree.leaves(params, is_leaf=lambda x: x is None))
  tx = _plain(for_sgd)

  @jax.jit
  def run(params):
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params

  out = run(params)
  return [None if x is None else np.asarray(x, np.float64)
          for x in jax.tree.leaves(out, is_leaf=lambda x: x is None)]


@pytest.mark.parametrize("opt_name", _OPT_IDS)
@pytest.mark.parametrize("shape, kind", _TREE_CASES)
def test_tree_shapes_and_leaf_dtypes(opt_name, shape, kind):
  """init + two jitted updates + apply_updates on every tree shape and leaf dtype class."""
  for_sgd = opt_name == "sgd_compensate"
  if for_sgd:
    tx = _sgd_compensate(_LR, momentum=0.9)
  else:
    tx = _FACTORIES[opt_name](_LR, weight_decay=_WD)
  kinds = _LEAF_CLASSES if kind == "mixed" else (kind,)
  if opt_name in _BF16_ONLY:
    if kind == "float16":
      _skip_if_float16_refused(opt_name, {"learning_rate": _LR}, kind)
    kinds = tuple(k for k in kinds if k != "float16")
  x64 = jax.enable_x64(True) if "float64" in kinds else contextlib.nullcontext()
  with x64:
    params0 = _tree(shape, kinds, grad=False, for_sgd=for_sgd)
    grads = _tree(shape, kinds, grad=True, for_sgd=for_sgd)
    # adamw's updates have the gradients' dtypes; the chain's those of optax.sgd
    # (which turns an int gradient into a float32 update; compensate passes it on).
    plain = _plain(for_sgd)
    expected_updates = grads if not for_sgd else jax.eval_shape(
        lambda: plain.update(grads, plain.init(params0), params0)[0])

    @jax.jit
    def step(params, state):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, updates

    state0 = tx.init(params0)
    params, state = params0, state0
    for _ in range(2):
      params, state, updates = step(params, state)
      assert _spec(updates) == _spec(expected_updates), "the updates' tree or dtypes are wrong"
      assert _spec(params) == _spec(params0), "apply_updates changed the params' tree or dtypes"
    # adamw's whole state is stable; in the chain optax.sgd's own trace of an
    # int leaf turns float32 (optax's behaviour), so there only compensate's.
    stable = (lambda s: s) if not for_sgd else (lambda s: s[-1])
    assert _spec(stable(state)) == _spec(stable(state0)), "the state changed tree, shape or dtype"

    master = jax.tree.leaves(co.master_params(params, state))
    refs = _reference(for_sgd, shape, kinds)
    for p0, p, m, ref in zip(jax.tree.leaves(params0), jax.tree.leaves(params), master, refs, strict=True):
      dtype = jnp.dtype(p0.dtype)
      if ref is None:
        np.testing.assert_array_equal(np.asarray(p), np.asarray(p0), err_msg=f"{dtype} leaf changed")
        continue
      p = np.asarray(p, np.float64)
      if dtype.itemsize >= 4:
        rtol = 1e-6 if dtype == jnp.float32 else 1e-12
        np.testing.assert_allclose(p, ref, rtol=rtol, atol=rtol * _LR,
                                   err_msg=f"{dtype} leaf differs from the plain optax optimizer's")
        continue
      # The stored param is within an ulp of the float32 reference; hi + lo
      # (the MCF value) within the storage rounding of the moments/updates.
      eps = 2.0**-jnp.finfo(dtype).nmant
      moved = np.abs(ref - np.asarray(p0, np.float64))
      np.testing.assert_array_less(np.abs(p - ref), np.abs(ref) * eps + 1e-30,
                                   err_msg=f"{dtype} param more than an ulp from the float32 reference")
      np.testing.assert_allclose(np.asarray(m, np.float64), ref, rtol=eps**2, atol=4 * eps * moved.max(),
                                 err_msg=f"{dtype} hi + lo differs from the float32 reference")


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--sharding-worker":
    _run_sharding_worker(Path(sys.argv[2]))
  else:
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
