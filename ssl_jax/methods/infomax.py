"""Mutual-information objectives: CPC on images and Deep InfoMax.

CPC (van den Oord et al. 2018; Henaff et al. 2019): the view is cut into a
grid of overlapping patches, each encoded by the backbone into a vector
z_{i,j}; a row-causal convolution over the grid gives a context c_{i,j} that
has seen rows <= i only (top to bottom); a linear map W_k of the context
predicts z_{i+k,j}, scored by InfoNCE against all other patch embeddings of
the global batch (`losses.cpc_infonce`). With 50%-overlapping patches the row
just below shares half its pixels with row i, so by default predictions start
two rows below (method.row_offsets).

Deep InfoMax, DIM(L) (Hjelm et al. 2019): the global feature of an image and
each position of one of its intermediate feature maps (the backbone's `aux`
maps, method.local_stage) should have high mutual information, estimated by
JSD or InfoNCE with other images' positions as negatives
(`losses.deep_infomax`). Critics in the paper's "encoder-and-dot" form: a
1x1-conv block on the local map and an MLP on the global vector, each with a
linear shortcut, and a dot product. The prior-matching term of the full DIM is
left out (DIM(L) with gamma = 0). With method.cross_view the global feature of
one augmented view is scored against the local map of another view of the same
image, both ways (the multi-view form of Bachman et al. 2019, AMDIM): the
positives then also carry the invariance to augmentation that a k-NN probe
rewards.

The backbone (params['backbone']) is what evaluation probes. Known
difference from Henaff et al.: the backbone's BatchNorm statistics mix the
patches of one image (they use LayerNorm for that reason); with small grids
on Fashion-MNIST it trains, but a LayerNorm backbone is the faithful choice.
"""

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import losses, models
from ssl_jax.losses import pretext
from ssl_jax.methods.base import METHODS, Method, StepOutput
from ssl_jax.train_state import TrainState


class CPCNetwork(nn.Module):
  """Patch encoder (the backbone), row-causal context network, predictors.

  Attributes:
    backbone: encodes each patch to a vector.
    context_dim: channels of the context network.
    context_layers: row-causal conv layers (each sees one more row above).
    num_predictions: K, one linear predictor per row offset.
  """
  backbone: nn.Module
  context_dim: int = 128
  context_layers: int = 2
  num_predictions: int = 2

  @nn.compact
  def __call__(self, patches: jax.Array, train: bool = True
               ) -> Dict[str, jax.Array]:
    """patches [b, rows, cols, p, p, C] -> z [b, rows, cols, D], predictions."""
    b, rows, cols = patches.shape[:3]
    z, _ = self.backbone(patches.reshape((b * rows * cols,) + patches.shape[3:]),
                         train=train)
    z = z.reshape(b, rows, cols, -1).astype(jnp.float32)
    h = z
    for i in range(self.context_layers):
      # A (2, 3) kernel padded by one row on top only: the output at row i
      # sees rows i-1 and i, never a row below, so the context is causal.
      y = nn.Conv(self.context_dim, (2, 3), padding=((1, 0), (1, 1)),
                  name=f'context{i}')(nn.relu(h) if i else h)
      h = y if i == 0 else h + y
    context = nn.relu(h)
    d = z.shape[-1]
    predictions = nn.Dense(self.num_predictions * d, name='predictors')(context)
    predictions = predictions.reshape(b, rows, cols, self.num_predictions, d)
    return {'embeddings': z,
            'predictions': jnp.moveaxis(predictions, 3, 1)}


@METHODS.register('cpc')
class CPC(Method):
  """Predict patch embeddings rows below from a row-causal context.

  Config: method.patch_size, method.patch_stride, method.row_offsets,
  method.context_dim, method.context_layers.
  """

  def network(self, axis_name: Optional[str]) -> CPCNetwork:
    m = self.config.method
    return CPCNetwork(backbone=models.get_backbone(self.config.model, axis_name),
                      context_dim=m.context_dim,
                      context_layers=m.context_layers,
                      num_predictions=len(m.row_offsets))

  def _patches(self, view: jax.Array) -> jax.Array:
    m = self.config.method
    return pretext.patch_grid(view, patch_size=m.patch_size,
                              stride=m.patch_stride)

  def init(self, rng: jax.Array) -> Tuple[Any, Any, Any]:
    m = self.config.method
    rows = pretext.grid_side(self.sample_input().shape[1], m.patch_size,
                             m.patch_stride)
    if max(m.row_offsets) >= rows:
      raise ValueError(f'config.method.row_offsets={tuple(m.row_offsets)} '
                       f'reach past the {rows} rows of the patch grid.')
    variables = self.network(None).init(
        {'params': rng}, self._patches(self.sample_input()), train=True)
    return variables['params'], variables.get('batch_stats', {}), {}

  def loss(self, params: Any, state: TrainState, views: Sequence[jax.Array],
           batch: Dict[str, jax.Array], rng: jax.Array,
           axis_name: Optional[str]) -> Tuple[jax.Array, StepOutput]:
    del batch, rng
    if len(views) != 1:
      raise ValueError(f'CPC uses 1 view, the config makes {len(views)}.')
    out, mutated = self.network(axis_name).apply(
        {'params': params, 'batch_stats': state.batch_stats},
        self._patches(views[0]), train=True, mutable=['batch_stats'])
    loss = losses.get_loss('cpc_infonce')(
        out['predictions'], out['embeddings'],
        offsets=tuple(self.config.method.row_offsets), axis_name=axis_name)
    embeddings = jnp.mean(out['embeddings'], axis=(1, 2))
    return loss, StepOutput(
        batch_stats=mutated['batch_stats'], method_state=state.method_state,
        metrics={}, features=self.whole_view_features(params, state, views[0]),
        embeddings=embeddings)


