"""ResNets (He et al. 2016) with an ImageNet or a CIFAR stem, and a tiny ConvNet."""

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models.layers import Conv, batch_norm, conv_padding, relu


class BasicBlock(nn.Module):
  features: int
  strides: int
  axis_name: Optional[str]
  conv_impl: str
  dtype: Any
  padding: str = 'same'

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s: Conv(f, k, s, impl=self.conv_impl,
                                padding=self.padding, dtype=self.dtype)
    norm = lambda **kw: batch_norm(train, self.axis_name, dtype=self.dtype, **kw)
    y = relu(norm()(conv(self.features, 3, self.strides)(x)))
    # Zero-initialised last BN scale: each block starts as the identity
    # (Goyal et al. 2017), which the SimCLR/BYOL recipes use for large batches.
    y = norm(scale_init=nn.initializers.zeros)(conv(self.features, 3, 1)(y))
    if x.shape != y.shape:
      x = norm()(conv(self.features, 1, self.strides)(x))
    return relu(x + y)


class Bottleneck(nn.Module):
  features: int
  strides: int
  axis_name: Optional[str]
  conv_impl: str
  dtype: Any
  padding: str = 'same'

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s: Conv(f, k, s, impl=self.conv_impl,
                                padding=self.padding, dtype=self.dtype)
    norm = lambda **kw: batch_norm(train, self.axis_name, dtype=self.dtype, **kw)
    y = relu(norm()(conv(self.features, 1, 1)(x)))
    y = relu(norm()(conv(self.features, 3, self.strides)(y)))
    y = norm(scale_init=nn.initializers.zeros)(conv(self.features * 4, 1, 1)(y))
    if x.shape != y.shape:
      x = norm()(conv(self.features * 4, 1, self.strides)(x))
    return relu(x + y)


def pool(x: jax.Array, pooling: str) -> jax.Array:
  """[B, H, W, C] -> [B, D] float32 features: 'avg' (global) or 'flatten'."""
  if pooling == 'flatten':
    return x.reshape((x.shape[0], -1)).astype(jnp.float32)
  if pooling == 'avg':
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
  raise ValueError(f"Unknown model.pooling {pooling!r}; known: 'avg', 'flatten'.")


class ResNet(nn.Module):
  """A ResNet backbone returning pooled features and per-stage feature maps.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: 'basic' or 'bottleneck'.
    width: channels of the first stage (64 in the paper).
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no
      pool), the variant used for 32x32 images by SimCLR and solo-learn.
    padding: of the strided convolutions and the max-pool: 'same' (XLA's) or
      'symmetric' (torchvision's), see `layers.PADDINGS`. With 'symmetric'
      and the 'imagenet' stem the network is torchvision's ResNet-18/34/50
      (v1.5: the stride on the 3x3 conv of a bottleneck) and its weights
      carry over with equal outputs (`ssl_jax.interop`).
  """
  stage_sizes: Sequence[int]
  block: str = 'basic'
  width: int = 64
  stem: str = 'imagenet'
  pooling: str = 'avg'  # 'avg' or 'flatten', as in ConvNet.
  axis_name: Optional[str] = None
  conv_impl: str = 'auto'
  dtype: Any = None
  padding: str = 'same'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    if self.stem not in ('imagenet', 'cifar'):
      raise ValueError(f"Unknown stem {self.stem!r}; known: 'cifar', 'imagenet'.")
    x = x.astype(self.dtype or jnp.float32)
    aux = {}
    conv = lambda k, s: Conv(self.width, k, s, impl=self.conv_impl,
                             padding=self.padding, dtype=self.dtype)
    if self.stem == 'imagenet':
      x = conv(7, 2)(x)
      x = relu(batch_norm(train, self.axis_name, dtype=self.dtype)(x))
      # Max-pool pads with -inf, as PyTorch's MaxPool2d(3, 2, padding=1).
      x = nn.max_pool(x, (3, 3), (2, 2), [
          conv_padding(x.shape[1], 3, 2, self.padding),
          conv_padding(x.shape[2], 3, 2, self.padding)])
    else:
      x = conv(3, 1)(x)
      x = relu(batch_norm(train, self.axis_name, dtype=self.dtype)(x))
    aux['stem'] = x
    block = {'basic': BasicBlock, 'bottleneck': Bottleneck}[self.block]
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = block(self.width * 2**i, 2 if (i > 0 and j == 0) else 1,
                  self.axis_name, self.conv_impl, self.dtype,
                  self.padding)(x, train)
      aux[f'stage{i + 1}'] = x
    features = pool(x, self.pooling)
    return features, aux


class ConvNet(nn.Module):
  """A small VGG-style network for tests and CPU recipes.

  Each stage is two 3x3 conv-BN-ReLU layers; every stage after the first
  halves the resolution, and the first one too when `first_stride` is 2
  (4x less compute at full resolution, for CPU recipes).
  """
  widths: Sequence[int] = (16, 32, 64)
  first_stride: int = 1
  # 'avg': global average pooling. 'flatten': the final feature map flattened,
  # which keeps where things are; for tiny images whose last map is 2x2, as
  # LeNet/DCGAN-style encoders do.
  pooling: str = 'avg'

  axis_name: Optional[str] = None
  conv_impl: str = 'auto'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    x = x.astype(self.dtype or jnp.float32)
    aux = {}
    for i, w in enumerate(self.widths):
      for j in range(2):
        stride = (2 if i > 0 else self.first_stride) if j == 0 else 1
        x = Conv(w, 3, stride, impl=self.conv_impl, dtype=self.dtype)(x)
        x = relu(batch_norm(train, self.axis_name, dtype=self.dtype)(x))
      aux[f'stage{i + 1}'] = x
    features = pool(x, self.pooling)
    return features, aux
