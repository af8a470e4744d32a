"""The one linear probe: a softmax classifier on frozen features.

Serves the online probe of the train step (one step per batch, inside the
step), the offline probe of `evaluation` (epochs over precomputed features),
distillation's teacher head (full-batch passes) and the linear head of
`evaluation.supervised` (its `head_*` functions), so all four fit the same
model with the same loss.
"""

import functools
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax import parallel

Params = Dict[str, jax.Array]


def init_params(feature_dim: int, num_classes: int) -> Params:
  """Zero kernel [D, C] and bias [C] (a zero head starts at chance, no seed)."""
  return {'kernel': jnp.zeros((feature_dim, num_classes), jnp.float32),
          'bias': jnp.zeros((num_classes,), jnp.float32)}


def logits(params: Params, features: jax.Array) -> jax.Array:
  return features @ params['kernel'] + params['bias']


def loss(params: Params, features: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits(params, features), labels).mean()


def step(params: Params, opt_state: Any, features: jax.Array,
         labels: jax.Array, tx: optax.GradientTransformation,
         axis_name: Optional[str] = None
         ) -> Tuple[Params, Any, jax.Array, jax.Array]:
  """One update on this device's (features, labels); gradients averaged.

  Returns:
    (params, opt_state, loss, accuracy), loss and accuracy over devices.
  """
  features = jax.lax.stop_gradient(features)

  def loss_fn(p):
    out = logits(p, features)
    value = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
    return parallel.pmean(value, axis_name), out

  (value, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  grads = parallel.mean_gradients(grads, axis_name)
  updates, opt_state = tx.update(grads, opt_state, params)
  accuracy = parallel.pmean(jnp.mean(jnp.argmax(out, -1) == labels), axis_name)
  return optax.apply_updates(params, updates), opt_state, value, accuracy


# -- the online probe (inside the train step) --------------------------------


def online_optimizer() -> optax.GradientTransformation:
  return optax.adam(1e-3)


def init_probe(feature_dim: int, num_classes: int) -> Dict[str, Any]:
  """The online probe's state in the TrainState ({} without labels)."""
  if num_classes <= 0:
    return {}
  params = init_params(feature_dim, num_classes)
  return {'params': params, 'opt_state': online_optimizer().init(params)}


def online_step(probe: Dict[str, Any], features: jax.Array, labels: jax.Array,
                axis_name: Optional[str]) -> Tuple[Dict[str, Any], Dict[str, jax.Array]]:
  params, opt_state, value, accuracy = step(
      probe['params'], probe['opt_state'], features, labels,
      online_optimizer(), axis_name)
  return ({'params': params, 'opt_state': opt_state},
          {'online_probe_loss': value, 'online_probe_acc': accuracy})


# -- the offline probe (on precomputed features) -----------------------------


def _optimizer(lr: float, total_steps: int,
               weight_decay: float) -> optax.GradientTransformation:
  return optax.adamw(optax.cosine_decay_schedule(lr, total_steps),
                     weight_decay=weight_decay)


# Module level with the hyperparameters static, so that evaluating several
# checkpoints (or the trained and the random-init encoder) of one run compiles
# the epoch once.
@functools.partial(jax.jit, static_argnames=('batch_size', 'lr', 'total_steps',
                                             'weight_decay', 'shuffle'))
def _epoch(carry: Any, key: jax.Array, train_x: jax.Array, train_y: jax.Array,
           *, batch_size: int, lr: float, total_steps: int,
           weight_decay: float, shuffle: bool) -> Any:
  tx = _optimizer(lr, total_steps, weight_decay)
  n = train_x.shape[0]
  steps = n // batch_size
  order = jax.random.permutation(key, n) if shuffle else jnp.arange(n)
  order = order[:steps * batch_size]

  def body(carry, idx):
    params, opt_state = carry
    params, opt_state, _, _ = step(params, opt_state, train_x[idx],
                                   train_y[idx], tx)
    return (params, opt_state), None

  return jax.lax.scan(body, carry, order.reshape(steps, batch_size))[0]


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
        epochs: int, batch_size: int, lr: float, weight_decay: float,
        seed: int = 0) -> Dict[str, np.ndarray]:
  """Fits the probe to standardised features; returns it for raw features.

  The features are standardised with their own mean and std (one learning
  rate then suits any feature scale), and the standardisation is folded into
  the returned kernel and bias: `logits(params, raw features)`.

  Args:
    features, labels: [n, D] features and [n] integer labels.
    num_classes: C.
    epochs: passes over the features (shuffled minibatches; with batch_size
      >= n one full-batch step per pass, in order).
    batch_size: minibatch size (clipped to n).
    lr, weight_decay: AdamW, its learning rate cosine-decayed to 0.
    seed: shuffling seed.

  Returns:
    {'kernel': [D, C], 'bias': [C]} float32 NumPy arrays.
  """
  mean = features.mean(0)
  std = features.std(0) + 1e-6
  x = jnp.asarray((features - mean) / std, jnp.float32)
  y = jnp.asarray(labels)
  n, d = x.shape
  batch_size = min(batch_size, n)
  total = epochs * (n // batch_size)
  params = init_params(d, num_classes)
  carry = (params, _optimizer(lr, total, weight_decay).init(params))
  for key in jax.random.split(jax.random.key(seed), epochs):
    carry = _epoch(carry, key, x, y, batch_size=batch_size, lr=float(lr),
                   total_steps=total, weight_decay=float(weight_decay),
                   shuffle=batch_size < n)
  kernel = np.asarray(carry[0]['kernel'])
  kernel_raw = kernel / std[:, None]
  bias = np.asarray(carry[0]['bias']) - (mean / std) @ kernel
  return {'kernel': kernel_raw.astype(np.float32), 'bias': bias.astype(np.float32)}


def top1_top5(scores: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  """Top-1 and top-5 accuracy in percent (top-k clipped to the classes)."""
  top5 = np.argsort(-scores, axis=1, kind='stable')[:, :min(5, scores.shape[1])]
  return {'top1': float(100 * np.mean(top5[:, 0] == labels)),
          'top5': float(100 * np.mean(np.any(top5 == labels[:, None], 1)))}
