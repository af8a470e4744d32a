"""The one module that knows about devices, hosts and axis names.

Everything else takes an `axis_name` argument that is either `None` (one device,
plain formulas: unit tests, notebooks) or `AXIS` (inside `shard_map` over the
mesh, or `pmap`: collectives across every device of every host).

The engine: one `jax.sharding.Mesh` with the single axis `AXIS` over every
device of every process (`default_mesh`). Per-device code written with pmap
semantics runs on it through `data_parallel`, which is `jax.jit` around
`jax.shard_map`: state and other replicated inputs are global `jax.Array`s
with sharding `P()`, batches global arrays split on `P(AXIS)`, each process
contributing its own share (`put_batch`). With FSDP (`config.mesh.fsdp`) the
state is stored sharded and the step is `fsdp_parallel` (see FSDP below).
The helpers below turn into the identity
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

import collections
import dataclasses
import functools
import itertools
import os
import socket
import sys
import threading
import time
from typing import (Any, Callable, Dict, Iterable, Iterator, NamedTuple,
                    Optional, Sequence, Tuple)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost as ocp_multihost

AXIS = 'batch'

# Random bits that do not depend on how an array is sharded: a key split or
# drawn under jit gives the same numbers whatever the mesh (the default since
# JAX 0.5, set here so that no older default or user setting changes the
# run's random streams between topologies).
jax.config.update('jax_threefry_partitionable', True)

# Shorthand for the two layouts the library uses: `P()` replicated on every
# device, `P(AXIS)` split along the leading (batch) axis.
P = PartitionSpec

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

  Uses the coordination service (orbax's barrier over an explicit process
  set), whose timeout is ours to choose, not a device collective: on CPU the
  first collective sets up gloo with a fixed 30 s deadline, so it must start
  at about the same time on every process even when one was slow to start
  or to compile. Every process must pass the same, unique `name`.
  """
  if jax.process_count() == 1:
    return
  ocp_multihost.sync_global_processes(
      name, timeout=int(timeout_s),
      processes=set(range(jax.process_count())))


_agreements = itertools.count()


def all_processes_agree(ok: bool, timeout_s: int = 600) -> bool:
  """True on every process if `ok` is True on every process, else False on
  every process (`ok` itself alone). Every process must call it, in the same
  order.

  A barrier first, for the reason given in `wait_for_all_processes`: a
  process still busy (hashing its share of a checkpoint) may arrive much
  later than the others.
  """
  if jax.process_count() == 1:
    return bool(ok)
  wait_for_all_processes(f'ssl_jax_agree_{next(_agreements)}', timeout_s)
  votes = multihost_utils.process_allgather(np.array(int(bool(ok)), np.int32))
  return bool(np.all(votes))


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
# The mesh, shardings, and moving data onto it.


def devices(count: Optional[int] = None) -> Tuple[jax.Device, ...]:
  """The first `count` devices of `jax.devices()` (default: all, of every
  process), in the order `make_mesh` lays batch shards out."""
  found = jax.devices()
  return tuple(found if count is None else found[:count])


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A one-axis mesh (`AXIS`) over `devices` (default: all of every process).

  Args:
    devices: the devices, in the order of their batch shards; the default,
      `jax.devices()`, lists process 0's devices first, so that process p's
      share of the global batch is its p-th block, as the data order assumes.

  Returns:
    The mesh.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (AXIS,))


@functools.lru_cache(maxsize=None)
def default_mesh() -> Mesh:
  """The run's mesh: every device of every process (built once per process,
  after `initialize_distributed`)."""
  return make_mesh()


# ---------------------------------------------------------------------------
# FSDP: the state stored sharded between steps, gathered where it is used.
#
# With `config.mesh.fsdp` = f > 1 the same devices also form a 2-D mesh
# (DATA_AXIS, FSDP_AXIS) of shape (devices / f, f), in the order of the 1-D
# mesh, so that device i holds batch shard i in both. Parameters, optimizer
# state and method state (EMA teachers, banks, queues) are stored sharded
# over FSDP_AXIS (each leaf on its largest dimension that f divides, as
# big_vision's `fsdp` rule; small leaves replicated), which divides their
# memory per device by f. A leaf no dimension of which f divides (SEER's
# RegNetY widths 373 x (2, 4, 11, 28)) is stored padded with zeros on its
# largest dimension to a multiple of f (`padded_shape`) and sharded there:
# jax shards only evenly (device_put and jit's in/out shardings raise
# IndivisibleError). Only the stored layout is padded: the step slices
# the padding off where it reads the state (after the all-gather; on entry
# to the update) and pads again on exit, so losses, optimizer norms, weight
# decay masks and normalisations see the logical shapes, and `logical`
# gives readers outside the step (evaluation, epoch hooks) the same.
#
# The step (`fsdp_parallel`) is two halves in one jit. The per-device half
# runs under `shard_map` over the 2-D mesh with the batch axis BATCH_AXES =
# (DATA_AXIS, FSDP_AXIS): the same devices in the same order as AXIS, so the
# losses' collectives, per-device keys and example offsets do not change.
# It receives the state's shards; its loss (`FsdpBody.gathered_loss`)
# all-gathers each sharded leaf where the model uses it and again in the
# backward pass (remat of the gathers only), so that no gathered weight has
# to outlive its layer (XLA's default CPU schedule still issues a pass's
# gathers early: experiments/memory.py), and the all-gather's transpose, a
# reduce-scatter, gives each device the gradient of its own shard. The
# update half (optimizer, non-finite guard, EMA teachers) runs on the
# sharded global arrays outside `shard_map`, where GSPMD computes norms
# (LARS trust ratios, clipping, the logged norms) over whole leaves.

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
# The batch axis of FSDP's per-device half: every device, in AXIS's order.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# The name (`jax.ad_checkpoint.checkpoint_name`) of a gathered FSDP leaf: not
# saved for the backward pass, gathered again there.
GATHERED = 'fsdp_gathered'

