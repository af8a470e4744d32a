"""Optimizer options of the official recipes, each against a port of its code.

Ports cite the official repositories at the commits read:
  facebookresearch/dino 7c446df5b9f45747937fb0d72314eb9f7b66930a
  facebookresearch/barlowtwins 8e8d284ca0bc02f88b92328e53f9b901e86b4a3c
  facebookresearch/swav 06b1b7cbaf6ba2a792300d79c7299db98b93b7f9
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from official_ports import official_port
from ssl_jax import optim

PARAMS = {'dense': {'kernel': jnp.full((3, 2), 2.0), 'bias': jnp.full((2,), 3.0)},
          'bn': {'scale': jnp.full((2,), 4.0)}}


def _opt(**kw):
  opt = common.base_config('simclr').optimizer
  opt.update(**kw)
  return opt


def _one_update(opt, grads, lr=0.1, total_steps=10, steps=1):
  tx = optim.get_optimizer(opt, lambda step: lr, total_steps)
  state = tx.init(PARAMS)
  params = PARAMS
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(lambda a, b: np.asarray(a - b), params, PARAMS)


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lars'])
def test_weight_decay_mask_all_decays_biases_and_norm(name):
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  kw = dict(name=name, weight_decay=0.5, momentum=0.0)
  masked = _one_update(_opt(**kw), zero)
  every = _one_update(_opt(weight_decay_mask='all', trust_ratio_mask='all', **kw),
                      zero)
  assert np.all(masked['dense']['bias'] == 0) and np.all(masked['bn']['scale'] == 0)
  assert np.all(every['dense']['bias'] < 0) and np.all(every['bn']['scale'] < 0)
  assert np.all(masked['dense']['kernel'] < 0)


def test_sgd_all_is_torch_sgd_weight_decay():
  # torch.optim.SGD(params, lr, momentum=0, weight_decay=wd): p -= lr (g + wd p),
  # for every parameter (official MoCo, SimSiam, NPID, DeepCluster optimisers).
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), PARAMS)
  delta = _one_update(_opt(name='sgd', weight_decay=0.01, momentum=0.0,
                           weight_decay_mask='all'), grads, lr=0.1)
  for d, p in zip(jax.tree.leaves(delta), jax.tree.leaves(PARAMS)):
    np.testing.assert_allclose(d, -0.1 * (0.25 + 0.01 * np.asarray(p)), rtol=1e-5)


def test_lars_trust_ratio_all_scales_biases():
  # With 'all', a bias's step is trust_coefficient * ||p|| / ||g + wd p|| * g.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
  delta = _one_update(_opt(name='lars', weight_decay=0.0, momentum=0.0,
                           weight_decay_mask='all', trust_ratio_mask='all',
                           trust_coefficient=0.001), grads, lr=1.0)
  b, g = np.asarray(PARAMS['dense']['bias']), np.full((2,), 0.5)
  expected = -0.001 * np.linalg.norm(b) / np.linalg.norm(g) * g
  np.testing.assert_allclose(delta['dense']['bias'], expected, rtol=1e-5)
  plain = _one_update(_opt(name='lars', weight_decay=0.0, momentum=0.0),
                      grads, lr=1.0)
  np.testing.assert_allclose(plain['dense']['bias'], -g, rtol=1e-6)


def _dino_cosine_scheduler(base_value, final_value, epochs, niter_per_ep):
  """dino utils.py `cosine_scheduler` (L187-L198), without warm-up."""
  iters = np.arange(epochs * niter_per_ep)
  return final_value + 0.5 * (base_value - final_value) * (
      1 + np.cos(np.pi * iters / len(iters)))


def test_cosine_weight_decay_matches_dino():
  opt = _opt(name='adamw', weight_decay=0.04, weight_decay_schedule='cosine',
             weight_decay_end=0.4)
  schedule = optim.weight_decay_schedule(opt, 100)
  reference = _dino_cosine_scheduler(0.04, 0.4, 10, 10)
  ours = np.array([schedule(t) for t in range(100)])
  np.testing.assert_allclose(ours, reference, rtol=1e-5)
  # And AdamW applies it: with zero gradients, step t shrinks a kernel by
  # lr * wd(t) * p (torch AdamW's decoupled decay, DINO main_dino.py L310-L312).
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  tx = optim.get_optimizer(opt, lambda step: 0.1, 100)
  state = tx.init(PARAMS)
  params = PARAMS
  for t in range(60):
    updates, state = tx.update(zero, state, params)
    if t == 59:
      np.testing.assert_allclose(
          updates['dense']['kernel'],
          -0.1 * reference[59] * np.asarray(params['dense']['kernel']),
          rtol=1e-5)
      np.testing.assert_array_equal(updates['dense']['bias'], 0)
    params = optax.apply_updates(params, updates)


def test_unknown_mask_and_schedule_fail_loudly():
  with pytest.raises(ValueError, match='known: no_bias_norm, all'):
    optim.get_optimizer(_opt(name='sgd', weight_decay_mask='bias'), 0.1)
  with pytest.raises(ValueError, match='known: constant, cosine'):
    optim.get_optimizer(_opt(weight_decay_schedule='linear'), 0.1)


def test_bias_norm_lr_is_barlow_twins_second_param_group():
  # barlowtwins main.py `adjust_learning_rate` (L155-L168): both groups follow
  # one schedule, times learning_rate_weights or learning_rate_biases.
  opt = _opt(name='sgd', lr=0.2, weight_decay=0.0, momentum=0.0,
             bias_norm_lr=0.0048)
  schedule = lambda step: 0.2 * (step + 1.0)  # any schedule of the step
  tx = optim.get_optimizer(opt, schedule, 10)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  state = tx.init(PARAMS)
  for step in range(2):
    updates, state = tx.update(grads, state, PARAMS)
    scale = step + 1.0
    np.testing.assert_allclose(updates['dense']['kernel'], -0.2 * scale, rtol=1e-6)
    np.testing.assert_allclose(updates['dense']['bias'], -0.0048 * scale, rtol=1e-5)
    np.testing.assert_allclose(updates['bn']['scale'], -0.0048 * scale, rtol=1e-5)


def test_warmup_starts_at_swav_start_warmup():
  # swav main_swav.py L178: np.linspace(start_warmup, base_lr, warmup iters).
  opt = _opt(name='lars', lr=0.3, lr_scaling='linear', warmup_start_lr=0.3,
             final_lr_fraction=0.001)
  schedule = optim.learning_rate_schedule(opt, 4096, 1000, 100)
  np.testing.assert_allclose(float(schedule(0)), 0.3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 4.8, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(1000)), 0.0048, rtol=1e-5)


def _dino_clip_gradients(grads, clip):
  """dino utils.py `clip_gradients` (L132-L141), on NumPy arrays."""
  out = []
  for g in grads:
    clip_coef = clip / (np.linalg.norm(g) + 1e-6)
    out.append(g * clip_coef if clip_coef < 1 else g)
  return out


def test_per_parameter_clip_matches_dino():
  grads = {'a': jnp.full((3, 2), 4.0), 'b': jnp.full((2,), 0.5)}
  opt = _opt(name='sgd', lr=1.0, weight_decay=0.0, momentum=0.0,
             clip_grad_norm=3.0, clip_grad_mode='per_parameter')
  tx = optim.get_optimizer(opt, 1.0)
  updates, _ = tx.update(grads, tx.init(grads), grads)
  expected = _dino_clip_gradients([np.asarray(g) for g in jax.tree.leaves(grads)], 3.0)
  for u, e in zip(jax.tree.leaves(updates), expected):
    np.testing.assert_allclose(-np.asarray(u), e, rtol=1e-6)
  # The global clip scales the small leaf too: the two modes differ here.
  glob, _ = optim.get_optimizer(_opt(name='sgd', lr=1.0, weight_decay=0.0,
                                     momentum=0.0, clip_grad_norm=3.0),
                                1.0).update(grads, tx.init(grads), grads)
  assert not np.allclose(glob['b'], updates['b'])


def test_constant_lr_params_keep_the_peak_rate_like_simsiam_fix_pred_lr():
  # facebookresearch/simsiam main_simsiam.py L194-L197 (`--fix-pred-lr`):
  # the predictor's group keeps init_lr = lr * batch / 256 while the
  # others follow the cosine schedule.
  opt = _opt(name='sgd', lr=0.05, lr_scaling='linear', weight_decay=0.0,
             momentum=0.0, constant_lr_params=('bn',))
  tx = optim.get_optimizer(opt, lambda step: 0.01, 10, global_batch=512)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.01)
  np.testing.assert_allclose(updates['bn']['scale'], -0.05 * 512 / 256)
  with pytest.raises(ValueError, match='predictor'):
    optim.get_optimizer(_opt(constant_lr_params=('predictor',)),
                        0.1).init(PARAMS)


def _torch_adamw_step(p, grad, state, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.AdamW's step for one parameter (torch/optim/adamw.py,
  single-tensor path); a parameter whose grad is None is skipped whole."""
  if grad is None:
    return p, state
  step, m, v = state
  step += 1
  p = p * (1 - lr * wd)
  m = b1 * m + (1 - b1) * grad
  v = b2 * v + (1 - b2) * grad * grad
  denom = np.sqrt(v) / np.sqrt(1 - b2 ** step) + eps
  return p - lr / (1 - b1 ** step) * m / denom, (step, m, v)


