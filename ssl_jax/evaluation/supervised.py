"""Supervised training on top of a pretrained backbone: two standard protocols.

- `mode='linear'` (the standard linear-evaluation protocol, SimCLR appendix
  B.6, MoCo, BYOL): the backbone is frozen (eval-mode BatchNorm, stop-gradient)
  and a linear head is trained on features of augmented images computed on the
  fly (random resized crop + horizontal flip), with SGD/LARS and a cosine
  schedule.
- `mode='finetune'`: the whole network is trained, the backbone with global
  BatchNorm in training mode and a learning rate `backbone_lr_mult` times the
  head's (optax.multi_transform), as in SimCLR's fine-tuning protocol.

In the linear protocol, as in MAE's linear probing (He et al. 2022, appendix
A.2), the head's input is standardised by the frozen backbone's feature
statistics on the clean training images (a BatchNorm without affine
parameters), which makes one head learning rate work for backbones whose
feature scales differ by orders of magnitude. Both run on every device of the
mesh (`parallel.data_parallel`) and report top-1/top-5 on the test source's
deterministic evaluation view.
"""

from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax import data, models, parallel
from ssl_jax.data import augment
from ssl_jax.evaluation import features as feats


def _crop_flip(rng: jax.Array, images: jax.Array, size: int,
               crop_scale: Tuple[float, float], mean: Sequence[float],
               std: Sequence[float]) -> jax.Array:
  x = augment.to_float(images)
  keys = jax.random.split(rng, x.shape[0])

  def one(key, image):
    k_crop, k_flip = jax.random.split(key)
    image = augment.random_resized_crop(k_crop, image, size, crop_scale)
    return augment.random_flip(k_flip, image, 0.5)

  return augment.normalize(jax.vmap(one)(keys, x), mean, std)


def _optimizer(name: str, lr: Any, momentum: float,
               weight_decay: float) -> optax.GradientTransformation:
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(lr, momentum=momentum, nesterov=True))
  if name == 'lars':
    return optax.lars(lr, weight_decay=weight_decay, momentum=momentum)
  if name == 'adamw':
    return optax.adamw(lr, weight_decay=weight_decay)
  raise ValueError(f'Unknown evaluation optimizer {name!r}; known: adamw, '
                   f'lars, sgd.')


