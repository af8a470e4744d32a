"""Deterministic, resumable batching over a random-access source.

The batch of step s is a pure function of (seed, s): epoch e = s // steps_per_epoch
uses the permutation `default_rng([seed, e]).permutation(N)`, and process p takes
its slice of each global batch. So a run resumed at step s sees exactly the
batches it would have seen, and the only iterator state a checkpoint needs is
the step. Hosts read disjoint, equal shares (the last partial batch of every
epoch is dropped, as in SimCLR/BYOL).
"""

import queue
import threading
from typing import Dict, Iterator

import numpy as np

from ssl_jax.data.sources import Source

Batch = Dict[str, np.ndarray]


class TrainBatches:
  """Iterator over this process's share of the shuffled global batches.

  Args:
    source: the dataset.
    global_batch_size: examples per step over all processes.
    seed: shuffling seed.
    start_step: first step to produce (resume).
    process_index, process_count: this host's share.
    prefetch: host batches prepared ahead in a background thread.
  """

  def __init__(self, source: Source, global_batch_size: int, seed: int,
               start_step: int = 0, process_index: int = 0,
               process_count: int = 1, prefetch: int = 4):
    if global_batch_size % process_count:
      raise ValueError(f'Global batch {global_batch_size} is not divisible by '
                       f'{process_count} processes.')
    self.steps_per_epoch = len(source) // global_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'The dataset {source.name} has {len(source)} examples, fewer than '
          f'one global batch of {global_batch_size}: lower '
          f'--config.batch_size.')
    self.source, self.global_batch_size, self.seed = source, global_batch_size, seed
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.step = start_step
    self._perm_epoch, self._perm = -1, None
    self._queue: 'queue.Queue' = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, daemon=True)
    self._thread.start()

  def indices(self, step: int) -> np.ndarray:
    """This process's dataset indices for `step`."""
    epoch, position = divmod(step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(
          len(self.source))
      self._perm_epoch = epoch
    start = position * self.global_batch_size + self.process_index * self.local_batch_size
    return self._perm[start:start + self.local_batch_size]

  def _fill(self):
    step = self.step
    try:
      while not self._stop.is_set():
        batch = self.source.get(self.indices(step))
        while not self._stop.is_set():
          try:
            self._queue.put(batch, timeout=0.1)
            break
          except queue.Full:
            continue
        step += 1
    except Exception as e:  # pylint: disable=broad-except
      self._queue.put(e)

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    item = self._queue.get()
    if isinstance(item, Exception):
      raise item
    self.step += 1
    return item

  def close(self):
    # Wait for the batch being read: a caller may delete the files next.
    self._stop.set()
    self._thread.join(timeout=60)


def eval_batches(source: Source, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """One pass over this process's contiguous share, padded to full batches.

  Each batch has a boolean 'mask' marking real examples, so the padding of the
  last batch never counts in a metric.
  """
  n = len(source)
  per_process = -(-n // process_count)
  start = process_index * per_process
  stop = min(n, start + per_process)
  for lo in range(start, stop, batch_size):
    idx = np.arange(lo, min(lo + batch_size, stop))
    batch = source.get(idx)
    pad = batch_size - len(idx)
    batch['mask'] = np.concatenate([np.ones(len(idx), bool), np.zeros(pad, bool)])
    if pad:
      for k in ('image', 'label', 'index'):
        batch[k] = np.concatenate(
            [batch[k], np.zeros((pad,) + batch[k].shape[1:], batch[k].dtype)])
    yield batch
