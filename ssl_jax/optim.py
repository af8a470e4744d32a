"""Optimizers, learning-rate and EMA schedules, built once from the config."""

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax.registry import Registry

OPTIMIZERS = Registry('optimizer')
Schedule = Callable[[jax.Array], jax.Array]


MASKS = ('no_bias_norm', 'all')


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay and LARS adaptation.

  Biases and normalisation parameters (every 0-d/1-d leaf) are excluded, as in
  SimCLR, BYOL and Barlow Twins.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


def parameter_mask(opt: ml_collections.ConfigDict, field: str) -> Any:
  """The mask that `opt.<field>` names, in the form optax takes.

  'no_bias_norm' (the default): `decay_mask`, biases and normalisation
  parameters left out (SimCLR, BYOL, Barlow Twins, DINO). 'all': every
  parameter, as torch's `SGD(model.parameters(), weight_decay=...)` in the
  official MoCo, SimSiam, NPID and DeepCluster code, and apex's LARC over
  SGD in SwAV's `main_swav.py`.
  """
  kind = opt.get(field, 'no_bias_norm')
  if kind == 'no_bias_norm':
    return decay_mask
  if kind == 'all':
    return True
  raise ValueError(f'Unknown optimizer.{field} {kind!r}; known: '
                   f'{", ".join(MASKS)}.')


def weight_decay_schedule(opt: ml_collections.ConfigDict,
                          total_steps: int) -> Any:
  """`opt.weight_decay`, constant or cosine-moved to `opt.weight_decay_end`.

  'cosine' is DINO's `utils.cosine_scheduler(weight_decay, weight_decay_end,
  epochs, niter_per_ep)`: wd(t) = end + (start - end) (1 + cos(pi t / T)) / 2
  over all T steps, no warm-up (facebookresearch/dino main_dino.py).
  """
  kind = opt.get('weight_decay_schedule', 'constant')
  if kind == 'constant':
    return opt.weight_decay
  if kind != 'cosine':
    raise ValueError(f"Unknown optimizer.weight_decay_schedule {kind!r}; "
                     f"known: constant, cosine.")
  start, end = opt.weight_decay, opt.weight_decay_end
  steps = max(total_steps, 1)

  def schedule(step):
    progress = jnp.clip(step / steps, 0.0, 1.0)
    return end + (start - end) * (1.0 + jnp.cos(jnp.pi * progress)) / 2.0

  return schedule


def peak_learning_rate(opt: ml_collections.ConfigDict, global_batch: int) -> float:
  """`lr` scaled by the batch size: 'linear' is lr*B/256 (SimCLR, BYOL)."""
  scaling = opt.get('lr_scaling', 'none')
  if scaling == 'linear':
    return opt.lr * global_batch / 256
  if scaling == 'sqrt':
    return opt.lr * math.sqrt(global_batch)
  if scaling == 'none':
    return opt.lr
  raise ValueError(f"Unknown lr_scaling {scaling!r}; known: linear, sqrt, none.")


def learning_rate_schedule(opt: ml_collections.ConfigDict, global_batch: int,
                           total_steps: int, warmup_steps: int) -> Schedule:
  """Linear warm-up, then cosine decay to `final_lr_fraction * peak`.

  The warm-up starts at `opt.warmup_start_lr` (absolute, not batch-scaled;
  SwAV's `--start_warmup`, 0.3 in its 800-epoch script), by default 0.
  """
  peak = peak_learning_rate(opt, global_batch)
  return optax.warmup_cosine_decay_schedule(
      init_value=opt.get('warmup_start_lr', 0.0), peak_value=peak,
      warmup_steps=max(warmup_steps, 0),
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=peak * opt.get('final_lr_fraction', 0.0))


