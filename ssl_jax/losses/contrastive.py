"""Contrastive losses: NT-Xent (SimCLR) and InfoNCE against a key set."""

from typing import Optional

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.registry import register


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  # rsqrt(max(|x|^2, eps^2)) is x / max(|x|, eps) without a sqrt at zero, whose
  # gradient would be NaN for an all-zero embedding.
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


@register('nt_xent')
def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float = 0.1,
            axis_name: Optional[str] = None) -> jax.Array:
  """SimCLR's normalised-temperature cross entropy (Chen et al. 2020, eq. 1).

  Each of the 2N views of the global batch is a query; its positive is the other
  view of the same image and its 2N-2 negatives are every other view, gathered
  from all devices. As in the official code (google-research/simclr
  `tf2/objective.py`, `add_contrastive_loss`: `reduce_mean(loss_a + loss_b)`),
  the loss of an image is the sum of its two queries' losses, averaged over the
  N images: twice the mean over the 2N queries. The factor matters: with LARS
  and weight decay, the loss scale sets how strongly the gradient weighs against
  the decay.

  Args:
    z1: [b, d] projections of the first view on this device.
    z2: [b, d] projections of the second view of the same images.
    temperature: softmax temperature tau.
    axis_name: None on one device, or the pmap axis to gather negatives over.

  Returns:
    The scalar loss of the global batch (the same value on every device).
  """
  b = z1.shape[0]
  z1 = l2_normalize(z1.astype(jnp.float32))
  z2 = l2_normalize(z2.astype(jnp.float32))
  all_z1 = parallel.all_gather(z1, axis_name)  # [N, d]
  all_z2 = parallel.all_gather(z2, axis_name)
  n = all_z1.shape[0]
  keys = jnp.concatenate([all_z1, all_z2], axis=0)  # [2N, d]
  queries = jnp.concatenate([z1, z2], axis=0)  # [2b, d]
  logits = queries @ keys.T / temperature  # [2b, 2N]

  # Positions of each local query's own row and of its positive among the keys.
  first = parallel.global_offset(b, axis_name) + jnp.arange(b)
  self_index = jnp.concatenate([first, first + n])
  positive_index = jnp.concatenate([first + n, first])
  # A large finite negative rather than -inf keeps the softmax gradient finite.
  logits = jnp.where(
      jnp.arange(2 * n)[None, :] == self_index[:, None], -1e9, logits)
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  local = -jnp.take_along_axis(log_prob, positive_index[:, None], axis=1)
  # sum over the 2 views / b images == 2 * mean over the 2b queries.
  return parallel.pmean(2.0 * jnp.mean(local), axis_name)


@register('info_nce')
def info_nce(queries: jax.Array, positive_keys: jax.Array,
             negative_keys: jax.Array, *, temperature: float = 0.2,
             axis_name: Optional[str] = None) -> jax.Array:
  """InfoNCE of each query against its positive and a shared negative set.

  As in MoCo (He et al. 2020): logits [q.k+, q.K-] / tau, cross entropy with
  the positive at index 0. Inputs are L2-normalised here.

  Args:
    queries: [b, d] local queries.
    positive_keys: [b, d] the positive key of each query.
    negative_keys: [K, d] negatives shared by every query (a queue, a bank).
    temperature: softmax temperature.
    axis_name: None or the pmap axis; the result is averaged over devices.

  Returns:
    The scalar mean loss of the global batch.
  """
  q = l2_normalize(queries.astype(jnp.float32))
  k_pos = l2_normalize(positive_keys.astype(jnp.float32))
  k_neg = l2_normalize(negative_keys.astype(jnp.float32))
  positive = jnp.sum(q * k_pos, axis=-1, keepdims=True)
  negative = q @ k_neg.T
  logits = jnp.concatenate([positive, negative], axis=1) / temperature
  local = -jax.nn.log_softmax(logits, axis=-1)[:, 0]
  return parallel.pmean(jnp.mean(local), axis_name)
