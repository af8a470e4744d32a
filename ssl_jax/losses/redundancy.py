"""Redundancy-reduction losses: Barlow Twins and VICReg.

Both losses need statistics of the *global* batch (per-dimension mean and
variance, a d x d cross-correlation or covariance). They are computed from
local sums that are `psum`-ed over devices, so a d x d matrix crosses the
interconnect once instead of every device gathering the whole [N, d] batch.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.registry import register


def _global_mean(x: jax.Array, axis_name: Optional[str]) -> Tuple[jax.Array, int]:
  n = parallel.global_batch_size(x.shape[0], axis_name)
  return parallel.psum(jnp.sum(x, axis=0), axis_name) / n, n


def _off_diagonal_square_sum(m: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(m)) - jnp.sum(jnp.square(jnp.diagonal(m)))


def batch_standardize(z: jax.Array, axis_name: Optional[str] = None,
                      eps: float = 1e-5) -> jax.Array:
  """Each dimension to zero mean, unit (biased) variance over the global batch.

  This is Barlow Twins' affine-free BatchNorm (`nn.BatchNorm1d(affine=False)`
  in the reference code), with torch's default eps and biased variance.

  Args:
    z: [b, d] local embeddings.
    axis_name: None or the pmap axis whose devices hold the rest of the batch.
    eps: added to the variance.

  Returns:
    [b, d] standardised embeddings.
  """
  mean, _ = _global_mean(z, axis_name)
  centered = z - mean
  var, _ = _global_mean(jnp.square(centered), axis_name)
  return centered * jax.lax.rsqrt(var + eps)


@register('barlow_twins')
def barlow_twins(z1: jax.Array, z2: jax.Array, *, lambda_offdiag: float = 0.0051,
                 axis_name: Optional[str] = None) -> jax.Array:
  """Barlow Twins (Zbontar et al. 2021, eq. 1-2).

  C = z1_n^T z2_n / N over the global batch, with z_n the batch-standardised
  embeddings; loss = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.

  Args:
    z1: [b, d] projections of the first view on this device.
    z2: [b, d] projections of the second view.
    lambda_offdiag: weight of the redundancy-reduction term (0.0051 in the
      paper for d = 8192).
    axis_name: None or the pmap axis.

  Returns:
    The scalar loss of the global batch (the same value on every device).
  """
  z1 = batch_standardize(z1.astype(jnp.float32), axis_name)
  z2 = batch_standardize(z2.astype(jnp.float32), axis_name)
  n = parallel.global_batch_size(z1.shape[0], axis_name)
  c = parallel.psum(z1.T @ z2, axis_name) / n
  on_diag = jnp.sum(jnp.square(1.0 - jnp.diagonal(c)))
  return on_diag + lambda_offdiag * _off_diagonal_square_sum(c)


def _variance_and_covariance(z: jax.Array, axis_name: Optional[str],
                             eps: float) -> Tuple[jax.Array, jax.Array]:
  """VICReg's hinge on the std and off-diagonal covariance of one branch."""
  mean, n = _global_mean(z, axis_name)
  centered = z - mean
  # Unbiased (N - 1) estimates, as torch.var / the reference x.T @ x / (N - 1).
  cov = parallel.psum(centered.T @ centered, axis_name) / (n - 1)
  std = jnp.sqrt(jnp.diagonal(cov) + eps)
  variance = jnp.mean(jax.nn.relu(1.0 - std))
  covariance = _off_diagonal_square_sum(cov) / z.shape[1]
  return variance, covariance


@register('vicreg')
def vicreg(z1: jax.Array, z2: jax.Array, *, invariance_weight: float = 25.0,
           variance_weight: float = 25.0, covariance_weight: float = 1.0,
           eps: float = 1e-4, axis_name: Optional[str] = None) -> jax.Array:
  """VICReg (Bardes et al. 2022, eq. 1-6), as in the reference implementation.

  invariance: mean squared error between the branches (over batch and dims);
  variance: mean over dims of max(0, 1 - sqrt(Var + eps)), averaged over the
  two branches; covariance: sum of squared off-diagonal covariances / d,
  summed over the two branches. Variance and covariance are over the global
  batch.

  Args:
    z1, z2: [b, d] local embeddings of the two views.
    invariance_weight, variance_weight, covariance_weight: lambda, mu, nu
      (25, 25, 1 in the paper).
    eps: added to the variance under the square root.
    axis_name: None or the pmap axis.

  Returns:
    The scalar loss of the global batch.
  """
  z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
  invariance = parallel.pmean(jnp.mean(jnp.square(z1 - z2)), axis_name)
  var1, cov1 = _variance_and_covariance(z1, axis_name, eps)
  var2, cov2 = _variance_and_covariance(z2, axis_name, eps)
  return (invariance_weight * invariance +
          variance_weight * (var1 + var2) / 2.0 +
          covariance_weight * (cov1 + cov2))
