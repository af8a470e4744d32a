"""Redundancy reduction and clustering: Barlow Twins, VICReg, SwAV, DeepCluster.

Every loss against an independent NumPy derivation of its paper's formula
(loops, float64) and on 8 devices against 1 on the same global batch;
distributed k-means on separable clusters and with a planted empty cluster;
SwAV's queue, prototype normalisation and freezing; a few training steps of
every method's smoke config (SEER included).
"""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official_ports import official_port
from ssl_jax import checkpointing, data, losses, methods, parallel, train
from ssl_jax.durations import Durations
from ssl_jax.losses import clustering
from ssl_jax.methods import memory
from ssl_jax.testing import device_equivalence

N_DEV = 8


def _random(shape, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * scale).astype(np.float32)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - np.max(x)
  return x - np.log(np.sum(np.exp(x)))


def _assert_devices_equal_one(fn, args, sharded, kwargs=None, rtol=1e-5):
  """8-device value and input gradients == 1-device ones (global batch)."""
  (v1, g1), (vn, gn) = device_equivalence(fn, args, N_DEV,
                                          sharded_argnums=sharded,
                                          kwargs=kwargs)
  np.testing.assert_allclose(vn, np.full(N_DEV, v1), rtol=rtol)
  for a, b in zip(g1, gn):
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  return v1