def ema_momentum_schedule(base: float, total_steps: int,
                          final: float = 1.0) -> Schedule:
  """BYOL's target momentum: base at step 0, cosine-increased to `final`."""
  if not 0.0 <= base <= 1.0:
    raise ValueError(f'EMA momentum must be in [0, 1], got {base}.')

  def schedule(step):
    progress = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
    return final - (final - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

  return schedule


# Each optimizer is built as `build(opt, lr, weight_decay=None)`: `lr` and
# `weight_decay` are numbers or schedules of the step; None reads
# `opt.weight_decay`.
@OPTIMIZERS.register('sgd')
def _sgd(opt, lr, weight_decay=None):
  weight_decay = opt.weight_decay if weight_decay is None else weight_decay
  return optax.chain(
      optax.add_decayed_weights(weight_decay,
                                mask=parameter_mask(opt, 'weight_decay_mask')),
      optax.sgd(lr, momentum=opt.get('momentum', 0.9),
                nesterov=opt.get('nesterov', False)))


@OPTIMIZERS.register('adamw')
def _adamw(opt, lr, weight_decay=None):
  weight_decay = opt.weight_decay if weight_decay is None else weight_decay
  return optax.adamw(lr, b1=opt.get('b1', 0.9), b2=opt.get('b2', 0.999),
                     weight_decay=weight_decay,
                     mask=parameter_mask(opt, 'weight_decay_mask'))


@OPTIMIZERS.register('lars')
def _lars(opt, lr, weight_decay=None):
  # You et al. 2017 as used by SimCLR/BYOL: by default the trust ratio and
  # weight decay skip biases and BN parameters; SwAV's LARC covers them all.
  weight_decay = opt.weight_decay if weight_decay is None else weight_decay
  return optax.lars(
      lr, weight_decay=weight_decay,
      weight_decay_mask=parameter_mask(opt, 'weight_decay_mask'),
      trust_ratio_mask=parameter_mask(opt, 'trust_ratio_mask'),
      trust_coefficient=opt.get('trust_coefficient', 0.001),
      momentum=opt.get('momentum', 0.9))


def clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
  """Clips every parameter's gradient to L2 norm `max_norm` on its own.

  DINO's `utils.clip_gradients` (facebookresearch/dino utils.py L132-L141):
  g * min(1, max_norm / (||g|| + 1e-6)), leaf by leaf, unlike
  `optax.clip_by_global_norm`, which scales all leaves by one factor.
  """

  def clip(updates, state, params=None):
    del params
    def one(g):
      coef = max_norm / (jnp.linalg.norm(g) + 1e-6)
      return jnp.where(coef < 1.0, g * coef, g)
    return jax.tree.map(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), clip)


class WaitState(NamedTuple):
  started: jax.Array  # bool scalar: a non-zero gradient has arrived
  inner: Any