class DIMNetwork(nn.Module):
  """Backbone with DIM's local (1x1 conv) and global (MLP) critics.

  Attributes:
    backbone: the encoder; its `aux[local_stage]` map is the local feature.
    local_stage: name of the aux map (e.g. 'stage2').
    critic_dim: width of both critics' embedding.
  """
  backbone: nn.Module
  local_stage: str
  critic_dim: int = 64

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = True
               ) -> Dict[str, jax.Array]:
    features, aux = self.backbone(images, train=train)
    if self.local_stage not in aux:
      raise ValueError(f'config.method.local_stage={self.local_stage!r} is not '
                       f'a feature map of this backbone; known: '
                       f'{", ".join(sorted(aux))}.')
    local = aux[self.local_stage].astype(jnp.float32)
    if local.ndim != 4:
      raise ValueError(f'Deep InfoMax needs a spatial map [b, h, w, C] at '
                       f'{self.local_stage!r}, got shape {local.shape}.')
    e = self.critic_dim
    # Dense layers on the channel axis are 1x1 convolutions.
    local_emb = (nn.Dense(e, name='local_out')(
        nn.relu(nn.Dense(e, name='local_hidden')(local))) +
                 nn.Dense(e, name='local_shortcut')(local))
    global_emb = (nn.Dense(e, name='global_out')(
        nn.relu(nn.Dense(e, name='global_hidden')(features))) +
                  nn.Dense(e, name='global_shortcut')(features))
    return {'features': features, 'local': local_emb, 'global': global_emb}


@METHODS.register('deep_infomax')
class DeepInfoMax(Method):
  """Global-local mutual information maximisation, DIM(L).

  Config: method.estimator ('infonce' or 'jsd'), method.local_stage,
  method.critic_dim, method.cross_view (False: one view, the paper's DIM(L);
  True: two views, global of each against local of the other).
  """

  def __init__(self, config, data_info, durations):
    super().__init__(config, data_info, durations)
    if config.method.estimator not in pretext.DIM_ESTIMATORS:
      raise ValueError(f'Unknown config.method.estimator '
                       f'{config.method.estimator!r}; known: '
                       f'{", ".join(pretext.DIM_ESTIMATORS)}.')

  def network(self, axis_name: Optional[str]) -> DIMNetwork:
    m = self.config.method
    return DIMNetwork(backbone=models.get_backbone(self.config.model, axis_name),
                      local_stage=m.local_stage, critic_dim=m.critic_dim)

  def init(self, rng: jax.Array) -> Tuple[Any, Any, Any]:
    variables = self.network(None).init({'params': rng}, self.sample_input(),
                                        train=True)
    return variables['params'], variables.get('batch_stats', {}), {}

  def loss(self, params: Any, state: TrainState, views: Sequence[jax.Array],
           batch: Dict[str, jax.Array], rng: jax.Array,
           axis_name: Optional[str]) -> Tuple[jax.Array, StepOutput]:
    del batch, rng
    cross_view = self.config.method.get('cross_view', False)
    expected = 2 if cross_view else 1
    if len(views) != expected:
      raise ValueError(f'Deep InfoMax with method.cross_view={cross_view} uses '
                       f'{expected} view(s), the config makes {len(views)}: '
                       f'set the count of config.augment.views to {expected}.')
    b = views[0].shape[0]
    # Both views in one forward pass: one set of BatchNorm statistics.
    out, mutated = self.network(axis_name).apply(
        {'params': params, 'batch_stats': state.batch_stats},
        jnp.concatenate(views, axis=0), train=True, mutable=['batch_stats'])
    dim = functools.partial(losses.get_loss('deep_infomax'),
                            estimator=self.config.method.estimator,
                            axis_name=axis_name)
    if cross_view:
      g, l = out['global'], out['local']
      loss = 0.5 * (dim(g[:b], l[b:]) + dim(g[b:], l[:b]))
    else:
      loss = dim(out['global'], out['local'])
    return loss, StepOutput(batch_stats=mutated['batch_stats'],
                            method_state=state.method_state, metrics={},
                            features=out['features'][:b],
                            embeddings=out['global'][:b])
