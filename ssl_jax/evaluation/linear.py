"""Linear evaluation on frozen, precomputed features.

The fast path of the standard protocol: features are computed once, then a
multinomial logistic regression is trained on them (standardised with the
training set's mean and std) with AdamW and a cosine schedule, full passes
over shuffled minibatches. Reports top-1 and top-5 on the test features.
"""

import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _optimizer(lr: float, total_steps: int,
               weight_decay: float) -> optax.GradientTransformation:
  return optax.adamw(optax.cosine_decay_schedule(lr, total_steps),
                     weight_decay=weight_decay)


def _loss(params, x, y):
  logits = x @ params['w'] + params['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# Module level with the hyperparameters static, so that evaluating several
# checkpoints (or the trained and the random-init encoder) of one run compiles
# the epoch once.
@functools.partial(jax.jit, static_argnames=('batch_size', 'lr', 'total_steps',
                                             'weight_decay'))
def _epoch(carry: Any, key: jax.Array, train_x: jax.Array, train_y: jax.Array,
           *, batch_size: int, lr: float, total_steps: int,
           weight_decay: float) -> Any:
  tx = _optimizer(lr, total_steps, weight_decay)
  n = train_x.shape[0]
  steps = n // batch_size
  perm = jax.random.permutation(key, n)[:steps * batch_size]

  def step(carry, idx):
    params, opt_state = carry
    grads = jax.grad(_loss)(params, train_x[idx], train_y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  return jax.lax.scan(step, carry, perm.reshape(steps, batch_size))[0]


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
  mean = train_x.mean(0, keepdims=True)
  std = train_x.std(0, keepdims=True) + 1e-6
  train_x = jnp.asarray((train_x - mean) / std, jnp.float32)
  test_x = jnp.asarray((test_x - mean) / std, jnp.float32)
  train_y, test_y = jnp.asarray(train_y), jnp.asarray(test_y)
  n, d = train_x.shape
  batch_size = min(batch_size, n)
  total = epochs * (n // batch_size)
  params = {'w': jnp.zeros((d, num_classes)), 'b': jnp.zeros((num_classes,))}
  carry = (params, _optimizer(lr, total, weight_decay).init(params))
  for key in jax.random.split(jax.random.key(seed), epochs):
    carry = _epoch(carry, key, train_x, train_y, batch_size=batch_size,
                   lr=float(lr), total_steps=total,
                   weight_decay=float(weight_decay))
  params = carry[0]
  logits = test_x @ params['w'] + params['b']
  top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
  return {'top1': float(100 * jnp.mean(top5[:, 0] == test_y)),
          'top5': float(100 * jnp.mean(jnp.any(top5 == test_y[:, None], -1)))}