def _assert_param_grads_equal(fn, sharded_args, param, kwargs=None):
  """Gradient w.r.t. a replicated parameter (prototypes): the train step's
  `mean_gradients` of the 8 per-device gradients == the 1-device gradient."""
  kwargs = kwargs or {}

  def grad(axis_name, p, *a):
    return jax.grad(lambda q: fn(*a, q, axis_name=axis_name, **kwargs))(p)

  g1 = jax.jit(lambda p, *a: grad(None, p, *a))(param, *sharded_args)
  split = [a.reshape((N_DEV, -1) + a.shape[1:]) for a in sharded_args]
  g8 = jax.pmap(
      lambda p, *a: parallel.mean_gradients(grad(parallel.AXIS, p, *a),
                                            parallel.AXIS),
      axis_name=parallel.AXIS, in_axes=(None,) + (0,) * len(split))(
          param, *split)
  assert np.abs(g1).max() > 0
  for g in np.asarray(g8):
    np.testing.assert_allclose(g, g1, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# NumPy references, written from the papers' formulas with loops.


def barlow_twins_reference(z1, z2, lambda_offdiag):
  """Zbontar et al. 2021, eq. 1-2, with BN (no affine, biased var, eps 1e-5)."""
  def bn(z):
    z = np.asarray(z, np.float64)
    mean = z.mean(axis=0)
    var = ((z - mean) ** 2).mean(axis=0)
    return (z - mean) / np.sqrt(var + 1e-5)
  a, b = bn(z1), bn(z2)
  n, d = a.shape
  loss = 0.0
  for i in range(d):
    for j in range(d):
      c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
      loss += (1 - c_ij) ** 2 if i == j else lambda_offdiag * c_ij ** 2
  return loss


def vicreg_reference(z1, z2, lam=25.0, mu=25.0, nu=1.0):
  """Bardes et al. 2022, eq. 1-6 (unbiased variance, cov / d, eps 1e-4)."""
  z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
  n, d = z1.shape
  invariance = sum((z1[k, j] - z2[k, j]) ** 2
                   for k in range(n) for j in range(d)) / (n * d)

  def terms(z):
    zc = z - z.mean(axis=0)
    cov = np.zeros((d, d))
    for i in range(d):
      for j in range(d):
        cov[i, j] = sum(zc[k, i] * zc[k, j] for k in range(n)) / (n - 1)
    variance = np.mean([max(0.0, 1.0 - np.sqrt(cov[j, j] + 1e-4))
                        for j in range(d)])
    covariance = sum(cov[i, j] ** 2 for i in range(d) for j in range(d)
                     if i != j) / d
    return variance, covariance

  v1, c1 = terms(z1)
  v2, c2 = terms(z2)
  return lam * invariance + mu * (v1 + v2) / 2 + nu * (c1 + c2)


def sinkhorn_reference(scores, epsilon, iterations):
  """SwAV's Algorithm: Q = exp(C^T Z / eps), alternately normalised so that
  prototypes get mass 1/K and samples 1/B; returned with rows summing to 1."""
  q = np.exp(np.asarray(scores, np.float64) / epsilon).T  # [K, B]
  k, b = q.shape
  q /= q.sum()
  for _ in range(iterations):
    for r in range(k):
      q[r] /= q[r].sum() * k
    for col in range(b):
      q[:, col] /= q[:, col].sum() * b
  return (q * b).T


def swav_reference(embeddings, prototypes, temperature, epsilon, iterations,
                   num_global, queue=None):
  """Caron et al. 2020, eq. 1-3: each global crop's codes predicted by every
  other crop, averaged over pairs; the queue's scores join Sinkhorn only."""
  z, c = _unit(embeddings), _unit(prototypes)
  num_crops, b, _ = z.shape
  total = 0.0
  for i in range(num_global):
    scores = z[i] @ c.T
    if queue is not None:
      scores = np.concatenate([_unit(queue[i]) @ c.T, scores])
    q = sinkhorn_reference(scores, epsilon, iterations)[-b:]
    sub = 0.0
    for v in range(num_crops):
      if v == i:
        continue
      for n in range(b):
        log_p = _log_softmax(z[v, n] @ c.T / temperature)
        sub -= np.sum(q[n] * log_p) / b
    total += sub / (num_crops - 1)
  return total / num_global


def deepcluster_reference(logits, labels, cluster_weights):
  """Cross-entropy on pseudo-labels, image n weighted by w[label_n]."""
  num, den = 0.0, 0.0
  for n in range(len(labels)):
    w = cluster_weights[labels[n]]
    num += -w * _log_softmax(np.asarray(logits[n], np.float64))[labels[n]]
    den += w
  return num / den


def deepclusterv2_reference(embeddings, prototypes, assignments, temperature):
  """Every crop predicts every head's assignment of its image."""
  z, c = _unit(embeddings), _unit(prototypes)
  heads, (crops, b, _) = len(c), z.shape
  total = 0.0
  for h in range(heads):
    for v in range(crops):
      for n in range(b):
        total -= _log_softmax(z[v, n] @ c[h].T / temperature)[assignments[h, n]]
  return total / (heads * crops * b)


# ---------------------------------------------------------------------------
# Losses: NumPy reference and 8 devices == 1.


def test_barlow_twins():
  z1, z2 = _random((32, 12), 0), _random((32, 12), 1, scale=2.0) + 1.0
  z2 = z2 + z1  # correlated views, so that C_ii is far from 0 and from 1
  fn = losses.get_loss('barlow_twins')
  value = _assert_devices_equal_one(fn, (z1, z2), (0, 1),
                                    {'lambda_offdiag': 0.05})
  np.testing.assert_allclose(value, barlow_twins_reference(z1, z2, 0.05),
                             rtol=1e-5)


def test_vicreg():
  # Half the dimensions with std < 1, so that the variance hinge is active.
  scale = np.where(np.arange(10) < 5, 0.3, 1.5).astype(np.float32)
  z1 = _random((32, 10), 2) * scale
  z2 = z1 + 0.5 * _random((32, 10), 3)
  fn = losses.get_loss('vicreg')
  value = _assert_devices_equal_one(fn, (z1, z2), (0, 1))
  np.testing.assert_allclose(value, vicreg_reference(z1, z2), rtol=1e-5)


SWAV_KW = dict(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
               num_global_crops=2)


@pytest.mark.parametrize('with_queue', [False, True])
def test_swav_swapped_prediction(with_queue):
  crops, b, d, k = 4, 16, 8, 6
  emb = _random((crops, b, d), 4)
  emb[1] = emb[0] + 0.3 * emb[1]  # the two global crops agree somewhat
  protos = _unit(_random((k, d), 5)).astype(np.float32)
  queue = (_unit(_random((2, 24, d), 6)).astype(np.float32) if with_queue
           else None)
  kwargs = dict(SWAV_KW, use_queue=with_queue)
  emb_bvd = np.swapaxes(emb, 0, 1)

  def fn(e_bvd, p, *, axis_name, **kw):
    # device_equivalence splits axis 0, the batch; the loss takes [V, b, d].
    return losses.get_loss('swav')(jnp.swapaxes(e_bvd, 0, 1), p, queue=queue,
                                   axis_name=axis_name, **kw)

  value = _assert_devices_equal_one(fn, (emb_bvd, protos), (0,), kwargs)
  np.testing.assert_allclose(
      value, swav_reference(emb, protos, 0.1, 0.05, 3, 2, queue), rtol=1e-5)
  _assert_param_grads_equal(fn, [emb_bvd], protos, kwargs)


# facebookresearch/swav at 06b1b7cbaf6ba2a792300d79c7299db98b93b7f9, ported
# to jax.numpy so that its gradient can be taken. `replicas` stands for the
# DDP processes: each holds a slice of the batch, dist.all_reduce is a sum
# over the slices, and DDP averages the replicas' gradients, so the global
# loss is the mean of the replicas' losses.


def swav_official_normalize_prototypes(weight):
  """main_swav.py lines 277-281, under torch.no_grad(): the new parameter."""
  return weight / jnp.linalg.norm(weight, axis=1, keepdims=True)


def swav_official_sinkhorn(outs, epsilon, iterations):
  """main_swav.py lines 353-376 (`distributed_sinkhorn`), one `out` per replica."""
  qs = [jnp.exp(out / epsilon).T for out in outs]
  b_total = qs[0].shape[1] * len(qs)
  k = qs[0].shape[0]
  sum_q = sum(jnp.sum(q) for q in qs)  # dist.all_reduce(sum_Q)
  qs = [q / sum_q for q in qs]
  for _ in range(iterations):
    sum_of_rows = sum(jnp.sum(q, axis=1, keepdims=True) for q in qs)
    qs = [q / sum_of_rows / k for q in qs]
    qs = [q / jnp.sum(q, axis=0, keepdims=True) / b_total for q in qs]
  return [jax.lax.stop_gradient(q * b_total).T for q in qs]


def swav_official_loss(embedding, prototypes_weight, temperature, epsilon,
                       iterations, crops_for_assign, replicas=1):
  """main_swav.py lines 283-315, the queue left out; src/resnet50.py lines
  297-305: L2-normalised embeddings times the prototype matrix as stored."""
  nmb_crops, batch, _ = embedding.shape
  bs = batch // replicas
  x = embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True)
  output = x @ prototypes_weight.T  # [crops, batch, K]
  per_replica = [output[:, r * bs:(r + 1) * bs] for r in range(replicas)]
  losses_r = [0.0] * replicas
  for crop_id in crops_for_assign:
    qs = swav_official_sinkhorn(
        [jax.lax.stop_gradient(o[crop_id]) for o in per_replica], epsilon,
        iterations)
    for r in range(replicas):
      subloss = 0.0
      for v in np.delete(np.arange(nmb_crops), crop_id):
        logits = per_replica[r][v] / temperature
        subloss -= jnp.mean(jnp.sum(qs[r] * jax.nn.log_softmax(logits, axis=1),
                                    axis=1))
      losses_r[r] += subloss / (nmb_crops - 1)
  return sum(l / len(crops_for_assign) for l in losses_r) / replicas