# Leaves with fewer elements stay replicated: sharding them saves little and
# adds a collective each.
FSDP_MIN_SIZE = 2**14


def mesh_shape(data: int = -1, fsdp: int = 1,
               device_count: Optional[int] = None) -> Tuple[int, int]:
  """(data, fsdp) of the run's mesh from `config.mesh` (data=-1: the rest).

  Raises:
    ValueError: fsdp does not divide the devices, or data x fsdp is not their
      number.
  """
  n = jax.device_count() if device_count is None else device_count
  if not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
    raise ValueError(f'config.mesh.fsdp={fsdp!r} must be a positive divisor of '
                     f'the {n} devices of this run (1 turns FSDP off).')
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f'config.mesh.data x config.mesh.fsdp = {data} x {fsdp} '
                     f'is not the {n} devices of this run; set '
                     f'--config.mesh.data=-1 (the rest).')
  return data, fsdp


def make_fsdp_mesh(fsdp: int,
                   devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The 2-D (DATA_AXIS, FSDP_AXIS) mesh over the devices of `make_mesh`,
  in the same order (so it shares the compiled step with the 1-D mesh)."""
  devices = jax.devices() if devices is None else list(devices)
  data, fsdp = mesh_shape(-1, fsdp, len(devices))
  return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS))


def fsdp_spec(shape: Sequence[int], fsdp: int,
              min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
  """Shards the largest dimension of `shape` that `fsdp` divides; if none
  does, the largest dimension, stored padded to a multiple of `fsdp`
  (`padded_shape`). P() if the leaf has fewer than `min_size` elements, or
  its largest dimension is below `fsdp` (padding would more than double it).
  """
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
    return P()
  # Largest first; among equal sizes the last dimension (big_vision's order).
  order = np.argsort(shape, kind='stable')[::-1]
  for d in order:
    if shape[d] % fsdp == 0 and shape[d] >= fsdp:
      return P(*([None] * int(d) + [FSDP_AXIS]))
  if len(order) and shape[order[0]] >= fsdp:
    return P(*([None] * int(order[0]) + [FSDP_AXIS]))
  return P()


def _spec_and_size(sharding: Any) -> Tuple[Optional[int], int]:
  """(the FSDP dimension of a NamedSharding or None, the FSDP axis size)."""
  spec = getattr(sharding, 'spec', None)
  mesh = getattr(sharding, 'mesh', None)
  if spec is None or mesh is None or FSDP_AXIS not in mesh.shape:
    return None, 1
  return _fsdp_dim(spec), mesh.shape[FSDP_AXIS]


def padded_shape(shape: Sequence[int], sharding: Any) -> Tuple[int, ...]:
  """The stored shape of a leaf of logical `shape` laid out as `sharding`:
  its FSDP dimension rounded up to a multiple of the FSDP axis size (the
  same shape where that divides, and for any other sharding)."""
  shape = tuple(int(n) for n in shape)
  d, fsdp = _spec_and_size(sharding)
  if d is None or d >= len(shape):
    return shape
  return shape[:d] + (-(-shape[d] // fsdp) * fsdp,) + shape[d + 1:]


def _pad_leaf(x: Any, shape: Tuple[int, ...]) -> Any:
  if tuple(np.shape(x)) == shape:
    return x
  widths = [(0, n - m) for m, n in zip(np.shape(x), shape)]
  return (jnp.pad(x, widths) if isinstance(x, jax.Array) else
          np.pad(np.asarray(x), widths))


@functools.lru_cache(maxsize=None)
def _cutter(shape: Tuple[int, ...]) -> Callable:
  # A jitted slice: on global arrays that span processes too (every process
  # calls it), and inlined when traced inside another jit.
  return jax.jit(lambda a: a[tuple(slice(0, n) for n in shape)])


def _slice_leaf(x: Any, shape: Sequence[int]) -> Any:
  shape = tuple(int(n) for n in shape)
  if tuple(np.shape(x)) == shape:
    return x
  if isinstance(x, jax.Array):
    return _cutter(shape)(x)
  return np.asarray(x)[tuple(slice(0, n) for n in shape)]


def pad_to_layout(tree: PyTree, shardings: PyTree) -> PyTree:
  """`tree` (logical shapes) in the stored shapes of `shardings`: each leaf
  FSDP pads (`padded_shape`) padded with zeros at the end; the others as
  they are (no copy). Host arrays or traced ones (inside jit)."""
  return jax.tree.map(
      lambda x, s: _pad_leaf(x, padded_shape(np.shape(x), s)), tree, shardings)


def logical(tree: PyTree, like: PyTree) -> PyTree:
  """`tree` (a stored state or part of one) cut to the logical shapes of
  `like` (the same tree of arrays or ShapeDtypeStructs, e.g. the run's
  initial state): the FSDP padding sliced off. Leaves without padding are
  returned as they are; inside jit, or on global arrays (a padded leaf then
  comes back replicated: what readers outside the step, such as
  evaluation, gather anyway)."""
  return jax.tree.map(lambda x, l: _slice_leaf(x, tuple(np.shape(l))),
                      tree, like)


def has_padding(like: PyTree, shardings: PyTree) -> bool:
  """Whether any leaf of `like` (logical shapes) is stored padded as
  `shardings`."""
  return any(padded_shape(np.shape(x), s) != tuple(np.shape(x))
             for x, s in zip(jax.tree.leaves(like), jax.tree.leaves(shardings)))


def fsdp_shardings(tree: PyTree, mesh: Mesh,
                   min_size: int = FSDP_MIN_SIZE) -> PyTree:
  """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs) on the
  2-D `mesh`: `fsdp_spec` of each leaf."""
  fsdp = mesh.shape[FSDP_AXIS]

  def sharding(x):
    spec = fsdp_spec(np.shape(x), fsdp, min_size)
    if is_key(x) and padded_shape(np.shape(x), NamedSharding(mesh, spec)
                                  ) != tuple(np.shape(x)):
      spec = P()  # typed keys have no zeros to pad with
    return NamedSharding(mesh, spec)

  return jax.tree.map(sharding, tree)


def state_shardings(state: PyTree, fsdp: int = 1,
                    fields: Sequence[str] = ('params', 'opt_state',
                                             'method_state'),
                    min_size: int = FSDP_MIN_SIZE,
                    devices: Optional[Sequence[jax.Device]] = None) -> PyTree:
  """The layout of a train state between steps.

  Args:
    state: a flax struct (TrainState) of arrays or ShapeDtypeStructs.
    fsdp: the FSDP axis size; 1 replicates everything (on `default_mesh()`).
    fields: the state's fields sharded over FSDP_AXIS; the others (step,
      rng, BatchNorm statistics, probe) stay replicated.
    min_size: see `fsdp_spec`.
    devices: the mesh's devices (default: all of every process).

  Returns:
    The same struct with a NamedSharding per leaf.
  """
  if fsdp <= 1:
    mesh = default_mesh() if devices is None else make_mesh(devices)
    return jax.tree.map(lambda _: replicated(mesh), state)
  mesh = make_fsdp_mesh(fsdp, devices)
  layout = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  return layout.replace(**{f: fsdp_shardings(getattr(state, f), mesh, min_size)
                           for f in fields})


def _fsdp_dim(spec: PartitionSpec) -> Optional[int]:
  """The dimension a leaf's `fsdp_spec` shards, or None if replicated."""
  return next((d for d, a in enumerate(spec) if a == FSDP_AXIS), None)


