"""The one module that knows about devices, hosts and axis names.

Everything else takes an `axis_name` argument that is either `None` (one device,
plain formulas: unit tests, notebooks) or `AXIS` (inside `pmap`, collectives
across every device of every host). The helpers below turn into the identity
when `axis_name` is None, so a loss written with them is the same code on one
device and on a pod.

Gradient convention (measured on this JAX, where `pmap` is built on `shard_map`
without varying-manual-axes checks): each device differentiates its own copy of
the loss, and the transposes of `all_gather`/`psum` add up the cotangents of all
copies. Losses therefore return the *global* value on every device, the
per-device parameter gradients are averaged with `pmean` once in the train step
(`mean_gradients`), and that average equals the single-device gradient of the
global loss. Gradients with respect to per-device *inputs* come back N times the
global gradient; `ssl_jax.testing` accounts for that when it compares devices.
"""

import os
import socket
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AXIS = 'batch'

PyTree = Any


# ---------------------------------------------------------------------------
# Collectives that degrade to the identity on one device.


def axis_size(axis_name: Optional[str]) -> int:
  return 1 if axis_name is None else lax.axis_size(axis_name)


def axis_index(axis_name: Optional[str]) -> jax.Array:
  return jnp.int32(0) if axis_name is None else lax.axis_index(axis_name)


