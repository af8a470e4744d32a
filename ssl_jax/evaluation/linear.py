"""Linear evaluation on frozen, precomputed features.

The fast path of the standard protocol: features are computed once, then a
multinomial logistic regression is trained on them (standardised with the
training set's mean and std) with AdamW and a cosine schedule, full passes
over shuffled minibatches. Reports top-1 and top-5 on the test features.
"""

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray,
                       test_x: np.ndarray, test_y: np.ndarray, *,
                       num_classes: int, epochs: int = 100,
                       batch_size: int = 1024, lr: float = 1e-2,
                       weight_decay: float = 1e-4, seed: int = 0
                       ) -> Dict[str, float]:
  """Trains a linear classifier and returns {'top1', 'top5'} in percent."""
  mean = train_x.mean(0, keepdims=True)
  std = train_x.std(0, keepdims=True) + 1e-6
  train_x = jnp.asarray((train_x - mean) / std, jnp.float32)
  test_x = jnp.asarray((test_x - mean) / std, jnp.float32)
  train_y, test_y = jnp.asarray(train_y), jnp.asarray(test_y)
  n, d = train_x.shape
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  total = epochs * steps_per_epoch
  tx = optax.adamw(optax.cosine_decay_schedule(lr, total),
                   weight_decay=weight_decay)
  params = {'w': jnp.zeros((d, num_classes)), 'b': jnp.zeros((num_classes,))}
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    logits = x @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def epoch(carry, key):
    params, opt_state = carry
    perm = jax.random.permutation(key, n)[:steps_per_epoch * batch_size]
    perm = perm.reshape(steps_per_epoch, batch_size)

    def step(carry, idx):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, train_x[idx], train_y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    return jax.lax.scan(step, (params, opt_state), perm)[0]

  keys = jax.random.split(jax.random.PRNGKey(seed), epochs)
  carry = (params, opt_state)
  for key in keys:
    carry = epoch(carry, key)
  params = carry[0]
  logits = test_x @ params['w'] + params['b']
  top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
  return {'top1': float(100 * jnp.mean(top5[:, 0] == test_y)),
          'top5': float(100 * jnp.mean(jnp.any(top5 == test_y[:, None], -1)))}