@official_port('swav', 'seer', source='facebookresearch/swav at '
               '06b1b7cbaf6ba2a792300d79c7299db98b93b7f9, main_swav.py lines '
               '277-315 and 353-376, src/resnet50.py lines 297-305 (SEER is '
               'this loss on a RegNet: vissl/losses/swav_loss.py, whose '
               'distibuted_sinkhornknopp.py lines 26-80 is the same algorithm)')
def test_swav_loss_gradient_and_prototype_update_match_official_code():
  crops, b, d, k = 4, 16, 8, 6
  emb = _random((crops, b, d), 20)
  emb[1] = emb[0] + 0.3 * emb[1]
  # Prototypes as an optimizer update leaves them: off the unit sphere.
  raw = _random((k, d), 21) * np.linspace(0.5, 2.0, k)[:, None]
  config = importlib.import_module('configs.swav').get_config('smoke')
  method = methods.get_method(
      config, data.DataInfo(1024, (28, 28, 1), 10, (0.5,), (0.5,)),
      Durations(10, 1024 // config.batch_size, config.batch_size))
  protos = np.asarray(method.project_params(
      {'prototypes': jnp.asarray(raw)}, jnp.zeros((), jnp.int32))['prototypes'])
  np.testing.assert_allclose(
      protos, swav_official_normalize_prototypes(raw), rtol=1e-6)

  def fn(e_bvd, p, *, axis_name, **kw):
    return losses.get_loss('swav')(jnp.swapaxes(e_bvd, 0, 1), p,
                                   axis_name=axis_name, **kw)

  (v1, g1), (vn, gn) = device_equivalence(
      fn, (np.swapaxes(emb, 0, 1), protos), N_DEV, sharded_argnums=(0,),
      grad_argnums=(0, 1), kwargs=SWAV_KW)
  for replicas, value, grads in ((1, v1, g1), (N_DEV, vn, gn)):
    want, (want_emb, want_protos) = jax.value_and_grad(
        swav_official_loss, argnums=(0, 1))(
            emb, protos, 0.1, 0.05, 3, (0, 1), replicas)
    np.testing.assert_allclose(value, np.broadcast_to(want, np.shape(value)),
                               rtol=1e-5)
    np.testing.assert_allclose(np.swapaxes(grads[0], 0, 1), want_emb,
                               rtol=1e-4, atol=1e-6)
    # The radial part of the prototypes' gradient is kept, as in the
    # official code: it is what normalising inside the loss would remove.
    np.testing.assert_allclose(grads[1], want_protos, rtol=1e-4, atol=1e-6)
    radial = np.sum(np.asarray(want_protos) * protos, axis=1)
    assert np.abs(radial).max() > 1e-2 * np.abs(want_protos).max()


def _with_labels(x, labels):
  """Integer labels ride along as a last float column, so that they are split
  over devices with the batch (device_equivalence differentiates every split
  argument; this column's gradient is zero through the int cast)."""
  return np.concatenate([x, labels.astype(np.float32)], axis=-1)


def _split_labels(x):
  labels = jax.lax.stop_gradient(x[..., -1:]).astype(jnp.int32)
  return x[..., :-1], labels


def test_deepcluster_weighted_cross_entropy():
  logits = _random((32, 5), 7, scale=2.0)
  labels = np.random.default_rng(8).integers(0, 5, 32)
  weights = (1.0 / np.bincount(labels, minlength=5)).astype(np.float32)

  def fn(packed, w, *, axis_name):
    lg, lb = _split_labels(packed)
    return losses.get_loss('deepcluster')(lg, lb[:, 0], w, axis_name=axis_name)

  value = _assert_devices_equal_one(
      fn, (_with_labels(logits, labels[:, None]), weights), (0,))
  np.testing.assert_allclose(
      value, deepcluster_reference(logits, labels, weights), rtol=1e-5)
  # Uniform sampling over clusters: every cluster weighs the same in total.
  per_cluster = [weights[c] * np.sum(labels == c) for c in range(5)]
  np.testing.assert_allclose(per_cluster, 1.0, rtol=1e-6)


def test_deepclusterv2_all_crops_predict_every_head():
  crops, heads, b, d, k = 3, 2, 16, 8, 5
  emb = _random((crops, b, d), 9)
  protos = _unit(_random((heads, k, d), 10)).astype(np.float32)
  assignments = np.random.default_rng(11).integers(0, k, (heads, b))

  def fn(packed, p, *, axis_name):
    # packed: [b, V, d + H]: each crop's embedding and the image's H labels.
    e, a = packed[..., :d], jax.lax.stop_gradient(packed[:, 0, d:])
    return losses.get_loss('deepclusterv2')(
        jnp.swapaxes(e, 0, 1), p, a.T.astype(jnp.int32), temperature=0.1,
        axis_name=axis_name)

  packed = np.concatenate(
      [np.swapaxes(emb, 0, 1),
       np.broadcast_to(assignments.T[:, None, :], (b, crops, heads))],
      axis=-1).astype(np.float32)
  value = _assert_devices_equal_one(fn, (packed, protos), (0,))
  np.testing.assert_allclose(
      value, deepclusterv2_reference(emb, protos, assignments, 0.1), rtol=1e-5)
  _assert_param_grads_equal(fn, [packed], protos)


# ---------------------------------------------------------------------------
# k-means: separable clusters, 8 devices == 1, no empty cluster survives.


def _blobs(num_clusters, per_cluster, d, seed, spread=0.05):
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(num_clusters, d)))
  labels = np.repeat(np.arange(num_clusters), per_cluster)
  x = centres[labels] + spread * rng.normal(size=(len(labels), d))
  perm = rng.permutation(len(labels))
  return x[perm].astype(np.float32), labels[perm]


