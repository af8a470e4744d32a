"""Convolution (XLA's, or im2col as a matmul), and the BatchNorm used everywhere."""

import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# 'auto' is XLA's convolution on every backend: on CPU it is the fastest once
# ssl_jax/__init__.py keeps YNNPACK off convolutions (im2col: 987 img/s on the
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


# Below this many multiply-adds in the input gradient, XLA's own is as fast,
# and the stride**2 extra convolutions only cost compile time (a `:smoke`
# SimCLR run took 31 s instead of 21).
SUBPIXEL_MIN_MACS = 2**28


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int,
              padding: str = 'same') -> jax.Array:
  kh, kw = kernel.shape[:2]
  pads = [conv_padding(x.shape[1], kh, stride, padding),
          conv_padding(x.shape[2], kw, stride, padding)]
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _phase_taps(kernel: int, pad: int, stride: int, phase: int):
  """Taps k of a strided 'SAME' conv that reach input rows = phase (mod stride),
  and how many output rows back each one reaches: in the forward pass
  y[i] += x[stride*i + k - pad] W[k], so x[stride*m + phase] gets
  dy[m - offset] W[k] with offset = (k - phase - pad) / stride."""
  taps = list(range((phase + pad) % stride, kernel, stride))
  return taps, [(k - phase - pad) // stride for k in taps]


def subpixel_input_gradient(dy: jax.Array, kernel: jax.Array,
                            x_shape: Tuple[int, ...], stride: int,
                            padding: str = 'same') -> jax.Array:
  """The input gradient of a strided NHWC conv as stride**2 stride-1 convs.

  XLA computes it as one convolution over dy dilated with zeros, so that
  3/4 of its multiply-adds (stride 2) are by zero. Each phase (a, b) of the
  input, x[stride*m + a, stride*n + b], instead gets a stride-1 convolution
  of dy with the taps that reach it; the phases are then interleaved. Needs
  H and W divisible by `stride`.
  """
  kh, kw, cin, _ = kernel.shape
  b, h, w, _ = x_shape
  pad_h = conv_padding(h, kh, stride, padding)[0]
  pad_w = conv_padding(w, kw, stride, padding)[0]
  rows = []
  for a in range(stride):
    taps_h, offsets_h = _phase_taps(kh, pad_h, stride, a)
    cols = []
    for c in range(stride):
      taps_w, offsets_w = _phase_taps(kw, pad_w, stride, c)
      # Reversed taps turn dy[m - offset] into a correlation over dy padded
      # by the largest offset in front.
      sub = kernel[jnp.array(taps_h[::-1])][:, jnp.array(taps_w[::-1])]
      lo_h, lo_w = offsets_h[-1], offsets_w[-1]
      padded = jax.lax.pad(dy, jnp.zeros((), dy.dtype), (
          (0, 0, 0),
          (lo_h, h // stride - dy.shape[1] - lo_h + len(taps_h) - 1, 0),
          (lo_w, w // stride - dy.shape[2] - lo_w + len(taps_w) - 1, 0),
          (0, 0, 0)))
      cols.append(jax.lax.conv_general_dilated(
          padded, jnp.swapaxes(sub, 2, 3), (1, 1), 'VALID',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    rows.append(jnp.stack(cols, axis=3))  # [B, H/s, W/s, s(b), C]
  phases = jnp.stack(rows, axis=2)  # [B, H/s, s(a), W/s, s(b), C]
  return phases.reshape(b, h, w, cin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x: jax.Array, kernel: jax.Array, stride: int,
                  padding: str) -> jax.Array:
  return _lax_conv(x, kernel, stride, padding)


def _strided_conv_fwd(x, kernel, stride, padding):
  return _lax_conv(x, kernel, stride, padding), (x, kernel)


def _strided_conv_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  dx = subpixel_input_gradient(dy, kernel, x.shape, stride, padding)
  dkernel, = jax.linear_transpose(
      lambda k: _lax_conv(x, k, stride, padding), kernel)(dy)
  return dx, dkernel


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def xla_conv(x: jax.Array, kernel: jax.Array, stride: int,
             padding: str = 'same') -> jax.Array:
  kh, kw = kernel.shape[:2]
  if (kh, kw) == (1, 1) and stride > 1:
    # The same convolution ('SAME' pads nothing for a 1x1 kernel), but its
    # input gradient becomes a 1x1 convolution and a pad instead of XLA:CPU's
    # lhs-dilated convolution: on ResNet-18's first projection shortcut at
    # batch 512, 48 ms instead of 89 (weight gradient 73 instead of 91).
    x, stride = x[:, ::stride, ::stride], 1
  if (1 < stride < min(kh, kw) and x.shape[1] % stride == 0
      and x.shape[2] % stride == 0 and jax.default_backend() == 'cpu'
      and x.size * kernel.shape[-1] * kh * kw >= SUBPIXEL_MIN_MACS * stride**2):
    # XLA:CPU's lhs-dilated input gradient multiplies mostly zeros: on
    # ResNet-18's three stride-2 3x3 convs at batch 512, 372/225/161 ms
    # against 203/137/118 as sub-pixel convolutions. GPUs and TPUs keep
    # their own strided backward pass.
    return _strided_conv(x, kernel, stride, padding)
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
  """max(x, 0), with nn.relu's values and gradients, as a two-array select.

  Why not `nn.relu`: XLA's CPU fusion freely duplicates an elementwise op with
  one array operand, such as max(x, 0), into each of its consumers. The next
  convolution's weight gradient reads its input through a transposing copy,
  and with max(x, 0) XLA recomputes the whole BatchNorm/residual chain inside
  that copy, at strided reads: 124 ms against 14 for the plain transpose of a
  [128, 32, 32, 64] map; in a ResNet-18 backward pass, a third of its time. A
  select of two arrays is not duplicated, so the copy reads the stored
  activation (the ResNet-18 SimCLR step, batch 256: 42.7 -> 51.0 img/s).
  `x <= 0` keeps NaN (NaN <= 0 is false) and gives gradient 0 at 0, both as
  in nn.relu.
  """
  return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


def batch_norm(train: bool, axis_name: Optional[str], **kwargs) -> nn.BatchNorm:
  """BatchNorm whose batch statistics are computed over `axis_name` devices.

  With axis_name='batch' this is SimCLR's global BN; statistics are kept in
  float32 even when activations are bfloat16.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, axis_name=axis_name if train else None,
                      dtype=kwargs.pop('dtype', None), param_dtype=jnp.float32,
                      **kwargs)
