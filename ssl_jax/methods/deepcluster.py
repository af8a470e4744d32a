"""DeepCluster (Caron et al. 2018) and DeepCluster-v2 (Caron et al. 2020).

Both alternate, once per epoch (`on_epoch_start`, a host hook of the training
loop), between clustering features of the whole training set with k-means
(`losses.clustering.kmeans`, distributed over every device of the mesh) and training
the network to predict the resulting pseudo-labels, looked up by the dataset
index that every batch carries.

DeepCluster: k-means clusters the projections PCA-whitened to
`method.pca_dim` dimensions (min(pca_dim, d)) and L2-normalised, with the
PCA fitted on every device's points (`losses.clustering.pca_whiten`, the
official `preprocess_features`); pca_dim = 0 clusters the L2-normalised
projections. A classifier on the projector output is re-initialised every
epoch (cluster ids are arbitrary, its old weights mean nothing) and trained
with cross-entropy; images are weighted by 1 / |cluster|, which is the
paper's uniform sampling over clusters in expectation.

DeepCluster-v2 (SwAV paper, appendix A): `num_heads` k-means runs on the
unit sphere, head h on the projections of global crop h % (number of global
crops); each head's prototypes are set to its normalised centroids, and every
crop (multi-crop included) predicts every head's assignment of its image
(temperature 0.1). The reference clusters a memory bank of the embeddings
seen during the previous epoch; here the global crops are re-embedded at the
start of each epoch (one extra forward pass over the data, in eval mode).

Config (configs/deepcluster.py, configs/deepclusterv2.py): method.num_clusters,
kmeans_iterations, (v1) pca_dim, (v2) num_heads, temperature,
freeze_prototypes_steps.
"""

import abc
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import losses, models, parallel
from ssl_jax.data import augment
from ssl_jax.losses.clustering import kmeans, pca_whiten
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.methods import common
from ssl_jax.methods.base import METHODS, EpochContext, Method, StepOutput
from ssl_jax.methods.swav import apply_multicrop
from ssl_jax.train_state import TrainState


def reset_subtree(tree: Any, name: str) -> Any:
  """Zeros every leaf whose path contains the dict key `name`.

  Used on the optimizer state, so that the momentum of a re-initialised
  layer does not carry over from the layer it replaces.
  """
  def reset(path, leaf):
    hit = any(getattr(k, 'key', None) == name for k in path)
    return np.zeros_like(leaf) if hit else leaf
  return jax.tree_util.tree_map_with_path(reset, tree)