def _same_partition(a, b):
  """Labels a and b define the same partition (up to renaming clusters)."""
  pairs = set(zip(a.tolist(), b.tolist()))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _kmeans_1_and_8(x, k, key, **kwargs):
  one = jax.jit(lambda x: clustering.kmeans(x, k, key, **kwargs))(x)
  split = {n: v.reshape((N_DEV, -1) + v.shape[1:])
           for n, v in kwargs.items() if n == 'mask'}
  rest = {n: v for n, v in kwargs.items() if n != 'mask'}
  eight = jax.pmap(
      lambda x, *m: clustering.kmeans(x, k, key, axis_name=parallel.AXIS,
                                      **dict(rest, **dict(zip(split, m)))),
      axis_name=parallel.AXIS)(x.reshape((N_DEV, -1) + x.shape[1:]),
                               *split.values())
  return [np.asarray(a) for a in one], [np.asarray(a) for a in eight]


@pytest.mark.parametrize('spherical', [False, True])
def test_kmeans_finds_separable_clusters_on_8_devices_as_on_1(spherical):
  k = 6
  x, truth = _blobs(k, 16, 8, seed=12)
  key = jax.random.PRNGKey(3)
  (c1, l1), (c8, l8) = _kmeans_1_and_8(x, k, key, spherical=spherical,
                                       num_iters=10)
  assert _same_partition(l1, truth)
  np.testing.assert_array_equal(l8.reshape(-1), l1)
  for c in c8:
    np.testing.assert_allclose(c, c1, rtol=1e-5, atol=1e-6)
  if spherical:
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, rtol=1e-6)


