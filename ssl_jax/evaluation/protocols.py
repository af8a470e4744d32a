"""The `linear`, `knn` and `finetune` evaluators (evaluation/registry.py).

  linear    a linear classifier on the frozen backbone; `config.eval.linear_mode`
            'features' (logistic regression on precomputed features) or
            'augmented' (random crop + flip through the frozen backbone, SGD or
            LARS, cosine schedule: the standard protocol);
  knn       weighted k-NN (k = config.eval.knn_k, T = config.eval.knn_temperature)
            with the training features as a bank sharded over the devices;
  finetune  the whole network with a new linear head, the backbone at a lower
            learning rate.

Each scores a train state: `evaluator(state) -> {'top1', 'top5', ...}` in
percent; those on precomputed features also score raw pixels
(`raw_pixels()`), a baseline no encoder should lose to.
"""

from typing import Any, Dict, Optional, Tuple

import abc
import ml_collections
import numpy as np

from ssl_jax import features as feats
from ssl_jax.evaluation import knn, linear, supervised
from ssl_jax.evaluation.registry import register

LINEAR_MODES = ('features', 'augmented')
Split = Tuple[np.ndarray, np.ndarray]


class _Protocol:
  """Evaluation sources (`config.eval` subsets) shared by every protocol."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.train_source, self.test_source = feats.eval_sources(config)
    self.num_classes = self.train_source.num_classes
    self.enabled = self.num_classes > 0


class _OnFeatures(_Protocol, abc.ABC):
  """A protocol on features precomputed once per state."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.feature_fn = feats.make_feature_fn(
        config.model, feats.view_size(config), self.train_source.mean,
        self.train_source.std)

  @abc.abstractmethod
  def score(self, train: Split, test: Split) -> Dict[str, float]:
    """top-1/top-5 of this protocol on (features, labels) splits."""

  def __call__(self, state: Any) -> Dict[str, float]:
    variables = feats.backbone_variables(state)
    bs = self.config.eval.batch_size
    return self.score(
        feats.extract(self.feature_fn, variables, self.train_source, bs),
        feats.extract(self.feature_fn, variables, self.test_source, bs))

  def raw_pixels(self) -> Optional[Dict[str, float]]:
    return self.score(feats.raw_pixels(self.train_source),
                      feats.raw_pixels(self.test_source))


class _OnTheFly(_Protocol):
  """A protocol that runs images through the backbone while training a head."""
  mode = ''
  prefix = ''

  def __call__(self, state: Any) -> Dict[str, float]:
    e, config = self.config.eval, self.config
    batch_size = e[f'{self.prefix}_batch_size']
    return supervised.train_classifier(
        config.model, feats.backbone_variables(state), self.train_source,
        self.test_source, mode=self.mode, size=feats.view_size(config),
        epochs=e[f'{self.prefix}_epochs'], batch_size=batch_size,
        # Learning rates are given per 256 examples (SimCLR's lr x B/256).
        lr=e[f'{self.prefix}_lr'] * min(batch_size, len(self.train_source)) / 256,
        optimizer=e[f'{self.prefix}_optimizer'],
        weight_decay=e[f'{self.prefix}_weight_decay'],
        backbone_lr_mult=e.get('finetune_backbone_lr_mult', 0.1),
        crop_scale=tuple(e.get('linear_aug_crop_scale', (0.08, 1.0))),
        eval_batch_size=e.batch_size, seed=config.seed)

  def raw_pixels(self) -> Optional[Dict[str, float]]:
    return None


class _LinearOnFeatures(_OnFeatures):

  def score(self, train, test):
    e = self.config.eval
    return linear.train_linear_probe(
        *train, *test, num_classes=self.num_classes, epochs=e.linear_epochs,
        batch_size=e.linear_batch_size, lr=e.linear_lr,
        weight_decay=e.linear_weight_decay, seed=self.config.seed)


class _LinearAugmented(_OnTheFly):
  mode, prefix = 'linear', 'linear_aug'


@register('linear')
def linear_evaluator(config: ml_collections.ConfigDict) -> _Protocol:
  """The linear probe in `config.eval.linear_mode`."""
  mode = config.eval.linear_mode
  if mode not in LINEAR_MODES:
    raise ValueError(f'Unknown config.eval.linear_mode {mode!r}; known: '
                     f'{", ".join(LINEAR_MODES)}.')
  return (_LinearAugmented if mode == 'augmented' else _LinearOnFeatures)(config)


@register('knn')
class KNN(_OnFeatures):

  def score(self, train, test):
    return knn.knn_accuracy(*train, *test, ks=tuple(self.config.eval.knn_k),
                            temperature=self.config.eval.knn_temperature,
                            num_classes=self.num_classes)


@register('finetune')
class Finetune(_OnTheFly):
  mode, prefix = 'finetune', 'finetune'
