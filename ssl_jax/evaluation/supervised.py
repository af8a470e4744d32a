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

import jax
import ml_collections
import numpy as np
import optax

from ssl_jax import data, linear_probe, models, optim, parallel
from ssl_jax.data import augment
from ssl_jax import features as feats


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
  """optim.py's optimizer `name`, over every parameter (no masks).

  SGD with Nesterov momentum as in SimCLR's linear evaluation.
  """
  opt = ml_collections.ConfigDict(dict(
      name=name, lr=lr, momentum=momentum, nesterov=True,
      weight_decay=weight_decay, weight_decay_mask='all',
      trust_ratio_mask='all'))
  return optim.OPTIMIZERS.get(name)(opt, lr)


def _standardisation(finetune: bool, feature_fn: Any, variables: Any,
                     source: data.Source, eval_batch_size: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, std) the head's input is standardised with."""
  if finetune:
    # The head sees training-mode BatchNorm features, whose statistics differ
    # from the eval-mode ones the standardisation would be measured on; a
    # barely trained backbone stayed at chance with it (13% vs 21% without,
    # 10 classes, tests/test_evaluation.py).
    n_dev = parallel.default_mesh().size
    dim = feature_fn.eval_shape(
        variables, jax.ShapeDtypeStruct(
            (n_dev,) + tuple(source.image_shape), np.uint8)).shape[-1]
    return np.zeros((dim,), np.float32), np.ones((dim,), np.float32)
  feat_mean, feat_std = feats.moments(feature_fn, variables, source,
                                      eval_batch_size)
  return feat_mean, feat_std + 1e-6


def _transform(optimizer: str, lr: float, total: int, momentum: float,
               weight_decay: float, finetune: bool,
               backbone_lr_mult: float) -> optax.GradientTransformation:
  """The head's optimizer, and the backbone's (frozen unless fine-tuning)."""
  schedule = optax.cosine_decay_schedule(lr, total)
  head_tx = _optimizer(optimizer, schedule, momentum, weight_decay)
  if finetune:
    backbone_tx = _optimizer(
        optimizer, lambda step: backbone_lr_mult * schedule(step), momentum,
        weight_decay)
  else:
    backbone_tx = optax.set_to_zero()
  return optax.multi_transform({'head': head_tx, 'backbone': backbone_tx},
                               {'head': 'head', 'backbone': 'backbone'})


def _mesh_step(backbone: Any, tx: optax.GradientTransformation,
               standardisation: Tuple[np.ndarray, np.ndarray], finetune: bool,
               size: int, crop_scale: Tuple[float, float], mean, std):
  """One step on every device: augment, forward, head update (and backbone)."""
  feat_mean, feat_std = standardisation

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
    return linear_probe.logits(params['head'], f), new_stats

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
  return parallel.data_parallel(
      step, in_specs=(parallel.P(), batch_spec, batch_spec, parallel.P()),
      out_specs=parallel.P())


def _fit(p_step, carry, source: data.Source, epochs: int,
         steps_per_epoch: int, batch_size: int, seed: int):
  """`epochs` shuffled passes of `p_step` over `source`; the final carry."""
  rng = jax.random.key(seed)
  for epoch in range(epochs):
    perm = np.random.default_rng([seed, epoch]).permutation(len(source))
    for i in range(steps_per_epoch):
      batch = source.get(perm[i * batch_size:(i + 1) * batch_size])
      rng, step_rng = jax.random.split(rng)
      carry, _ = p_step(carry, *parallel.put_global_batch(
          (batch['image'], batch['label'])), parallel.put_replicated(step_rng))
  return carry


def _test_accuracy(feature_fn, params, batch_stats, standardisation,
                   source: data.Source, eval_batch_size: int) -> Dict[str, float]:
  """Top-1/top-5 of the trained head (and backbone) on `source`'s eval view."""
  variables = {'params': params['backbone'], 'batch_stats': batch_stats}
  logits, labels = [], []
  for f, y in feats.batches(feature_fn, variables, source, eval_batch_size):
    logits.append(np.asarray(linear_probe.logits(
        params['head'], (f - standardisation[0]) / standardisation[1])))
    labels.append(y)
  return linear_probe.top1_top5(np.concatenate(logits), np.concatenate(labels))


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
    optimizer: 'sgd' (Nesterov momentum), 'lars' or 'adamw' (optim.py's).
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
  backbone = models.get_backbone(
      model_config, axis_name=parallel.AXIS if finetune else None)
  feature_fn = feats.make_feature_fn(model_config, size, train_source.mean,
                                     train_source.std)
  standardisation = _standardisation(finetune, feature_fn, variables,
                                     train_source, eval_batch_size)
  params = {'head': linear_probe.init_params(standardisation[0].shape[-1],
                                             train_source.num_classes),
            'backbone': variables['params']}
  tx = _transform(optimizer, lr, total, momentum, weight_decay, finetune,
                  backbone_lr_mult)
  p_step = _mesh_step(backbone, tx, standardisation, finetune, size,
                      crop_scale, train_source.mean, train_source.std)
  carry = _fit(p_step, parallel.put_replicated(
      (params, variables.get('batch_stats', {}), tx.init(params))),
      train_source, epochs, steps_per_epoch, batch_size, seed)
  params, batch_stats, _ = parallel.to_host(carry)
  return _test_accuracy(feature_fn, params, batch_stats, standardisation,
                        test_source, eval_batch_size)
