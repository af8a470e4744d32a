"""Evolving sets of past embeddings as pure functions: the queue (MoCo's keys,
SwAV's global-crop embeddings) and NPID's memory bank.

Both live in `TrainState.method_state` as plain arrays, are replicated on every
device, and are updated with the all-gathered values of the step, so every
device's copy stays identical without any extra synchronisation and any copy
can be checkpointed.
"""

from typing import Any, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp

from ssl_jax import parallel
from ssl_jax.losses.contrastive import l2_normalize


# ---------------------------------------------------------------------------
# Pending writes: what a step would write into a large array, applied only
# once the step is accepted.
#
# A method's loss may put one of these where the updated array belongs in its
# `StepOutput.method_state`; `base.train_step` checks the written values, and
# only if the whole step is finite applies them (`apply_writes`) inside the
# accepting branch of a `lax.cond`. The old array is then dead once the write
# happens, so XLA updates it in place: the non-finite guard never holds a
# second copy of a bank or queue (experiments/memory.py measures it).


@flax.struct.dataclass
class RowsWrite:
  """Sets `rows` at `indices` (axis 0) of an array: a memory-bank update."""
  indices: jax.Array
  rows: jax.Array

  def apply(self, array: jax.Array) -> jax.Array:
    return array.at[self.indices].set(self.rows.astype(array.dtype))


