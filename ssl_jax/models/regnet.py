"""RegNetY (Radosavovic et al. 2020): ResNet-style bottlenecks with group
convolutions and Squeeze-and-Excitation, widths from a quantised linear rule.

SEER (Goyal et al. 2021) pretrains RegNetY-256GF with SwAV. The stage widths,
depths and group widths of a named model come from its four design
parameters (depth, w_0, w_a, w_m) and its group width, computed exactly as
pycls / torchvision do (`regnet_stages`).
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models.layers import Conv, batch_norm, relu

# name -> (depth, w_0, w_a, w_m, group_width); from pycls' model zoo
# (RegNetY-400MF, -16GF) and VISSL's SEER configs (RegNetY-256GF).
REGNETY_DESIGNS = {
    'regnety_400mf': (16, 48, 27.89, 2.09, 8),
    'regnety_16gf': (18, 200, 106.23, 2.48, 112),
    'regnety_256gf': (27, 640, 230.83, 2.53, 373),
}


def _make_divisible(value: float, divisor: int) -> int:
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * value else new


def regnet_stages(depth: int, w_0: float, w_a: float, w_m: float,
                  group_width: int, quantum: int = 8
                  ) -> Tuple[List[int], List[int], List[int]]:
  """Stage widths, depths and group widths of a RegNet design (pycls rule).

  Per-block widths u_j = w_0 + w_a * j are snapped to w_0 * w_m^round(log(u_j /
  w_0) / log w_m), rounded to a multiple of `quantum`; runs of equal widths
  form stages; widths are then made divisible by the group width.

  Args:
    depth, w_0, w_a, w_m: the design parameters (Radosavovic et al., eq. 2-4).
    group_width: channels per group of the 3x3 convolutions.
    quantum: width rounding.

  Returns:
    (stage_widths, stage_depths, stage_group_widths).
  """
  widths = []
  for j in range(depth):
    capacity = round(math.log((j * w_a + w_0) / w_0) / math.log(w_m))
    widths.append(int(round(w_0 * w_m**capacity / quantum) * quantum))
  stage_widths, stage_depths = [], []
  for w in widths:
    if stage_widths and stage_widths[-1] == w:
      stage_depths[-1] += 1
    else:
      stage_widths.append(w)
      stage_depths.append(1)
  groups = [min(group_width, w) for w in stage_widths]
  stage_widths = [_make_divisible(w, g) for w, g in zip(stage_widths, groups)]
  return stage_widths, stage_depths, groups


class SqueezeExcite(nn.Module):
  """Channel gating by a 2-layer MLP of the pooled map (Hu et al. 2018)."""
  squeeze: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = relu(nn.Conv(self.squeeze, (1, 1), dtype=self.dtype)(s))
    s = nn.sigmoid(nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype)(s))
    return x * s


class RegNetYBlock(nn.Module):
  """1x1 -> grouped 3x3 (stride) -> SE -> 1x1, residual (bottleneck ratio 1)."""
  features: int
  strides: int
  group_width: int
  se_ratio: float
  axis_name: Optional[str]
  conv_impl: str
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda **kw: batch_norm(train, self.axis_name, dtype=self.dtype, **kw)
    conv = lambda f, k, s: Conv(f, k, s, impl=self.conv_impl, dtype=self.dtype)
    y = relu(norm()(conv(self.features, 1, 1)(x)))
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides),
                padding='SAME', use_bias=False,
                feature_group_count=self.features // self.group_width,
                dtype=self.dtype)(y)
    y = relu(norm()(y))
    # The SE bottleneck is a fraction of the block's *input* width (pycls).
    y = SqueezeExcite(max(1, int(round(self.se_ratio * x.shape[-1]))),
                      dtype=self.dtype)(y)
    y = norm(scale_init=nn.initializers.zeros)(conv(self.features, 1, 1)(y))
    if x.shape != y.shape:
      x = norm()(conv(self.features, 1, self.strides)(x))
    return relu(x + y)


class RegNetY(nn.Module):
  """RegNetY backbone returning pooled features and per-stage maps.

  Attributes:
    stage_widths, stage_depths, group_widths: per stage (see `regnet_stages`).
    stem_width: channels of the 3x3 stride-2 stem (32).
    se_ratio: SE squeeze ratio (0.25).
  """
  stage_widths: Sequence[int]
  stage_depths: Sequence[int]
  group_widths: Sequence[int]
  stem_width: int = 32
  se_ratio: float = 0.25
  axis_name: Optional[str] = None
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    x = x.astype(self.dtype or jnp.float32)
    x = Conv(self.stem_width, 3, 2, impl=self.conv_impl, dtype=self.dtype)(x)
    x = relu(batch_norm(train, self.axis_name, dtype=self.dtype)(x))
    aux = {'stem': x}
    for i, (w, d, g) in enumerate(zip(self.stage_widths, self.stage_depths,
                                      self.group_widths)):
      for j in range(d):
        x = RegNetYBlock(w, 2 if j == 0 else 1, g, self.se_ratio,
                         self.axis_name, self.conv_impl, self.dtype)(x, train)
      aux[f'stage{i + 1}'] = x
    features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    return features, aux