def _own_shard(x: jax.Array, spec: PartitionSpec) -> jax.Array:
  """This device's block of a whole (replicated) leaf laid out as `spec`."""
  d = _fsdp_dim(spec)
  if d is None:
    return x
  size = x.shape[d] // lax.axis_size(FSDP_AXIS)
  return lax.dynamic_slice_in_dim(x, lax.axis_index(FSDP_AXIS) * size, size,
                                  axis=d)


class Kept(NamedTuple):
  """A method state leaving FSDP's per-device half: `stored`, each leaf in
  its stored layout (this device's shard); `whole`, None but where the step
  returned something else than an array of the leaf's shape (a pending bank
  or queue write), passed on whole (replicated) instead."""
  stored: PyTree
  whole: PyTree


class _Pair(NamedTuple):
  stored: Any
  whole: Any


def _is_kept(x: Any) -> bool:
  return isinstance(x, Kept)


def merge_kept(tree: PyTree) -> PyTree:
  """`tree` with each `Kept` node turned back into one global tree (outside
  `shard_map`): the stored leaves, or what passed whole in their place."""
  def merge(kept):
    return jax.tree.map(lambda s, w: s if w is None else w, kept.stored,
                        kept.whole, is_leaf=lambda x: x is None)
  return jax.tree.map(lambda x: merge(x) if _is_kept(x) else x, tree,
                      is_leaf=_is_kept)


def _is_float(x: Any) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.inexact)


def _after(tree: PyTree, anchor: PyTree) -> PyTree:
  """`tree`, unchanged in value, made to depend on every float leaf of
  `anchor`: XLA may not compute what reads it (a gather) before `anchor`.

  A zero times one element of each anchor leaf, not an optimization barrier:
  XLA:CPU still hoisted the gathers across barriers. (A non-finite anchor
  makes the tree non-finite; the step is rejected then anyway.)
  """
  zeros = [0 * jnp.ravel(a)[0] for a in jax.tree.leaves(anchor) if _is_float(a)]
  if not zeros:
    return tree
  zero = functools.reduce(lambda a, b: a + b.astype(a.dtype), zeros)
  return jax.tree.map(lambda x: x + zero.astype(x.dtype) if _is_float(x) else x,
                      tree)