class _DeepClusterBase(Method):
  """Feature extraction over the dataset and distributed k-means."""

  def __init__(self, config, data_info, durations):
    super().__init__(config, data_info, durations)
    self._extract_fn = None
    self._kmeans_fn = None

  @abc.abstractmethod
  def extraction_views(self, rng: jax.Array, images: jax.Array) -> jax.Array:
    """[V, b, ...] views whose embeddings are clustered (V k-means runs)."""

  def _embed(self, variables, rng, images):
    network = models.get_network(self.config.model, axis_name=None)
    views = self.extraction_views(rng, images)
    out, _ = common.apply_network(network, variables['params'],
                                  variables['batch_stats'], list(views),
                                  train=False)
    # Raw: `preprocess_features` runs on the gathered points of every device.
    return out['projection']  # [V, b, d]

  def _embed_on_device(self, variables, key, images):
    """Per device: [b, V, d] embeddings (batch first, split on the mesh)."""
    rng = parallel.per_device_rng(key, parallel.AXIS)
    return jnp.swapaxes(self._embed(variables, rng, images), 0, 1)

  def preprocess_features(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Per device: this device's [n, d] points as k-means sees them (the
    statistics of a preprocessing, if any, over every device's points)."""
    del mask
    return l2_normalize(x)

  def _cluster_on_device(self, feats, indices, masks, keys):
    """Per device: k-means of every device's points (one run per view).

    Args:
      feats, indices, masks: lists (one entry per batch) of this device's
        [b, V, d] embeddings, [b] dataset indices and [b] validity.
      keys: [V] k-means keys, the same on every device.

    Returns:
      (centroids [V, K, d], the same on every device; labels [n, V], indices
      [n] and masks [n] of this device's points, in one order).
    """
    x = jnp.swapaxes(jnp.concatenate(feats, 0), 0, 1)  # [V, n, d]
    mask = jnp.concatenate(masks, 0)
    m = self.config.method
    centroids, labels = jax.vmap(
        lambda x, key: kmeans(
            self.preprocess_features(x, mask), m.num_clusters, key,
            num_iters=m.kmeans_iterations,
            spherical=self.spherical, init=m.get('kmeans_init', 'kmeans++'),
            mask=mask, empty_clusters=self.empty_clusters,
            axis_name=parallel.AXIS))(x, keys)
    return centroids, labels.T, jnp.concatenate(indices, 0), mask

  def cluster_dataset(self, state: TrainState, context: EpochContext
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means of every training image's embeddings (one run per view).

    Every process embeds its devices' share of the dataset
    (`context.embed_dataset`); k-means then runs over the points of every
    device of the mesh.

    Args:
      state: the train state (global arrays replicated on the mesh).
      context: the epoch (seeds the augmentations and the k-means init) and
        the pass over the training set.

    Returns:
      (centroids [V, K, d], labels [V, N] of every dataset index, counts
      [V, K]) as NumPy arrays, identical on every host.
    """
    mesh = parallel.default_mesh()
    split = parallel.P(parallel.AXIS)
    if self._extract_fn is None:
      self._extract_fn = parallel.data_parallel(
          self._embed_on_device, mesh,
          in_specs=(parallel.P(), parallel.P(), split), out_specs=split)
      self._kmeans_fn = parallel.data_parallel(
          self._cluster_on_device, mesh,
          in_specs=(split, split, split, parallel.P()),
          out_specs=(parallel.P(), split, split, split))
    key = jax.random.fold_in(jax.random.key(self.config.seed), context.epoch)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    embedded = context.embed_dataset(self._extract_fn, variables, key)
    num_views = embedded.features[0].shape[1]
    km_keys = jax.random.split(jax.random.fold_in(key, 10**6), num_views)
    centroids, point_labels, flat_idx, flat_mask = parallel.to_host(
        self._kmeans_fn(embedded.features, embedded.indices, embedded.masks,
                        parallel.put_replicated(km_keys, mesh)))
    flat_mask = flat_mask.astype(bool)
    labels = np.zeros((num_views, embedded.num_examples), np.int32)
    labels[:, flat_idx[flat_mask]] = point_labels[flat_mask].T
    k = self.config.method.num_clusters
    counts = np.stack([np.bincount(l, minlength=k) for l in labels])
    return centroids, labels, counts


@METHODS.register('deepcluster')
class DeepCluster(_DeepClusterBase):
  """Backbone + projector + a classifier re-initialised every epoch."""

  spherical = False
  # faiss (facebookresearch/deepcluster clustering.py, run_kmeans) splits
  # empty clusters off large ones.
  empty_clusters = 'split'

  def preprocess_features(self, x, mask):
    # The official clustering.py preprocess_features: PCA to 256 dimensions
    # with whitening, then row L2; method.pca_dim = 0 clusters the
    # L2-normalised projections instead.
    pca_dim = self.config.method.get('pca_dim', 256)
    if pca_dim < 0:
      raise ValueError(f'method.pca_dim must be >= 0 (0 = no PCA), got '
                       f'{pca_dim}')
    if not pca_dim:
      return super().preprocess_features(x, mask)
    return pca_whiten(x, pca_dim, mask=mask, axis_name=parallel.AXIS)

  def extraction_views(self, rng, images):
    del rng
    size = self.view_specs[next(iter(self.view_specs))].size
    x = augment.eval_view(images, size, self.data_info.mean, self.data_info.std)
    return x[None]

  def _classifier(self):
    return nn.Dense(self.config.method.num_clusters)

  def init(self, rng):
    network = models.get_network(self.config.model, axis_name=None)
    net_rng, cls_rng = jax.random.split(rng)
    params, batch_stats = common.init_network(network, net_rng,
                                              self.sample_input())
    dim = self.config.model.projector.output_dim
    params = dict(params, classifier=self._classifier().init(
        cls_rng, jnp.zeros((1, dim)))['params'])
    k = self.config.method.num_clusters
    method_state = {
        'pseudo_labels': jnp.zeros((self.data_info.num_examples,), jnp.int32),
        'cluster_weights': jnp.ones((k,), jnp.float32)}
    return params, batch_stats, method_state

  def on_epoch_start(self, state, context):
    _, labels, counts = self.cluster_dataset(state, context)
    host = parallel.to_host(state)
    counts = counts[0].astype(np.float32)
    # 1/|c| per image, scaled so that the mean weight over the dataset is 1.
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
    weights *= context.num_examples / max(float(np.sum(weights * counts)), 1.0)
    dim = self.config.model.projector.output_dim
    rng = jax.random.fold_in(jax.random.key(self.config.seed + 1),
                             context.epoch)
    classifier = self._classifier().init(rng, jnp.zeros((1, dim)))['params']
    params = dict(host.params, classifier=jax.device_get(classifier))
    method_state = dict(host.method_state, pseudo_labels=labels[0],
                        cluster_weights=weights.astype(np.float32))
    host = host.replace(params=params, method_state=method_state,
                        opt_state=reset_subtree(host.opt_state, 'classifier'))
    return parallel.put_replicated(host)

  def loss(self, params, state, views, batch, rng, axis_name):
    del rng
    network = models.get_network(self.config.model, axis_name)
    out, batch_stats = common.apply_network(network, params, state.batch_stats,
                                            views)
    ms = state.method_state
    labels = ms['pseudo_labels'][batch['index']]
    classifier = self._classifier()
    loss = 0.0
    for z in out['projection']:
      logits = classifier.apply({'params': params['classifier']}, z)
      loss += losses.get_loss('deepcluster')(
          logits, labels, ms['cluster_weights'], axis_name=axis_name)
    loss = loss / len(views)
    return loss, StepOutput(batch_stats=batch_stats, method_state=ms,
                            metrics={}, features=out['features'][0],
                            embeddings=out['projection'][0])


@METHODS.register('deepclusterv2')
class DeepClusterV2(_DeepClusterBase):
  """Prototypes = normalised k-means centroids; multi-crop, several heads.

  Head h clusters the embeddings of global crop h % num_global_crops (the
  reference's `crops_for_assign` cycled over `nmb_prototypes`), so the three
  heads of the paper's recipe cluster crops 0, 1, 0 from three different
  initialisations.
  """

  spherical = True
  # The reference's cluster_memory keeps an empty cluster's old centroid.
  empty_clusters = 'keep'

  def __init__(self, config, data_info, durations):
    super().__init__(config, data_info, durations)
    first_view = config.augment.views[next(iter(config.augment.views))]
    self.num_global_crops = first_view.get('count', 1)
    self.num_heads = config.method.get('num_heads', 1)

  def extraction_views(self, rng, images):
    views = self.make_views(rng, images)[:self.num_global_crops]
    return jnp.stack([views[h % len(views)] for h in range(self.num_heads)])

  def init(self, rng):
    network = models.get_network(self.config.model, axis_name=None)
    net_rng, proto_rng = jax.random.split(rng)
    params, batch_stats = common.init_network(network, net_rng,
                                              self.sample_input())
    k, dim = self.config.method.num_clusters, self.config.model.projector.output_dim
    params = dict(params, prototypes=l2_normalize(
        jax.random.normal(proto_rng, (self.num_heads, k, dim), jnp.float32)))
    method_state = {'assignments': jnp.zeros(
        (self.num_heads, self.data_info.num_examples), jnp.int32)}
    return params, batch_stats, method_state

  def on_epoch_start(self, state, context):
    centroids, labels, _ = self.cluster_dataset(state, context)
    host = parallel.to_host(state)
    params = dict(host.params, prototypes=np.asarray(
        l2_normalize(jnp.asarray(centroids))))
    host = host.replace(
        params=params,
        method_state=dict(host.method_state, assignments=labels),
        opt_state=reset_subtree(host.opt_state, 'prototypes'))
    return parallel.put_replicated(host)

  def loss(self, params, state, views, batch, rng, axis_name):
    del rng
    m = self.config.method
    network = models.get_network(self.config.model, axis_name)
    out, batch_stats = apply_multicrop(network, params, state.batch_stats,
                                       views)
    # The reference sets `freeze_prototypes_niters` beyond the run's length:
    # the prototypes stay the epoch's centroids. The 0/1 factor zeroes their
    # gradient inside the step.
    trainable = (state.step >= m.freeze_prototypes_steps).astype(jnp.float32)
    frozen = jax.lax.stop_gradient(params['prototypes'])
    prototypes = frozen + trainable * (params['prototypes'] - frozen)
    assignments = state.method_state['assignments'][:, batch['index']]
    loss = losses.get_loss('deepclusterv2')(
        out['projection'], prototypes, assignments,
        temperature=m.temperature, axis_name=axis_name)
    return loss, StepOutput(batch_stats=batch_stats,
                            method_state=state.method_state,
                            metrics={'prototypes_trainable': trainable},
                            features=out['features'][0],
                            embeddings=out['projection'][0])

  def project_params(self, params, step):
    del step
    return dict(params, prototypes=l2_normalize(params['prototypes']))
