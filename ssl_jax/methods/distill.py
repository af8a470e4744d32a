"""Knowledge distillation (Hinton et al. 2015) from a trained run's encoder.

The teacher is the backbone of any run's checkpoint (`method.teacher_workdir`,
loaded with `ssl_jax.evaluation.features.load_run`) or of a weights file
(`method.teacher_init_from`: a torchvision/timm state_dict or an ssl_jax
export, as `model.init_from`; architecture `method.teacher_backbone`), frozen
and run in eval mode on the student's view. Two signals, mixed by weights:

  * logits: with `method.teacher_head`, a linear classifier is fitted to the
    teacher's features of labelled training images once, before training; the
    student's own classifier then matches the temperature-softened teacher
    logits (KL * T^2), optionally mixed with cross entropy on the labels;
  * features: a learned linear projection of the student's features regresses
    the teacher's features (cosine or MSE), which needs no labels.

Self-distillation is the same with `config.model` equal to the teacher's. The
teacher's variables (and head) live in `method_state`, constant during training.
"""

import functools
import json
import logging
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import interop, losses, models, parallel
from ssl_jax.methods import common
from ssl_jax.methods.base import METHODS, Method, StepOutput


class DistillStudent(nn.Module):
  """Backbone + classifier ('classifier') + projection to the teacher width."""
  backbone: nn.Module
  num_classes: int
  teacher_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> Dict[str, jax.Array]:
    features, _ = self.backbone(x, train=train)
    out = {'features': features,
           'projection': nn.Dense(self.teacher_dim, name='projection')(features)}
    if self.num_classes > 0:
      out['logits'] = nn.Dense(self.num_classes, name='classifier')(features)
    return out


def fit_linear_head(features: np.ndarray, labels: np.ndarray, num_classes: int,
                    *, steps: int = 300, lr: float = 1e-2,
                    weight_decay: float = 1e-4) -> Dict[str, np.ndarray]:
  """A multinomial logistic regression on frozen features (full-batch Adam).

  The features are standardised with their own mean and std, and the
  standardisation is folded into the returned kernel and bias, so that
  `features @ kernel + bias` are the logits of raw features.

  Args:
    features: [n, D] teacher features.
    labels: [n] integer labels.
    num_classes: C.
    steps, lr, weight_decay: the optimisation (AdamW, cosine decay).

  Returns:
    {'kernel': [D, C], 'bias': [C]} float32 NumPy arrays.
  """
  mean = features.mean(0)
  std = features.std(0) + 1e-6
  x = jnp.asarray((features - mean) / std, jnp.float32)
  y = jnp.asarray(labels)
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps),
                   weight_decay=weight_decay)
  params = {'w': jnp.zeros((x.shape[1], num_classes)),
            'b': jnp.zeros((num_classes,))}

  def loss_fn(p):
    logits = x @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, _):
    p, s = carry
    g = jax.grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None,
                                length=steps)
  w = np.asarray(params['w']) / std[:, None]
  b = np.asarray(params['b']) - (mean / std) @ np.asarray(params['w'])
  return {'kernel': w.astype(np.float32), 'bias': b.astype(np.float32)}


def teacher_from_file(config: ml_collections.ConfigDict
                      ) -> ml_collections.ConfigDict:
  """The run config of a teacher given as weights (`method.teacher_init_from`).

  Its backbone is `method.teacher_backbone` (default: the student's), built
  from the student's `config.model` fields (stem, padding, patch size, ...)
  and loaded from the file; it sees the student's data and views.
  """
  teacher = ml_collections.ConfigDict(config.to_dict())
  teacher.model.backbone = config.method.get('teacher_backbone') or config.model.backbone
  teacher.model.init_from = config.method.teacher_init_from
  return teacher


def _teacher_run(workdir: str, teacher_json: str):
  """(config, backbone variables) of a trained run or of a weights file."""
  from ssl_jax.evaluation import features as feats  # pylint: disable=g-import-not-at-top
  if not teacher_json:
    config, _, state = feats.load_run(workdir)
    return config, jax.device_get(feats.backbone_variables(state))
  config = ml_collections.ConfigDict(json.loads(teacher_json))
  backbone = models.get_backbone(config.model)
  size = feats.view_size(config)
  template = jax.eval_shape(lambda: backbone.init(
      jax.random.key(0), jnp.zeros((1, size, size, config.data.channels)),
      train=False))
  return config, interop.load_backbone_variables(config.model, template)