_in_block = threading.local()


def _block_call(module: Any, mutable: Sequence[str], static: Any,
                params: PyTree, consts: Dict[str, PyTree], dynamic: Sequence[Any]
                ) -> Tuple[Any, Dict[str, PyTree]]:
  """`module.__call__` (an unbound copy) on these variables: (output, updated
  `mutable` collections)."""
  args, kwargs = jax.tree.unflatten(static[0], [
      dynamic[i] if i in static[2] else x for i, x in enumerate(static[1])])
  depth = getattr(_in_block, 'depth', 0)
  _in_block.depth = depth + 1  # its own __call__ is not intercepted again
  try:
    out = module.apply({'params': params, **consts}, *args,
                       mutable=list(mutable), **kwargs)
  finally:
    _in_block.depth = depth
  return out


def _gathering_block(call: Callable, where: Sequence[Tuple[PartitionSpec, Any]]
                     ) -> Callable:
  """`call(whole, others, consts, dynamic)` made a function of the shards of
  `whole` (`where`: their specs and logical shapes) that gathers them after
  `dynamic` (the block's inputs) exists, and again in the backward pass after
  the output's cotangent exists; there the input's cotangent waits for the
  weights' reduce-scattered gradient."""
  def run(shards, others, consts, dynamic):
    whole = [FsdpBody._gather_leaf(x, *w) for x, w in zip(shards, where)]
    return call(whole, others, consts, dynamic)

  def fwd(shards, others, consts, dynamic):
    out = run(_after(shards, dynamic), others, consts, dynamic)
    return out, (shards, others, consts, dynamic)

  def bwd(res, ct):
    shards, others, consts, dynamic = res
    _, vjp = jax.vjp(lambda s, o, d: run(s, o, consts, d)[0],
                     _after(shards, ct[0]), others, dynamic)
    c_shards, c_others, c_dynamic = vjp(ct[0])
    return (c_shards, c_others, jax.tree.map(jnp.zeros_like, consts),
            _after(c_dynamic, c_shards))

  block = jax.custom_vjp(run)
  block.defvjp(fwd, bwd)
  return block


class _BlockGathers:
  """A flax method interceptor that runs the `__call__` of `blocks` modules,
  whose parameters are FSDP shards (`shards`: id -> (spec, logical shape)),
  as a `jax.custom_vjp`: the forward pass gathers the weights once the
  block's input exists, the backward pass gathers them again once the
  output's cotangent exists, differentiates the block on them and
  reduce-scatters the weights' gradient before passing the input's
  cotangent on. Hence one block's gathered weights live at a time; the price
  is the block's forward computed again in the backward pass.

  With `shards` None it probes instead: blocks run on zeros in place of the
  leaves it finds, and `found` collects their ids (`_block_only_leaves`).
  """

  def __init__(self, blocks: Tuple[type, ...],
               shards: Optional[Dict[int, Tuple[PartitionSpec, Any]]]):
    self.blocks = blocks
    self.shards = shards
    self.found = set()

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if (getattr(_in_block, 'depth', 0) or context.method_name != '__call__'
        or not isinstance(module, self.blocks) or module.scope is None
        # Blocks drawing random numbers would draw others in a copy.
        or module.scope.rngs
        or module.scope.is_mutable_collection('params')):
      return next_fun(*args, **kwargs)
    variables = dict(module.variables)
    leaves, treedef = jax.tree.flatten(variables.pop('params', {}))
    if self.shards is None:
      own = [i for i, x in enumerate(leaves) if _is_float(x)]
    else:
      own = [i for i, x in enumerate(leaves) if id(x) in self.shards]
    if not own:
      return next_fun(*args, **kwargs)
    mutable = [c for c in variables if module.scope.is_mutable_collection(c)]
    consts = {c: v for c, v in variables.items() if c not in mutable}
    flat, args_def = jax.tree.flatten((args, kwargs))
    at = tuple(i for i, x in enumerate(flat) if isinstance(x, (jax.Array,
                                                               np.ndarray)))
    static = (args_def, [None if i in at else x for i, x in enumerate(flat)],
              at)
    dynamic = [flat[i] for i in at]
    unbound = module.clone(parent=None)
    others = [None if i in own else x for i, x in enumerate(leaves)]

    def merge(whole, others):
      it = iter(whole)
      return treedef.unflatten([next(it) if i in own else x
                                for i, x in enumerate(others)])

    if self.shards is None:
      self.found.update(id(leaves[i]) for i in own)
      whole = [jnp.zeros(leaves[i].shape, leaves[i].dtype) for i in own]
      y, new = _block_call(unbound, mutable, static, merge(whole, others),
                           consts, dynamic)
    else:
      def call(whole, others, consts, dynamic):
        return _block_call(unbound, mutable, static, merge(whole, others),
                           consts, dynamic)

      where = [self.shards[id(leaves[i])] for i in own]
      y, new = _gathering_block(call, where)([leaves[i] for i in own], others,
                                             consts, dynamic)
    for c, tree in new.items():
      for name, value in tree.items():
        module.put_variable(c, name, value)
    return y


