"""Linear evaluation on frozen, precomputed features.

The fast path of the standard protocol: features are computed once, then a
multinomial logistic regression (`ssl_jax.linear_probe`, the probe every
protocol shares) is trained on them, standardised with the training set's
mean and std, with AdamW and a cosine schedule, full passes over shuffled
minibatches. Reports top-1 and top-5 on the test features.
"""

from typing import Dict

import numpy as np

from ssl_jax import linear_probe


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray,
                       test_x: np.ndarray, test_y: np.ndarray, *,
                       num_classes: int, epochs: int = 100,
                       batch_size: int = 1024, lr: float = 1e-2,
                       weight_decay: float = 1e-4, seed: int = 0
                       ) -> Dict[str, float]:
  """Trains a linear classifier on features; returns its test accuracy.

  Args:
    train_x, train_y: training features [n, d] and integer labels [n].
    test_x, test_y: test features and labels.
    num_classes: number of classes.
    epochs: passes over the training features.
    batch_size: minibatch size (clipped to n).
    lr: AdamW's peak learning rate (cosine-decayed to 0).
    weight_decay: AdamW's decoupled weight decay.
    seed: shuffling seed.

  Returns:
    {'top1', 'top5'} in percent.
  """
  head = linear_probe.fit(train_x, train_y, num_classes, epochs=epochs,
                          batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, seed=seed)
  scores = np.asarray(linear_probe.logits(head, test_x.astype(np.float32)))
  return linear_probe.top1_top5(scores, np.asarray(test_y))