@flax.struct.dataclass
class SliceWrite:
  """Writes `values` over rows `start:start + n` of axis -2: a queue update
  ([..., K, d] arrays; leading axes are separate queues)."""
  start: jax.Array
  values: jax.Array

  def apply(self, array: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(
        array, self.values.astype(array.dtype),
        (0,) * (array.ndim - 2) + (self.start, 0))


def is_write(x: Any) -> bool:
  return isinstance(x, (RowsWrite, SliceWrite))


def unwritten(old: Any, new: Any) -> Any:
  """`new` with each pending write replaced by the array it would write to."""
  return jax.tree.map(lambda n, o: o if is_write(n) else n, new, old,
                      is_leaf=is_write)


def apply_writes(old: Any, new: Any) -> Any:
  """`new` with each pending write applied to its array in `old`.

  Args:
    old: the method state before the step (arrays).
    new: the same structure, some arrays replaced by `RowsWrite`/`SliceWrite`.

  Returns:
    The method state after the step, structured as `old`.
  """
  return jax.tree.map(lambda n, o: n.apply(o) if is_write(n) else n, new, old,
                      is_leaf=is_write)


# ---------------------------------------------------------------------------
# The queue: a ring buffer of the most recent embeddings (MoCo's keys, SwAV's
# global crops).


def check_queue_size(queue_size: int, global_batch: int,
                     field: str = 'config.method.queue_size') -> None:
  """Fails early, with what to change, if the batch does not tile the queue.

  `enqueue` writes whole global batches at the pointer; a queue length that
  is not a multiple of the batch would make a batch straddle the end (MoCo
  asserts it; SwAV rounds `queue_length` down to a multiple).

  Args:
    queue_size: K.
    global_batch: the global batch size.
    field: the config field that sets K, for the message.

  Raises:
    ValueError: K is not a positive multiple of the global batch.
  """
  if queue_size <= 0 or queue_size % global_batch:
    suggestion = max(global_batch, queue_size // global_batch * global_batch)
    raise ValueError(
        f'The queue size {queue_size} ({field}) must be '
        f'a positive multiple of the global batch size {global_batch}: set '
        f'--{field}={suggestion} or change '
        f'--config.batch_size.')


def init_queue(rng: jax.Array, queue_size: int, dim: int) -> Dict[str, jax.Array]:
  """A queue of random unit vectors, as MoCo initialises it, pointer at 0.

  Args:
    rng: key for the initial contents.
    queue_size: K.
    dim: key dimension.

  Returns:
    {'queue': [K, dim] float32, 'queue_ptr': int32 scalar}.
  """
  queue = l2_normalize(jax.random.normal(rng, (queue_size, dim), jnp.float32))
  return {'queue': queue, 'queue_ptr': jnp.zeros((), jnp.int32)}


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array,
            axis_name: Optional[str] = None) -> Dict[str, jax.Array]:
  """Writes this step's global batch of keys over the oldest queue entries.

  Args:
    queue: [..., K, d] the queue (identical on every device); leading axes
      are separate queues filled in step (SwAV keeps one per global crop).
    ptr: int32 scalar, the row where the oldest entries start.
    keys: [..., b, d] this device's keys; they are all-gathered in device
      order so the queue receives the whole global batch in dataset order.
    axis_name: None or the pmap axis.

  Returns:
    {'queue': the new queue, 'queue_ptr': (ptr + B) mod K}, keys
    L2-normalised in the queue's dtype.
  """
  update = enqueue_write(queue, ptr, keys, axis_name)
  return dict(update, queue=update['queue'].apply(queue))


def enqueue_write(queue: jax.Array, ptr: jax.Array, keys: jax.Array,
                  axis_name: Optional[str] = None) -> Dict[str, Any]:
  """`enqueue` as a pending write, for a step's `method_state`.

  Returns:
    {'queue': a SliceWrite of the keys at `ptr`, 'queue_ptr': (ptr + B) mod K}.
  """
  keys = jnp.moveaxis(jax.lax.stop_gradient(keys), -2, 0)
  keys = jnp.moveaxis(parallel.all_gather(keys, axis_name), 0, -2)
  keys = l2_normalize(keys.astype(queue.dtype))
  return {'queue': SliceWrite(start=ptr, values=keys),
          'queue_ptr': (ptr + keys.shape[-2]) % queue.shape[-2]}


# ---------------------------------------------------------------------------
# NPID's memory bank: one L2-normalised embedding per dataset example.


def init_bank(rng: jax.Array, num_data: int, dim: int) -> jax.Array:
  """Random unit rows (the NPID code starts from uniform noise), [n, dim]."""
  return l2_normalize(jax.random.normal(rng, (num_data, dim), jnp.float32))


def update_bank(bank: jax.Array, indices: jax.Array, embeddings: jax.Array,
                momentum: float, axis_name: Optional[str] = None) -> jax.Array:
  """m_i <- normalise(momentum * m_i + (1 - momentum) * v_i) for the step's i.

  Wu et al. 2018 (sec. 3.3) with momentum 0.5. The (index, embedding) pairs of
  every device are all-gathered first so each replicated copy receives the
  same update; rows of examples not in the batch are left untouched.

  Args:
    bank: [n, d] the bank.
    indices: [b] dataset indices of this device's examples (distinct within a
      global batch, as an epoch-wise permutation guarantees).
    embeddings: [b, d] their new embeddings.
    momentum: weight of the old row.
    axis_name: None or the pmap axis.

  Returns:
    The updated bank.
  """
  return bank_write(bank, indices, embeddings, momentum, axis_name).apply(bank)


def bank_write(bank: jax.Array, indices: jax.Array, embeddings: jax.Array,
               momentum: float, axis_name: Optional[str] = None) -> RowsWrite:
  """`update_bank` as a pending write, for a step's `method_state`."""
  indices = parallel.all_gather(indices, axis_name)
  v = l2_normalize(jax.lax.stop_gradient(
      parallel.all_gather(embeddings, axis_name)).astype(bank.dtype))
  rows = l2_normalize(momentum * bank[indices] + (1.0 - momentum) * v)
  return RowsWrite(indices=indices, rows=rows)


def sample_negatives(rng: jax.Array, indices: jax.Array, num_negatives: int,
                     num_data: int) -> jax.Array:
  """Uniform noise indices, [b, m], one independent draw per example.

  Drawn from `fold_in(rng, index)` so each example's noise samples depend on
  the example, not on how the batch is split across devices.

  Args:
    rng: key of the step.
    indices: [b] dataset indices of the examples.
    num_negatives: m (4096 in NPID and PIRL).
    num_data: n.

  Returns:
    [b, m] int32 bank indices.
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)
  return jax.vmap(lambda k: jax.random.randint(k, (num_negatives,), 0,
                                               num_data))(keys)
