"""DINO (Caron et al. 2021): self-distillation with no labels.

A student (backbone + DINO head) matches the sharpened, centred output of an
EMA teacher across multi-crop views. The teacher sees the global crops only;
pairs where student and teacher see the same crop are skipped. The center
(`method_state['center']`) is an EMA (momentum 0.9) of the teacher outputs of
the global batch; the teacher temperature warms up linearly from 0.04 to 0.07,
stepped once per epoch as in the official code;
the head's weight-normalised last layer can be frozen during the first epoch.

Config (configs/dino.py): method.{num_global_crops, num_prototypes,
head_hidden_dim, head_bottleneck_dim, head_layers, head_use_bn,
norm_last_layer, freeze_last_layer_epochs, student_temperature,
teacher_temperature_start, teacher_temperature, teacher_temperature_warmup_epochs,
center_momentum, ema_momentum_base}.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import losses, models, optim
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.losses.teacher_student import dino_center_update
from ssl_jax.methods import common
from ssl_jax.methods.base import METHODS, Method, StepOutput
from ssl_jax.models.layers import batch_norm


def teacher_temperature_schedule(start: float, end: float, warmup_epochs: int,
                                 epoch_steps: float):
  """DINO's teacher temperature tau_t, a function of the step.

  As the official code (facebookresearch/dino `main_dino.py`, `DINOLoss`):
  `np.concatenate((np.linspace(start, end, warmup_epochs),
  np.ones(nepochs - warmup_epochs) * end))[epoch]`, i.e. constant within an
  epoch, stepping once per epoch, `end` already in the last warm-up epoch
  (linspace includes both ends) and from then on.

  Args:
    start: tau_t in the first epoch (`warmup_teacher_temp`, 0.04).
    end: tau_t after the warm-up (`teacher_temp`).
    warmup_epochs: `warmup_teacher_temp_epochs`, a whole number of epochs.
    epoch_steps: steps in one epoch.

  Returns:
    schedule(step) -> tau_t.

  Raises:
    ValueError: a warm-up that is not a whole number of epochs.
  """
  if warmup_epochs < 0 or warmup_epochs != int(warmup_epochs):
    raise ValueError(f'config.method.teacher_temperature_warmup_epochs must be '
                     f'a whole number of epochs >= 0 (DINO steps the teacher '
                     f'temperature once per epoch), got {warmup_epochs}.')
  warmup_epochs = int(warmup_epochs)

  def schedule(step):
    epoch = jnp.floor(step / epoch_steps)
    if warmup_epochs == 0:
      return jnp.asarray(end, jnp.float32)
    # np.linspace(start, end, W)[e] = start + (end - start) * e / (W - 1).
    frac = epoch / max(warmup_epochs - 1, 1)
    warm = start + (end - start) * jnp.minimum(frac, 1.0)
    return jnp.where(epoch < warmup_epochs, warm, end).astype(jnp.float32)

  return schedule


class DINOHead(nn.Module):
  """MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

  Attributes:
    hidden_dim: width of the hidden layers (2048).
    bottleneck_dim: width before the prototypes (256).
    num_prototypes: K (65536).
    num_layers: linear layers before the prototype layer (3).
    use_bn: BN in the MLP (DINO uses it only for ResNets).
    norm_last_layer: fix the weight-norm gain g to 1 (DINO's default; more
      stable for ViT-S).
  """
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_prototypes: int = 65536
  num_layers: int = 3
  use_bn: bool = False
  norm_last_layer: bool = True
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True,
               freeze_last_layer: Any = False) -> jax.Array:
    init = nn.initializers.truncated_normal(0.02)
    for _ in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, kernel_init=init)(x)
      if self.use_bn:
        x = batch_norm(train, self.axis_name)(x)
      x = nn.gelu(x, approximate=False)
    x = nn.Dense(self.bottleneck_dim, kernel_init=init)(x)
    x = l2_normalize(x.astype(jnp.float32))
    v = self.param('prototypes', init, (self.bottleneck_dim, self.num_prototypes))
    # DINO zeroes the last layer's gradients in the first epoch; a where over a
    # stop_gradient does that inside the step, with `freeze_last_layer` traced.
    v = jnp.where(freeze_last_layer, jax.lax.stop_gradient(v), v)
    w = v * jax.lax.rsqrt(jnp.sum(v * v, axis=0, keepdims=True))
    if not self.norm_last_layer:
      g = self.param('prototype_gain', nn.initializers.ones,
                     (self.num_prototypes,))
      g = jnp.where(freeze_last_layer, jax.lax.stop_gradient(g), g)
      w = w * g
    return x @ w


class DINONetwork(nn.Module):
  """Backbone + DINO head; parameters under 'backbone' and 'head'."""
  backbone: nn.Module
  head: DINOHead

  def __call__(self, x: jax.Array, train: bool = True,
               freeze_last_layer: Any = False) -> Dict[str, jax.Array]:
    features, _ = self.backbone(x, train=train)
    return {'features': features,
            'logits': self.head(features, train=train,
                                freeze_last_layer=freeze_last_layer)}


def get_dino_network(config: ml_collections.ConfigDict,
                     axis_name: Optional[str]) -> DINONetwork:
  """The student/teacher network of a DINO config."""
  m = config.method
  head = DINOHead(hidden_dim=m.head_hidden_dim,
                  bottleneck_dim=m.head_bottleneck_dim,
                  num_prototypes=m.num_prototypes, num_layers=m.head_layers,
                  use_bn=m.head_use_bn, norm_last_layer=m.norm_last_layer,
                  axis_name=axis_name)
  return DINONetwork(models.get_backbone(config.model, axis_name), head)


def apply_by_resolution(network: nn.Module, params: Any, batch_stats: Any,
                        views: Sequence[jax.Array], **kwargs
                        ) -> Tuple[Dict[str, jax.Array], Any]:
  """Runs `network` once per group of same-sized consecutive views.

  Multi-crop mixes 224- and 96-pixel crops that cannot share one batch; DINO
  likewise runs one forward pass per resolution. Returns outputs stacked to
  [num_views, b, ...] and the BN statistics after the last group.
  """
  outs = []
  for group in common.by_resolution(views):
    x = jnp.concatenate(group, axis=0)
    out, mutated = network.apply({'params': params, 'batch_stats': batch_stats},
                                 x, train=True, mutable=['batch_stats'],
                                 **kwargs)
    batch_stats = mutated.get('batch_stats', batch_stats)
    n = len(group)
    outs.append({k: v.reshape((n, v.shape[0] // n) + v.shape[1:])
                 for k, v in out.items()})
  return common.concat_views(outs), batch_stats


@METHODS.register('dino')
class DINO(Method):
  """Student vs. EMA teacher with centering, sharpening and multi-crop."""

  def __init__(self, config, data_info, durations):
    super().__init__(config, data_info, durations)
    m = config.method
    self.ema_momentum = optim.ema_momentum_schedule(m.ema_momentum_base,
                                                    durations.total_steps)
    self.teacher_temperature = teacher_temperature_schedule(
        m.teacher_temperature_start, m.teacher_temperature,
        m.teacher_temperature_warmup_epochs, durations.steps_per_epoch)
    self.freeze_last_layer_steps = durations.of_config(m, 'freeze_last_layer')

  def init(self, rng):
    network = get_dino_network(self.config, axis_name=None)
    params, batch_stats = common.init_network(network, rng, self.sample_input())
    method_state = {
        'teacher_params': jax.tree.map(jnp.copy, params),
        'teacher_batch_stats': jax.tree.map(jnp.copy, batch_stats),
        'center': jnp.zeros((self.config.method.num_prototypes,), jnp.float32)}
    return params, batch_stats, method_state

  def loss(self, params, state, views, batch, rng, axis_name):
    del batch, rng
    m = self.config.method
    num_global = m.num_global_crops
    # Two global crops and no local ones is a valid DINO run (main_dino.py
    # with --local_crops_number 0; solo-learn's CIFAR recipe): each global
    # crop's student output against the other's teacher output.
    if len(views) < max(num_global, 2) or num_global < 1:
      raise ValueError(f'DINO needs {num_global} global crops and two crops '
                       f'at least; the config makes {len(views)}.')
    network = get_dino_network(self.config, axis_name)
    freeze = state.step < self.freeze_last_layer_steps
    student, batch_stats = apply_by_resolution(
        network, params, state.batch_stats, views, freeze_last_layer=freeze)
    ms = state.method_state
    teacher, teacher_stats = apply_by_resolution(
        network, ms['teacher_params'], ms['teacher_batch_stats'],
        views[:num_global])
    teacher_logits = jax.lax.stop_gradient(teacher['logits'])
    tau_t = self.teacher_temperature(state.step)
    loss = losses.get_loss('dino')(
        student['logits'], teacher_logits, ms['center'],
        student_temperature=m.student_temperature, teacher_temperature=tau_t,
        axis_name=axis_name)
    center = dino_center_update(ms['center'], teacher_logits,
                                momentum=m.center_momentum, axis_name=axis_name)
    method_state = dict(ms, center=center, teacher_batch_stats=teacher_stats)
    return loss, StepOutput(
        batch_stats=batch_stats, method_state=method_state,
        metrics={'ema_momentum': self.ema_momentum(state.step),
                 'teacher_temperature': tau_t},
        features=student['features'][0],
        # Backbone features, not the K-way scores: the rank monitor's SVD of a
        # [b, 65536] matrix would cost more than the step.
        embeddings=student['features'][:num_global])

  def after_update(self, params, method_state, step):
    teacher = common.ema_update(method_state['teacher_params'], params,
                                self.ema_momentum(step))
    return dict(method_state, teacher_params=teacher)
