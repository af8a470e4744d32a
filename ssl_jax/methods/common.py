"""Pieces several methods share: running a network on views, EMA updates."""

from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp

from ssl_jax import models


def init_network(network, rng: jax.Array, sample: jax.Array) -> Tuple[Any, Any]:
  variables = network.init({'params': rng}, sample, train=True)
  return variables['params'], variables.get('batch_stats', {})


def init_without_state(method: Any, rng: jax.Array) -> Tuple[Any, Any, Dict]:
  """`Method.init` of a method whose whole state is `config.model`'s network."""
  network = models.get_network(method.config.model, axis_name=None)
  params, batch_stats = init_network(network, rng, method.sample_input())
  return params, batch_stats, {}


def apply_network(network, params, batch_stats, views: Sequence[jax.Array],
                  train: bool = True) -> Tuple[Dict[str, jax.Array], Any]:
  """Runs `network` once on the views concatenated along the batch.

  One call over all views (as SimCLR's reference does) keeps one BN batch of
  all views and one large matmul per layer. Outputs are split back per view
  into arrays of shape [num_views, b, ...].
  """
  n = len(views)
  x = jnp.concatenate(views, axis=0)
  variables = {'params': params, 'batch_stats': batch_stats}
  if train:
    out, mutated = network.apply(variables, x, train=True,
                                 mutable=['batch_stats'])
    new_stats = mutated['batch_stats']
  else:
    out, new_stats = network.apply(variables, x, train=False), batch_stats
  split = lambda y: y.reshape((n, y.shape[0] // n) + y.shape[1:])
  out = {k: split(v) for k, v in out.items() if k != 'aux'}
  return out, new_stats


def by_resolution(views: Sequence[jax.Array]) -> List[List[jax.Array]]:
  """Runs of consecutive same-shape views (multi-crop: one per resolution)."""
  groups: List[List[jax.Array]] = []
  for v in views:
    if groups and groups[-1][0].shape == v.shape:
      groups[-1].append(v)
    else:
      groups.append([v])
  return groups


def concat_views(outs: Sequence[Dict[str, jax.Array]]) -> Dict[str, jax.Array]:
  """Per-group outputs [n_g, b, ...] concatenated back to [num_views, b, ...]."""
  return {k: jnp.concatenate([o[k] for o in outs], axis=0) for k in outs[0]}


def ema_update(target: Any, online: Any, momentum: jax.Array) -> Any:
  """target <- m * target + (1 - m) * online, leaf by leaf (BYOL eq. 1)."""
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o,
                      target, online)


def teacher_subset(params: Dict[str, Any], keys=('backbone', 'projector')):
  """The part of the online parameters that the EMA teacher mirrors."""
  return {k: params[k] for k in keys if k in params}