def test_no_empty_cluster_survives_a_planted_one():
  # Three real blobs, four centroids, one planted far from every point: it is
  # empty at the first assignment and must end up owning points. The last 4
  # points are padding (masked) far away, which must move no centroid.
  x, truth = _blobs(3, 20, 4, seed=13)
  centres = np.stack([x[truth == c].mean(0) for c in range(3)])
  planted = np.concatenate([centres, np.full((1, 4), -100.0)]).astype(np.float32)
  x = np.concatenate([x, np.full((4, 4), 50.0, np.float32)])
  mask = np.arange(len(x)) < 60
  (c1, l1), (c8, l8) = _kmeans_1_and_8(
      x, 4, jax.random.PRNGKey(0), num_iters=3, init_centroids=planted,
      mask=mask)
  counts = np.bincount(l1[mask], minlength=4)
  assert np.all(counts > 0), counts
  np.testing.assert_array_equal(l8.reshape(-1)[mask], l1[mask])
  np.testing.assert_allclose(c8[0], c1, rtol=1e-5, atol=1e-6)
  # The planted centroid took half of a real blob: each real blob is one
  # cluster or a union of two.
  assert all(len(set(l1[mask][truth == c])) <= 2 for c in range(3))
  assert np.abs(c1).max() < 10.0  # padding at 50 moved no centroid


