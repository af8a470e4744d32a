"""Projector and predictor MLPs."""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models.layers import batch_norm


class MLP(nn.Module):
  """Linear-(BN)-ReLU layers then a linear output, optionally batch-normed.

  Attributes:
    hidden_dims: widths of the hidden layers (empty: a single linear layer).
    output_dim: width of the output.
    use_bn: BN after each hidden linear layer (SimCLR v2, BYOL, MoCo v3).
    last_bn: BN on the output, without bias (MoCo v3, SimSiam, SimCLR).
    last_bn_scale: whether that output BN learns a scale. MoCo v3 and SimSiam
      use `BatchNorm1d(affine=False)`: no. SimCLR's official head
      (google-research/simclr `tf2/model.py`, `LinearLayer` of the last
      `ProjectionHead` layer: `BatchNormRelu(relu=False, center=False)`, whose
      `scale` stays True): yes.
    axis_name: devices over which BN statistics are computed.
  """
  hidden_dims: Sequence[int]
  output_dim: int
  use_bn: bool = True
  last_bn: bool = False
  last_bn_scale: bool = False
  axis_name: Optional[str] = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    for width in self.hidden_dims:
      x = nn.Dense(width, use_bias=not self.use_bn, dtype=self.dtype)(x)
      if self.use_bn:
        x = batch_norm(train, self.axis_name, dtype=self.dtype)(x)
      x = nn.relu(x)
    x = nn.Dense(self.output_dim, use_bias=not self.last_bn, dtype=self.dtype)(x)
    if self.last_bn:
      x = batch_norm(train, self.axis_name, use_scale=self.last_bn_scale,
                     use_bias=False, dtype=self.dtype)(x)
    return x.astype(jnp.float32)