def _block_only_leaves(loss_fn: Callable, blocks: Tuple[type, ...],
                       treedef: Any, gathered: Sequence[Any],
                       specs: Sequence[PartitionSpec], state: PyTree
                       ) -> Tuple[int, ...]:
  """The positions of the sharded parameter leaves (of `gathered`, whole)
  that `loss_fn` reads only inside calls of `blocks` modules it can run on
  shards (`_BlockGathers`).

  Traces the loss once more, the blocks fed zeros in place of the leaves
  they read: a leaf its jaxpr still reads is used elsewhere too (a shared
  weight, a norm of the parameters) and must be gathered whole.
  """
  probe = _BlockGathers(blocks, None)
  found = {}

  def traced(*leaves):
    found.update((id(x), i) for i, x in enumerate(leaves))
    with nn.intercept_methods(probe):
      return loss_fn(treedef.unflatten(list(leaves)), state)

  jaxpr = jax.make_jaxpr(traced)(*gathered).jaxpr
  read = {id(v) for e in jaxpr.eqns for v in e.invars}
  read |= {id(v) for v in jaxpr.outvars}
  in_blocks = {found[k] for k in probe.found if k in found}
  return tuple(i for i, v in enumerate(jaxpr.invars)
               if i in in_blocks and id(v) not in read and
               _fsdp_dim(specs[i]) is not None)


@dataclasses.dataclass(frozen=True)
class FsdpBody:
  """What FSDP's per-device half needs to compute on state shards.

  Attributes:
    params: a PartitionSpec per parameter (`fsdp_spec`).
    state: a PartitionSpec per leaf of the other sharded state (the method
      state: teachers, banks, queues, centres).
    param_shapes, state_shapes: the logical shapes of the same leaves (trees
      of arrays or ShapeDtypeStructs), where a leaf may be stored padded
      (`padded_shape`); the gathered leaves are cut to them. None: nothing
      is padded.
    blocks: module classes (the backbones' repeated blocks) whose calls
      gather their own parameters, one block at a time (`gathered_loss`).
  """
  params: PyTree
  state: PyTree
  param_shapes: Optional[PyTree] = None
  state_shapes: Optional[PyTree] = None

  blocks: Tuple[type, ...] = ()

  @staticmethod
  def _gather_leaf(x: Any, spec: PartitionSpec, like: Any = None) -> Any:
    d = _fsdp_dim(spec)
    if d is None:
      return x
    whole = checkpoint_name(lax.all_gather(x, FSDP_AXIS, axis=d, tiled=True),
                            GATHERED)
    # The slice's transpose pads the cotangent with zeros: the padding's
    # gradient is exactly zero, and the loss never sees the padding.
    return whole if like is None else _slice_leaf(whole, np.shape(like))

  @classmethod
  def _gather(cls, tree: PyTree, specs: PyTree, shapes: Optional[PyTree]
              ) -> PyTree:
    if shapes is None:
      return jax.tree.map(cls._gather_leaf, tree, specs)
    return jax.tree.map(cls._gather_leaf, tree, specs, shapes)

  def _keep(self, new: PyTree, whole: PyTree, shards: PyTree) -> Kept:
    def split(old, shard, spec, new):
      if new is old:  # unchanged: the shard this device already holds
        return shard, None
      if isinstance(new, jax.Array) and new.shape == old.shape:
        d = _fsdp_dim(spec)
        if d is not None:  # back to the stored (padded) shape
          n = shard.shape[d] * lax.axis_size(FSDP_AXIS)
          new = _pad_leaf(new, new.shape[:d] + (n,) + new.shape[d + 1:])
        return _own_shard(new, spec), None
      return shard, new
    pairs = jax.tree.map(lambda *a: _Pair(*split(*a)), whole, shards,
                         self.state, new)
    is_pair = lambda x: isinstance(x, _Pair)
    return Kept(jax.tree.map(lambda p: p.stored, pairs, is_leaf=is_pair),
                jax.tree.map(lambda p: p.whole, pairs, is_leaf=is_pair))

  def gathered_loss(self, loss_fn: Callable) -> Callable:
    """`loss_fn(params, state) -> (loss, (aux, new_state))` on whole values
    made a function of their shards, returning `(loss, (aux, Kept))`.

    Each sharded leaf is all-gathered (over FSDP_AXIS) where it is used,
    and gathered again for the backward pass instead of being saved
    (`jax.checkpoint` saving everything but GATHERED). Differentiate with
    respect to the parameter shards: the all-gather's transpose sums each
    shard's cotangent over FSDP_AXIS (a reduce-scatter).

    XLA hoists those gathers, though (on CPU all of them: one model's worth
    of gathered weights live at once), so the parameters that only `blocks`
    modules use are not gathered here: each call of such a block gathers its
    own weights, in the forward and again in the backward pass, and
    reduce-scatters their gradient before the backward pass moves on
    (`_BlockGathers`), which holds about one block's weights at a time.
    """
    def sharded_loss(params, state):
      whole = self._gather(state, self.state, self.state_shapes)
      leaves, treedef = jax.tree.flatten(params)
      specs = treedef.flatten_up_to(self.params)
      shapes = (treedef.flatten_up_to(self.param_shapes)
                if self.param_shapes is not None else [None] * len(leaves))
      gathered = [self._gather_leaf(*a) for a in zip(leaves, specs, shapes)]
      own = (_block_only_leaves(loss_fn, self.blocks, treedef, gathered,
                                specs, whole) if self.blocks else ())
      if not own:
        loss, (aux, new) = loss_fn(treedef.unflatten(gathered), whole)
      else:
        # The blocks' leaves stay shards here; `_BlockGathers` knows them
        # by identity (flax hands a module the very arrays passed in).
        mixed = [leaves[i] if i in own else g for i, g in enumerate(gathered)]
        shards = {id(leaves[i]): (specs[i], shapes[i]) for i in own}
        with nn.intercept_methods(_BlockGathers(self.blocks, shards)):
          loss, (aux, new) = loss_fn(treedef.unflatten(mixed), whole)
      return loss, (aux, self._keep(new, whole, state))

    return jax.checkpoint(
        sharded_loss,
        policy=jax.checkpoint_policies.save_anything_except_these_names(
            GATHERED))

  def mean_gradients(self, grads: PyTree) -> PyTree:
    """The global mean gradient, laid out as the parameters.

    A sharded leaf's gradient already holds the sum over its FSDP group
    (reduce-scatter); summing over DATA_AXIS completes the sum over every
    device, whose mean `mean_gradients` takes for replicated leaves.
    """
    n = lax.axis_size(BATCH_AXES)
    return jax.tree.map(
        lambda g, spec: (lax.pmean(g, BATCH_AXES) if _fsdp_dim(spec) is None
                         else lax.psum(g, DATA_AXIS) / n), grads, self.params)


