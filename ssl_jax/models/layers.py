"""Convolution (XLA's, or im2col as a matmul), and the BatchNorm used everywhere.

XLA:CPU's faster paths (same values) live in `ssl_jax/cpu.py`.
"""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import cpu

# 'auto' is XLA's convolution on every backend: on CPU it is the fastest once
# `cpu.configure_xla_flags` keeps YNNPACK off convolutions (im2col: 987 img/s on the
# Fashion-MNIST ConvNet against XLA's 1561, `experiments/benchmark.py
# --backbones=convnet --conv_impl=...`). im2col stays as a matmul-only
# alternative for backends whose convolutions are slow.
CONV_IMPLS = ('auto', 'xla', 'im2col')

# Both paddings give ceil(size / stride) outputs from an odd kernel k, and
# the same ones when `size` is odd; they differ for strided convs of even
# inputs:
#   'same'       XLA's and TensorFlow's SAME, the odd pixel of padding last:
#                at stride 2, output i reads inputs 2i - k//2 + 1 ... 2i + k//2 + 1;
#   'symmetric'  k//2 pixels on each side, PyTorch's `padding=k//2`
#                (torchvision's ResNets): output i is centred on input 2i.
# A model trained with one padding and run with the other sees every strided
# layer shifted by one pixel.
PADDINGS = ('same', 'symmetric')


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
  # XLA's 'SAME': out = ceil(size/stride); the odd pixel of padding goes last.
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv_padding(size: int, kernel: int, stride: int,
                 padding: str = 'same') -> Tuple[int, int]:
  """(before, after) padding of one spatial axis; see PADDINGS.

  Both give ceil(size / stride) outputs for odd kernels: 'symmetric' pads
  kernel//2 before and only what the last output reads after (the rest of
  PyTorch's kernel//2 is never read).
  """
  if padding == 'same':
    return _same_padding(size, kernel, stride)
  if padding == 'symmetric':
    if kernel % 2 == 0:
      raise ValueError(f"padding='symmetric' needs an odd kernel, got {kernel}.")
    out = -(-size // stride)
    before = kernel // 2
    return before, max((out - 1) * stride + kernel - size - before, 0)
  raise ValueError(f'Unknown padding {padding!r}; known: {", ".join(PADDINGS)}.')


def _patches(x: jax.Array, kh: int, kw: int, stride: int,
             padding: str = 'same') -> jax.Array:
  """[B, Ho, Wo, kh*kw*C] patches of x, (i, j, c)-major like HWIO."""
  _, h, w, _ = x.shape
  (top, bottom), (left, right) = (conv_padding(h, kh, stride, padding),
                                  conv_padding(w, kw, stride, padding))
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  ho, wo = -(-h // stride), -(-w // stride)
  if kh == kw == 1:
    return xp[:, ::stride, ::stride, :]
  return jnp.concatenate([
      xp[:, i:i + stride * (ho - 1) + 1:stride,
         j:j + stride * (wo - 1) + 1:stride, :]
      for i in range(kh) for j in range(kw)], axis=-1)


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int,
                padding: str = 'same') -> jax.Array:
  """An NHWC convolution computed as shifted slices and one matmul.

  Numerically the same convolution as XLA's (tested against
  `lax.conv_general_dilated`); autodiff turns its backward pass into matmuls,
  pads and slices. `padding`: one of PADDINGS.
  """
  kh, kw, cin, cout = kernel.shape
  return jnp.dot(_patches(x, kh, kw, stride, padding),
                 kernel.reshape(kh * kw * cin, cout))


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int,
              padding: str = 'same') -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), _pads(x, kernel, stride, padding),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _pads(x: jax.Array, kernel: jax.Array, stride: int, padding: str):
  kh, kw = kernel.shape[:2]
  return (conv_padding(x.shape[1], kh, stride, padding),
          conv_padding(x.shape[2], kw, stride, padding))


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int,
             padding: str = 'same') -> jax.Array:
  kh, kw = kernel.shape[:2]
  if (kh, kw) == (1, 1) and stride > 1:
    # The same convolution ('SAME' pads nothing for a 1x1 kernel), but its
    # input gradient becomes a 1x1 convolution and a pad instead of XLA:CPU's
    # lhs-dilated convolution: on ResNet-18's first projection shortcut at
    # batch 512, 48 ms instead of 89 (weight gradient 73 instead of 91).
    x, stride = x[:, ::stride, ::stride], 1
  if (jax.default_backend() == 'cpu'
      and cpu.takes_subpixel_gradient(x.shape, kernel.shape, stride)):
    # GPUs and TPUs keep their own strided backward pass.
    return cpu.strided_conv(x, kernel, stride,
                            _pads(x, kernel, stride, padding))
  return _lax_conv(x, kernel, stride, padding)


CONV_FNS = {'xla': xla_conv, 'im2col': im2col_conv}


class Conv(nn.Module):
  """A square convolution with the parameter layout of `nn.Conv`.

  `impl`: 'auto' (= 'xla') or 'im2col' (see CONV_IMPLS). Checkpoints do not
  depend on the choice. `padding`: 'same' or 'symmetric' (see PADDINGS).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = False
  impl: str = 'auto'
  padding: str = 'same'
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
    impl = 'xla' if self.impl == 'auto' else self.impl
    y = CONV_FNS[impl](x, kernel, self.strides, self.padding)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(dtype)
    return y


def relu(x: jax.Array) -> jax.Array:
  """nn.relu's values and gradients; on CPU as a select (see `cpu.relu`)."""
  if jax.default_backend() == 'cpu':
    return cpu.relu(x)
  return nn.relu(x)


def batch_norm(train: bool, axis_name: Optional[str], **kwargs) -> nn.BatchNorm:
  """BatchNorm whose batch statistics are computed over `axis_name` devices.

  With axis_name='batch' this is SimCLR's global BN; statistics are kept in
  float32 even when activations are bfloat16.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, axis_name=axis_name if train else None,
                      dtype=kwargs.pop('dtype', None), param_dtype=jnp.float32,
                      **kwargs)