def deepclusterv2_official_kmeans(local_memories, centroids, nmb_kmeans_iters):
  """facebookresearch/swav at 06b1b7cbaf6ba2a792300d79c7299db98b93b7f9,
  main_deepclusterv2.py lines 360-387 (`cluster_memory`'s k-means loop), in
  NumPy: one local memory per process, dist.all_reduce a sum over them, the
  initial centroids given (rank 0's random rows, lines 352-358)."""
  centroids = np.array(centroids, np.float64)
  K = len(centroids)
  for n_iter in range(nmb_kmeans_iters + 1):
    # E step
    local_assignments = [np.argmax(m @ centroids.T, axis=1)
                         for m in local_memories]
    if n_iter == nmb_kmeans_iters:
      break
    # M step
    counts = np.zeros(K, np.int64)
    emb_sums = np.zeros_like(centroids)
    for m, a in zip(local_memories, local_assignments):
      for k in range(K):
        if np.any(a == k):
          emb_sums[k] += m[a == k].sum(axis=0)
          counts[k] += np.sum(a == k)
    mask = counts > 0
    centroids[mask] = emb_sums[mask] / counts[mask][:, None]
    # normalize centroids
    centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
  return centroids, local_assignments


@official_port('deepclusterv2', source='facebookresearch/swav at '
               '06b1b7cbaf6ba2a792300d79c7299db98b93b7f9, '
               'main_deepclusterv2.py lines 352-389 (cluster_memory)')
def test_deepclusterv2_kmeans_matches_official_code_empty_cluster_kept():
  # Three blobs, four centroids, one planted on the far side of the sphere:
  # it never wins a point, and the official loop leaves it where it is
  # (DeepCluster's split would move it into a blob).
  x, truth = _blobs(3, 16, 4, seed=13)
  x = _unit(x).astype(np.float32)
  centres = _unit(np.stack([x[truth == c].mean(0) for c in range(3)]))
  planted = np.concatenate([centres, -_unit(centres.sum(0))[None]])
  planted = (planted + 0.05 * _random(planted.shape, 14)).astype(np.float32)
  (c1, l1), (c8, l8) = _kmeans_1_and_8(
      x, 4, jax.random.PRNGKey(0), num_iters=3, spherical=True,
      init_centroids=planted, empty_clusters='keep')
  for devices, (centroids, labels) in ((1, (c1, l1[None])), (N_DEV, (c8[0], l8))):
    want_c, want_l = deepclusterv2_official_kmeans(
        np.split(x.astype(np.float64), devices), _unit(planted), 3)
    np.testing.assert_allclose(centroids, want_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, np.stack(want_l))
  assert np.sum(l1 == 3) == 0
  np.testing.assert_allclose(c1[3], _unit(planted[3]), rtol=1e-5, atol=1e-6)


def test_split_empty_clusters_halves_the_largest():
  centroids = _random((4, 3), 14)
  counts = jnp.asarray([0.0, 10.0, 3.0, 0.0])
  new = np.asarray(clustering.split_empty_clusters(
      jnp.asarray(centroids), counts, jax.random.PRNGKey(0), scale=1e-3))
  # Cluster 0 takes half of cluster 1 (counts 5, 5), then cluster 3 half of
  # cluster 0: each split moves the pair symmetrically about the old centroid.
  np.testing.assert_allclose((new[0] + new[3]) / 2 + new[1], 2 * centroids[1],
                             rtol=1e-5, atol=1e-6)
  for i in (0, 1, 3):
    distance = np.linalg.norm(new[i] - centroids[1])
    assert 0 < distance < 2e-2 * np.linalg.norm(centroids[1])
  assert len({tuple(c) for c in new}) == 4
  np.testing.assert_array_equal(new[2], centroids[2])


# ---------------------------------------------------------------------------
# SwAV's queue.


@official_port('swav', 'seer', source='facebookresearch/swav at '
               '06b1b7cbaf6ba2a792300d79c7299db98b93b7f9, main_swav.py lines '
               '283-286 (the queue)')
