"""Backbones: the CPU convolution equals XLA's, every backbone builds."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_jax import models


@pytest.mark.parametrize('kernel,stride,size', [(3, 1, 9), (3, 2, 9), (3, 2, 8),
                                                (1, 1, 6), (1, 2, 7), (7, 2, 16)])
def test_im2col_conv_matches_xla_value_and_gradients(kernel, stride, size):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)
  xla = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, k: models.im2col_conv(x, k, stride)
  np.testing.assert_allclose(ours(x, k), xla(x, k), rtol=1e-5, atol=1e-5)
  loss = lambda f: (lambda x, k: jnp.sum(jnp.sin(f(x, k))))
  for g_ours, g_xla in zip(jax.grad(loss(ours), (0, 1))(x, k),
                           jax.grad(loss(xla), (0, 1))(x, k)):
    np.testing.assert_allclose(g_ours, g_xla, rtol=1e-4, atol=1e-4)


BACKBONE_CASES = {
    'resnet18': dict(stem='cifar', width=8),
    'resnet34': dict(stem='imagenet', width=4),
    'resnet50': dict(stem='imagenet', width=4),
    'convnet': dict(widths=(4, 8)),
}


def test_every_backbone_is_tested():
  assert set(models.BACKBONES.names()) == set(BACKBONE_CASES), (
      'A registered backbone has no entry in BACKBONE_CASES.')


@pytest.mark.parametrize('name', sorted(BACKBONE_CASES))
def test_backbone_builds_and_reports_stages(name):
  cfg = ml_collections.ConfigDict(dict(backbone=name, **BACKBONE_CASES[name]))
  net = models.get_backbone(cfg)
  x = jnp.ones((2, 32, 32, 3))
  variables = net.init(jax.random.PRNGKey(0), x, train=False)
  (features, aux) = net.apply(variables, x, train=False)
  assert features.shape[0] == 2 and features.ndim == 2
  assert 'stage1' in aux
  expected = {'resnet18': 64, 'resnet34': 32, 'resnet50': 128, 'convnet': 8}[name]
  assert features.shape[1] == expected


def test_unknown_backbone_lists_known_ones():
  with pytest.raises(ValueError, match='Known backbones: convnet, resnet18, resnet34, resnet50'):
    models.get_backbone(ml_collections.ConfigDict(dict(backbone='resnet81')))
