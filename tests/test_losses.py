"""Losses against independent NumPy derivations, and across 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official_ports import official_port
from ssl_jax import losses
from ssl_jax.testing import device_equivalence


def _normalize(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def nt_xent_reference(z1, z2, temperature):
  """Chen et al. 2020, eq. (1), with loops: an image's loss is the sum of its
  two anchors' losses (as the official code), averaged over the N images."""
  z = _normalize(np.concatenate([z1, z2]).astype(np.float64))
  n2 = len(z)
  n = n2 // 2
  sim = z @ z.T / temperature
  total = 0.0
  for i in range(n2):
    positive = (i + n) % n2
    denominator = sum(np.exp(sim[i, k]) for k in range(n2) if k != i)
    total += -np.log(np.exp(sim[i, positive]) / denominator)
  return total / n


# google-research/simclr at 383d4143fd8cf7879ae10f1046a9baeb753ff438,
# tf2/objective.py lines 35-89 (`add_contrastive_loss`), ported line by line
# to jax.numpy so that its gradient can be taken. `replicas` stands for the
# tf.distribute replicas: `hidden` is the concatenation of the replicas'
# [hidden1; hidden2] halves, tpu_cross_replica_concat is a concatenation over
# replicas, and tf2/run.py line 617 divides each replica's loss by the number
# of replicas before the gradients are summed: the global loss is their mean.
LARGE_NUM = 1e9  # tf2/objective.py line 23


def simclr_official_loss(hidden1_all, hidden2_all, temperature, replicas=1):
  hidden1_all = hidden1_all / jnp.linalg.norm(hidden1_all, axis=-1, keepdims=True)
  hidden2_all = hidden2_all / jnp.linalg.norm(hidden2_all, axis=-1, keepdims=True)
  hidden1_large, hidden2_large = hidden1_all, hidden2_all
  enlarged_batch_size = hidden1_large.shape[0]
  batch_size = enlarged_batch_size // replicas
  total = 0.0
  for replica_id in range(replicas):
    rows = slice(replica_id * batch_size, (replica_id + 1) * batch_size)
    hidden1, hidden2 = hidden1_all[rows], hidden2_all[rows]
    labels_idx = jnp.arange(batch_size) + replica_id * batch_size
    labels = jax.nn.one_hot(labels_idx, enlarged_batch_size * 2)
    masks = jax.nn.one_hot(labels_idx, enlarged_batch_size)
    logits_aa = hidden1 @ hidden1_large.T / temperature - masks * LARGE_NUM
    logits_bb = hidden2 @ hidden2_large.T / temperature - masks * LARGE_NUM
    logits_ab = hidden1 @ hidden2_large.T / temperature
    logits_ba = hidden2 @ hidden1_large.T / temperature
    ce = lambda labels, logits: -jnp.sum(labels * jax.nn.log_softmax(logits), -1)
    loss_a = ce(labels, jnp.concatenate([logits_ab, logits_aa], 1))
    loss_b = ce(labels, jnp.concatenate([logits_ba, logits_bb], 1))
    total += jnp.mean(loss_a + loss_b) / replicas
  return total


@official_port('simclr', source='google-research/simclr at '
               '383d4143fd8cf7879ae10f1046a9baeb753ff438, tf2/objective.py '
               'lines 35-89, tf2/run.py line 617')
def test_nt_xent_matches_official_code_on_1_and_8_devices():
  z1, z2 = _random((32, 8), 5), _random((32, 8), 6)
  fn = losses.get_loss('nt_xent')
  (v1, g1), (vn, gn) = device_equivalence(fn, (z1, z2), 8,
                                          kwargs={'temperature': 0.1})
  for replicas, value, grads in ((1, v1, g1), (8, vn, gn)):
    expected, expected_grads = jax.value_and_grad(
        simclr_official_loss, argnums=(0, 1))(z1, z2, 0.1, replicas)
    np.testing.assert_allclose(value, np.broadcast_to(expected, np.shape(value)),
                               rtol=1e-5)
    for got, want in zip(grads, expected_grads):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


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