def wait_for_first_gradient(
    inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, left untouched until its parameters get a non-zero gradient.

  PyTorch optimizers skip a parameter whose `.grad` is None: no step, no
  weight decay, and AdamW's per-parameter step count, hence its bias
  correction, starts at the first real gradient. DINO sets the last layer's
  gradients to None for its first epoch (facebookresearch/dino utils.py
  `cancel_gradients_last_layer`); our step zeroes them instead, and a plain
  optax AdamW would then start that layer's moments at step 0 and make its
  first real steps several times larger. Until a gradient is non-zero the
  update here is zero and Adam's state (moments and count) keeps its initial
  value; the other states (the learning-rate and weight-decay schedules'
  counts) advance, as torch reads both from the global iteration.
  """
  def is_adam(x):
    return isinstance(x, optax.ScaleByAdamState)

  def init(params):
    return WaitState(jnp.zeros((), bool), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    started = state.started | jnp.any(jnp.stack(
        [jnp.any(g != 0) for g in jax.tree.leaves(updates)] or
        [jnp.zeros((), bool)]))
    merged = jax.tree.map(
        lambda old, new: (jax.tree.map(
            lambda o, n: jnp.where(started, n, o), old, new)
                          if is_adam(old) else new),
        state.inner, new_inner, is_leaf=is_adam)
    new_updates = jax.tree.map(lambda u: jnp.where(started, u, 0), new_updates)
    return new_updates, WaitState(started, merged)

  return optax.GradientTransformation(init, update)


def _scaled(schedule: Schedule, factor: float) -> Schedule:
  return lambda step: factor * schedule(step)


def _with_constant_lr_groups(opt, tx, build, weight_decay, global_batch):
  """`tx` for most parameters; `opt.constant_lr_params` at a constant rate."""
  constant_groups = tuple(opt.constant_lr_params)
  constant = peak_learning_rate(
      ml_collections.ConfigDict(dict(
          opt.to_dict(), lr=opt.get('constant_lr', 0.0) or opt.lr)),
      global_batch)

  def labels(params):
    missing = set(constant_groups) - set(params)
    if missing:
      raise ValueError(
          f'optimizer.constant_lr_params names {sorted(missing)}, which the '
          f'model does not have; its parameter groups are {sorted(params)}.')
    return {k: 'fixed' if k in constant_groups else 'scheduled'
            for k in params}

  return optax.multi_transform(
      {'fixed': build(opt, constant, weight_decay=weight_decay),
       'scheduled': tx}, labels)


def _gradient_clipping(opt) -> optax.GradientTransformation:
  mode = opt.get('clip_grad_mode', 'global')
  if mode == 'global':
    return optax.clip_by_global_norm(opt.clip_grad_norm)
  if mode == 'per_parameter':
    return clip_each_by_norm(opt.clip_grad_norm)
  raise ValueError(f"Unknown optimizer.clip_grad_mode {mode!r}; known: "
                   f"global, per_parameter.")


def get_optimizer(opt: ml_collections.ConfigDict, lr: Schedule,
                  total_steps: int = 0,
                  global_batch: int = 256) -> optax.GradientTransformation:
  """The optimizer named `opt.name`, with optional global-norm clipping.

  Args:
    opt: `config.optimizer`. Beyond the optimizer's own fields:
      weight_decay_mask / trust_ratio_mask ('no_bias_norm' or 'all', see
      `parameter_mask`); weight_decay_schedule ('constant' or 'cosine' to
      weight_decay_end, see `weight_decay_schedule`); bias_norm_lr (> 0: the
      biases and normalisation parameters follow the schedule scaled by
      bias_norm_lr / lr, Barlow Twins' `--learning-rate-biases`);
      clip_grad_norm (> 0: clip the gradient norm first, of all parameters
      together or, clip_grad_mode='per_parameter', of each on its own);
      constant_lr_params (names of top-level parameter groups, e.g.
      ('predictor',), that keep a constant learning rate: `constant_lr`,
      batch-scaled like `lr`, by default the schedule's peak; SimSiam's
      `--fix-pred-lr`); wait_for_gradient_params (names of parameter
      leaves, e.g. ('prototypes',), optimized apart and left untouched until
      their first non-zero gradient, see `wait_for_first_gradient`; DINO's
      frozen last layer).
    lr: the learning-rate schedule of the weights.
    total_steps: the run's length, for a weight-decay schedule.
    global_batch: the global batch size, to scale `constant_lr`.

  Returns:
    The optax transformation.
  """
  build = OPTIMIZERS.get(opt.name)
  weight_decay = weight_decay_schedule(opt, total_steps)
  tx = build(opt, lr, weight_decay=weight_decay)
  if tuple(opt.get('constant_lr_params', ()) or ()):
    tx = _with_constant_lr_groups(opt, tx, build, weight_decay, global_batch)
  if opt.get('bias_norm_lr', 0.0):
    # Two parameter groups, as barlowtwins main.py's `param_weights` and
    # `param_biases`: the same schedule, another peak.
    bias_lr = _scaled(lr, opt.bias_norm_lr / opt.lr)
    labels = lambda params: jax.tree.map(
        lambda p: 'weights' if p.ndim > 1 else 'bias_norm', params)
    bias_tx = build(opt, bias_lr, weight_decay=weight_decay)
    tx = optax.multi_transform({'weights': tx, 'bias_norm': bias_tx}, labels)
  waiting = tuple(opt.get('wait_for_gradient_params', ()) or ())
  if waiting:
    def wait_labels(params):
      labels = jax.tree_util.tree_map_with_path(
          lambda path, _: 'wait' if getattr(path[-1], 'key', None) in waiting
          else 'rest', params)
      if 'wait' not in jax.tree.leaves(labels):
        raise ValueError(
            f'optimizer.wait_for_gradient_params names {list(waiting)}, '
            f'which no parameter of the model is called.')
      return labels

    tx = optax.multi_transform(
        {'wait': wait_for_first_gradient(
            build(opt, lr, weight_decay=weight_decay)), 'rest': tx},
        wait_labels)
  if opt.get('clip_grad_norm', 0.0):
    tx = optax.chain(_gradient_clipping(opt), tx)
  return tx
