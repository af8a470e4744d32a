"""Classification pretext tasks: rotation, jigsaw, relative patch position.

Each turns an unlabelled view into inputs and a pretext label, runs every
input (image, tile, patch) through the shared backbone, concatenates the
features of one example and classifies the label with an MLP head:

- rotation (Gidaris et al. 2018, RotNet): the 4 rotations of every view,
  4-way classification of the rotation.
- jigsaw (Noroozi & Favaro 2016): 3x3 jittered tiles shuffled by one of a
  fixed set of permutations (maximal Hamming distance), classification of the
  permutation index.
- relative_position (Doersch et al. 2015): a centre patch and one of its 8
  neighbours (gaps and jitter between them), 8-way classification.

The backbone (params['backbone']) is what evaluation probes; on tiles and
patches it sees smaller inputs than the whole images it is evaluated on,
as in the papers. The online probe reads the features of the unrotated view
(rotation) or, for tiles and patches, the eval-mode features of the whole view
(`Method.whole_view_features`).

Config (configs/rotation.py, jigsaw.py, relative_position.py): model.head
(the classifier MLP; its output width is set by the task); method.* below.
"""

import abc
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, models, parallel
from ssl_jax.data import jigsaw
from ssl_jax.data.info import DataInfo
from ssl_jax.durations import Durations
from ssl_jax.losses import pretext
from ssl_jax.methods.base import METHODS, Method, StepOutput
from ssl_jax.train_state import TrainState


class PretextClassifier(nn.Module):
  """Shared backbone on each of m inputs per example, concatenated, MLP head.

  Attributes:
    backbone: the trunk, applied to every input.
    head: the classifier on the m concatenated feature vectors.
  """
  backbone: nn.Module
  head: nn.Module

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = True
               ) -> Dict[str, jax.Array]:
    """inputs [b, m, h, w, C] -> {'features': [b, m, D], 'logits': [b, classes]}."""
    b, m = inputs.shape[:2]
    features, _ = self.backbone(inputs.reshape((b * m,) + inputs.shape[2:]),
                                train=train)
    features = features.reshape(b, m, -1)
    logits = self.head(features.reshape(b, -1), train=train)
    return {'features': features, 'logits': logits.astype(jnp.float32)}


def standardize_each(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Zero mean, unit std per input ([..., h, w, C] over h, w, C).

  Noroozi & Favaro normalise every tile on its own so that the network cannot
  match tiles by their low-level statistics.
  """
  mean = jnp.mean(x, axis=(-3, -2, -1), keepdims=True)
  std = jnp.std(x, axis=(-3, -2, -1), keepdims=True)
  return (x - mean) / (std + eps)


class _PretextClassification(Method):
  """Shared init/loss of the classification pretext tasks."""

  num_classes: int

  @abc.abstractmethod
  def pretext_inputs(self, rng: jax.Array, view: jax.Array
                     ) -> Tuple[jax.Array, jax.Array]:
    """(inputs [b', m, h, w, C], labels [b']) made from one view [b, s, s, C]."""

  def probe_features(self, params: Any, state: TrainState, view: jax.Array,
                     features: jax.Array) -> Optional[jax.Array]:
    """[b, D] features of the original examples for the online probe.

    Tiles and patches are not what evaluation embeds: the whole view is.
    """
    del features
    return self.whole_view_features(params, state, view)

  def network(self, axis_name: Optional[str]) -> PretextClassifier:
    dtype = models.compute_dtype(self.config.model.get('dtype', 'float32'))
    head = ml_collections.ConfigDict(self.config.model.head.to_dict())
    head.output_dim = self.num_classes
    return PretextClassifier(
        backbone=models.get_backbone(self.config.model, axis_name),
        head=models.get_mlp(head, axis_name, dtype))

  def init(self, rng: jax.Array) -> Tuple[Any, Any, Any]:
    net_rng, input_rng = jax.random.split(rng)
    inputs, _ = self.pretext_inputs(input_rng, self.sample_input())
    variables = self.network(None).init({'params': net_rng}, inputs,
                                        train=True)
    return variables['params'], variables.get('batch_stats', {}), {}

  def loss(self, params: Any, state: TrainState, views: Sequence[jax.Array],
           batch: Dict[str, jax.Array], rng: jax.Array,
           axis_name: Optional[str]) -> Tuple[jax.Array, StepOutput]:
    del batch
    if len(views) != 1:
      raise ValueError(f'{self.config.method.name} uses 1 view, the config '
                       f'makes {len(views)}.')
    inputs, labels = self.pretext_inputs(rng, views[0])
    out, mutated = self.network(axis_name).apply(
        {'params': params, 'batch_stats': state.batch_stats}, inputs,
        train=True, mutable=['batch_stats'])
    loss = losses.get_loss('pretext_classification')(
        out['logits'], labels, axis_name=axis_name)
    accuracy = parallel.pmean(
        jnp.mean(jnp.argmax(out['logits'], -1) == labels), axis_name)
    return loss, StepOutput(
        batch_stats=mutated['batch_stats'], method_state=state.method_state,
        metrics={'pretext_accuracy': accuracy},
        features=self.probe_features(params, state, views[0], out['features']))


@METHODS.register('rotation')
class Rotation(_PretextClassification):
  """RotNet: which of 0/90/180/270 degrees was the view turned by?"""

  num_classes = pretext.NUM_ROTATIONS

  def pretext_inputs(self, rng, view):
    del rng
    rotated, labels = pretext.rotate_images(view)
    return rotated[:, None], labels

  def probe_features(self, params, state, view, features):
    # The unrotated copies come first (rotate_images is rotation-major).
    del params, state
    return features[:view.shape[0], 0]


@METHODS.register('jigsaw')
class Jigsaw(_PretextClassification):
  """Which permutation of the fixed set shuffled the 3x3 jittered tiles?

  Config: method.num_permutations (100; 1000 in the paper's larger set),
  method.permutation_seed, method.grid (3), method.tile_size (each tile is
  cut at a random place inside its cell of view_size / grid pixels),
  method.normalize_tiles.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               data_info: DataInfo, durations: Durations):
    super().__init__(config, data_info, durations)
    m = config.method
    # Computed once, on the host, when the method is built.
    self.permutations = jigsaw.permutation_set(
        m.num_permutations, m.grid * m.grid, m.get('permutation_seed', 0))
    self.num_classes = m.num_permutations

  def pretext_inputs(self, rng, view):
    m = self.config.method
    tiles, labels = jigsaw.jigsaw_from_set(rng, view, self.permutations,
                                           grid=m.grid, tile_size=m.tile_size)
    if m.get('normalize_tiles', True):
      tiles = standardize_each(tiles)
    return tiles, labels


@METHODS.register('relative_position')
class RelativePosition(_PretextClassification):
  """Where is the second patch relative to the first (8 neighbours)?

  Config: method.patch_size, method.gap, method.jitter (see
  `pretext.relative_position_pairs`; the labels are `NEIGHBOUR_OFFSETS`).
  """

  num_classes = pretext.NUM_NEIGHBOURS

  def pretext_inputs(self, rng, view):
    m = self.config.method
    centres, neighbours, labels = pretext.relative_position_pairs(
        rng, view, patch_size=m.patch_size, gap=m.gap, jitter=m.jitter)
    return jnp.stack([centres, neighbours], axis=1), labels
