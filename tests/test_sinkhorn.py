"""Sinkhorn-Knopp codes: properties (hypothesis), reference, 8 devices == 1."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import parallel
from ssl_jax.losses import clustering

# One compilation per shape instead of one dispatch per op.
sinkhorn = jax.jit(clustering.sinkhorn,
                   static_argnames=('epsilon', 'num_iters', 'axis_name'))


def sinkhorn_reference(scores, epsilon, num_iters):
  """SwAV's `distributed_sinkhorn` on one device (K x B layout), float64."""
  q = np.exp(scores.astype(np.float64) / epsilon).T  # [K, B]
  k, b = q.shape
  q /= q.sum()
  for _ in range(num_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def _cosines(seed, b, k, d=8):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(b, d))
  c = rng.normal(size=(k, d))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  return (z @ c.T).astype(np.float32)


def test_matches_reference():
  scores = _cosines(0, 16, 6)
  np.testing.assert_allclose(sinkhorn(scores, epsilon=0.05, num_iters=3),
                             sinkhorn_reference(scores, 0.05, 3), rtol=1e-4,
                             atol=1e-7)


# Few distinct shapes: each one compiles once.
_shapes = st.tuples(st.sampled_from([3, 8, 24]), st.sampled_from([2, 5, 12]))


@hypothesis.given(shape=_shapes, seed=st.integers(0, 10**6),
                  epsilon=st.sampled_from([0.05, 0.1, 0.5]))
def test_codes_are_a_balanced_transport_plan(shape, seed, epsilon):
  b, k = shape
  q = np.asarray(sinkhorn(_cosines(seed, b, k), epsilon=epsilon,
                          num_iters=300))
  assert np.all(q >= 0)
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(q.sum(axis=0), b / k, rtol=2e-2)


@hypothesis.given(shape=_shapes, seed=st.integers(0, 10**6))
def test_invariant_to_permuting_the_batch(shape, seed):
  b, k = shape
  scores = _cosines(seed, b, k)
  perm = np.random.default_rng(seed).permutation(b)
  np.testing.assert_allclose(sinkhorn(scores[perm]), np.asarray(
      sinkhorn(scores))[perm], rtol=1e-4, atol=1e-7)


@hypothesis.given(seed=st.integers(0, 10**6),
                  magnitude=st.sampled_from([1.0, 20.0, 1e3, 1e6]))
def test_finite_for_large_scores(seed, magnitude):
  # 1/epsilon = 20: exp(scores/epsilon) = exp(400) overflows float32 unless
  # the max is subtracted first.
  rng = np.random.default_rng(seed)
  scores = (rng.uniform(-1, 1, size=(16, 5)) * magnitude).astype(np.float32)
  q = np.asarray(sinkhorn(scores, epsilon=0.05, num_iters=3))
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)


def test_rejects_scores_that_are_not_a_matrix():
  with pytest.raises(ValueError, match=r'\[batch, prototypes\]'):
    clustering.sinkhorn(jnp.zeros((2, 3, 4)))


def test_unnormalised_scores_still_give_a_transport_plan():
  # Scores from unnormalised vectors (far outside [-1, 1]) are accepted and
  # the output is normalised all the same.
  scores = _cosines(3, 12, 4) * 37.0 + 5.0
  q = np.asarray(sinkhorn(scores, epsilon=0.05, num_iters=50))
  assert np.all(np.isfinite(q)) and np.all(q >= 0)
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)


def test_no_gradient_flows_through_codes():
  scores = jnp.asarray(_cosines(1, 8, 4))
  g = jax.grad(lambda s: jnp.sum(sinkhorn(s) * s))(scores)
  np.testing.assert_allclose(g, sinkhorn(scores), rtol=1e-6)


def test_eight_devices_equal_one():
  scores = _cosines(2, 32, 6)
  one = np.asarray(sinkhorn(scores, num_iters=5))
  eight = jax.pmap(lambda s: clustering.sinkhorn(s, num_iters=5,
                                                 axis_name=parallel.AXIS),
                   axis_name=parallel.AXIS)(scores.reshape(8, 4, 6))
  np.testing.assert_allclose(np.asarray(eight).reshape(32, 6), one,
                             rtol=1e-5, atol=1e-8)
