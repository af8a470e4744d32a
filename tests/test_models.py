"""Backbones: our convolutions and ReLU equal lax's and flax's, CPU backward
passes stay free of recomputation, every backbone builds."""

import functools
import importlib
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import cpu, models
from ssl_jax.models import layers, regnet


def _value_and_grads(f, x, k):
  """f(x, k) and the gradients of sum(sin(f)), as one compiled program (op
  by op, im2col's k*k slices and their transposes compile one by one)."""
  loss = lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  return jax.jit(lambda x, k: (f(x, k), jax.grad(loss, (0, 1))(x, k)))(x, k)


@pytest.mark.parametrize('impl', sorted(layers.CONV_FNS))
@pytest.mark.parametrize('kernel,stride,size', [(3, 1, 9), (3, 2, 9), (3, 2, 8),
                                                (1, 1, 6), (1, 2, 7), (1, 2, 8),
                                                (1, 3, 9), (7, 2, 16), (3, 3, 9),
                                                (5, 2, 10), (4, 2, 8)])
def test_conv_impls_match_lax_value_and_gradients(impl, kernel, stride, size,
                                                  monkeypatch):
  monkeypatch.setattr(cpu, 'SUBPIXEL_MIN_MACS', 0)  # sub-pixel at any size
  # 'xla' is lax's convolution except strided 1x1 (a slice, then 1x1) and,
  # on CPU, the input gradient of strided convs with H, W divisible by the
  # stride (sub-pixel convolutions): (3, 2, 8), (7, 2, 16), (3, 3, 9), ...
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)
  lax_conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, k: layers.CONV_FNS[impl](x, k, stride)
  y_ours, grads_ours = _value_and_grads(ours, x, k)
  y_lax, grads_lax = _value_and_grads(lax_conv, x, k)
  np.testing.assert_allclose(y_ours, y_lax, rtol=1e-5, atol=1e-5)
  for g_ours, g_lax in zip(grads_ours, grads_lax):
    np.testing.assert_allclose(g_ours, g_lax, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('impl', sorted(layers.CONV_FNS))
@pytest.mark.parametrize('kernel,stride,size', [(3, 2, 8), (3, 2, 9), (7, 2, 16),
                                                (1, 2, 8), (3, 1, 8)])
def test_symmetric_padding_is_pytorchs(impl, kernel, stride, size, monkeypatch):
  # PyTorch's Conv2d(padding=k//2): k//2 pixels on both sides, whatever the
  # size; for even sizes and stride 2 this differs from 'SAME' (asserted, so
  # the test cannot pass by both being SAME).
  monkeypatch.setattr(cpu, 'SUBPIXEL_MIN_MACS', 0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)
  p = kernel // 2
  torch_conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), [(p, p), (p, p)],
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, k: layers.CONV_FNS[impl](x, k, stride, 'symmetric')
  y_ours, grads_ours = _value_and_grads(ours, x, k)
  y_ref, grads_ref = _value_and_grads(torch_conv, x, k)
  np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)
  for g_ours, g_ref in zip(grads_ours, grads_ref):
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-4)
  same = jax.jit(lambda x, k: layers.CONV_FNS[impl](x, k, stride, 'same'))(
      x, k)
  assert (stride > 1 and kernel > 1 and size % 2 == 0) == (
      not np.allclose(same, y_ref, atol=1e-4))


def test_only_large_strided_convs_take_the_subpixel_input_gradient():
  def lhs_dilated_convs(batch):
    x = jax.ShapeDtypeStruct((batch, 32, 32, 64), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32)
    grad = jax.grad(lambda x, k: jnp.sum(layers.xla_conv(x, k, 2)))
    return jax.jit(grad).lower(x, k).as_text().count('lhs_dilate = [2, 2]')
  # ResNet-18's first stride-2 conv: at batch 512 (9.7 GMACs) the sub-pixel
  # path; at batch 2 (38 MMACs) XLA's own input gradient.
  assert lhs_dilated_convs(512) == 0
  assert lhs_dilated_convs(2) == 1


