"""InstDisc / NPID and PIRL: instance discrimination against a memory bank.

InstDisc (Wu et al. 2018): every training example is its own class. A memory
bank holds one L2-normalised embedding per example (`batch['index']` names
the row); each step the encoder's embedding of an example is contrasted with
its bank row (positive) and with other rows (negatives), either by NCE with
`method.num_negatives` uniformly drawn rows (4096 in the paper) and a
partition function Z estimated on the first batch and then fixed, or by the
full non-parametric softmax over the bank (`method.objective`). The rows of
the step's examples are then updated with momentum 0.5 and renormalised.

PIRL (Misra & van der Maaten 2020): the embedding of an image, f(v_I), and of
its jigsaw-transformed version, g(v_It) (3x3 jittered tiles in a random
order, each encoded by the shared backbone, projected, concatenated and
projected again), must both match the image's bank row:
loss = lambda * NCE(g(v_It), m_I) + (1 - lambda) * NCE(f(v_I), m_I), with
lambda = 0.5; the bank is updated with the image embeddings f(v_I).

The bank lives in `method_state['bank']`, replicated on every device, and is
updated with the all-gathered (index, embedding) pairs of the step so every
copy stays identical. Replication costs n*d floats per device (655 MB for
ImageNet at d=128). To shard it, give device r the rows with index % N == r:
the update would scatter each gathered pair only to its owner, the positive
rows would be fetched with one all_to_all, and for NCE each device would
score the negatives it owns (sampled per device from its own shard, which is
still uniform over the dataset) and the per-example sums would be combined
with a psum; the full softmax's log-partition becomes a psum of per-shard
sums of exponentials. This module keeps the replicated bank.

Config (configs/instdisc.py, configs/pirl.py): method.temperature,
method.num_negatives, method.bank_momentum, method.objective ('nce' or
'softmax'); PIRL adds method.jigsaw_weight, method.jigsaw_grid,
method.jigsaw_tile_size, and the 'jigsaw' view's crop in augment.views.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, models
from ssl_jax.data import jigsaw
from ssl_jax.data.info import DataInfo
from ssl_jax.durations import Durations
from ssl_jax.losses import instance
from ssl_jax.methods import common, memory
from ssl_jax.methods.base import METHODS, Method, StepOutput
from ssl_jax.train_state import TrainState

OBJECTIVES = ('nce', 'softmax')


class _BankLoss:
  """The shared memory-bank contrast of InstDisc and PIRL."""

  config: ml_collections.ConfigDict
  data_info: DataInfo

  @property
  def num_data(self) -> int:
    return self.data_info.num_examples

  def _check(self) -> None:
    m = self.config.method
    if m.objective not in OBJECTIVES:
      raise ValueError(f'Unknown config.method.objective {m.objective!r}; '
                       f'known: {", ".join(OBJECTIVES)}.')
    if m.objective == 'nce' and m.num_negatives >= self.num_data:
      raise ValueError(
          f'config.method.num_negatives={m.num_negatives} must be smaller than '
          f'the {self.num_data} training examples (the noise samples are drawn '
          f'from them); lower it or use --config.method.objective=softmax.')

  def bank_loss(self, embeddings: jax.Array, bank: jax.Array,
                indices: jax.Array, negative_indices: jax.Array,
                normalizer: jax.Array,
                axis_name: Optional[str]) -> Tuple[jax.Array, jax.Array]:
    """(loss, Z) of embeddings against the bank; Z is fixed once estimated."""
    m = self.config.method
    bank = jax.lax.stop_gradient(bank)
    positive_rows = bank[indices]
    if m.objective == 'softmax':
      loss = losses.get_loss('bank_softmax')(
          embeddings, positive_rows, bank, temperature=m.temperature,
          axis_name=axis_name)
      return loss, normalizer
    negative_rows = bank[negative_indices]
    # Z is estimated on the first step (stored as 0 until then) and kept.
    z = jnp.where(
        normalizer > 0, normalizer,
        instance.estimate_normalizer(embeddings, positive_rows, negative_rows,
                                     temperature=m.temperature,
                                     num_data=self.num_data,
                                     axis_name=axis_name))
    loss = losses.get_loss('nce')(
        embeddings, positive_rows, negative_rows, temperature=m.temperature,
        normalizer=z, num_data=self.num_data, axis_name=axis_name)
    return loss, z


@METHODS.register('instdisc')
class InstDisc(_BankLoss, Method):
  """Backbone + linear embedding, contrasted with a memory bank (NPID)."""

  def __init__(self, config: ml_collections.ConfigDict,
               data_info: DataInfo, durations: Durations):
    super().__init__(config, data_info, durations)
    self._check()

  def init(self, rng: jax.Array) -> Tuple[Any, Any, Any]:
    net_rng, bank_rng = jax.random.split(rng)
    network = models.get_network(self.config.model, axis_name=None)
    params, batch_stats = common.init_network(network, net_rng,
                                              self.sample_input())
    method_state = {
        'bank': memory.init_bank(bank_rng, self.num_data,
                                 self.config.model.projector.output_dim),
        'normalizer': jnp.zeros((), jnp.float32)}
    return params, batch_stats, method_state

  def loss(self, params: Any, state: TrainState, views: Sequence[jax.Array],
           batch: Dict[str, jax.Array], rng: jax.Array,
           axis_name: Optional[str]) -> Tuple[jax.Array, StepOutput]:
    if len(views) != 1:
      raise ValueError(f'InstDisc uses 1 view, the config makes {len(views)}.')
    network = models.get_network(self.config.model, axis_name)
    out, batch_stats = common.apply_network(network, params, state.batch_stats,
                                            views)
    z = out['projection'][0]
    ms = state.method_state
    indices = batch['index']
    negatives = memory.sample_negatives(rng, indices,
                                        self.config.method.num_negatives,
                                        self.num_data)
    loss, normalizer = self.bank_loss(z, ms['bank'], indices, negatives,
                                      ms['normalizer'], axis_name)
    bank = memory.bank_write(ms['bank'], indices, z,
                              self.config.method.bank_momentum, axis_name)
    return loss, StepOutput(
        batch_stats=batch_stats,
        method_state={'bank': bank, 'normalizer': normalizer},
        metrics={'nce_normalizer': normalizer},
        features=out['features'][0], embeddings=z)


class PIRLNetwork(nn.Module):
  """Shared backbone; image head f and jigsaw head g (PIRL, sec. 3.2).

  Attributes:
    backbone: the trunk, applied to images and to every jigsaw tile.
    projector: f, the image head (a linear map to the embedding in PIRL).
    embedding_dim: output width of both heads.
  """
  backbone: nn.Module
  projector: nn.Module
  embedding_dim: int

  @nn.compact
  def __call__(self, images: jax.Array, tiles: jax.Array,
               train: bool = True) -> Dict[str, jax.Array]:
    features, _ = self.backbone(images, train=train)
    b, n = tiles.shape[:2]
    tile_features, _ = self.backbone(tiles.reshape((b * n,) + tiles.shape[2:]),
                                     train=train)
    # Each tile is projected alone, then the projections are concatenated in
    # the shuffled order and projected again, so g sees the permutation.
    tile_z = nn.Dense(self.embedding_dim, name='tile_head')(tile_features)
    jigsaw_z = nn.Dense(self.embedding_dim, name='jigsaw_head')(
        tile_z.reshape((b, n * self.embedding_dim)))
    return {'features': features,
            'projection': self.projector(features, train=train),
            'jigsaw': jigsaw_z.astype(jnp.float32)}


@METHODS.register('pirl')
class PIRL(_BankLoss, Method):
  """Image and jigsaw embeddings both contrasted with the image's bank row."""

  def __init__(self, config: ml_collections.ConfigDict,
               data_info: DataInfo, durations: Durations):
    super().__init__(config, data_info, durations)
    self._check()
    if list(config.augment.views) != ['image', 'jigsaw']:
      raise ValueError('PIRL needs augment.views with an "image" view and a '
                       '"jigsaw" view, in that order (configs/pirl.py).')

  def network(self, axis_name: Optional[str]) -> PIRLNetwork:
    dtype = models.compute_dtype(self.config.model.get('dtype', 'float32'))
    return PIRLNetwork(
        backbone=models.get_backbone(self.config.model, axis_name),
        projector=models.get_mlp(self.config.model.projector, axis_name, dtype),
        embedding_dim=self.config.model.projector.output_dim)

  def _tiles(self, rng: jax.Array, jigsaw_view: jax.Array) -> jax.Array:
    m = self.config.method
    tiles, _ = jigsaw.jigsaw(rng, jigsaw_view, grid=m.jigsaw_grid,
                             tile_size=m.jigsaw_tile_size)
    return tiles

  def init(self, rng: jax.Array) -> Tuple[Any, Any, Any]:
    net_rng, bank_rng = jax.random.split(rng)
    image = self.sample_input()
    size = self.view_specs['jigsaw'].size
    crop = jnp.zeros((image.shape[0], size, size, image.shape[-1]), jnp.float32)
    variables = self.network(None).init(
        {'params': net_rng}, image, self._tiles(bank_rng, crop), train=True)
    method_state = {
        'bank': memory.init_bank(bank_rng, self.num_data,
                                 self.config.model.projector.output_dim),
        # One Z for both NCE terms, as the official code keeps one.
        'normalizer': jnp.zeros((), jnp.float32)}
    return (variables['params'], variables.get('batch_stats', {}),
            method_state)

  def contrast(self, jigsaw_embeddings: jax.Array, image_embeddings: jax.Array,
               bank: jax.Array, indices: jax.Array, negatives: jax.Array,
               normalizer: jax.Array, axis_name: Optional[str]
               ) -> Tuple[jax.Array, jax.Array, Tuple[jax.Array, jax.Array]]:
    """PIRL's two NCE terms against the images' bank rows.

    As vissl's NCELossWithMemory (the official PIRL code) does, one Z serves
    both terms: estimated from the jigsaw term's scores on the first step
    (its first output), then kept.

    Returns:
      (weighted loss, Z, (jigsaw term, image term)).
    """
    w = self.config.method.jigsaw_weight
    jigsaw_loss, z = self.bank_loss(jigsaw_embeddings, bank, indices,
                                    negatives, normalizer, axis_name)
    image_loss, _ = self.bank_loss(image_embeddings, bank, indices, negatives,
                                   z, axis_name)
    return (w * jigsaw_loss + (1.0 - w) * image_loss, z,
            (jigsaw_loss, image_loss))

  def loss(self, params: Any, state: TrainState, views: Sequence[jax.Array],
           batch: Dict[str, jax.Array], rng: jax.Array,
           axis_name: Optional[str]) -> Tuple[jax.Array, StepOutput]:
    tile_rng, noise_rng = jax.random.split(rng)
    tiles = self._tiles(tile_rng, views[1])
    out, mutated = self.network(axis_name).apply(
        {'params': params, 'batch_stats': state.batch_stats}, views[0], tiles,
        train=True, mutable=['batch_stats'])
    ms = state.method_state
    m = self.config.method
    indices = batch['index']
    negatives = memory.sample_negatives(noise_rng, indices, m.num_negatives,
                                        self.num_data)
    loss, normalizer, (jigsaw_loss, image_loss) = self.contrast(
        out['jigsaw'], out['projection'], ms['bank'], indices, negatives,
        ms['normalizer'], axis_name)
    bank = memory.bank_write(ms['bank'], indices, out['projection'],
                              m.bank_momentum, axis_name)
    return loss, StepOutput(
        batch_stats=mutated['batch_stats'],
        method_state={'bank': bank, 'normalizer': normalizer},
        metrics={'jigsaw_loss': jigsaw_loss, 'image_loss': image_loss},
        features=out['features'], embeddings=out['projection'])