@functools.lru_cache(maxsize=4)
def load_teacher(workdir: str, head: bool, head_examples: int,
                 teacher_json: str = ''
                 ) -> Tuple[Any, Dict[str, Any], Optional[Dict[str, Any]], int]:
  """The frozen teacher: (model config, variables, head, dim).

  Args:
    workdir: a trained run's --workdir, or '' with `teacher_json`.
    head, head_examples: fit a linear head on this many labelled features.
    teacher_json: the JSON of `teacher_from_file(config)`, for a teacher
      given as weights.

  Cached, because the method is built again by evaluation and by tests.
  """
  from ssl_jax import data  # pylint: disable=g-import-not-at-top
  from ssl_jax.evaluation import features as feats  # pylint: disable=g-import-not-at-top
  config, variables = _teacher_run(workdir, teacher_json)
  size = feats.view_size(config)
  source = data.get_source(config.data, config.data.train_split, head_examples)
  feature_fn = feats.make_feature_fn(config.model, size, source.mean,
                                     source.std)
  n_dev = parallel.default_mesh().size
  x, y = feats.extract(feature_fn, variables, source, 32 * n_dev)
  linear = None
  if head:
    if source.num_classes <= 0:
      raise ValueError(f'method.teacher_head needs labels; {source.name} has '
                       f'none. Set method.teacher_head=False.')
    linear = fit_linear_head(x, y, source.num_classes)
    acc = np.mean(np.argmax(x @ linear['kernel'] + linear['bias'], -1) == y)
    logging.info('Teacher head: %.1f%% train accuracy on %d examples.',
                 100 * acc, len(y))
  return config.model, variables, linear, x.shape[1]


@METHODS.register('distill')
class Distill(Method):
  """A student trained on a frozen teacher's logits and/or features."""

  def __init__(self, config, data_info, durations):
    super().__init__(config, data_info, durations)
    m = config.method
    if bool(m.get('teacher_workdir')) == bool(m.get('teacher_init_from')):
      raise ValueError('Set one of config.method.teacher_workdir (the --workdir '
                       'of a trained run) and config.method.teacher_init_from '
                       '(a torchvision/timm state_dict or ssl_jax export).')
    teacher_json = (teacher_from_file(config).to_json_best_effort()
                    if m.get('teacher_init_from') else '')
    self.teacher_model, self.teacher_variables, self.teacher_head, self.teacher_dim = (
        load_teacher(m.get('teacher_workdir', ''), bool(m.teacher_head),
                     int(m.get('teacher_head_examples', 0)), teacher_json))
    uses_logits = m.kd_weight > 0 or m.label_weight > 0
    if m.kd_weight > 0 and self.teacher_head is None:
      raise ValueError('method.kd_weight > 0 needs method.teacher_head=True '
                       '(logits to distil).')
    self.num_classes = data_info.num_classes if uses_logits else 0

  def _student(self, axis_name):
    return DistillStudent(models.get_backbone(self.config.model, axis_name),
                          self.num_classes, self.teacher_dim)

  def init(self, rng):
    params, batch_stats = common.init_network(self._student(None), rng,
                                              self.sample_input())
    method_state = {'teacher': self.teacher_variables}
    if self.teacher_head is not None:
      method_state['teacher_head'] = self.teacher_head
    return params, batch_stats, method_state

  def loss(self, params, state, views, batch, rng, axis_name):
    del rng
    m = self.config.method
    x = views[0]
    out, mutated = self._student(axis_name).apply(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        mutable=['batch_stats'])
    ms = state.method_state
    teacher = models.get_backbone(self.teacher_model, None)
    teacher_features = jax.lax.stop_gradient(
        teacher.apply(ms['teacher'], x, train=False)[0])
    loss, metrics = 0.0, {}
    if m.feature_weight > 0:
      feature_loss = losses.get_loss('feature_distillation')(
          out['projection'], teacher_features, kind=m.feature_loss,
          axis_name=axis_name)
      loss = loss + m.feature_weight * feature_loss
      metrics['feature_loss'] = feature_loss
    if m.kd_weight > 0:
      head = ms['teacher_head']
      teacher_logits = teacher_features @ head['kernel'] + head['bias']
      kd = losses.get_loss('kd')(out['logits'], teacher_logits,
                                 temperature=m.temperature, axis_name=axis_name)
      loss = loss + m.kd_weight * kd
      metrics['kd_loss'] = kd
      metrics['teacher_train_acc'] = parallel.pmean(
          jnp.mean(jnp.argmax(teacher_logits, -1) == batch['label']), axis_name)
    if m.label_weight > 0:
      ce = parallel.pmean(optax.softmax_cross_entropy_with_integer_labels(
          out['logits'], batch['label']).mean(), axis_name)
      loss = loss + m.label_weight * ce
      metrics['label_loss'] = ce
    return loss, StepOutput(batch_stats=mutated['batch_stats'],
                            method_state=ms, metrics=metrics,
                            features=out['features'],
                            embeddings=out['projection'])