def test_relu_matches_flax_values_gradients_and_nan():
  x = jnp.array([-2., -0., 0., 1e-30, 3., jnp.nan, jnp.inf, -jnp.inf])
  np.testing.assert_array_equal(layers.relu(x), nn.relu(x))
  finite = x[jnp.isfinite(x)]  # (at NaN the value is NaN anyway)
  g_ours = jax.grad(lambda x: jnp.sum(layers.relu(x) * jnp.arange(5.)))(finite)
  g_flax = jax.grad(lambda x: jnp.sum(nn.relu(x) * jnp.arange(5.)))(finite)
  np.testing.assert_array_equal(g_ours, g_flax)  # 0 at 0, as nn.relu
  assert layers.relu(jnp.ones((2,), jnp.bfloat16)).dtype == jnp.bfloat16


def test_weight_gradient_transposes_read_the_stored_activation():
  # With max(x, 0) XLA:CPU recomputed the BatchNorm/residual chain inside the
  # transposing copy that feeds each weight gradient (3-10x slower than the
  # copy alone); layers.relu keeps that copy a one-operand transpose.
  def block(x, k1, k2):
    y = layers.relu(layers.xla_conv(x, k1, 1) * 0.5 + 0.1)
    return layers.relu(x + layers.xla_conv(y, k2, 1) * 0.3 - 0.2)

  def loss(x, k1, k2):
    return jnp.sum(layers.xla_conv(block(x, k1, k2), k2, 1) ** 2)

  x, k = jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32)) * 0.01
  hlo = jax.jit(jax.grad(loss, (1, 2))).lower(x, k, k).compile().as_text()
  # The activations' copies, [channels, height, width, batch] for XLA:CPU's
  # weight-gradient convolution.
  transposes = [l for l in hlo.splitlines()
                if 'fusion(' in l and '= f32[32,16,16,8]' in l]
  assert len(transposes) == 3, 'one copy per weight gradient expected: stale test'
  for line in transposes:
    operands = line.split('fusion(', 1)[1].split(')', 1)[0].split(',')
    assert len(operands) == 1, f'a transpose fused with recomputation: {line[:300]}'


def test_cpu_convolutions_are_xlas_and_reductions_are_not_window_trees():
  # conftest calls cpu.configure_xla_flags() before the test session's first
  # JAX computation, as the command lines do; a convolution handed to YNNPACK
  # (jaxlib 0.10's default) slowed the ResNet-18 step to 0.70x PyTorch's
  # (experiments/benchmark.py).
  assert (f'--xla_cpu_experimental_ynn_fusion_type={cpu.YNN_FUSION_TYPES}'
          in os.environ['XLA_FLAGS'])
  # (YNNPACK takes convolutions of this size, not tiny ones.)
  x, k = jnp.ones((2, 16, 16, 64)), jnp.ones((3, 3, 64, 64))
  conv_hlo = jax.jit(layers.xla_conv, static_argnums=2).lower(x, k, 1).compile().as_text()
  assert 'convolution(' in conv_hlo and '__ynn_fusion' not in conv_hlo
  # BatchNorm's statistics: a plain reduction, not XLA's reduce-window tree.
  mean_hlo = jax.jit(lambda y: jnp.mean(y, axis=(0, 1, 2))).lower(
      jnp.ones((64, 32, 32, 64))).compile().as_text()
  assert 'reduce-window' not in mean_hlo


