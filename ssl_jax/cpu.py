"""Everything specific to XLA:CPU: its flags and its faster convolution paths.

Nothing here changes a value: each path computes what the portable code in
`models/layers.py` computes, faster on XLA:CPU (measured in
`experiments/benchmark.py`); accelerators never take them.

`configure_xla_flags()` is an explicit call, made by the command lines
(`ssl_jax.main`, `ssl_jax.evaluate`, `ssl_jax.export`), the benchmarks and the
test suite; importing ssl_jax changes no environment variable. A notebook or a
user's script calls it before its first JAX computation to get the same CPU
speed.
"""

import functools
import importlib.metadata
import os
from typing import Tuple

import jax
import jax.numpy as jnp

# XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK by default; there a
# ResNet-18 weight gradient runs at 6-30 GFLOP/s against 90-160 for XLA's own
# (Eigen) convolution, and BatchNorm's reductions become slow reduce-window
# trees unless YNNPACK takes reductions. So on CPU we keep YNNPACK for dots and
# reductions and give convolutions back to XLA.
YNN_FUSION_TYPES = 'individual_dot,reduce'
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'

Pads = Tuple[Tuple[int, int], Tuple[int, int]]


def configure_xla_flags() -> bool:
  """Adds the CPU flags above to `XLA_FLAGS` (read when JAX starts XLA:CPU).

  Call it before the process's first JAX computation; later it has no effect.
  A fusion type already in `XLA_FLAGS` is kept (set your own that way), and
  jaxlib versions other than 0.10, which may not know the flag (XLA aborts on
  unknown flags), are left alone.

  Returns:
    Whether `XLA_FLAGS` now holds the flag.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if _YNN_FLAG in flags:
    return True
  try:
    jaxlib_version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return False
  if not jaxlib_version.startswith('0.10.'):
    return False
  os.environ['XLA_FLAGS'] = f'{flags} {_YNN_FLAG}={YNN_FUSION_TYPES}'.strip()
  return True


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


# Below this many multiply-adds in the input gradient, XLA's own is as fast,
# and the stride**2 extra convolutions only cost compile time (a `:smoke`
# SimCLR run took 31 s instead of 21).
SUBPIXEL_MIN_MACS = 2**28


def takes_subpixel_gradient(x_shape: Tuple[int, ...],
                            kernel_shape: Tuple[int, ...], stride: int) -> bool:
  """Whether a strided conv's input gradient is faster as sub-pixel convs.

  XLA:CPU's lhs-dilated input gradient multiplies mostly zeros: on
  ResNet-18's three stride-2 3x3 convs at batch 512, 372/225/161 ms against
  203/137/118 as sub-pixel convolutions.
  """
  kh, kw = kernel_shape[:2]
  size = 1
  for d in x_shape:
    size *= d
  return (1 < stride < min(kh, kw) and x_shape[1] % stride == 0
          and x_shape[2] % stride == 0
          and size * kernel_shape[-1] * kh * kw >= SUBPIXEL_MIN_MACS * stride**2)


def _conv(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _phase_taps(kernel: int, pad: int, stride: int, phase: int):
  """Taps k of a strided conv that reach input rows = phase (mod stride),
  and how many output rows back each one reaches: in the forward pass
  y[i] += x[stride*i + k - pad] W[k], so x[stride*m + phase] gets
  dy[m - offset] W[k] with offset = (k - phase - pad) / stride."""
  taps = list(range((phase + pad) % stride, kernel, stride))
  return taps, [(k - phase - pad) // stride for k in taps]


def subpixel_input_gradient(dy: jax.Array, kernel: jax.Array,
                            x_shape: Tuple[int, ...], stride: int,
                            pads: Pads) -> jax.Array:
  """The input gradient of a strided NHWC conv as stride**2 stride-1 convs.

  XLA computes it as one convolution over dy dilated with zeros, so that
  3/4 of its multiply-adds (stride 2) are by zero. Each phase (a, b) of the
  input, x[stride*m + a, stride*n + b], instead gets a stride-1 convolution
  of dy with the taps that reach it; the phases are then interleaved. Needs
  H and W divisible by `stride`.

  Args:
    dy: the output's cotangent, [B, Ho, Wo, Cout].
    kernel: [kh, kw, Cin, Cout].
    x_shape: the input's shape.
    stride: the forward convolution's stride.
    pads: its ((top, bottom), (left, right)) padding.

  Returns:
    The input's cotangent, of shape `x_shape`.
  """
  kh, kw, cin, _ = kernel.shape
  b, h, w, _ = x_shape
  pad_h, pad_w = pads[0][0], pads[1][0]
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
def strided_conv(x: jax.Array, kernel: jax.Array, stride: int,
                 pads: Pads) -> jax.Array:
  """XLA's strided convolution whose input gradient is sub-pixel convs."""
  return _conv(x, kernel, stride, pads)


def _strided_conv_fwd(x, kernel, stride, pads):
  return _conv(x, kernel, stride, pads), (x, kernel)


def _strided_conv_bwd(stride, pads, residuals, dy):
  x, kernel = residuals
  dx = subpixel_input_gradient(dy, kernel, x.shape, stride, pads)
  dkernel, = jax.linear_transpose(
      lambda k: _conv(x, k, stride, pads), kernel)(dy)
  return dx, dkernel


strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)
