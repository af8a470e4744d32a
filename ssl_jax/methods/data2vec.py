"""data2vec for images (Baevski et al. 2022): regress an EMA teacher's layers.

The student ViT sees the image with blocks of patches (BEiT's block-wise
masking, or a uniform subset) replaced by a learned mask token; the teacher
(an EMA of the student backbone, in `method_state`) sees the whole image; the
student's regression head predicts, at the masked positions, the average of
the teacher's top-K block outputs, each layer-normalised, the average
layer-normalised again. Loss: smooth L1 (beta) or L2 on masked positions.

Config (configs/data2vec.py): method.{mask_ratio, mask_type ('block' or
'random'), min_mask_patches_per_block, max_mask_patches_per_block, top_k,
target_norm, post_target_norm, loss_type, loss_beta, ema_momentum_base,
ema_momentum_final}.
"""

from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax import losses, models, optim
from ssl_jax.losses.teacher_student import data2vec_targets
from ssl_jax.methods.base import METHODS, Method, StepOutput
from ssl_jax.models.vit import ViT, block_patch_mask, random_patch_mask


def _block_outputs(aux: Dict[str, jax.Array]):
  blocks = sorted((k for k in aux if k.startswith('block')),
                  key=lambda k: int(k[len('block'):]))
  return [aux[k] for k in blocks]


@METHODS.register('data2vec')
class Data2Vec(Method):
  """Masked student ViT regresses the EMA teacher's averaged top-K blocks."""

  def __init__(self, config, data_info, durations):
    super().__init__(config, data_info, durations)
    m = config.method
    self.ema_momentum = optim.ema_momentum_schedule(
        m.ema_momentum_base, durations.total_steps, m.get('ema_momentum_final', 1.0))

  def _backbone(self, axis_name=None) -> ViT:
    backbone = models.get_backbone(self.config.model, axis_name)
    if not isinstance(backbone, ViT):
      raise ValueError(f'data2vec masks patch tokens and needs a ViT backbone, '
                       f'not {self.config.model.backbone!r}.')
    return backbone

  def _num_masked(self, image_size: int) -> Tuple[int, int]:
    backbone = self._backbone()
    n = backbone.patch_grid(image_size) ** 2
    return n, int(round(self.config.method.mask_ratio * n))

  def init(self, rng):
    backbone = self._backbone()
    b_rng, h_rng = jax.random.split(rng)
    params = {'backbone': backbone.init({'params': b_rng}, self.sample_input(),
                                        train=True)['params']}
    params['head'] = nn.Dense(backbone.width).init(
        h_rng, jnp.zeros((1, backbone.width)))['params']
    method_state = {'teacher_params': jax.tree.map(jnp.copy,
                                                   params['backbone'])}
    return params, {}, method_state

  def loss(self, params, state, views, batch, rng, axis_name):
    del batch
    m = self.config.method
    if len(views) != 1:
      raise ValueError(f'data2vec uses 1 view, the config makes {len(views)}.')
    x = views[0]
    backbone = self._backbone(axis_name)
    n, num_masked = self._num_masked(x.shape[1])
    mask_type = m.get('mask_type', 'random')
    if mask_type == 'block':
      mask = block_patch_mask(
          rng, x.shape[0], backbone.patch_grid(x.shape[1]), num_masked,
          min_block=m.get('min_mask_patches_per_block', 16),
          max_block=m.get('max_mask_patches_per_block') or None)
    elif mask_type == 'random':
      mask = random_patch_mask(rng, x.shape[0], n, num_masked)
    else:
      raise ValueError(f"Unknown method.mask_type {mask_type!r}; known: "
                       f"block, random.")
    features, aux = backbone.apply({'params': params['backbone']}, x,
                                   train=True, mask=mask)
    predictions = nn.Dense(backbone.width).apply({'params': params['head']},
                                                 aux['patch_tokens'])
    _, teacher_aux = backbone.apply(
        {'params': state.method_state['teacher_params']}, x, train=True)
    targets = data2vec_targets(_block_outputs(teacher_aux), top_k=m.top_k,
                               norm=m.target_norm,
                               post_norm=m.get('post_target_norm', 'none'))
    loss = losses.get_loss('data2vec')(predictions, targets, mask,
                                       loss_type=m.loss_type, beta=m.loss_beta,
                                       axis_name=axis_name)
    return loss, StepOutput(
        batch_stats={}, method_state=state.method_state,
        metrics={'ema_momentum': self.ema_momentum(state.step)},
        features=features, embeddings=features)

  def after_update(self, params, method_state, step):
    momentum = self.ema_momentum(step)
    teacher = jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o,
                           method_state['teacher_params'], params['backbone'])
    return dict(method_state, teacher_params=teacher)
