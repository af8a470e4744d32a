"""Optimizers, learning-rate and EMA schedules, built once from the config."""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax.registry import Registry

OPTIMIZERS = Registry('optimizer')
Schedule = Callable[[jax.Array], jax.Array]


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay and LARS adaptation.

  Biases and normalisation parameters (every 0-d/1-d leaf) are excluded, as in
  SimCLR, BYOL and Barlow Twins.
  """
  return jax.tree.map(lambda p: p.ndim > 1, params)


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
  """Linear warm-up from 0, then cosine decay to `final_lr_fraction * peak`."""
  peak = peak_learning_rate(opt, global_batch)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=max(warmup_steps, 0),
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


@OPTIMIZERS.register('sgd')
def _sgd(opt, lr):
  return optax.chain(
      optax.add_decayed_weights(opt.weight_decay, mask=decay_mask),
      optax.sgd(lr, momentum=opt.get('momentum', 0.9),
                nesterov=opt.get('nesterov', False)))


@OPTIMIZERS.register('adamw')
def _adamw(opt, lr):
  return optax.adamw(lr, b1=opt.get('b1', 0.9), b2=opt.get('b2', 0.999),
                     weight_decay=opt.weight_decay, mask=decay_mask)


@OPTIMIZERS.register('lars')
def _lars(opt, lr):
  # You et al. 2017 as used by SimCLR/BYOL: trust ratio and weight decay skip
  # biases and BN parameters.
  return optax.lars(lr, weight_decay=opt.weight_decay,
                    weight_decay_mask=decay_mask, trust_ratio_mask=decay_mask,
                    trust_coefficient=opt.get('trust_coefficient', 0.001),
                    momentum=opt.get('momentum', 0.9))


def get_optimizer(opt: ml_collections.ConfigDict,
                  lr: Schedule) -> optax.GradientTransformation:
  """The optimizer named `opt.name`, with optional global-norm clipping."""
  tx = OPTIMIZERS.get(opt.name)(opt, lr)
  if opt.get('clip_grad_norm', 0.0):
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_grad_norm), tx)
  return tx
