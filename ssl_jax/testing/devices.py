"""Does a loss give the same value and gradient on N devices as on one?"""

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import PartitionSpec

from ssl_jax import parallel

# These programs run a few times on tiny arrays, so compiling is their whole
# cost; XLA:CPU at optimisation level 0 compiles them ~2x faster (measured on
# SwAV's value and gradient: 1.6 s -> 0.8 s of CPU) with the same float32 ops.
COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def device_equivalence(loss_fn: Callable[..., jax.Array],
                       args: Sequence[jax.Array], num_devices: int, *,
                       sharded_argnums: Optional[Sequence[int]] = None,
                       kwargs: Optional[Dict[str, Any]] = None,
                       grad_argnums: Optional[Sequence[int]] = None
                       ) -> Tuple[Tuple[np.ndarray, list], Tuple[np.ndarray, list]]:
  """Runs `loss_fn` on one device and split over `num_devices` devices.

  Args:
    loss_fn: `loss_fn(*args, axis_name=..., **kwargs) -> scalar`.
    args: global-batch inputs; those in `sharded_argnums` (default: all) are
      split along axis 0 over the devices, the others (a queue, a bank) are
      given whole to every device.
    num_devices: N, at most `len(parallel.devices())`.
    sharded_argnums: the per-example arguments (default: all).
    kwargs: extra keyword arguments (temperatures ...).
    grad_argnums: the arguments to differentiate (default: the sharded ones);
      they must be floating point. Integer labels or masks can be sharded
      without being differentiated.

  Returns:
    ((value_1, grads_1), (values_N, grads_N)): the single-device value and
    gradients w.r.t. `grad_argnums`, and the N per-device values with the
    N-device gradients. Under this library's pmap convention each device
    differentiates its own copy of the global loss, so per-device gradients
    of a sharded input are N times the global gradient: they are divided by N
    and reassembled into a global-batch array. Gradients of a replicated
    input (prototypes, a queue) are averaged over the devices, which is what
    the train step's `pmean` of parameter gradients does. For a correct loss
    grads_N == grads_1 and every entry of values_N == value_1.
  """
  kwargs = kwargs or {}
  available = len(parallel.devices())
  if num_devices > available:
    raise ValueError(f'Need {num_devices} devices, have {available}; '
                     f'under pytest, the ssl_jax plugin gives 8 CPU devices '
                     f'unless turned off (-p no:ssl_jax) or JAX started first; '
                     f'else set XLA_FLAGS=--xla_force_host_platform_device_'
                     f'count={num_devices} before JAX starts.')
  sharded = tuple(range(len(args))) if sharded_argnums is None else tuple(sharded_argnums)
  differentiated = sharded if grad_argnums is None else tuple(grad_argnums)

  for i in sharded:
    if args[i].shape[0] % num_devices:
      raise ValueError(f'Argument {i} has batch {args[i].shape[0]}, not '
                       f'divisible by {num_devices} devices.')
  single, multi = _compiled(loss_fn, _freeze(kwargs), num_devices, sharded,
                            len(args), differentiated)
  value_1, grads_1 = single(*args)
  values_n, grads_n = multi(*args)
  # Sharded gradients come back already concatenated in device order.
  grads_n = [np.asarray(g) / num_devices if i in sharded
             else np.mean(np.asarray(g), axis=0)
             for i, g in zip(differentiated, grads_n)]
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
              num_devices: int, sharded: Tuple[int, ...], num_args: int,
              differentiated: Tuple[int, ...]):
  """The jitted 1-device and N-device value-and-gradient functions.

  Cached because a property test calls `device_equivalence` once per example
  with the same loss and shapes: a fresh transform per call would compile
  again every time (~0.5-1 s of CPU), the cached one only when a shape
  changes.
  """
  kwargs = dict(kwargs_key.items() if isinstance(kwargs_key, _Unhashable)
                else kwargs_key)

  def value_and_grads(axis_name, *a):
    return jax.value_and_grad(
        lambda *x: loss_fn(*x, axis_name=axis_name, **kwargs),
        argnums=differentiated)(*a)

  single = jax.jit(lambda *a: value_and_grads(None, *a),
                   compiler_options=COMPILER_OPTIONS)

  # jax.pmap in this JAX is exactly this: a jit of shard_map with
  # check_vma=False over a 1-D mesh (see jax.pmap's source), hence the same
  # collectives and the same gradient convention as the train step's pmap.
  # Built directly so that it can be compiled at optimisation level 0.
  def per_device(*a):
    value, grads = value_and_grads(parallel.AXIS, *a)
    grads = [g if i in sharded else g[None] for i, g in zip(differentiated, grads)]
    return value[None], grads

  batch = PartitionSpec(parallel.AXIS)
  multi = jax.jit(jax.shard_map(
      per_device,
      mesh=parallel.make_mesh(parallel.devices(num_devices)),
      in_specs=tuple(batch if i in sharded else PartitionSpec()
                     for i in range(num_args)),
      out_specs=(batch, [batch] * len(differentiated)), check_vma=False),
                  compiler_options=COMPILER_OPTIONS)
  return single, multi