def test_swav_queue_holds_the_last_features_of_each_crop_across_devices():
  # swav main_swav.py L283-L286 shifts the queue and puts the newest batch in
  # front; ours is MoCo's ring buffer (methods/memory.py). Sinkhorn treats
  # rows alike, so what must match is the set of rows: the last L embeddings
  # of each global crop, normalised, identical on every device.
  g, length, d = 2, 16, 4
  state = {'queue': np.zeros((g, length, d), np.float32),
           'queue_ptr': np.int32(0)}
  pushes = [_random((g, 8, d), 16 + t) for t in range(3)]  # wraps once
  one = state
  for batch in pushes:
    one = memory.enqueue(one['queue'], one['queue_ptr'], batch)
  official = np.zeros((g, length, d), np.float32)
  for batch in pushes:
    official = np.concatenate([_unit(batch), official[:, :-8]], axis=1)
  for crop in range(g):
    np.testing.assert_allclose(
        np.sort(np.asarray(one['queue'][crop]), axis=0),
        np.sort(official[crop], axis=0), rtol=1e-6)
  eight = jax.pmap(
      lambda e: memory.enqueue(state['queue'], state['queue_ptr'], e,
                               parallel.AXIS),
      axis_name=parallel.AXIS)(np.swapaxes(pushes[0].reshape(g, 8, 1, d), 0, 1))
  expected = memory.enqueue(state['queue'], state['queue_ptr'], pushes[0])
  for q in np.asarray(eight['queue']):
    np.testing.assert_allclose(q, expected['queue'], rtol=1e-6)
  assert int(eight['queue_ptr'][0]) == 8


# ---------------------------------------------------------------------------
# Every method trains a few steps from its smoke config.


def _restore(workdir, target, step):
  state, _ = checkpointing.Checkpointer(workdir).restore(target, step=step)
  return state


@pytest.mark.parametrize('name', ['barlow_twins', 'vicreg', 'swav',
                                  'deepcluster', 'deepclusterv2', 'seer'])
def test_smoke_config_trains(tmp_path, name):
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.num_steps = 2
  # Intermediate checkpoints only where a test reads one (each costs a save).
  keep_step_1 = name in ('swav', 'deepclusterv2')
  config.training.update(log_every=1, checkpoint_every=1 if keep_step_1 else 2)
  state = train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['loss']) and r['finite'] == 1.0 for r in rows)
  m, ms = config.method, state.method_state

  if m.name in ('swav', 'seer'):
    initial = train.setup(config).state
    norms = np.linalg.norm(state.params['prototypes'], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    # Frozen for `freeze_prototypes_steps` steps (up to the rounding of a
    # weight-decay rescaling that the normalisation undoes), trained after.
    frozen_until = m.freeze_prototypes_steps
    if frozen_until:
      frozen = _restore(str(tmp_path), initial, frozen_until)
      np.testing.assert_allclose(frozen.params['prototypes'],
                                 initial.params['prototypes'], atol=1e-6)
    moved = np.abs(state.params['prototypes'] - initial.params['prototypes'])
    assert moved.max() > 1e-5
    if 'queue' in ms:  # filled by step 1's global batch, used at step 2
      assert int(ms['queue_count']) == m.queue_length == config.batch_size
      np.testing.assert_allclose(np.linalg.norm(ms['queue'], axis=-1), 1.0,
                                 rtol=1e-5)
      assert rows[-1]['queue_used'] == 1.0 and rows[0]['queue_used'] == 0.0

  if m.name == 'deepcluster':
    # The epoch-0 clustering ran: every one of the K clusters holds images,
    # and the weights are 1 / |cluster| up to a common factor.
    counts = np.bincount(ms['pseudo_labels'], minlength=m.num_clusters)
    assert counts.sum() == 1024 and np.all(counts > 0), counts
    np.testing.assert_allclose(ms['cluster_weights'] * counts,
                               ms['cluster_weights'][0] * counts[0], rtol=1e-5)

  if m.name == 'deepclusterv2':
    # Empty clusters may stay empty (the reference keeps their centroids).
    assert ms['assignments'].shape == (m.num_heads, 1024)
    assert ms['assignments'].min() >= 0
    assert ms['assignments'].max() < m.num_clusters
    # Prototypes = the epoch's normalised centroids, frozen (the reference's
    # freeze_prototypes_niters outlasts the run).
    # Restored into the state's shapes: no initialiser or dataset needed.
    after_clustering = _restore(str(tmp_path),
                                train.setup(config, abstract=True).state, 1)
    np.testing.assert_allclose(state.params['prototypes'],
                               after_clustering.params['prototypes'], atol=1e-6)
    np.testing.assert_allclose(
        np.linalg.norm(state.params['prototypes'], axis=-1), 1.0, rtol=1e-5)
