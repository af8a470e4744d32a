"""Convolution with a fast CPU path, and the BatchNorm used everywhere."""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'im2col')


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
  # XLA's 'SAME': out = ceil(size/stride); the odd pixel of padding goes last.
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A 'SAME' NHWC convolution computed as shifted slices and one matmul.

  XLA's CPU backend computes convolution weight-gradients at a fraction of its
  forward speed; written as slices + dot, autodiff turns the backward pass into
  matmuls and pads, which run several times faster there. Numerically it is the
  same convolution (tested against `lax.conv_general_dilated`).
  """
  kh, kw, cin, cout = kernel.shape
  _, h, w, _ = x.shape
  (top, bottom), (left, right) = (_same_padding(h, kh, stride),
                                  _same_padding(w, kw, stride))
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho, wo = -(-h // stride), -(-w // stride)
  if kh == kw == 1:
    patches = xp[:, ::stride, ::stride, :]
  else:
    patches = jnp.concatenate([
        xp[:, i:i + stride * (ho - 1) + 1:stride,
           j:j + stride * (wo - 1) + 1:stride, :]
        for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


class Conv(nn.Module):
  """A square 'SAME' convolution with the parameter layout of `nn.Conv`.

  `impl='auto'` uses `im2col_conv` on the CPU backend and XLA's convolution on
  accelerators, where cuDNN / the TPU's MXU are faster. Checkpoints do not
  depend on the choice.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = False
  impl: str = 'auto'
  dtype: Optional[jnp.dtype] = None
  kernel_init: nn.initializers.Initializer = nn.initializers.kaiming_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.impl not in CONV_IMPLS:
      raise ValueError(f'Unknown conv impl {self.impl!r}; known: {CONV_IMPLS}.')
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, x.shape[-1], self.features))
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    impl = self.impl
    if impl == 'auto':
      impl = 'im2col' if jax.default_backend() == 'cpu' else 'xla'
    if impl == 'im2col':
      y = im2col_conv(x, kernel, self.strides)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, (self.strides, self.strides), 'SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(dtype)
    return y


def batch_norm(train: bool, axis_name: Optional[str], **kwargs) -> nn.BatchNorm:
  """BatchNorm whose batch statistics are computed over `axis_name` devices.

  With axis_name='batch' this is SimCLR's global BN; statistics are kept in
  float32 even when activations are bfloat16.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, axis_name=axis_name if train else None,
                      dtype=kwargs.pop('dtype', None), param_dtype=jnp.float32,
                      **kwargs)
