"""Collapse monitors of a step's embeddings (global batch), on logging steps.

- `embedding_std`: mean over dimensions of the per-dimension std of the
  L2-normalised embeddings; about 1/sqrt(d) when the embeddings spread over
  the sphere, 0 when they collapse to a point (Chen & He 2021, SimSiam).
- `effective_rank`: exp of the entropy of the normalised singular values of
  the embedding batch (Roy & Vetterli 2007; RankMe, Garrido et al. 2023):
  between 1 (collapse to a line or point) and min(n, d).
- `alignment` and `uniformity` (Wang & Isola 2020) between the first two views:
  E||f(x)-f(y)||^2 over positive pairs, and log E exp(-2||f(x)-f(y)||^2) over
  all pairs of the batch.
"""

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.contrastive import l2_normalize


def embedding_std(z: jax.Array) -> jax.Array:
  z = l2_normalize(z)
  return jnp.mean(jnp.std(z, axis=0))


def effective_rank(z: jax.Array, eps: float = 1e-12) -> jax.Array:
  s = jnp.linalg.svd(z.astype(jnp.float32), compute_uv=False)
  p = s / (jnp.sum(s) + eps) + eps
  return jnp.exp(-jnp.sum(p * jnp.log(p)))


def alignment(z1: jax.Array, z2: jax.Array) -> jax.Array:
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
  return jnp.mean(jnp.sum(jnp.square(z1 - z2), axis=-1))


def uniformity(z: jax.Array, t: float = 2.0) -> jax.Array:
  z = l2_normalize(z)
  sq = jnp.maximum(2.0 - 2.0 * z @ z.T, 0.0)
  n = z.shape[0]
  off_diagonal = ~jnp.eye(n, dtype=bool)
  logits = jnp.where(off_diagonal, -t * sq, -jnp.inf)
  return jax.nn.logsumexp(logits) - jnp.log(n * (n - 1))


def collapse_metrics(embeddings: jax.Array,
                     axis_name: Optional[str] = None,
                     enabled: Any = True) -> Dict[str, jax.Array]:
  """Monitors of a [views, b, d] (or [b, d]) embedding batch, over all devices.

  Computed on stop-gradient embeddings gathered from every device, so the
  values are those of the global batch and identical on every device.

  Args:
    embeddings: this device's embeddings.
    axis_name: None or the device axis.
    enabled: True (Python) computes them; a traced boolean computes them
      under `lax.cond` (the same on every device), so a step that does not
      log skips the SVD and the B x B matrix (the all-gather stays); skipped
      monitors are NaN.

  Returns:
    {'embedding_std', 'effective_rank', 'uniformity', and 'alignment' with
    two or more views}: float32 scalars.
  """
  z = jax.lax.stop_gradient(embeddings.astype(jnp.float32))
  if z.ndim == 2:
    z = z[None]
  # The gather stays outside the `lax.cond`: a collective inside a
  # conditional is not ordered with the step's other collectives on XLA's CPU
  # backend, and 8 devices deadlocked with some in this all-gather and some
  # in a gradient all-reduce (DINO smoke run). What the cond skips is the
  # SVD and the B x B matrix.
  z = jax.vmap(lambda v: parallel.all_gather(v, axis_name))(z)

  def compute(z):
    metrics = {'embedding_std': embedding_std(z[0]),
               'effective_rank': effective_rank(z[0]),
               'uniformity': uniformity(z[0])}
    if z.shape[0] > 1:
      metrics['alignment'] = alignment(z[0], z[1])
    return {k: v.astype(jnp.float32) for k, v in metrics.items()}

  if isinstance(enabled, bool):
    return compute(z) if enabled else {}

  def skip(z):
    del z
    names = METRICS if z_views > 1 else METRICS[:-1]
    return {k: jnp.float32(jnp.nan) for k in names}

  z_views = z.shape[0]
  return jax.lax.cond(enabled, compute, skip, z)


# The keys `collapse_metrics` returns (alignment only with two views or more).
METRICS = ('embedding_std', 'effective_rank', 'uniformity', 'alignment')