def bytes_per_device(tree: PyTree, shardings: PyTree) -> int:
  """Bytes one device holds of `tree` (logical or stored shapes) laid out as
  `shardings`, FSDP's padding included."""
  # dtype.itemsize: typed PRNG keys have one (8 bytes) but no NumPy dtype.
  return sum(int(np.prod(s.shard_shape(padded_shape(np.shape(x), s)),
                         dtype=np.int64)) *
             x.dtype.itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def replicated(mesh: Optional[Mesh] = None) -> NamedSharding:
  """Sharding of arrays held whole by every device (state, parameters)."""
  return NamedSharding(mesh or default_mesh(), P())


def batch_sharded(mesh: Optional[Mesh] = None) -> NamedSharding:
  """Sharding of arrays split over the devices along their leading axis."""
  return NamedSharding(mesh or default_mesh(), P(AXIS))


def put_replicated(tree: PyTree, mesh: Optional[Mesh] = None) -> PyTree:
  """Global arrays replicated on every device of `mesh` from a host tree.

  Every process must pass the same values. Leaves that already are global
  arrays with this sharding are returned as they are (no copy).

  Args:
    tree: NumPy or jax arrays (e.g. a freshly initialised TrainState).
    mesh: the mesh (default: `default_mesh()`).

  Returns:
    The same tree of replicated `jax.Array`s.
  """
  sharding = replicated(mesh)
  return put_sharded(tree, jax.tree.map(lambda _: sharding, tree))


def is_key(x: Any) -> bool:
  """Whether `x` is a typed PRNG key array (`jax.random.key`) or its shape."""
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype,
                                                       jax.dtypes.prng_key)


@functools.lru_cache(maxsize=None)
def _resharder(sharding: jax.sharding.Sharding) -> Callable:
  return jax.jit(lambda a: a, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _padder(sharding: jax.sharding.Sharding, shape: Tuple[int, ...]
            ) -> Callable:
  return jax.jit(lambda a: _pad_leaf(a, shape), out_shardings=sharding)


def _put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  shape = padded_shape(np.shape(x), sharding)
  if shape != tuple(np.shape(x)):  # a logical leaf into an FSDP padded layout
    if isinstance(x, jax.Array) and not is_key(x):
      return _padder(sharding, shape)(x)
    x = _pad_leaf(np.asarray(x), shape)
  if isinstance(x, jax.Array):
    if x.sharding == sharding or (
        x.sharding.device_set == sharding.device_set and
        x.sharding.is_equivalent_to(sharding, x.ndim)):
      return x
    if not x.is_fully_addressable or x.sharding.device_set == sharding.device_set:
      # Another global layout (e.g. FSDP shards <-> replicated): on device.
      return _resharder(sharding)(x)
  if is_key(x):  # typed keys have no NumPy form: place their data
    return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def put_sharded(tree: PyTree, shardings: PyTree) -> PyTree:
  """Global arrays laid out as `shardings` (a NamedSharding per leaf).

  Host leaves must hold the whole value on every process; global arrays in
  another layout are resharded on the devices; leaves already in their layout
  are returned as they are. Logical leaves that an FSDP layout stores padded
  are padded (`padded_shape`); `logical` undoes it.
  """
  return jax.tree.map(_put, tree, shardings)


def _check_local_batch(x: np.ndarray, mesh: Mesh) -> None:
  n = len(mesh.local_devices)
  if x.ndim == 0 or x.shape[0] % n:
    raise ValueError(f'Host batch of shape {x.shape} cannot be split over '
                     f'{n} local devices.')


def put_batch(tree: PyTree, mesh: Optional[Mesh] = None) -> PyTree:
  """Global batch arrays from each process's own share (host-local rows).

  Process p's rows become the p-th block of the global batch (the order of
  `mesh.devices`), so the global batch is the processes' shares concatenated
  in process order, as `data.TrainBatches` deals them.

  Args:
    tree: this process's batch, leading axis = its examples.
    mesh: the mesh (default: `default_mesh()`).

  Returns:
    Global arrays sharded `P(AXIS)`, leading axis = the global batch.
  """
  mesh = mesh or default_mesh()
  sharding = batch_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    _check_local_batch(x, mesh)
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, tree)


