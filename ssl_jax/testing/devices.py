"""Does a loss give the same value and gradient on N devices as on one?"""

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from ssl_jax import parallel


def device_equivalence(loss_fn: Callable[..., jax.Array],
                       args: Sequence[jax.Array], num_devices: int, *,
                       sharded_argnums: Optional[Sequence[int]] = None,
                       kwargs: Optional[Dict[str, Any]] = None
                       ) -> Tuple[Tuple[np.ndarray, list], Tuple[np.ndarray, list]]:
  """Runs `loss_fn` on one device and split over `num_devices` devices.

  Args:
    loss_fn: `loss_fn(*args, axis_name=..., **kwargs) -> scalar`.
    args: global-batch inputs; those in `sharded_argnums` (default: all) are
      split along axis 0 over the devices, the others (a queue, a bank) are
      given whole to every device.
    num_devices: N, at most `jax.device_count()`.
    kwargs: extra keyword arguments (temperatures ...).

  Returns:
    ((value_1, grads_1), (values_N, grads_N)): the single-device value and
    gradients w.r.t. the sharded args, and the N per-device values with the
    N-device gradients reassembled into global-batch arrays. Under this
    library's pmap convention each device differentiates its own copy of the
    global loss, so per-device input gradients are N times the global
    gradient; they are divided by N here, so that for a correct loss
    grads_N == grads_1 and every entry of values_N == value_1.
  """
  kwargs = kwargs or {}
  if num_devices > jax.device_count():
    raise ValueError(f'Need {num_devices} devices, have {jax.device_count()}; '
                     f'set XLA_FLAGS=--xla_force_host_platform_device_count='
                     f'{num_devices} before importing JAX.')
  sharded = tuple(range(len(args))) if sharded_argnums is None else tuple(sharded_argnums)

  split_args = []
  for i, a in enumerate(args):
    if i in sharded:
      if a.shape[0] % num_devices:
        raise ValueError(f'Argument {i} has batch {a.shape[0]}, not divisible '
                         f'by {num_devices} devices.')
      split_args.append(a.reshape((num_devices, -1) + a.shape[1:]))
    else:
      split_args.append(a)
  single, multi = _compiled(loss_fn, _freeze(kwargs), num_devices, sharded,
                            len(args))
  value_1, grads_1 = single(*args)
  values_n, grads_n = multi(*split_args)
  grads_n = [np.asarray(g).reshape((-1,) + g.shape[2:]) / num_devices
             for g in grads_n]
  return ((np.asarray(value_1), [np.asarray(g) for g in grads_1]),
          (np.asarray(values_n), grads_n))


def _freeze(kwargs: Dict[str, Any]) -> Any:
  """A hashable key for `kwargs`, or the dict itself when it has none."""
  try:
    key = tuple(sorted(kwargs.items()))
    hash(key)
    return key
  except TypeError:
    return _Unhashable(kwargs)


class _Unhashable:
  """Wraps kwargs holding arrays: hashed by identity, so never reused."""

  def __init__(self, kwargs: Dict[str, Any]):
    self.kwargs = kwargs

  def items(self):
    return self.kwargs.items()


@functools.lru_cache(maxsize=256)
def _compiled(loss_fn: Callable[..., jax.Array], kwargs_key: Any,
              num_devices: int, sharded: Tuple[int, ...], num_args: int):
  """The jitted 1-device and pmapped N-device value-and-gradient functions.

  Cached because a property test calls `device_equivalence` once per example
  with the same loss and shapes: a fresh `pmap(lambda ...)` per call would
  compile again every time (~0.5 s on CPU), the cached one only when a shape
  changes.
  """
  kwargs = dict(kwargs_key.items() if isinstance(kwargs_key, _Unhashable)
                else kwargs_key)

  def value_and_grads(axis_name, *a):
    return jax.value_and_grad(
        lambda *x: loss_fn(*x, axis_name=axis_name, **kwargs),
        argnums=sharded)(*a)

  single = jax.jit(lambda *a: value_and_grads(None, *a))
  in_axes = tuple(0 if i in sharded else None for i in range(num_args))
  multi = jax.pmap(
      lambda *a: value_and_grads(parallel.AXIS, *a), axis_name=parallel.AXIS,
      in_axes=in_axes, devices=jax.devices()[:num_devices])
  return single, multi
