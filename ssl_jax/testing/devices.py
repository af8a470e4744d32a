"""Does a loss give the same value and gradient on N devices as on one?"""

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

  def value_and_grads(axis_name, *a):
    return jax.value_and_grad(
        lambda *x: loss_fn(*x, axis_name=axis_name, **kwargs),
        argnums=sharded)(*a)

  value_1, grads_1 = jax.jit(lambda *a: value_and_grads(None, *a))(*args)

  split_args = []
  for i, a in enumerate(args):
    if i in sharded:
      if a.shape[0] % num_devices:
        raise ValueError(f'Argument {i} has batch {a.shape[0]}, not divisible '
                         f'by {num_devices} devices.')
      split_args.append(a.reshape((num_devices, -1) + a.shape[1:]))
    else:
      split_args.append(a)
  in_axes = tuple(0 if i in sharded else None for i in range(len(args)))
  values_n, grads_n = jax.pmap(
      lambda *a: value_and_grads(parallel.AXIS, *a), axis_name=parallel.AXIS,
      in_axes=in_axes, devices=jax.devices()[:num_devices])(*split_args)
  grads_n = [np.asarray(g).reshape((-1,) + g.shape[2:]) / num_devices
             for g in grads_n]
  return ((np.asarray(value_1), [np.asarray(g) for g in grads_1]),
          (np.asarray(values_n), grads_n))