def put_global_batch(tree: PyTree, mesh: Optional[Mesh] = None) -> PyTree:
  """Global batch arrays from a batch that every process holds whole.

  For evaluation, where each process reads the same examples: each device
  takes its own rows, so the work is split over all devices of all processes.

  Args:
    tree: the whole batch (same on every process).
    mesh: the mesh (default: `default_mesh()`).

  Returns:
    Global arrays sharded `P(AXIS)`.
  """
  mesh = mesh or default_mesh()
  sharding = batch_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % mesh.size:
      raise ValueError(f'Batch of shape {x.shape} cannot be split over '
                       f'{mesh.size} devices.')
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(put, tree)


def global_batches(batches: Iterable[PyTree], mesh: Optional[Mesh] = None,
                   size: int = 2) -> Iterator[PyTree]:
  """`put_batch` of each host batch, keeping `size` of them on the devices
  ahead of the step that consumes them (the host-to-device copy overlaps the
  running step)."""
  iterator = iter(batches)
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(put_batch(batch, mesh))

  enqueue(max(size, 1))
  while queue:
    yield queue.popleft()
    enqueue(1)


def to_host(tree: PyTree) -> PyTree:
  """NumPy copies of (global) arrays, the same on every process.

  A replicated array is read from one local device (no collective); a
  sharded one that spans other processes is all-gathered (every process must
  call this then). Typed PRNG keys have no NumPy form: they come back as
  they are (jax key arrays), so that a state read and put back keeps its key;
  `to_numpy` gives their key data.
  """
  def get(x):
    if is_key(x):
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    # Fully addressable: one copy (a replicated array reads one device, and
    # reuses a `copy_to_host_async` already under way).
    return np.asarray(x)

  return jax.tree.map(get, tree)


def to_numpy(tree: PyTree) -> PyTree:
  """`to_host`, with typed PRNG keys as their key data (uint32): all NumPy,
  for comparisons."""
  return jax.tree.map(
      lambda x: np.asarray(jax.random.key_data(x)) if is_key(x) else x,
      to_host(tree))


# ---------------------------------------------------------------------------
# Running per-device code on the mesh.

_compilations = itertools.count()


class MeshFunction:
  """`jax.jit(jax.shard_map(fn))`, compiled ahead of its first call.

  Each new input signature is lowered and compiled first, then every process
  waits at a barrier, then the collective-bearing program runs: processes
  that compile at different speeds (a loaded host) reach the first
  collective together, within gloo's fixed 30 s connection window on CPU.
  """

  def __init__(self, jitted: Callable, name: str,
               in_shardings: Optional[Tuple[Any, ...]] = None):
    self._jitted = jitted
    self._name = name
    self._in_shardings = in_shardings
    self._compiled: Dict[Any, Any] = {}

  def _conform(self, args):
    """Reshards global-array arguments held in another layout (an FSDP state
    passed to a replicated evaluation, a replicated leaf a host hook put into
    an FSDP state) onto the shardings the function was compiled for."""
    if self._in_shardings is None:
      return args
    is_sharding = lambda s: isinstance(s, jax.sharding.Sharding)

    def conform(sharding, subtree):
      return jax.tree.map(
          lambda x: _put(x, sharding) if isinstance(x, jax.Array) else x,
          subtree)

    return tuple(jax.tree.map(conform, self._in_shardings, tuple(args),
                              is_leaf=is_sharding))

  @staticmethod
  def _signature(args) -> Any:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (x.aval, x.sharding) if isinstance(x, jax.Array) else
        (np.shape(x), np.result_type(x)) for x in leaves)

  def lower(self, *args):
    return self._jitted.lower(*args)

  def eval_shape(self, *args):
    """Output shapes for (abstract) global arguments; nothing is compiled."""
    return jax.eval_shape(self._jitted, *args)

  def __call__(self, *args):
    args = self._conform(args)
    key = self._signature(args)
    compiled = self._compiled.get(key)
    if compiled is None:
      compiled = self._jitted.lower(*args).compile()
      self._compiled[key] = compiled
      wait_for_all_processes(
          f'ssl_jax_compiled_{self._name}_{next(_compilations)}')
    return compiled(*args)