@official_port('dino', devices=(1,), source='facebookresearch/dino at '
               '7c446df5b9f45747937fb0d72314eb9f7b66930a, utils.py lines '
               '144-149, main_dino.py lines 331-343; torch AdamW')
def test_frozen_last_layer_is_skipped_like_dino_cancel_gradients():
  # dino utils.py L144-L149 (cancel_gradients_last_layer: p.grad = None for
  # `freeze_last_layer` epochs) under torch's AdamW, main_dino.py L331-L343:
  # the layer gets neither a step nor weight decay while frozen, and its
  # Adam step count starts at its first gradient. The rest of the model
  # steps as usual; lr and weight decay come from the global iteration.
  frozen_steps, steps = 3, 7
  opt = _opt(name='adamw', weight_decay=0.04, weight_decay_schedule='cosine',
             weight_decay_end=0.4, wait_for_gradient_params=('prototypes',))
  lr = lambda t: 0.01 * (t + 1)
  wd = optim.weight_decay_schedule(opt, steps)
  params = {'head': {'prototypes': jnp.full((3, 2), 2.0),
                     'kernel': jnp.full((2, 2), 1.0)}}
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                        params) for _ in range(steps)]
  for t in range(frozen_steps):  # our step: the frozen layer's grads are 0
    grads[t]['head']['prototypes'] = np.zeros((3, 2), np.float32)
  tx = optim.get_optimizer(opt, lr, steps)
  state = tx.init(params)
  ours = params
  torch = {k: np.asarray(v, np.float64) for k, v in params['head'].items()}
  torch_state = {k: (0, 0.0, 0.0) for k in torch}
  for t in range(steps):
    updates, state = tx.update(grads[t], state, ours)
    ours = optax.apply_updates(ours, updates)
    for k in torch:
      g = None if (k == 'prototypes' and t < frozen_steps) else grads[t]['head'][k]
      torch[k], torch_state[k] = _torch_adamw_step(
          torch[k], g, torch_state[k], lr(t), float(wd(t)))
    for k in torch:
      np.testing.assert_allclose(ours['head'][k], torch[k], rtol=1e-5,
                                 err_msg=f'{k}, step {t}')
    if t == frozen_steps:
      first_real_step = np.asarray(ours['head']['prototypes'])
  # Without the option, the first step after the freeze differs.
  opt.wait_for_gradient_params = ()
  tx = optim.get_optimizer(opt, lr, steps)
  state, plain = tx.init(params), params
  for t in range(frozen_steps + 1):
    updates, state = tx.update(grads[t], state, plain)
    plain = optax.apply_updates(plain, updates)
  assert not np.allclose(plain['head']['prototypes'], first_real_step,
                         rtol=1e-3)


def test_wait_for_gradient_params_must_name_a_parameter():
  opt = _opt(name='adamw', wait_for_gradient_params=('last_layer',))
  tx = optim.get_optimizer(opt, lambda t: 0.1, 10)
  with pytest.raises(ValueError, match="names \\['last_layer'\\], which no "
                     "parameter"):
    tx.init(PARAMS)
