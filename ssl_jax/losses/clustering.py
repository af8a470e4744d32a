"""Clustering objectives: Sinkhorn-Knopp codes, SwAV's swapped prediction,
k-means with empty-cluster splitting, and DeepCluster's cross-entropies.

Everything here is a pure function of arrays; with `axis_name` set the sums
over the batch become `psum`s, so the global batch is clustered without any
device holding all of it.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.losses.registry import register


def sinkhorn(scores: jax.Array, *, epsilon: float = 0.05, num_iters: int = 3,
             axis_name: Optional[str] = None) -> jax.Array:
  """Soft codes Q of the equipartition-constrained assignment (SwAV eq. 3).

  Q = Diag(u) exp(scores / epsilon) Diag(v), scaled so that every sample's
  codes sum to 1 and every prototype receives B/K of the global batch B, after
  `num_iters` Sinkhorn-Knopp iterations (the reference code's `distributed_
  sinkhorn`). Gradients do not flow through Q (codes are targets).

  Args:
    scores: [b, K] similarities of this device's samples to the K prototypes
      (cosines in [-1, 1] when both sides are L2-normalised; any real scores
      are accepted: the iterations run in the log domain, max-shifted).
    epsilon: entropic regularisation (0.05 in SwAV).
    num_iters: Sinkhorn iterations (3 in SwAV).
    axis_name: None or the pmap axis; the per-prototype sums then run over
      the global batch.

  Returns:
    [b, K] non-negative codes, rows summing to 1.

  Raises:
    ValueError: scores that are not a [batch, prototypes] matrix.
  """
  if scores.ndim != 2:
    raise ValueError(f'sinkhorn expects [batch, prototypes] scores, got shape '
                     f'{scores.shape}.')
  logits = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  b, k = logits.shape
  n = parallel.global_batch_size(b, axis_name)

  def batch_logsumexp(x):
    # Per prototype over the global batch, max-shifted: with scores of
    # magnitude 1/epsilon, exp(scores/epsilon) spans e^-400..e^400, which
    # float32 can neither hold nor, after a single global shift, resolve (whole
    # rows underflow to 0). The log domain keeps every ratio exact.
    local_max = jnp.max(x, axis=0)
    m = jnp.max(parallel.all_gather(local_max[None], axis_name), axis=0)
    m = jax.lax.stop_gradient(m)
    total = parallel.psum(jnp.sum(jnp.exp(x - m), axis=0), axis_name)
    return jnp.log(total) + m

  # The reference's first `Q /= sum(Q)` is a global constant that the first
  # per-prototype normalisation removes, so it is omitted.
  def iteration(_, log_q):
    log_q = log_q - batch_logsumexp(log_q)[None, :] - jnp.log(k)
    return (log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)
            - jnp.log(n))

  log_q = jax.lax.fori_loop(0, num_iters, iteration, logits)
  # Times n: rows sum to 1 (the reference's `Q *= B`).
  return jnp.exp(log_q + jnp.log(n))


def swapped_prediction_from_scores(scores: jax.Array, codes: jax.Array, *,
                                   temperature: float) -> jax.Array:
  """Mean over samples of -sum_k q_k log softmax(scores / tau)_k (local)."""
  log_p = jax.nn.log_softmax(scores / temperature, axis=-1)
  return -jnp.mean(jnp.sum(codes * log_p, axis=-1))


def _swav_codes(scores, queue, prototypes, use_queue, epsilon, num_iters,
                axis_name):
  """Sinkhorn codes [b, K] of one crop's scores, with the queue when used."""
  b = scores.shape[0]
  codes = sinkhorn(scores, epsilon=epsilon, num_iters=num_iters,
                   axis_name=axis_name)
  if queue is None:
    return codes
  # The queue is replicated, so its rows may not be summed once per device:
  # Sinkhorn then runs on the gathered batch (+ queue) on every device and
  # each device keeps its own rows.
  gathered = parallel.all_gather(scores, axis_name)
  queue_scores = jax.lax.stop_gradient(queue) @ prototypes.T
  with_queue = sinkhorn(jnp.concatenate([queue_scores, gathered]),
                        epsilon=epsilon, num_iters=num_iters)
  start = queue_scores.shape[0] + parallel.global_offset(b, axis_name)
  local = jax.lax.dynamic_slice_in_dim(with_queue, start, b, axis=0)
  return jnp.where(use_queue, local, codes)


@register('swav')
def swav(embeddings: jax.Array, prototypes: jax.Array, *,
         temperature: float = 0.1, epsilon: float = 0.05,
         sinkhorn_iterations: int = 3, num_global_crops: int = 2,
         queue: Optional[jax.Array] = None, use_queue: jax.Array = False,
         axis_name: Optional[str] = None) -> jax.Array:
  """SwAV's swapped prediction over all crop pairs (Caron et al. 2020, eq. 1).

  Codes come from the `num_global_crops` first crops only; each code q_i is
  predicted from every other crop v != i, and the loss is averaged over the
  (i, v) pairs, as in the reference `main_swav.py`.

  Args:
    embeddings: [V, b, d] embeddings of V crops of this device's b images
      (any scale: they are L2-normalised here).
    prototypes: [K, d] prototypes, used as given. SwAV keeps them on the unit
      sphere by re-normalising the parameter outside the differentiated
      function, before each step's forward pass (facebookresearch/swav
      `main_swav.py`, `with torch.no_grad(): ... prototypes.weight.copy_(w)`),
      so the gradient flows through the raw matrix, radial part included;
      normalising here would remove that part and change every update.
    temperature: softmax temperature tau of the predictions (0.1).
    epsilon, sinkhorn_iterations: Sinkhorn-Knopp parameters.
    num_global_crops: how many leading crops codes are computed for.
    queue: optional [num_global_crops, L, d] normalised embeddings of earlier
      batches (the same on every device); when `use_queue` is true their
      scores join the batch's in Sinkhorn so that small batches still spread
      over many prototypes.
    use_queue: boolean scalar, whether the queue is used at this step.
    axis_name: None or the pmap axis.

  Returns:
    The scalar loss of the global batch.
  """
  num_crops = embeddings.shape[0]
  if num_crops < 2 or num_global_crops > num_crops:
    raise ValueError(f'SwAV needs >= 2 crops and at most that many global '
                     f'crops; got {num_crops} crops, {num_global_crops} global.')
  z = l2_normalize(embeddings.astype(jnp.float32))
  c = prototypes.astype(jnp.float32)
  scores = z @ c.T  # [V, b, K]
  total = 0.0
  for i in range(num_global_crops):
    codes = _swav_codes(scores[i], None if queue is None else queue[i], c,
                        use_queue, epsilon, sinkhorn_iterations, axis_name)
    for v in range(num_crops):
      if v != i:
        total += swapped_prediction_from_scores(scores[v], codes,
                                                temperature=temperature)
  local_loss = total / (num_global_crops * (num_crops - 1))
  return parallel.pmean(local_loss, axis_name)


# ---------------------------------------------------------------------------
# k-means.


def _sum_in_device_order(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """A psum whose rounding does not depend on the topology: the devices'
  terms are gathered and added in device order on every device. Whitening
  divides by the smallest eigenvalues, which amplified the different
  rounding of a psum over 2 processes x 4 devices and over 1 x 8 into other
  clusters (losses 3e-4 apart, tests/test_multihost.py)."""
  if axis_name is None:
    return x
  return jnp.sum(parallel.all_gather(x[None], axis_name), axis=0)


def pca_whiten(x: jax.Array, dim: int, *, mask: Optional[jax.Array] = None,
               eigenvalue_floor: float = 1e-6,
               axis_name: Optional[str] = None) -> jax.Array:
  """DeepCluster's preprocessing of the features it clusters.

  PCA to min(dim, d) dimensions with whitening, then L2 normalisation of
  every row: facebookresearch/deepcluster `clustering.py`
  `preprocess_features` (faiss `PCAMatrix(d, dim, eigen_power=-0.5)`, then
  row L2). The mean and covariance are those of the global set of points
  (sums `psum`-ed over `axis_name`), so every device projects with the same
  matrix and N devices give the clusters of one. faiss scales by the
  eigenvalues of the unnormalised scatter matrix (n times ours); the row L2
  normalisation removes that common factor. Eigenvalues below
  `eigenvalue_floor` times the largest are raised to it, so that
  rank-deficient features (fewer points than dimensions, collapsed
  directions) stay finite where faiss would divide by ~0; eigenvector signs
  are arbitrary, as in faiss, which k-means does not see.

  Args:
    x: [n, d] this device's points.
    dim: the PCA dimension (DeepCluster: 256); min(dim, d) is kept.
    mask: [n] 1 for real points, 0 for padding (left out of the statistics).
    eigenvalue_floor: relative floor of the whitening eigenvalues.
    axis_name: None or the pmap axis.

  Returns:
    [n, min(dim, d)] whitened, unit-norm rows (float32).
  """
  if dim < 1:
    raise ValueError(f'pca_whiten: dim must be >= 1, got {dim}')
  x = x.astype(jnp.float32)
  w = jnp.ones(x.shape[:1], jnp.float32) if mask is None else (
      mask.astype(jnp.float32))
  hi = jax.lax.Precision.HIGHEST
  count = _sum_in_device_order(jnp.sum(w), axis_name)
  mean = _sum_in_device_order(jnp.dot(w, x, precision=hi), axis_name) / count
  xc = x - mean
  cov = _sum_in_device_order(jnp.dot((xc * w[:, None]).T, xc, precision=hi),
                             axis_name) / count
  eigvals, eigvecs = jnp.linalg.eigh(cov)  # ascending
  k = min(dim, x.shape[1])
  eigvals, eigvecs = eigvals[::-1][:k], eigvecs[:, ::-1][:, :k]
  floor = eigenvalue_floor * jnp.maximum(eigvals[0], 1e-30)
  scale = jax.lax.rsqrt(jnp.maximum(eigvals, floor))
  return l2_normalize(jnp.dot(xc, eigvecs * scale[None, :], precision=hi))


def _assign(x: jax.Array, centroids: jax.Array, spherical: bool) -> jax.Array:
  if spherical:
    return jnp.argmax(x @ centroids.T, axis=-1)
  # ||x - c||^2 up to the per-sample constant ||x||^2.
  d = jnp.sum(jnp.square(centroids), -1)[None, :] - 2.0 * x @ centroids.T
  return jnp.argmin(d, axis=-1)


def _cluster_sums(x, labels, k, axis_name, weights=None):
  one_hot = jax.nn.one_hot(labels, k, dtype=x.dtype)
  if weights is not None:
    one_hot = one_hot * weights[:, None]
  sums = parallel.psum(one_hot.T @ x, axis_name)
  counts = parallel.psum(jnp.sum(one_hot, axis=0), axis_name)
  return sums, counts


def split_empty_clusters(centroids: jax.Array, counts: jax.Array,
                         key: jax.Array, scale: float = 1e-4) -> jax.Array:
  """Gives every empty cluster half of the currently largest one.

  DeepCluster (Caron et al. 2018, sec. 3.3): an empty cluster takes the
  centroid of a large non-empty cluster plus a small random perturbation,
  the large one the opposite perturbation, and the next assignment step splits
  its points between the two. Sequential, so several empty clusters split
  several (or repeatedly the same, halved) large clusters.

  Args:
    centroids: [K, d] centroids.
    counts: [K] points per cluster (global).
    key: PRNG key for the perturbations (the same on every device).
    scale: perturbation size relative to the centroid's norm.

  Returns:
    [K, d] centroids with no cluster left at count 0 (when some cluster has at
    least 2 points).
  """
  k = centroids.shape[0]

  def body(i, carry):
    centroids, counts = carry
    big = jnp.argmax(counts)
    empty = (counts[i] == 0) & (counts[big] > 1)
    noise = jax.random.normal(jax.random.fold_in(key, i), centroids.shape[1:])
    noise = noise * scale * (jnp.linalg.norm(centroids[big]) + 1e-6)
    half = counts[big] // 2
    centroids = jnp.where(
        empty, centroids.at[i].set(centroids[big] + noise)
        .at[big].set(centroids[big] - noise), centroids)
    counts = jnp.where(empty, counts.at[i].set(half)
                       .at[big].set(counts[big] - half), counts)
    return centroids, counts

  centroids, _ = jax.lax.fori_loop(0, k, body, (centroids, counts))
  return centroids


def _points_at(x: jax.Array, global_indices: jax.Array,
               axis_name: Optional[str]) -> jax.Array:
  """Rows of the global [N, d] point set at `global_indices`, on every device.

  Each device contributes the rows it holds and zeros elsewhere; a `psum`
  assembles them, so the points never have to be gathered whole.
  """
  n = x.shape[0]
  local = global_indices - parallel.global_offset(n, axis_name)
  inside = (local >= 0) & (local < n)
  rows = jnp.where(inside[:, None], x[jnp.clip(local, 0, n - 1)], 0.0)
  return parallel.psum(rows, axis_name)


def _squared_distances(x: jax.Array, c: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x - c[None, :]), axis=-1)


def kmeans_plus_plus(x: jax.Array, num_clusters: int, key: jax.Array,
                     weights: jax.Array,
                     axis_name: Optional[str] = None) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007) over the global points.

  Each next centroid is a point drawn with probability proportional to its
  squared distance to the nearest centroid so far; only the [N] distances
  are gathered, not the [N, d] points. Random seeding can put two centroids
  in one well-separated cluster and none in another, a local optimum that
  Lloyd iterations never leave.

  Args:
    x: [n, d] this device's points.
    num_clusters: K.
    key: PRNG key, the same on every device.
    weights: [n] 1 for real points, 0 for padding (never drawn).
    axis_name: None or the pmap axis.

  Returns:
    [K, d] initial centroids, the same on every device.
  """
  all_w = parallel.all_gather(weights, axis_name)
  keys = jax.random.split(key, num_clusters)

  def draw(k, d2):
    all_d2 = parallel.all_gather(d2, axis_name)
    total = jnp.sum(all_d2)
    # All points already coincide with a centroid (duplicates): uniform.
    p = jnp.where(total > 0, all_d2 / jnp.maximum(total, 1e-30),
                  all_w / jnp.sum(all_w))
    index = jax.random.choice(k, all_d2.shape[0], (1,), p=p)
    return _points_at(x, index, axis_name)[0]

  first = draw(keys[0], jnp.zeros_like(weights))
  centroids = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(first)
  d2 = _squared_distances(x, first) * weights

  def body(i, carry):
    centroids, d2 = carry
    c = draw(keys[i], d2)
    return (centroids.at[i].set(c),
            jnp.minimum(d2, _squared_distances(x, c) * weights))

  centroids, _ = jax.lax.fori_loop(1, num_clusters, body, (centroids, d2))
  return centroids


def kmeans(x: jax.Array, num_clusters: int, key: jax.Array, *,
           num_iters: int = 10, spherical: bool = False,
           init: str = 'kmeans++', max_split_rounds: int = 10,
           mask: Optional[jax.Array] = None,
           init_centroids: Optional[jax.Array] = None,
           empty_clusters: str = 'split',
           axis_name: Optional[str] = None) -> Tuple[jax.Array, jax.Array]:
  """Lloyd's k-means over the global set of points.

  The assignment step is local to each device; centroid sums and counts are
  `psum`-ed, so every device holds the same centroids. Initial centroids come
  from k-means++ seeding or are `num_clusters` distinct points drawn
  uniformly (as DeepCluster's faiss and DeepCluster-v2's reference do), with
  `key` (the same on every device). Empty clusters, with
  `empty_clusters='split'` (DeepCluster: faiss splits them), are split off the
  largest one after every iteration, and after the last one rounds of
  `split_empty_clusters` + reassignment run until no cluster is empty; with
  'keep' (DeepCluster-v2: facebookresearch/swav `main_deepclusterv2.py`,
  `cluster_memory`, `centroids[mask] = emb_sums[mask] / counts[mask]`), an
  empty cluster keeps its previous centroid and may stay empty.

  Args:
    x: [n, d] this device's points (every device the same n).
    num_clusters: K.
    key: PRNG key, the same on every device.
    num_iters: Lloyd iterations.
    spherical: cosine k-means on the unit sphere (centroids re-normalised,
      DeepCluster-v2) instead of Euclidean (DeepCluster).
    init: 'kmeans++' or 'random'.
    max_split_rounds: bound on the final split-and-reassign rounds.
    mask: optional [n] booleans, False for padding points that must neither
      move a centroid nor be drawn as one (the last batch of a dataset split
      evenly over devices).
    init_centroids: optional [K, d] starting centroids instead of `init`.
    empty_clusters: 'split' or 'keep', see above.
    axis_name: None or the pmap axis.

  Returns:
    (centroids [K, d], labels [n] int32 of this device's points).

  Raises:
    ValueError: fewer points than clusters, or an unknown `init`.
  """
  x = x.astype(jnp.float32)
  weights = None if mask is None else mask.astype(jnp.float32)
  total = parallel.global_batch_size(x.shape[0], axis_name)
  if total < num_clusters:
    raise ValueError(f'k-means with {num_clusters} clusters needs at least as '
                     f'many points, got {total}.')
  if init not in ('kmeans++', 'random'):
    raise ValueError(f"Unknown k-means init {init!r}; known: kmeans++, random.")
  if empty_clusters not in ('split', 'keep'):
    raise ValueError(f'Unknown k-means empty_clusters {empty_clusters!r}; '
                     f'known: split, keep.')
  split = empty_clusters == 'split'
  init_key, split_key = jax.random.split(key)
  ones = jnp.ones(x.shape[:1], jnp.float32) if weights is None else weights
  if init_centroids is not None:
    centroids = init_centroids.astype(jnp.float32)
  elif init == 'kmeans++':
    centroids = kmeans_plus_plus(x, num_clusters, init_key, ones, axis_name)
  else:
    all_w = parallel.all_gather(ones, axis_name)
    first = jax.random.choice(init_key, total, (num_clusters,),
                              replace=False, p=all_w / jnp.sum(all_w))
    centroids = _points_at(x, first, axis_name)
  if spherical:
    centroids = l2_normalize(centroids)

  def update(centroids, i):
    labels = _assign(x, centroids, spherical)
    sums, counts = _cluster_sums(x, labels, num_clusters, axis_name,
                                 weights)
    new = jnp.where(counts[:, None] > 0,
                    sums / jnp.maximum(counts, 1.0)[:, None], centroids)
    if split:
      new = split_empty_clusters(new, counts, jax.random.fold_in(split_key, i))
    # A split moves two centroids off the sphere; cosine assignments need them
    # back on it to compare like with like.
    return l2_normalize(new) if spherical else new

  centroids = jax.lax.fori_loop(0, num_iters,
                                lambda i, c: update(c, i), centroids)

  def has_empty(carry):
    centroids, rounds = carry
    labels = _assign(x, centroids, spherical)
    _, counts = _cluster_sums(x, labels, num_clusters, axis_name, weights)
    return jnp.any(counts == 0) & (rounds < max_split_rounds)

  def split_round(carry):
    centroids, rounds = carry
    labels = _assign(x, centroids, spherical)
    _, counts = _cluster_sums(x, labels, num_clusters, axis_name, weights)
    centroids = split_empty_clusters(
        centroids, counts, jax.random.fold_in(split_key, num_iters + rounds),
        scale=1e-2)
    if spherical:
      centroids = l2_normalize(centroids)
    return centroids, rounds + 1

  if split:
    centroids, _ = jax.lax.while_loop(has_empty, split_round, (centroids, 0))
  return centroids, _assign(x, centroids, spherical).astype(jnp.int32)


@register('deepcluster')
def deepcluster(logits: jax.Array, pseudo_labels: jax.Array,
                cluster_weights: jax.Array, *,
                axis_name: Optional[str] = None) -> jax.Array:
  """DeepCluster's classification loss with uniform sampling over clusters.

  Caron et al. 2018 sample images uniformly over clusters; here every example
  is weighted by 1 / |its cluster| instead, which is the same objective in
  expectation with the data order left untouched: loss = sum_i w_i CE_i /
  sum_i w_i over the global batch.

  Args:
    logits: [b, K] classifier outputs.
    pseudo_labels: [b] int cluster of each example.
    cluster_weights: [K] weight of each cluster (1 / size).
    axis_name: None or the pmap axis.

  Returns:
    The scalar weighted mean cross-entropy of the global batch.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(log_p, pseudo_labels[:, None], axis=1)[:, 0]
  w = jax.lax.stop_gradient(cluster_weights)[pseudo_labels]
  return (parallel.psum(jnp.sum(w * ce), axis_name) /
          parallel.psum(jnp.sum(w), axis_name))


@register('deepclusterv2')
def deepclusterv2(embeddings: jax.Array, prototypes: jax.Array,
                  assignments: jax.Array, *, temperature: float = 0.1,
                  axis_name: Optional[str] = None) -> jax.Array:
  """DeepCluster-v2 (Caron et al. 2020, appendix): every crop predicts every
  k-means head's assignment of its image from its scores against that head's
  centroids.

  loss = 1/H sum_h 1/(V b) sum_{v, n} CE(softmax(z_vn . c_h / tau), a_hn),
  as in the reference `main_deepclusterv2.py` (the targets of head h are
  repeated over all V crops).

  Args:
    embeddings: [V, b, d] embeddings of V crops of this device's b images
      (L2-normalised here).
    prototypes: [H, K, d] centroids of the H k-means heads (L2-normalised
      here).
    assignments: [H, b] int cluster of each image under each head.
    temperature: softmax temperature tau (0.1).
    axis_name: None or the pmap axis.

  Returns:
    The scalar loss of the global batch.
  """
  z = l2_normalize(embeddings.astype(jnp.float32))
  c = prototypes.astype(jnp.float32)
  scores = jnp.einsum('vbd,hkd->hvbk', z, c) / temperature
  log_p = jax.nn.log_softmax(scores, axis=-1)
  targets = jnp.broadcast_to(assignments[:, None, :, None],
                             log_p.shape[:3] + (1,))
  ce = -jnp.take_along_axis(log_p, targets, axis=-1)
  return parallel.pmean(jnp.mean(ce), axis_name)
