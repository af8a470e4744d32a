"""Evaluation during pretraining: the `periodic` evaluator (evaluation/registry.py).

The online probe trained inside the train step reports its accuracy on the
training batch it just fitted, which says little about generalisation. Here,
on its schedule (`config.evals.<name>.every_steps`, or the older
`config.training.eval_every`), the current backbone (eval-mode BatchNorm) embeds a
fixed subset of the evaluation split and of the training split
(`config.eval.periodic_test_examples`, `config.eval.periodic_train_examples`),
and two numbers are logged to metrics.jsonl:

- `eval_online_probe_acc`: the online probe's top-1 on the eval subset;
- `eval_knn_acc`: weighted k-NN top-1 (k = config.eval.knn_k[0],
  T = config.eval.knn_temperature) with the training subset as the bank.

The subsets and the compiled feature function are built once, so an
evaluation costs one forward pass over the subsets plus the k-NN.
"""

from typing import Any, Dict

import ml_collections
import numpy as np

from ssl_jax import data, linear_probe, parallel
from ssl_jax import features as feats
from ssl_jax.evaluation import knn
from ssl_jax.evaluation.registry import register


@register('periodic')
class PeriodicEvaluator:
  """Online-probe and k-NN accuracy of a replicated train state.

  Args:
    config: the run config (`data`, `model`, `augment`, `eval`, `training`).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.train_source = data.get_source(
        config.data, config.data.train_split,
        config.eval.get('periodic_train_examples', 5000))
    self.test_source = data.get_source(
        config.data, config.data.eval_split,
        config.eval.get('periodic_test_examples', 1000))
    self.feature_fn = feats.make_feature_fn(
        config.model, feats.view_size(config), self.train_source.mean,
        self.train_source.std)
    self.batch_size = config.eval.get('batch_size', 512)
    # k-NN and the probe need labels; without them there is nothing to score.
    self.enabled = self.train_source.num_classes > 0

  def __call__(self, state: Any) -> Dict[str, float]:
    """Evaluates a train state (every process must call this).

    Args:
      state: TrainState of host arrays or of global arrays on the mesh
        (the training loop's, used where it is: no host copy); only its
        `params`, `batch_stats` and `probe` are read.

    Returns:
      {'eval_knn_acc', and 'eval_online_probe_acc' when the run has a probe},
      accuracies in [0, 1] like the train step's `online_probe_acc`.
    """
    variables = feats.backbone_variables(state)
    train_x, train_y = feats.extract(self.feature_fn, variables,
                                     self.train_source, self.batch_size)
    test_x, test_y = feats.extract(self.feature_fn, variables,
                                   self.test_source, self.batch_size)
    n_cls = self.train_source.num_classes
    k = tuple(self.config.eval.knn_k)[0]
    result = knn.knn_accuracy(
        train_x, train_y, test_x, test_y, ks=(k,),
        temperature=self.config.eval.knn_temperature, num_classes=n_cls)
    metrics = {'eval_knn_acc': result['top1'] / 100}
    if state.probe:
      logits = np.asarray(linear_probe.logits(parallel.to_host(state.probe['params']),
                                       test_x))
      metrics['eval_online_probe_acc'] = float(np.mean(logits.argmax(-1) == test_y))
    return metrics