def _top1_top5(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  top5 = np.argsort(-logits, axis=1, kind='stable')[:, :min(5, logits.shape[1])]
  return {'top1': float(100 * np.mean(top5[:, 0] == labels)),
          'top5': float(100 * np.mean(np.any(top5 == labels[:, None], 1)))}


def train_classifier(model_config: Any, variables: Dict[str, Any],
                     train_source: data.Source, test_source: data.Source, *,
                     mode: str, size: int, epochs: int, batch_size: int,
                     lr: float, optimizer: str = 'sgd', momentum: float = 0.9,
                     weight_decay: float = 0.0, backbone_lr_mult: float = 0.1,
                     crop_scale: Tuple[float, float] = (0.08, 1.0),
                     eval_batch_size: int = 512,
                     seed: int = 0) -> Dict[str, float]:
  """Trains a linear head (and, to fine-tune, the backbone); returns accuracy.

  Args:
    model_config: `config.model` of the run (builds the backbone).
    variables: the backbone's {'params', 'batch_stats'}.
    train_source, test_source: labelled data.
    mode: 'linear' (frozen backbone) or 'finetune' (whole network).
    size: input resolution of the crops.
    epochs: passes over `train_source`.
    batch_size: global batch (rounded down to a multiple of the devices).
    lr: peak learning rate of the head (cosine-decayed to 0; not scaled by
      the batch size: pass the scaled value).
    optimizer: 'sgd' (Nesterov momentum), 'lars' or 'adamw'.
    momentum: SGD/LARS momentum.
    weight_decay: on the head (and the backbone when fine-tuning).
    backbone_lr_mult: backbone learning rate / head learning rate (finetune).
    crop_scale: area range of the random resized crops.
    eval_batch_size: examples per forward pass when computing clean features
      (their statistics, and the test predictions).
    seed: shuffling and augmentation seed.

  Returns:
    {'top1', 'top5'} in percent on `test_source`.
  """
  if mode not in ('linear', 'finetune'):
    raise ValueError(f"Unknown mode {mode!r}; known: finetune, linear.")
  finetune = mode == 'finetune'
  n_dev = parallel.default_mesh().size
  batch_size = max(n_dev, min(batch_size, len(train_source)) // n_dev * n_dev)
  steps_per_epoch = max(1, len(train_source) // batch_size)
  total = max(1, epochs * steps_per_epoch)
  mean, std = train_source.mean, train_source.std
  num_classes = train_source.num_classes
  axis = parallel.AXIS if finetune else None
  backbone = models.get_backbone(model_config, axis_name=axis)
  feature_fn = feats.make_feature_fn(model_config, size, mean, std)

  if finetune:
    # The head sees training-mode BatchNorm features, whose statistics differ
    # from the eval-mode ones the standardisation would be measured on; a
    # barely trained backbone stayed at chance with it (13% vs 21% without,
    # 10 classes, tests/test_evaluation.py).
    dim = feature_fn.eval_shape(
        variables, jax.ShapeDtypeStruct(
            (n_dev,) + tuple(train_source.image_shape), np.uint8)).shape[-1]
    feat_mean = np.zeros((dim,), np.float32)
    feat_std = np.ones((dim,), np.float32)
  else:
    feat_mean, feat_std = feats.moments(feature_fn, variables, train_source,
                                        eval_batch_size)
    feat_std = feat_std + 1e-6
  feature_dim = feat_mean.shape[-1]

  head = nn.Dense(num_classes, kernel_init=nn.initializers.zeros)
  params = {'head': head.init(jax.random.key(seed),
                              jnp.zeros((1, feature_dim)))['params'],
            'backbone': variables['params']}
  batch_stats = variables.get('batch_stats', {})
  schedule = optax.cosine_decay_schedule(lr, total)
  head_tx = _optimizer(optimizer, schedule, momentum, weight_decay)
  if finetune:
    backbone_tx = _optimizer(
        optimizer, lambda step: backbone_lr_mult * schedule(step), momentum,
        weight_decay)
  else:
    backbone_tx = optax.set_to_zero()
  tx = optax.multi_transform({'head': head_tx, 'backbone': backbone_tx},
                             {'head': 'head', 'backbone': 'backbone'})
  opt_state = tx.init(params)

  def logits_fn(params, batch_stats, x, train):
    vs = {'params': params['backbone'], 'batch_stats': batch_stats}
    if train:
      (f, _), new = backbone.apply(vs, x, train=True, mutable=['batch_stats'])
      new_stats = new['batch_stats']
    else:
      f = backbone.apply(vs, x, train=False)[0]
      new_stats = batch_stats
      f = jax.lax.stop_gradient(f)
    f = (f - feat_mean) / feat_std
    return head.apply({'params': params['head']}, f), new_stats

  def step(carry, images, labels, rng):
    params, batch_stats, opt_state = carry
    rng = parallel.per_device_rng(rng, parallel.AXIS)
    x = _crop_flip(rng, images, size, crop_scale, mean, std)

    def loss_fn(p):
      logits, new_stats = logits_fn(p, batch_stats, x, finetune)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return parallel.pmean(loss.mean(), parallel.AXIS), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = parallel.mean_gradients(grads, parallel.AXIS)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    new_stats = parallel.pmean(new_stats, parallel.AXIS)
    return (params, new_stats, opt_state), loss

  batch_spec = parallel.P(parallel.AXIS)
  p_step = parallel.data_parallel(
      step, in_specs=(parallel.P(), batch_spec, batch_spec, parallel.P()),
      out_specs=parallel.P())
  carry = parallel.put_replicated((params, batch_stats, opt_state))
  rng = jax.random.key(seed)
  for epoch in range(epochs):
    perm = np.random.default_rng([seed, epoch]).permutation(len(train_source))
    for i in range(steps_per_epoch):
      batch = train_source.get(perm[i * batch_size:(i + 1) * batch_size])
      rng, step_rng = jax.random.split(rng)
      carry, _ = p_step(carry, *parallel.put_global_batch(
          (batch['image'], batch['label'])), parallel.put_replicated(step_rng))

  params, batch_stats, _ = parallel.to_host(carry)
  variables = {'params': params['backbone'], 'batch_stats': batch_stats}
  logits, labels = [], []
  for f, y in feats.batches(feature_fn, variables, test_source,
                            eval_batch_size):
    logits.append(np.asarray(head.apply({'params': params['head']},
                                        (f - feat_mean) / feat_std)))
    labels.append(y)
  return _top1_top5(np.concatenate(logits), np.concatenate(labels))