def test_a_users_own_ynn_flag_is_left_alone():
  env = dict(os.environ, XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type=')
  out = subprocess.run(
      [sys.executable, '-c', 'import os, ssl_jax; print(os.environ["XLA_FLAGS"])'],
      env=env, capture_output=True, text=True, check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == '--xla_cpu_experimental_ynn_fusion_type='


BACKBONE_CASES = {
    'resnet18': dict(stem='cifar', width=8),
    'resnet34': dict(stem='imagenet', width=4),
    'resnet50': dict(stem='imagenet', width=4),
    'convnet': dict(widths=(4, 8)),
    'regnety_custom': dict(regnet_stem_width=8, regnet_widths=(8, 16),
                           regnet_depths=(1, 1), regnet_group_widths=(4, 4)),
    'vit_tiny': dict(patch_size=8, pos_embed_size=32, vit_depth=1),
}
# Too big to build in a test: their stage design is checked instead (the ViT
# sizes in tests/test_vit.py).
DESIGN_ONLY = ('regnety_400mf', 'regnety_16gf', 'regnety_256gf', 'vit_small', 'vit_base',
               'vit_large')
EXPECTED_DIM = {'resnet18': 64, 'resnet34': 32, 'resnet50': 128, 'convnet': 8,
                'regnety_custom': 16, 'vit_tiny': 192}


def test_every_backbone_is_tested():
  assert set(models.BACKBONES.names()) == set(BACKBONE_CASES) | set(DESIGN_ONLY), (
      'A registered backbone has no entry in BACKBONE_CASES or DESIGN_ONLY.')


@pytest.mark.parametrize('name,widths,depths', [
    # pycls / torchvision's RegNetY stages (Radosavovic et al. 2020; SEER).
    ('regnety_400mf', [48, 104, 208, 440], [1, 3, 6, 6]),
    ('regnety_16gf', [224, 448, 1232, 3024], [2, 4, 11, 1]),
    ('regnety_256gf', [746, 1492, 4103, 10444], [2, 7, 17, 1]),
])
def test_regnety_designs(name, widths, depths):
  got_widths, got_depths, _ = regnet.regnet_stages(*regnet.REGNETY_DESIGNS[name])
  assert (list(got_widths), list(got_depths)) == (widths, depths)


@pytest.mark.parametrize('name', sorted(BACKBONE_CASES))
def test_backbone_builds_and_reports_stages(name):
  cfg = ml_collections.ConfigDict(dict(backbone=name, **BACKBONE_CASES[name]))
  net = models.get_backbone(cfg)
  # Shapes are all it asserts: traced, not run (op by op, ResNet-50's init
  # and forward pass compiled hundreds of small programs).
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(net.init, train=False),
                             jax.random.PRNGKey(0), x)
  features, aux = jax.eval_shape(functools.partial(net.apply, train=False),
                                 variables, x)
  assert features.shape[0] == 2 and features.ndim == 2
  assert aux
  assert features.shape[1] == EXPECTED_DIM[name]


def test_unknown_backbone_lists_known_ones():
  with pytest.raises(ValueError, match='Known backbones: convnet, .*resnet18, resnet34, resnet50'):
    models.get_backbone(ml_collections.ConfigDict(dict(backbone='resnet81')))


def test_simclr_projector_is_the_official_default_head():
  # google-research/simclr at 383d4143fd8cf7879ae10f1046a9baeb753ff438:
  # tf2/run.py lines 192-202 (nonlinear, 3 layers, 128 out) and tf2/model.py
  # lines 119-186: Dense without bias, then BN on every layer; the hidden BNs
  # have scale and shift (center=use_bias=True), the output BN only a scale.
  config = importlib.import_module('configs.simclr').get_config()
  head = models.get_mlp(config.model.projector)
  params = jax.eval_shape(head.init, jax.random.key(0),
                          jnp.zeros((2, 2048)))['params']
  shapes = jax.tree_util.tree_map(lambda p: p.shape, params)
  assert shapes == {
      'Dense_0': {'kernel': (2048, 2048)},
      'BatchNorm_0': {'scale': (2048,), 'bias': (2048,)},
      'Dense_1': {'kernel': (2048, 2048)},
      'BatchNorm_1': {'scale': (2048,), 'bias': (2048,)},
      'Dense_2': {'kernel': (2048, 128)},
      'BatchNorm_2': {'scale': (128,)},
  }
  # No ReLU after the output BN: its outputs take both signs. (The same head
  # at small widths: initialising 2048-wide layers would only cost time.)
  small = config.model.projector.copy_and_resolve_references()
  small.update(hidden_dims=(16, 16), output_dim=8)
  head = models.get_mlp(small)
  x = jax.random.normal(jax.random.key(1), (16, 32))
  variables = head.init(jax.random.key(0), x)
  out, _ = head.apply(variables, x, mutable=['batch_stats'])
  assert float(jnp.min(out)) < 0 < float(jnp.max(out))


def test_importing_ssl_jax_leaves_xla_flags_alone():
  # The flags are the command lines' explicit call (cpu.configure_xla_flags),
  # not a side effect of an import.
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  code = ('import os, ssl_jax, ssl_jax.train, ssl_jax.evaluate, ssl_jax.export; '
          'print(os.environ.get("XLA_FLAGS"))')
  out = subprocess.run([sys.executable, '-c', code], env=env, check=True,
                       capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  assert out.strip() == 'None'
