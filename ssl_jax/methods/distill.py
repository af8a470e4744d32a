"""Knowledge distillation (Hinton et al. 2015) from a trained run's encoder.

The teacher is the backbone of any run's checkpoint (`method.teacher_workdir`,
read through `Method.bind_inputs`, i.e. `experiment.load_backbone`) or of a weights file
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
teacher (variables and head) is a read-only input of the run, loaded once
before `init`; the student's checkpoints record its path and SHA-256, and a
resume with another teacher stops with a message.
"""

import dataclasses
import hashlib
import logging
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import data, features, interop, linear_probe, losses, models, parallel
from ssl_jax.methods import common
from ssl_jax.methods.base import METHODS, BackboneLoader, Method, StepOutput


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


def weights_sha256(variables: Any) -> str:
  """SHA-256 of a pytree of arrays: paths, dtypes, shapes and bytes, in order."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(variables))
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The frozen teacher, a read-only input of the run.

  Attributes:
    model: its `config.model`.
    variables: its backbone's {'params', 'batch_stats'} (host arrays).
    head: {'kernel', 'bias'} of a linear classifier on its features, or None.
    dim: its feature width.
    path: the run's workdir or the weights file it was read from.
    sha256: `weights_sha256(variables)`, recorded in the student's checkpoints.
  """
  model: ml_collections.ConfigDict
  variables: Dict[str, Any]
  head: Optional[Dict[str, np.ndarray]]
  dim: int
  path: str
  sha256: str


def _teacher_run(config: ml_collections.ConfigDict,
                 load_backbone: BackboneLoader):
  """(config, backbone variables) of a trained run or of a weights file."""
  m = config.method
  if m.get('teacher_workdir'):
    return load_backbone(m.teacher_workdir)
  teacher = teacher_from_file(config)
  backbone = models.get_backbone(teacher.model)
  size = features.view_size(teacher)
  template = jax.eval_shape(lambda: backbone.init(
      jax.random.key(0), jnp.zeros((1, size, size, teacher.data.channels)),
      train=False))
  return teacher, interop.load_backbone_variables(teacher.model, template)


def load_teacher(config: ml_collections.ConfigDict,
                 load_backbone: BackboneLoader) -> Teacher:
  """Reads the teacher named by `config.method` and fits its head.

  Args:
    config: the student's run config (`method.teacher_workdir` or
      `method.teacher_init_from`, `teacher_head`, `teacher_head_examples`).
    load_backbone: reads a trained run's backbone (`Method.bind_inputs`).
  """
  m = config.method
  teacher_config, variables = _teacher_run(config, load_backbone)
  source = data.get_source(teacher_config.data, teacher_config.data.train_split,
                           int(m.get('teacher_head_examples', 0)))
  feature_fn = features.make_feature_fn(
      teacher_config.model, features.view_size(teacher_config), source.mean,
      source.std)
  n_dev = parallel.default_mesh().size
  x, y = features.extract(feature_fn, variables, source, 32 * n_dev)
  head = None
  if m.teacher_head:
    if source.num_classes <= 0:
      raise ValueError(f'method.teacher_head needs labels; {source.name} has '
                       f'none. Set method.teacher_head=False.')
    # Full-batch AdamW, 300 cosine-decayed steps.
    head = linear_probe.fit(x, y, source.num_classes, epochs=300,
                            batch_size=len(x), lr=1e-2, weight_decay=1e-4)
    acc = np.mean(np.argmax(linear_probe.logits(head, x), -1) == y)
    logging.info('Teacher head: %.1f%% train accuracy on %d examples.',
                 100 * acc, len(y))
  return Teacher(teacher_config.model, variables, head, x.shape[1],
                 m.get('teacher_workdir') or m.teacher_init_from,
                 weights_sha256(variables))


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
    uses_logits = m.kd_weight > 0 or m.label_weight > 0
    if m.kd_weight > 0 and not m.teacher_head:
      raise ValueError('method.kd_weight > 0 needs method.teacher_head=True '
                       '(logits to distil).')
    self.num_classes = data_info.num_classes if uses_logits else 0
    self.teacher: Optional[Teacher] = None

  def bind_inputs(self, load_backbone):
    self.teacher = load_teacher(self.config, load_backbone)

  def inputs_record(self):
    return {'teacher_path': self.teacher.path,
            'teacher_sha256': self.teacher.sha256}

  def check_inputs_record(self, record):
    if record.get('teacher_sha256', self.teacher.sha256) != self.teacher.sha256:
      raise ValueError(
          f'The teacher at {self.teacher.path} (sha256 {self.teacher.sha256[:12]}) '
          f'is not the one this run was trained with '
          f'({record.get("teacher_path")}, sha256 {record["teacher_sha256"][:12]}): '
          f'restore that teacher, or start a new --workdir.')

  def _student(self, axis_name):
    if self.teacher is None:
      raise ValueError('The distillation teacher is not loaded: call '
                       'method.bind_inputs(experiment.load_backbone) before '
                       'init (experiment.setup does).')
    return DistillStudent(models.get_backbone(self.config.model, axis_name),
                          self.num_classes, self.teacher.dim)

  def init(self, rng):
    params, batch_stats = common.init_network(self._student(None), rng,
                                              self.sample_input())
    # The teacher is not state: it is read once per run (`bind_inputs`), and
    # checkpoints record its path and hash rather than its weights.
    return params, batch_stats, {}

  def loss(self, params, state, views, batch, rng, axis_name):
    del rng
    m = self.config.method
    x = views[0]
    out, mutated = self._student(axis_name).apply(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        mutable=['batch_stats'])
    ms = state.method_state
    teacher = models.get_backbone(self.teacher.model, None)
    teacher_features = jax.lax.stop_gradient(
        teacher.apply(self.teacher.variables, x, train=False)[0])
    loss, metrics = 0.0, {}
    if m.feature_weight > 0:
      feature_loss = losses.get_loss('feature_distillation')(
          out['projection'], teacher_features, kind=m.feature_loss,
          axis_name=axis_name)
      loss = loss + m.feature_weight * feature_loss
      metrics['feature_loss'] = feature_loss
    if m.kd_weight > 0:
      teacher_logits = linear_probe.logits(self.teacher.head, teacher_features)
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
