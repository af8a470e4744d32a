"""Deterministic, resumable batching over a random-access source.

The batch of step s is a pure function of (seed, s): epoch e = s // steps_per_epoch
uses the permutation `default_rng([seed, e]).permutation(N)`, and process p takes
its slice of each global batch. So a run resumed at step s sees exactly the
batches it would have seen, and the only iterator state a checkpoint needs is
the step. Hosts read disjoint, equal shares (the last partial batch of every
epoch is dropped, as in SimCLR/BYOL).

Sources of files (folders, TFDS) are cropped on the host: every view of every
example is a RandomResizedCrop of the whole decoded image (`data/crops.py`),
drawn from a generator seeded by (seed, step, position in the global batch).
Their batches carry 'crops' ({view name: uint8 [n, count, size, size, C]})
instead of 'image', and are made by `num_workers` grain worker processes, each
making whole batches: worker w makes the batches of steps start + w,
start + w + W, ... and grain hands them back in step order, so a batch's
content depends on neither the worker count nor where the run resumed.
"""

import concurrent.futures
import os
import queue
import threading
from typing import Dict, Iterator, Sequence

import numpy as np

from ssl_jax.data import crops as crops_lib
from ssl_jax.data.sources import Source

Batch = Dict[str, np.ndarray]


class BatchMaker:
  """Step -> this process's batch; a pure function, picklable for workers.

  Args:
    source: the dataset.
    global_batch_size: examples per step over all processes.
    seed: shuffling (and crop) seed.
    process_index, process_count: this host's share.
    crop_specs: views to crop on the host (`crops.crop_specs`); empty for
      batches of fixed-size 'image's (in-memory sources).
    threads: decode threads within the process that calls it.
  """

  def __init__(self, source: Source, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               crop_specs: Sequence[crops_lib.CropSpec] = (), threads: int = 8):
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
    self.crop_specs = tuple(crop_specs)
    self.threads = threads
    self._perm_epoch, self._perm, self._pool = -1, None, None

  def __getstate__(self):
    # Each worker process makes its own pool and permutation cache.
    return dict(self.__dict__, _perm_epoch=-1, _perm=None, _pool=None)

  def indices(self, step: int) -> np.ndarray:
    """This process's dataset indices for `step`."""
    epoch, position = divmod(step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(
          len(self.source))
      self._perm_epoch = epoch
    start = position * self.global_batch_size + self.process_index * self.local_batch_size
    return self._perm[start:start + self.local_batch_size]

  def _crop_one(self, step: int, position: int, index: int):
    image, label = self.source.read_original(index)
    rng = crops_lib.example_rng(self.seed, step, position)
    views = crops_lib.view_crops(image, rng, self.crop_specs,
                                 self.source.image_shape[2])
    return views, label, image is None

  def __call__(self, step: int) -> Batch:
    """The batch of `step`: 'crops' (or 'image'), 'label', 'index', and for
    cropped batches 'unreadable' (bool [n], files replaced by black views)."""
    indices = self.indices(step)
    if not self.crop_specs:
      return self.source.get(indices)
    if self._pool is None and self.threads > 1:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.threads)
    first = self.process_index * self.local_batch_size
    def make(p):
      return self._crop_one(step, first + p, int(indices[p]))
    positions = range(len(indices))
    made = list(self._pool.map(make, positions) if self._pool
                else map(make, positions))
    return {
        'crops': {spec.name: np.stack([m[0][spec.name] for m in made])
                  for spec in self.crop_specs},
        'label': np.array([m[1] for m in made], np.int32),
        'index': indices.astype(np.int32),
        'unreadable': np.array([m[2] for m in made], bool)}


def resolve_num_workers(num_workers: int) -> int:
  """`config.data.num_workers`: -1 means one per CPU core but one, up to 32.

  The core left over runs the training loop; past 32 processes a host's
  loader is rarely the limit and each worker holds a copy of the file list.
  """
  if num_workers >= 0:
    return num_workers
  return max(1, min(32, (os.cpu_count() or 2) - 1))


def _copy_out(tree):
  # Out of grain's shared memory, which is then freed at once rather than
  # whenever the arrays (or the interpreter) go away.
  if isinstance(tree, dict):
    return {k: _copy_out(v) for k, v in tree.items()}
  return np.array(tree)


def _parse_absl_flags_if_needed() -> None:
  # grain reads its options from absl flags; outside an absl app (tests,
  # notebooks) they are unparsed and reading them raises, so take defaults.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainBatches:
  """Iterator over this process's share of the shuffled global batches.

  Args:
    source: the dataset.
    global_batch_size: examples per step over all processes.
    seed: shuffling seed.
    start_step: first step to produce (resume).
    process_index, process_count: this host's share.
    prefetch: host batches prepared ahead (shared out among the workers).
    crop_specs: the views to crop on the host; used only for sources with
      `crops_on_host` (files), ignored for in-memory arrays, which the
      device crops.
    num_workers: grain worker processes that decode and crop (0: a thread of
      this process). Only for `crops_on_host` sources.
  """

  def __init__(self, source: Source, global_batch_size: int, seed: int,
               start_step: int = 0, process_index: int = 0,
               process_count: int = 1, prefetch: int = 4,
               crop_specs: Sequence[crops_lib.CropSpec] = (),
               num_workers: int = 0):
    on_host = bool(crop_specs) and source.crops_on_host
    self.num_workers = num_workers if on_host else 0
    self.maker = BatchMaker(source, global_batch_size, seed, process_index,
                            process_count, crop_specs if on_host else (),
                            threads=1 if self.num_workers else 8)
    self.source = source
    self.steps_per_epoch = self.maker.steps_per_epoch
    self.local_batch_size = self.maker.local_batch_size
    self.step = start_step
    self._stop = threading.Event()
    self._grain_iter = None
    if self.num_workers:
      self._grain_iter = self._start_workers(start_step, prefetch)
    else:
      self._queue: 'queue.Queue' = queue.Queue(maxsize=max(1, prefetch))
      self._thread = threading.Thread(target=self._fill, daemon=True)
      self._thread.start()

  def indices(self, step: int) -> np.ndarray:
    """This process's dataset indices for `step`."""
    return self.maker.indices(step)

  def _start_workers(self, start_step: int, prefetch: int):
    import grain  # pylint: disable=g-import-not-at-top
    _parse_absl_flags_if_needed()
    # A record is a whole batch, so records and steps are the same: worker w
    # of W makes steps start + w, start + w + W, ... (grain slices the range
    # round robin and interleaves the results back in order).
    dataset = grain.MapDataset.range(start_step, start_step + 2**40).map(
        self.maker)
    dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=self.num_workers,
        per_worker_buffer_size=max(1, -(-prefetch // self.num_workers))))
    return iter(dataset)

  def _fill(self):
    step = self.step
    try:
      while not self._stop.is_set():
        batch = self.maker(step)
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
    if self._grain_iter is not None:
      item = _copy_out(next(self._grain_iter))
    else:
      item = self._queue.get()
      if isinstance(item, Exception):
        raise item
    unreadable = item.pop('unreadable', None)
    if unreadable is not None and unreadable.any():
      # Workers decode in other processes; count their bad files here.
      for index in item['index'][unreadable]:
        self.source.mark_unreadable(int(index), 'could not be decoded')
    self.step += 1
    return item

  def close(self):
    # Wait for the batch being read: a caller may delete the files next.
    self._stop.set()
    if self._grain_iter is not None:
      self._grain_iter.close()
      self._grain_iter = None
    else:
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
