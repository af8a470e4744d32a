"""Convolution with fast CPU paths, and the BatchNorm used everywhere."""

import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'im2col', 'hybrid')
# What 'auto' picks on the CPU backend (see experiments/benchmark.py).
CPU_CONV_IMPL = 'im2col'


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
  # XLA's 'SAME': out = ceil(size/stride); the odd pixel of padding goes last.
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _patches(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
  """[B, Ho, Wo, kh*kw*C] 'SAME' patches of x, (i, j, c)-major like HWIO."""
  _, h, w, _ = x.shape
  (top, bottom), (left, right) = (_same_padding(h, kh, stride),
                                  _same_padding(w, kw, stride))
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho, wo = -(-h // stride), -(-w // stride)
  if kh == kw == 1:
    return xp[:, ::stride, ::stride, :]
  return jnp.concatenate([
      xp[:, i:i + stride * (ho - 1) + 1:stride,
         j:j + stride * (wo - 1) + 1:stride, :]
      for i in range(kh) for j in range(kw)], axis=-1)


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A 'SAME' NHWC convolution computed as shifted slices and one matmul.

  Numerically the same convolution as XLA's (tested against
  `lax.conv_general_dilated`); autodiff turns its backward pass into matmuls,
  pads and slices.
  """
  kh, kw, cin, cout = kernel.shape
  return jnp.dot(_patches(x, kh, kw, stride), kernel.reshape(kh * kw * cin, cout))


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def hybrid_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """XLA's convolution whose weight gradient is one im2col matmul.

  XLA's CPU backend runs a convolution and its input gradient (itself a
  convolution) fast, but the weight gradient, a convolution that contracts
  over the batch, at a fraction of that speed. Here it is computed as
  patches(x)^T @ dy instead; the forward pass and the input gradient stay
  XLA's. Same values and gradients as `xla_conv` (tested).
  """
  return xla_conv(x, kernel, stride)


def _hybrid_conv_fwd(x, kernel, stride):
  return xla_conv(x, kernel, stride), (x, kernel)


def _hybrid_conv_bwd(stride, residuals, dy):
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  _, input_vjp = jax.vjp(lambda x_: xla_conv(x_, kernel, stride), x)
  patches = _patches(x, kh, kw, stride).reshape(-1, kh * kw * cin)
  dkernel = jax.lax.dot_general(patches, dy.reshape(-1, cout),
                                (((0,), (0,)), ((), ())))
  return input_vjp(dy)[0], dkernel.reshape(kernel.shape).astype(kernel.dtype)


hybrid_conv.defvjp(_hybrid_conv_fwd, _hybrid_conv_bwd)
CONV_FNS = {'xla': xla_conv, 'im2col': im2col_conv, 'hybrid': hybrid_conv}


class Conv(nn.Module):
  """A square 'SAME' convolution with the parameter layout of `nn.Conv`.

  `impl='auto'` uses `CPU_CONV_IMPL` on the CPU backend and XLA's convolution
  on accelerators, where cuDNN / the TPU's MXU are faster. Checkpoints do not
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
      impl = CPU_CONV_IMPL if jax.default_backend() == 'cpu' else 'xla'
    y = CONV_FNS[impl](x, kernel, self.strides)
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
