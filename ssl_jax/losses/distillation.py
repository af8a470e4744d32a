"""Self-distillation losses: BYOL's normalised regression."""

from typing import Optional

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.losses.registry import register


@register('byol')
def byol_loss(online_predictions: jax.Array, target_projections: jax.Array, *,
              axis_name: Optional[str] = None) -> jax.Array:
  """BYOL's regression loss (Grill et al. 2020, eq. 2), one direction.

  ||q/|q| - z'/|z'|||^2 = 2 - 2 cos(q, z'), averaged over the global batch.
  The target is a stop-gradient: the EMA network is never differentiated. The
  symmetric BYOL objective is the sum of this loss over both view orders.

  Args:
    online_predictions: [b, d] predictor outputs of the online network.
    target_projections: [b, d] projections of the other view by the target.
    axis_name: None or the pmap axis; the result is averaged over devices.

  Returns:
    The scalar mean loss of the global batch.
  """
  p = l2_normalize(online_predictions.astype(jnp.float32))
  z = l2_normalize(jax.lax.stop_gradient(target_projections).astype(jnp.float32))
  local = 2.0 - 2.0 * jnp.sum(p * z, axis=-1)
  return parallel.pmean(jnp.mean(local), axis_name)
