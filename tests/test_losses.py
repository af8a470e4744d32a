"""Losses against independent NumPy derivations, and across 8 devices."""

import jax
import numpy as np
import pytest

from ssl_jax import losses
from ssl_jax.testing import device_equivalence


def _normalize(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def nt_xent_reference(z1, z2, temperature):
  """Chen et al. 2020, eq. (1), averaged over all 2N anchors, with loops."""
  z = _normalize(np.concatenate([z1, z2]).astype(np.float64))
  n2 = len(z)
  n = n2 // 2
  sim = z @ z.T / temperature
  total = 0.0
  for i in range(n2):
    positive = (i + n) % n2
    denominator = sum(np.exp(sim[i, k]) for k in range(n2) if k != i)
    total += -np.log(np.exp(sim[i, positive]) / denominator)
  return total / n2


def byol_reference(p, z):
  p, z = _normalize(p.astype(np.float64)), _normalize(z.astype(np.float64))
  return np.mean(np.sum((p - z) ** 2, axis=1))


def info_nce_reference(q, k, negatives, temperature):
  q, k, negatives = map(lambda a: _normalize(a.astype(np.float64)), (q, k, negatives))
  total = 0.0
  for i in range(len(q)):
    logits = np.concatenate([[q[i] @ k[i]], negatives @ q[i]]) / temperature
    total += -logits[0] + np.log(np.sum(np.exp(logits)))
  return total / len(q)


def _random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize('temperature', [0.1, 0.5])
def test_nt_xent_matches_numpy(temperature):
  z1, z2 = _random((16, 8), 0), _random((16, 8), 1)
  got = losses.get_loss('nt_xent')(z1, z2, temperature=temperature)
  np.testing.assert_allclose(got, nt_xent_reference(z1, z2, temperature),
                             rtol=1e-5)


def test_byol_matches_numpy():
  p, z = _random((16, 8), 0), _random((16, 8), 1)
  np.testing.assert_allclose(losses.get_loss('byol')(p, z),
                             byol_reference(p, z), rtol=1e-5)


def test_byol_does_not_differentiate_the_target():
  p, z = _random((4, 8), 0), _random((4, 8), 1)
  grad_z = jax.grad(lambda z: losses.get_loss('byol')(p, z), argnums=0)(z)
  np.testing.assert_array_equal(grad_z, 0.0)


def test_info_nce_matches_numpy():
  q, k, neg = _random((8, 6), 0), _random((8, 6), 1), _random((32, 6), 2)
  got = losses.get_loss('info_nce')(q, k, neg, temperature=0.2)
  np.testing.assert_allclose(got, info_nce_reference(q, k, neg, 0.2), rtol=1e-5)


@pytest.mark.parametrize('name,kwargs', [('nt_xent', {'temperature': 0.2}),
                                         ('byol', {})])
def test_eight_devices_equal_one(name, kwargs):
  z1, z2 = _random((32, 8), 3), _random((32, 8), 4)
  fn = losses.get_loss(name)
  (v1, g1), (vn, gn) = device_equivalence(fn, (z1, z2), 8, kwargs=kwargs)
  np.testing.assert_allclose(vn, np.full(8, v1), rtol=1e-5)
  for a, b in zip(g1, gn):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_nt_xent_positives_found_across_devices():
  # Perfectly aligned views, orthogonal images: the positive of every query is
  # on its own device only at the right offset; a wrong offset would put a
  # zero-similarity key in its place and raise the loss.
  z = np.eye(16, dtype=np.float32)
  (v1, _), (vn, _) = device_equivalence(
      losses.get_loss('nt_xent'), (z, z), 8, kwargs={'temperature': 0.1})
  expected = nt_xent_reference(z, z, 0.1)
  # float32 log-softmax near 0: relative precision ~1e-4.
  np.testing.assert_allclose(vn, expected, rtol=1e-3)
  assert expected < 0.01