def _donated(donate_argnums: Sequence[int], donate_on_cpu: bool
             ) -> Tuple[int, ...]:
  # Measured here (jax 0.10.2, 2 cores): a donated pmapped train step ran 7x
  # slower than the same step without it on the CPU backend, and host memory
  # is not the constraint donation exists for.
  if jax.default_backend() == 'cpu' and not donate_on_cpu:
    return ()
  return tuple(donate_argnums)


def data_parallel(fn: Callable, mesh: Optional[Mesh] = None, *,
                  in_specs: Any, out_specs: Any = P(),
                  donate_argnums: Sequence[int] = (),
                  donate_on_cpu: bool = False) -> MeshFunction:
  """Runs per-device `fn` (pmap semantics, axis `AXIS`) on every device of `mesh`.

  `fn` sees what a pmapped function sees: replicated arguments whole, batch
  arguments as this device's rows, and collectives over `AXIS`. Its outputs
  marked `P()` must be the same on every device (as pmap users take device 0's
  copy); `check_vma=False` keeps pmap's gradient convention (module
  docstring).

  Donation is skipped on the CPU backend (`_donated`).

  Args:
    fn: the per-device function.
    mesh: the mesh (default: `default_mesh()`).
    in_specs: a PartitionSpec (prefix) per positional argument: `P()` for
      replicated, `P(AXIS)` for batch-split.
    out_specs: the same for the outputs.
    donate_argnums: arguments whose buffers the outputs may reuse
      (accelerators only).
    donate_on_cpu: donate on the CPU backend too (experiments/memory.py
      measures what an accelerator would hold).

  Returns:
    A callable on global arrays (compiled on first call per signature).
  """
  mesh = mesh or default_mesh()
  donate_argnums = _donated(donate_argnums, donate_on_cpu)
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs),
                         out_specs=out_specs, check_vma=False)
  to_sharding = lambda specs: jax.tree.map(
      lambda spec: NamedSharding(mesh, spec), specs,
      is_leaf=lambda x: isinstance(x, PartitionSpec))
  in_shardings = to_sharding(tuple(in_specs))
  out_shardings = to_sharding(out_specs)
  jitted = jax.jit(mapped, in_shardings=in_shardings,
                   out_shardings=out_shardings,
                   donate_argnums=tuple(donate_argnums))
  return MeshFunction(jitted, getattr(fn, '__name__', 'fn'), in_shardings)


def fsdp_parallel(device_fn: Callable, update_fn: Callable,
                  layout: PyTree, *, in_specs: Tuple[Any, ...],
                  out_specs: Any, like: Optional[PyTree] = None,
                  logical_out: Optional[Callable] = None,
                  donate_on_cpu: bool = False) -> MeshFunction:
  """An FSDP step, `update_fn(state, device_fn(state, ...))`, in one jit.

  Args:
    device_fn: `(state, *rest) -> out`, per device (batch axis BATCH_AXES)
      on the state's shards; `FsdpBody` gathers them where used. `Kept`
      nodes in `out` are merged back into global trees (`merge_kept`).
    update_fn: `(state, out) -> (state, metrics)` on global arrays (GSPMD:
      whole-array semantics, no axis name).
    layout: the state's NamedShardings on the (DATA_AXIS, FSDP_AXIS) mesh
      (`state_shardings`), between steps and in `device_fn`.
    in_specs: PartitionSpecs (prefixes) of `rest`, on that mesh.
    out_specs: PartitionSpecs (prefix) of `device_fn`'s output.
    like: the state's logical shapes (arrays or ShapeDtypeStructs), where
      `layout` stores leaves padded (`padded_shape`): `update_fn` gets the
      state cut to them (`logical`), and its new state is padded back.
    logical_out: with `like`, cuts `device_fn`'s global output (before
      `merge_kept`) to logical shapes, e.g. the gradients and `Kept.stored`.
    donate_on_cpu: see `data_parallel`; the state is donated.

  Returns:
    `step(state, *rest) -> (state, metrics)` on global arrays, the metrics
    replicated.
  """
  mesh = jax.tree.leaves(layout)[0].mesh
  state_specs = jax.tree.map(lambda s: s.spec, layout)
  mapped = jax.shard_map(device_fn, mesh=mesh,
                         in_specs=(state_specs,) + tuple(in_specs),
                         out_specs=out_specs, check_vma=False)

  def step(state, *rest):
    out = mapped(state, *rest)
    if like is None:
      return update_fn(state, merge_kept(out))
    # The update (optimizer norms, weight decay, the guard, EMA) on logical
    # shapes: GSPMD shards the unevenly sized intermediates internally.
    new, metrics = update_fn(logical(state, like),
                             merge_kept(logical_out(out)))
    return pad_to_layout(new, layout), metrics

  is_spec = lambda x: isinstance(x, PartitionSpec)
  in_shardings = (layout,) + tuple(jax.tree.map(
      lambda spec: NamedSharding(mesh, spec), tuple(in_specs), is_leaf=is_spec))
  jitted = jax.jit(step, in_shardings=in_shardings,
                   out_shardings=(layout, NamedSharding(mesh, P())),
                   donate_argnums=_donated((0,), donate_on_cpu))
  return MeshFunction(jitted, getattr(device_fn, '__name__', 'fn'),
                      in_shardings)
