"""A small decoder-only transformer (GPT) over bytes, in Flax NNX.

Pre-LayerNorm blocks (Radford et al. 2019, GPT-2), causal self-attention,
learned positions, byte embeddings (vocabulary 256) tied to the output layer
(Press & Wolf 2017). Parameters are created in float32 (``param_dtype``) and
every matmul computes in bfloat16 (``dtype``): give it bfloat16 params (the
float32 init cast) and it runs entirely in bfloat16. Used by
``collage-optax compare``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["GPT", "GPTConfig", "init_params", "loss"]

VOCAB = 256


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Model size: ``layers`` blocks of ``width`` channels, ``heads`` heads, ``context`` bytes."""

  layers: int = 2
  width: int = 128
  heads: int = 4
  context: int = 128
  dtype: Any = jnp.bfloat16

  def __post_init__(self):
    for name in ("layers", "width", "heads", "context"):
      if getattr(self, name) < 1:
        raise ValueError(f"GPTConfig: {name}={getattr(self, name)} must be >= 1.")
    if self.width % self.heads:
      raise ValueError(
        f"GPTConfig: width={self.width} must be divisible by heads={self.heads} "
        f"(e.g. width={self.heads * max(1, round(self.width / self.heads))})."
      )


def _dense(cfg: GPTConfig, n_in: int, n_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
    n_in, n_out, dtype=cfg.dtype, param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(std), rngs=rngs
  )


def _norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.width, dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs)


class Block(nnx.Module):
  """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    std, out_std = 0.02, 0.02 / (2 * cfg.layers) ** 0.5  # GPT-2's scaled residual init.
    self.heads = cfg.heads
    self.ln1 = _norm(cfg, rngs)
    self.qkv = _dense(cfg, cfg.width, 3 * cfg.width, std, rngs)
    self.proj = _dense(cfg, cfg.width, cfg.width, out_std, rngs)
    self.ln2 = _norm(cfg, rngs)
    self.fc = _dense(cfg, cfg.width, 4 * cfg.width, std, rngs)
    self.out = _dense(cfg, 4 * cfg.width, cfg.width, out_std, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, w = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    heads = lambda a: a.reshape(b, t, self.heads, w // self.heads)
    att = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    x = x + self.proj(att.reshape(b, t, w))
    return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
  """Byte-level GPT: ``tokens [batch, time] (uint8/int) -> logits [batch, time, 256]``."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.embed = nnx.Embed(
      VOCAB,
      cfg.width,
      dtype=cfg.dtype,
      param_dtype=jnp.float32,
      embedding_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    self.pos = nnx.Param(0.01 * jax.random.normal(rngs.params(), (cfg.context, cfg.width), jnp.float32))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
    self.ln_f = _norm(cfg, rngs)
    self.dtype = cfg.dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[1]
    x = self.embed(tokens.astype(jnp.int32)) + self.pos[:t].astype(self.dtype)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.ln_f(x))  # Tied output embedding.


def init_params(cfg: GPTConfig, seed: int) -> tuple[nnx.GraphDef, dict]:
  """The model's structure and its float32 initial params as a plain nested dict."""
  graphdef, state = nnx.split(GPT(cfg, nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def loss(graphdef: nnx.GraphDef, params: dict, windows: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy (nats) of ``windows [batch, context + 1]``.

  The model computes in its ``dtype`` whatever the params' dtype; the softmax
  and the mean are float32.
  """
  state = nnx.State(params)
  model = nnx.merge(graphdef, state)
  logits = model(windows[:, :-1]).astype(jnp.float32)
  labels = windows[:, 1:].astype(jnp.int32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
