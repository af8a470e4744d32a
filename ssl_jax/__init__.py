"""ssl_jax: self-supervised visual representation learning in JAX/Flax."""

import importlib.metadata
import os

# XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK by default; there a
# ResNet-18 weight gradient runs at 6-30 GFLOP/s against 90-160 for XLA's own
# (Eigen) convolution, and BatchNorm's reductions become slow reduce-window
# trees unless YNNPACK takes reductions. So on CPU we keep YNNPACK for dots and
# reductions and give convolutions back to XLA (experiments/benchmark.py
# measures the effect). The flag is read when JAX first starts its CPU
# backend: import ssl_jax before running any JAX computation. Setting
# --xla_cpu_experimental_ynn_fusion_type in XLA_FLAGS yourself overrides this.
CPU_YNN_FUSION_TYPES = 'individual_dot,reduce'
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'


def _prefer_xla_convolutions_on_cpu() -> None:
  try:
    jaxlib_version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return
  # Other jaxlib versions may not know the flag, and XLA aborts on unknown flags.
  if not jaxlib_version.startswith('0.10.'):
    return
  flags = os.environ.get('XLA_FLAGS', '')
  if _YNN_FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {_YNN_FLAG}={CPU_YNN_FUSION_TYPES}'.strip()


_prefer_xla_convolutions_on_cpu()
