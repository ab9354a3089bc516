"""Shared helpers of the performance benchmarks: strategies, machine, JSON, HLO."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import collage_optax
from collage_optax.cli import strategies

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

LR, WD = 1e-3, 0.1

#: The optimizers the benchmarks compare, from ``collage_optax.cli.strategies.REGISTRY``: optax's
#: fp32 and bf16, every mode of ``collage_optax.MODES`` in its order, Lion + compensate.
NAMES = ("fp32", "bf16", *collage_optax.MODES, "lion_compensate")


def _factory(name: str) -> Callable[[], optax.GradientTransformation]:
  """The optimizer of strategy ``name`` with the benchmarks' AdamW (``LR``, ``WD``, no mask)."""
  return lambda: strategies.get(name).optimizer(strategies.AdamW(LR, weight_decay=WD))


#: name -> (label, param dtype, optimizer factory) of every strategy of :data:`NAMES`.
STRATEGIES: dict[str, tuple[str, Any, Callable[[], optax.GradientTransformation]]] = {
  name: (strategies.get(name).label, strategies.get(name).param_dtype, _factory(name)) for name in NAMES
}


#: FlashOptim's AdamW (``flashoptim_jax.flash_adamw``, Ortiz et al. 2026) variants: name -> (label,
#: ``flash_adamw`` keyword arguments). Its "24-bit master" is the bf16 param + an int8 correction in
#: units of half its ulp / 127, its "32-bit master" the same with an int16 correction (/ 32767); its
#: 8-bit moments are int8 (m, softsign) and uint8 (√v) codes with a float16 scale per 32 elements of
#: the flattened leaf.
FLASH_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
  "flash_adamw": ("FlashOptim flash_adamw: 24-bit master, 8-bit moments", {}),
  "flash_adamw_24_f32": ("FlashOptim flash_adamw: 24-bit master, fp32 moments", {"quantize": False}),
  "flash_adamw_32_q8": ("FlashOptim flash_adamw: 32-bit master, 8-bit moments", {"master_weight_bits": 32}),
  "flash_adamw_32": (
    "FlashOptim flash_adamw: 32-bit master, fp32 moments",
    {"master_weight_bits": 32, "quantize": False},
  ),
}


def flash_adamw(name: str, learning_rate: Any = LR, weight_decay: float = WD, **kwargs: Any) -> Any:
  """FlashOptim variant ``name`` of :data:`FLASH_VARIANTS` (``kwargs``: more ``flash_adamw`` arguments,
  e.g. ``b1``, ``param_groups``).

  ``fused=False``: FlashOptim's plain-JAX path (its fused path is a Pallas/Triton GPU kernel).
  """
  import flashoptim_jax  # pylint: disable=import-outside-toplevel

  return flashoptim_jax.flash_adamw(
    learning_rate, weight_decay=weight_decay, fused=False, **FLASH_VARIANTS[name][1], **kwargs
  )


def _flash(name: str) -> tuple[str, Any, Callable[[], Any]]:
  return FLASH_VARIANTS[name][0], jnp.bfloat16, lambda: flash_adamw(name)


#: FlashOptim, side by side: name -> (label, param dtype, factory), every variant of
#: :data:`FLASH_VARIANTS`. Not optax transformations: a ``FlashOptimizer(init, step)`` with
#: ``params, state = step(params, state, grads)``. Its initial state shares buffers (mu and nu are
#: one zeros array), so its step cannot be donated; it is timed without donation.
ALL_FLASH_STRATEGIES: dict[str, tuple[str, Any, Callable[[], Any]]] = {name: _flash(name) for name in FLASH_VARIANTS}

#: The FlashOptim variants the step benchmark and the device check run by default: its default
#: (24-bit master, 8-bit moments) and its most precise (32-bit master, fp32 moments).
FLASH_STRATEGIES = {name: ALL_FLASH_STRATEGIES[name] for name in ("flash_adamw", "flash_adamw_32")}


def flash_unavailable() -> str | None:
  """Why ``flashoptim_jax`` cannot be used here, or ``None`` when it can."""
  try:
    import flashoptim_jax  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except Exception as e:  # pylint: disable=broad-except
    return (
      f"flashoptim_jax not importable ({type(e).__name__}: {e}); "
      "pip install 'collage-optax[benchmarks]' to compare with FlashOptim"
    )
  return None


BASELINE = "fp32"


def parse_count(text: str) -> int:
  """``"16M"`` -> 16_000_000; ``"4k"`` -> 4_000; plain integers pass."""
  text = text.strip()
  scale = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
  return int(float(text[:-1] if scale > 1 else text) * scale)


def machine() -> dict[str, Any]:
  """What the numbers were measured on."""
  info: dict[str, Any] = {
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d.device_kind) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "collage_optax": str(Path(collage_optax.__file__).parent),
  }
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    for key in (
      "Model name",
      "CPU(s)",
      "Thread(s) per core",
      "Core(s) per socket",
      "L2 cache",
      "L3 cache",
      "Hypervisor vendor",
    ):
      if key in fields:
        info["lscpu_" + key.lower().replace(" ", "_").replace("(s)", "s")] = fields[key].strip()
    flags = fields.get("Flags", "").split()
    info["simd"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "fma") if f in flags]
  except (OSError, subprocess.SubprocessError, ValueError):
    pass
  with contextlib.suppress(ValueError, OSError):
    info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
  return info


def load_average() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def hlo_stats(compiled: Any, n_params: int) -> dict[str, Any]:
  """What XLA made of a step: kernels, and bytes and flops per parameter.

  ``xla_bytes_accessed_per_param`` is XLA's own count over every kernel's
  inputs and outputs (so re-reads by several fusions and materialised
  temporaries count): the number to compare with the bytes the dtypes imply.
  ``loop_kernels`` counts the fusions and copies over arrays of at least
  ``n_params / 4`` elements (compile a one-leaf step to read it per leaf).
  ``temp_bytes_per_param`` is the scratch XLA allocates per call (on CPU a
  fresh, page-faulted allocation: donated params and state are updated in
  place, temporaries are not).
  """
  text = compiled.as_text()
  entry = text[text.find("\nENTRY") :]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  found = re.findall(r"= \w+\[(\d+(?:,\d+)*)\]\{[^}]*\} (fusion|copy)\(", entry)
  loops = [kind for dims, kind in found if _prod(dims) * 4 >= n_params]
  mem = compiled.memory_analysis()
  return {
    "loop_kernels": len(loops),
    "copies": loops.count("copy"),
    "xla_bytes_accessed_per_param": round(float(cost.get("bytes accessed", 0.0)) / n_params, 2),
    "xla_flops_per_param": round(float(cost.get("flops", 0.0)) / n_params, 1),
    "temp_bytes_per_param": round(mem.temp_size_in_bytes / n_params, 2),
  }


def _prod(dims: str) -> int:
  out = 1
  for d in dims.split(","):
    out *= int(d)
  return out


def write_json(data: Any, path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def format_table(header: list[str], rows: list[list[Any]]) -> str:
  """A GitHub-markdown table."""
  cells = [[str(c) for c in r] for r in [header, *rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])