def all_gather(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Concatenates `x` from every device along axis 0 (device order)."""
  if axis_name is None:
    return x
  return lax.all_gather(x, axis_name, axis=0, tiled=True)


def psum(x: PyTree, axis_name: Optional[str]) -> PyTree:
  return x if axis_name is None else lax.psum(x, axis_name)


def pmean(x: PyTree, axis_name: Optional[str]) -> PyTree:
  return x if axis_name is None else lax.pmean(x, axis_name)


def global_batch_size(local_batch: int, axis_name: Optional[str]) -> int:
  return local_batch * axis_size(axis_name)


def global_offset(local_batch: int, axis_name: Optional[str]) -> jax.Array:
  """Index of this device's first example in the gathered global batch."""
  return axis_index(axis_name) * local_batch


def per_device_rng(rng: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Different randomness on each device from one replicated key."""
  if axis_name is None:
    return rng
  return jax.random.fold_in(rng, lax.axis_index(axis_name))


def mean_gradients(grads: PyTree, axis_name: Optional[str]) -> PyTree:
  """Averages per-device gradients into the gradient of the global loss."""
  return pmean(grads, axis_name)


# ---------------------------------------------------------------------------
# Hosts and devices.


def initialize_distributed(coordinator_address: str = '',
                           num_processes: int = 0,
                           process_id: int = -1,
                           heartbeat_timeout_s: int = 100,
                           initialization_timeout_s: int = 300) -> None:
  """Starts JAX's multi-host runtime (`jax.distributed`).

  Empty/zero/-1 arguments are left for JAX to detect from the environment
  (TPU pods, SLURM, Open MPI); the `SSL_JAX_COORDINATOR`, `SSL_JAX_NUM_PROCESSES`
  and `SSL_JAX_PROCESS_ID` variables fill them in for hand-launched processes.

  Args:
    coordinator_address: 'host:port' of process 0's coordination service.
    num_processes: number of processes in the run.
    process_id: this process's index.
    heartbeat_timeout_s: seconds without a heartbeat after which the
      coordination service declares a process dead and the survivors abort
      (non-zero exit) rather than wait forever in a collective.
    initialization_timeout_s: seconds to wait for every process to join.
  """
  coordinator_address = (coordinator_address or
                         os.environ.get('SSL_JAX_COORDINATOR') or None)
  num_processes = (num_processes or
                   int(os.environ.get('SSL_JAX_NUM_PROCESSES', 0)) or None)
  if process_id < 0:
    process_id = int(os.environ.get('SSL_JAX_PROCESS_ID', -1))
  # Cross-process collectives on CPU hosts go through gloo; accelerators use
  # their own (NCCL, ICI) and ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  where = (f'coordinator {coordinator_address or "(detected by JAX)"}, '
           f'process {process_id if process_id >= 0 else "?"} of '
           f'{num_processes or "?"}, initialization timeout '
           f'{int(initialization_timeout_s)} s')
  # JAX aborts the process natively (no Python exception) when registration
  # with the coordinator times out: a line first, so the log names them.
  sys.stderr.write(f'Joining the multi-host run: {where}.\n')
  sys.stderr.flush()
  # Only a process known not to be the coordinator waits for its port (one
  # whose index JAX detects may be the coordinator itself).
  if coordinator_address and process_id > 0:
    _wait_for_coordinator(coordinator_address, initialization_timeout_s, where)
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=None if process_id < 0 else process_id,
        initialization_timeout=int(initialization_timeout_s),
        heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  except Exception as e:  # pylint: disable=broad-except
    # JAX raises RuntimeError/ValueError/XlaRuntimeError here (a port in use,
    # an address that does not parse); one message whatever the type.
    raise DistributedInitError(
        f'Could not start the multi-host run ({where}): {type(e).__name__}: '
        f'{str(e).strip().splitlines()[0] if str(e).strip() else e!r}. Check '
        f'--config.distributed.coordinator_address and that the port is free '
        f'on process 0.') from e


class DistributedInitError(RuntimeError):
  """This process could not join the multi-host run (names the coordinator)."""


def _wait_for_coordinator(address: str, timeout_s: float, where: str) -> None:
  """Waits until `address` accepts TCP connections, or raises naming it.

  Process 0 starts the coordination service inside `jax.distributed.initialize`;
  the others can wait for its port here, where a timeout is a Python
  exception with a message instead of a native abort.
  """
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  try:
    port = int(port)
  except ValueError:
    raise DistributedInitError(
        f'config.distributed.coordinator_address={address!r} is not '
        f'host:port.') from None
  deadline = time.monotonic() + float(timeout_s)
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(
          5.0, max(deadline - time.monotonic(), 0.1))):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise DistributedInitError(
          f'The coordinator {address} could not be reached within '
          f'{float(timeout_s):g} s ({where}; last error: {last}). Start process '
          f'0 first, check the address and the firewall, or raise '
          f'--config.distributed.initialization_timeout_s.')
    time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def wait_for_all_processes(name: str, timeout_s: int = 600) -> None:
  """Blocks until every process reaches the barrier `name` (no-op alone).

  Uses the coordination service, whose timeout is ours to choose, so that the
  first collective (on CPU, gloo sets up its context with a fixed 30 s
  deadline) starts at about the same time on every process even when one of
  them was slow to start.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def local_device_count() -> int:
  return jax.local_device_count()


def device_count() -> int:
  return jax.device_count()


def is_main_process() -> bool:
  return jax.process_index() == 0


def check_batch_size(global_batch: int) -> None:
  """Fails early, with what to change, if the batch does not split evenly."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if global_batch % n_dev:
    raise ValueError(
        f'The global batch size {global_batch} is not divisible by the '
        f'{n_dev} devices of this run. Set --config.batch_size to a '
        f'multiple of {n_dev} (e.g. {max(n_dev, global_batch // n_dev * n_dev)}).')
  if global_batch % n_proc:
    raise ValueError(
        f'The global batch size {global_batch} is not divisible by the '
        f'{n_proc} processes of this run; set --config.batch_size to a '
        f'multiple of {n_proc}.')


# ---------------------------------------------------------------------------
# Moving state and batches onto the local devices.


def replicate(tree: PyTree) -> PyTree:
  """One copy of `tree` per local device, laid out as `pmap` outputs are.

  `flax.jax_utils.replicate` alone yields arrays whose sharding names another
  mesh axis than pmap's outputs, which makes the second train step compile
  again (measured: +12 s); passing them through an identity pmap gives the
  layout every later step sees.
  """
  return _identity_pmap(flax.jax_utils.replicate(tree))


_identity_pmap = jax.pmap(lambda x: x, axis_name=AXIS)


def unreplicate(tree: PyTree) -> PyTree:
  """The copy of device 0, fetched to host memory as NumPy arrays."""
  return jax.device_get(flax.jax_utils.unreplicate(tree))


def shard(batch: PyTree) -> PyTree:
  """Splits the leading (host-local batch) axis into [devices, per_device]."""
  n = jax.local_device_count()

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f'Host batch of {x.shape[0]} examples cannot be split '
                       f'over {n} local devices.')
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree.map(split, batch)


def prefetch_to_devices(batches: Iterable[PyTree],
                        size: int = 2) -> Iterator[PyTree]:
  """Shards host batches and keeps `size` of them in flight on the devices."""
  return flax.jax_utils.prefetch_to_device(
      (shard(b) for b in batches), size)


def pmap(fn: Callable, *, donate_argnums: Sequence[int] = (),
         static_broadcasted_argnums: Sequence[int] = ()) -> Callable:
  """`jax.pmap` over all local devices with the library's axis name.

  Donation is skipped on the CPU backend: measured here (jax 0.10.2, 2 cores),
  a donated pmapped train step ran 7x slower than the same step without it,
  and host memory is not the constraint donation exists for.
  """
  if jax.default_backend() == 'cpu':
    donate_argnums = ()
  return jax.pmap(fn, axis_name=AXIS, donate_argnums=tuple(donate_argnums),
                  static_broadcasted_argnums=tuple(static_broadcasted_argnums))


def host_local_to_numpy(x: jax.Array) -> np.ndarray:
  return np.asarray(jax.device_get(x))
