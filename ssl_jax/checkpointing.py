"""Orbax checkpoints under `workdir/checkpoints`, with automatic resume.

Orbax writes each step to a temporary folder and renames it when complete, so
a run killed mid-save leaves the previous checkpoint intact. On restore the
newest step is tried first; if its files are truncated or corrupted, the
previous ones are tried in turn, with a warning, so one bad write costs only
the steps since the checkpoint before it.

Orbax only notices corruption that breaks its file formats; bytes changed in
the middle of an array file restore silently (measured: an optimizer entry
came back as 2.2e38). So once each save is committed, every process writes
`<step>/ssl_jax_checksums/process_<i>.json`, the SHA-256 and size of the
files it wrote itself (its own shards; the main process also the shared
metadata) and the number of processes. A restore checks them first, each
process a share of about 1/P of the bytes, and the processes agree on the
verdict: a checkpoint whose bytes changed is treated as unreadable by all of
them (set aside, the previous one used). A checkpoint without some or all of
the lists (written before checksums, or killed in the moment between its
commit and its checksums) has the files they would list restored unverified,
with a warning, as the list-less checkpoints of older runs are: calling it
corrupt would throw away the newest good checkpoint of every run killed in
that moment. The single `ssl_jax_checksums.json` of older checkpoints is
still verified.
"""

import hashlib
import heapq
import json
import logging
import os
import re
import threading
from typing import Any, Dict, List, Optional, Tuple

from etils import epath
import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
# Public in orbax's newer API; here only under _src (orbax is pinned).
from orbax.checkpoint._src.metadata import array_metadata_store

# Each process lists its own files in `<step>/ssl_jax_checksums/process_<i>.json`.
CHECKSUM_DIR = 'ssl_jax_checksums'
# The one list of every file that checkpoints written before the per-process
# lists carry; still verified.
CHECKSUM_FILE = 'ssl_jax_checksums.json'

from ssl_jax import workdir as workdir_lib
from ssl_jax import parallel
from ssl_jax.train_state import TrainState


class CheckpointError(RuntimeError):
  """No usable checkpoint although some exist."""


class ChecksumMismatch(CheckpointError):
  """A checkpoint's files differ from the checksums written with it."""


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


# Orbax names what one process writes after it: its OCDBT data folder
# (`state/ocdbt.process_<i>/`) and its array metadata
# (`state/array_metadatas/process_<i>`); the primary process writes the rest
# (the merged OCDBT root, `_METADATA`, `_sharding`, the JSON items). A file
# whose name this misses is hashed by process 0: still correct, as every file
# is final once the step is committed; only the work is not split.
_PROCESS_NAME = re.compile(r'(?:ocdbt\.)?process_(\d+)')


def _writer(name: str, process_count: int) -> int:
  """The process whose hashes cover the file or folder `name` (relative)."""
  for part in name.split('/'):
    match = _PROCESS_NAME.fullmatch(part)
    if match and int(match.group(1)) < process_count:
      return int(match.group(1))
  return 0


def _files(step_dir: epath.Path, process_index: int = 0,
           process_count: int = 1) -> List[epath.Path]:
  """The files of `step_dir` that process `process_index` wrote.

  Other processes' folders are not even listed, so that a process's work is
  its own files plus the few shared entries, however many processes wrote.
  """
  # A walk with iterdir: epath's rglob refuses '**' on gs:// paths.
  found, pending = [], [step_dir]
  while pending:
    for p in pending.pop().iterdir():
      name = str(p.relative_to(step_dir))
      if name in (CHECKSUM_FILE, CHECKSUM_DIR):
        continue
      if p.is_dir():
        if (not _PROCESS_NAME.fullmatch(p.name) or
            _writer(name, process_count) == process_index):
          pending.append(p)
      elif _writer(name, process_count) == process_index:
        found.append(p)
  return sorted(found)


def checksum_file(process_index: int) -> str:
  """Where process `process_index` writes its checksums, relative to a step."""
  return f'{CHECKSUM_DIR}/process_{process_index}.json'


def write_checksums(step_dir: Any, process_index: int = 0,
                    process_count: int = 1) -> None:
  """Writes `<step_dir>/ssl_jax_checksums/process_<i>.json` for process i.

  It lists the SHA-256 and size of the files that process wrote (see
  `_writer`) and `process_count`, so that a reader knows how many lists make
  the checkpoint whole.

  Args:
    step_dir: a committed checkpoint step folder (str or epath.Path, local or
      gs://).
    process_index: this process.
    process_count: the processes that wrote the checkpoint.
  """
  step_dir = epath.Path(step_dir)
  files = {str(p.relative_to(step_dir)): {'sha256': _sha256(p),
                                          'size': p.stat().length}
           for p in _files(step_dir, process_index, process_count)}
  # Atomic: a local rename, or one object upload on gs:// (where a rename is a
  # copy and a delete, and took tens of seconds against the emulator).
  workdir_lib.write_atomic(
      step_dir / checksum_file(process_index),
      json.dumps({'algorithm': 'sha256', 'process_index': process_index,
                  'process_count': process_count, 'files': files}, indent=1))


def read_checksums(step_dir: Any) -> Tuple[Dict[str, Dict[str, Any]],
                                           List[str]]:
  """The checksums of every file of a step that has them.

  Reads the per-process lists, or the single `ssl_jax_checksums.json` of
  checkpoints written before them.

  Args:
    step_dir: a checkpoint step folder.

  Returns:
    (files, missing): `{relative name: {'sha256', 'size'}}`, and the lists
    that should exist and do not (empty when every file is covered; the
    checksum folder when the step has no checksums at all).

  Raises:
    ChecksumMismatch: the lists disagree on how many processes wrote.
  """
  step_dir = epath.Path(step_dir)
  legacy = step_dir / CHECKSUM_FILE
  if legacy.exists():
    return json.loads(legacy.read_text())['files'], []
  folder = step_dir / CHECKSUM_DIR
  lists = ([json.loads(p.read_text()) for p in sorted(folder.iterdir())
            if p.name.endswith('.json')] if folder.is_dir() else [])
  if not lists:
    return {}, [CHECKSUM_DIR]
  counts = {l['process_count'] for l in lists}
  if len(counts) != 1:
    raise ChecksumMismatch(f'the checksum lists in {folder} disagree on the '
                           f'number of processes that wrote: {sorted(counts)}')
  present = {l['process_index'] for l in lists}
  files = {}
  for l in lists:
    files.update(l['files'])
  return files, [checksum_file(i) for i in range(counts.pop())
                 if i not in present]


def split_files(files: Dict[str, Dict[str, Any]],
                count: int) -> List[List[str]]:
  """Splits `files` (name -> {'size', ...}) into `count` shares of about
  equal bytes, the same on every process (it depends on names and sizes only).

  Largest first, each to the least loaded share (ties: the lowest index):
  within 4/3 of the best split, where a split by name could hand one process
  all the large array files.
  """
  shares = [[] for _ in range(count)]
  loads = [(0, i) for i in range(count)]  # a heap of (bytes, share)
  for name in sorted(files, key=lambda n: (-files[n]['size'], n)):
    load, i = heapq.heappop(loads)
    shares[i].append(name)
    heapq.heappush(loads, (load + files[name]['size'], i))
  return [sorted(s) for s in shares]


def verify_checksums(step_dir: Any, process_index: int = 0,
                     process_count: int = 1) -> List[str]:
  """Checks this process's share of a step's files against their checksums.

  Every process reads the same lists and verifies `split_files`' share
  `process_index` of `process_count`: together they cover each file once.

  Args:
    step_dir: a checkpoint step folder.
    process_index: this process.
    process_count: the processes restoring (not necessarily those that wrote).

  Returns:
    The checksum lists that are missing (see `read_checksums`): empty if
    every file of the step is covered.

  Raises:
    ChecksumMismatch: a listed file of this share is missing, has another
      size, or other bytes.
  """
  step_dir = epath.Path(step_dir)
  expected, missing = read_checksums(step_dir)
  for name in split_files(expected, process_count)[process_index]:
    want = expected[name]
    path = step_dir / name
    if not path.exists():
      raise ChecksumMismatch(f'{path} is missing (listed in its checksums)')
    size = path.stat().length
    if size != want['size']:
      raise ChecksumMismatch(f'{path} has {size} bytes, {want["size"]} when '
                             f'written')
    if _sha256(path) != want['sha256']:
      raise ChecksumMismatch(f'the bytes of {path} changed since it was '
                             f'written (SHA-256 mismatch)')
  return missing


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's handler of the train state (StandardCheckpointHandler's, whose
  format it writes), saving a replicated array from one device per process.

  Orbax's default on CPU and TPU is replica-parallel saving: each of the R
  devices holding a copy writes 1/R of it, sliced on the device. That spreads
  the writes over processes; within one process it only adds work: one
  sliced copy per device and leaf (a smoke run's saves: ~800 slices, ~80 tiny
  programs to compile, ~5 s of CPU per run). The arrays saved are the same,
  in fewer storage chunks; checkpoints of either kind restore with either.
  """
  handlers = ocp.type_handlers
  scalar = handlers.ScalarHandler()
  registry = handlers.create_type_handler_registry(
      (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
      (np.ndarray, handlers.NumpyHandler()),
      (jax.Array, handlers.ArrayHandler(
          use_replica_parallel=parallel.process_count() > 1,
          array_metadata_store=array_metadata_store.Store())),
      (str, handlers.StringHandler()))
  # The sizes StandardCheckpointHandler gives its own PyTreeCheckpointHandler.
  return ocp.PyTreeCheckpointHandler(
      save_concurrent_gb=96, restore_concurrent_gb=96,
      type_handler_registry=registry)


class Checkpointer:
  """Saves and restores (TrainState, metadata) pairs by step.

  Args:
    workdir: run directory; checkpoints go to `workdir/checkpoints`.
    keep: number of most recent checkpoints to keep.
    writer: False for a reader (evaluation, export) of a run that may still
      be training: it leaves the run's in-flight saves alone.
  """

  def __init__(self, workdir: str, keep: int = 3, writer: bool = True):
    # epath keeps gs://bucket/run intact (os.path.abspath would not).
    self.directory = workdir_lib.join(
        workdir if workdir_lib.is_remote(workdir) else os.path.abspath(workdir),
        'checkpoints')
    self._checksummer = None  # thread writing the last save's checksums
    self._checksum_error = None
    self._manager = ocp.CheckpointManager(
        self.directory,
        # A save killed half-way leaves a `<step>.orbax-checkpoint-tmp-*`
        # folder, never a `<step>` one (the rename is the commit); remove such
        # leftovers at start. Old steps are deleted only after the new one is
        # committed, so a good checkpoint always exists. Only the writer:
        # a reader's clean-up would delete a live run's save in progress
        # (and runs in a thread orbax's close does not wait for).
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=writer),
        item_handlers={'state': _state_handler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, state: TrainState, meta: Dict[str, Any]) -> None:
    """Saves `state` (all processes must call this).

    Global `jax.Array`s are written from the devices, each process its own
    shards (a replicated array by one of them), without a host copy of the
    whole state; host (NumPy) trees work too. The save is asynchronous; once
    orbax has committed it, a background thread on each process writes the
    checksums of that process's files (`wait` waits for both).
    """
    step = int(parallel.to_host(state.step))
    # Typed PRNG keys are saved as their key data (uint32), the format of the
    # raw keys of older checkpoints, which therefore still restore.
    tree = jax.tree.map(
        lambda x: jax.random.key_data(x) if parallel.is_key(x) else x,
        flax.serialization.to_state_dict(state))
    self._join_checksummer()
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(tree),
        meta=ocp.args.JsonSave(dict(meta, step=step))))
    if saved:
      # Every process hashes the files it wrote, once orbax has committed the
      # step: `wait_until_finished` returns on each process only after the
      # primary one has finalized (renamed) it, so no file changes after.
      self._checksummer = threading.Thread(
          target=self._checksum_when_committed, args=(step,),
          name=f'ssl_jax_checksums_{step}', daemon=True)
      self._checksummer.start()

  def _checksum_when_committed(self, step: int) -> None:
    try:
      self._manager.wait_until_finished()
      step_dir = epath.Path(self.directory) / str(step)
      if step_dir.is_dir():
        write_checksums(step_dir, parallel.process_index(),
                        parallel.process_count())
    except Exception as e:  # pylint: disable=broad-except
      self._checksum_error = e

  def _join_checksummer(self) -> None:
    if self._checksummer is not None:
      self._checksummer.join()
      self._checksummer = None
      if self._checksum_error is not None:
        logging.warning('Could not write the checksums of the last checkpoint '
                        '(it will restore unverified): %s',
                        self._checksum_error)
        self._checksum_error = None

  def wait(self) -> None:
    """Waits until the last save and its checksums are written."""
    self._join_checksummer()
    self._manager.wait_until_finished()

  def restore(self, target: TrainState, step: Optional[int] = None,
              set_aside_unreadable: bool = False,
              sharding: Any = None
              ) -> Tuple[Optional[TrainState], Dict[str, Any]]:
    """Restores `step` (default: the newest usable one) into `target`'s shape.

    With `set_aside_unreadable` (a run resuming), newer checkpoints that could
    not be read are renamed `<step>.unreadable` so the run can write its own.

    The arrays are read straight onto the devices with `sharding` (default:
    replicated on `parallel.default_mesh()`), whatever the topology that
    wrote them: a checkpoint saved on 8 devices resumes on 4 (elastic resume).

    Args:
      target: a TrainState (arrays or `jax.ShapeDtypeStruct`s) of the
        shapes to restore.
      step: the step to restore (default: the newest readable one).
      set_aside_unreadable: see above.
      sharding: the restored arrays' sharding, one for all or a tree of
        them shaped like `target` (an FSDP layout, `train.state_layout`).

    Returns:
      (state, meta), or (None, {}) when the directory holds no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none can be read.
    """
    self._join_checksummer()
    steps = self.all_steps() if step is None else [step]
    if not steps:
      return None, {}
    sharding = sharding or parallel.replicated()
    if isinstance(sharding, jax.sharding.Sharding):
      sharding = jax.tree.map(lambda _: sharding, target)
    target_dict = flax.serialization.to_state_dict(target)

    def abstract_leaf(x, sharding):
      if parallel.is_key(x):
        x = jax.eval_shape(jax.random.key_data, x)
      # An FSDP layout stores leaves no fsdp size divides padded.
      return jax.ShapeDtypeStruct(
          parallel.padded_shape(np.shape(x), sharding),
          x.dtype if hasattr(x, 'dtype') else np.result_type(x),
          sharding=sharding)

    def as_target(x, restored):
      if parallel.is_key(x):
        # An abstract target (ShapeDtypeStruct) keeps the default impl.
        impl = jax.random.key_impl(x) if isinstance(x, jax.Array) else None
        return jax.random.wrap_key_data(restored, impl=impl)
      return restored

    abstract = jax.tree.map(abstract_leaf, target_dict,
                            flax.serialization.to_state_dict(sharding))
    errors = []
    for s in reversed(steps):
      try:
        missing = self._verify(s)
        if missing:
          logging.warning('Checkpoint at step %d has no %s (written before '
                          'checksums, or killed just after its commit); '
                          'restoring the files they would list without '
                          'verifying their bytes.', s, ', '.join(missing))
        # Shapes may differ from the saved ones only by FSDP padding (a
        # checkpoint written with another fsdp size, or read into logical
        # shapes); orbax then pads with zeros or cuts at the end.
        saved = self._saved_shapes(s)
        _check_saved_shapes(target_dict, saved, s)
        strict = all(saved.get(jax.tree_util.keystr(path), x.shape) == x.shape
                     for path, x in
                     jax.tree_util.tree_flatten_with_path(abstract)[0])
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
                    abstract, strict=strict)),
            meta=ocp.args.JsonRestore()))
        state = flax.serialization.from_state_dict(
            target, jax.tree.map(as_target, target_dict, restored['state']))
        _check_shapes(abstract, restored['state'], s)
        if errors:
          logging.warning('Checkpoint(s) %s could not be read; resumed from '
                          'step %d instead. Errors: %s',
                          [e[0] for e in errors], s, errors)
          if set_aside_unreadable and step is None:
            self._set_aside([e[0] for e in errors])
        return state, dict(restored['meta'])
      except Exception as e:  # pylint: disable=broad-except
        errors.append((s, f'{type(e).__name__}: {e}'))
        logging.warning('Checkpoint at step %d is unreadable (%s); trying an '
                        'older one.', s, e)
    raise CheckpointError(
        f'None of the checkpoints {steps} in {self.directory} can be read '
        f'({errors}). Move the folder away to start afresh.')

  def _verify(self, step: int) -> List[str]:
    """Verifies this process's share of `step`'s files; every process calls
    it and gets the same verdict (so all fall back to the same step).

    Returns:
      The missing checksum lists (see `verify_checksums`).

    Raises:
      ChecksumMismatch (or the error that stopped the check) on every
      process if any process found a bad file.
    """
    step_dir = epath.Path(self.directory) / str(step)
    try:
      missing = verify_checksums(step_dir, parallel.process_index(),
                                 parallel.process_count())
      error = None
    except Exception as e:  # pylint: disable=broad-except
      # Caught, not raised: the other processes wait for this one's vote.
      missing, error = [], e
    if not parallel.all_processes_agree(error is None):
      raise error or ChecksumMismatch(
          f'another process found files of {step_dir} that changed since '
          f'they were written (see its log)')
    return missing

  def _saved_shapes(self, step: int) -> Dict[str, Tuple[int, ...]]:
    """The shape of each array saved at `step`, by tree path."""
    # Read by the item's handler: a manager that has not saved yet does not
    # know the handler of its items (item_metadata then holds nothing).
    tree = ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.directory) / str(step) / 'state').tree
    return {jax.tree_util.keystr(path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if getattr(x, 'shape', None) is not None}

  def _set_aside(self, steps) -> None:
    """Renames unreadable checkpoints to `<step>.unreadable` (kept, not deleted).

    Otherwise the resumed run could not write its own checkpoint at those
    steps (orbax does not overwrite a step) and would fall back again.
    """
    self.wait()
    if parallel.is_main_process():
      for step in steps:
        path = workdir_lib.join(self.directory, str(step))
        target = f'{path}.unreadable'
        n = 1
        while workdir_lib.path(target).exists():
          target, n = f'{path}.unreadable{n}', n + 1
        if workdir_lib.path(path).is_dir():
          workdir_lib.path(path).rename(target)
          logging.warning('Moved the unreadable checkpoint %s to %s.', path,
                          target)
    # The others must not reload before the main process has moved them.
    parallel.wait_for_all_processes(
        'ssl_jax_checkpoint_set_aside_' + '_'.join(map(str, steps)))
    self._manager.reload()

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _fsdp_padding(logical, saved) -> bool:
  """Whether `saved` is `logical` as an FSDP layout of some size f stores it:
  padded to a multiple of f on the dimension `parallel.fsdp_spec` pads for
  f. (A model that differs in one width by such an amount would pass; the
  workdir's config check catches that on resume.)"""
  diff = [d for d, (a, b) in enumerate(zip(logical, saved)) if a != b]
  if len(logical) != len(saved) or len(diff) != 1:
    return False
  d = diff[0]
  if saved[d] < logical[d]:
    return False
  padded_on_d = parallel.P(*([None] * d + [parallel.FSDP_AXIS]))
  # f divides saved[d] and exceeds the padding, and no dimension divides.
  return any(saved[d] % f == 0 and
             parallel.fsdp_spec(logical, f, min_size=0) == padded_on_d
             for f in range(max(saved[d] - logical[d] + 1, 2),
                            logical[d] + 1))


def _check_saved_shapes(target_dict, saved, step) -> None:
  """Checks the saved shapes against `target_dict`'s (logical) ones.

  Raises:
    CheckpointError: a shape differs otherwise than by FSDP padding (another
      model).
  """
  for path, x in jax.tree_util.tree_flatten_with_path(target_dict)[0]:
    want = np.shape(jax.eval_shape(jax.random.key_data, x)
                    if parallel.is_key(x) else x)
    have = saved.get(jax.tree_util.keystr(path))
    if have is None or have == want:
      continue
    if not _fsdp_padding(want, have):
      raise CheckpointError(
          f'Checkpoint {step} holds an array of shape {have} where the '
          f'config builds {want} ({jax.tree_util.keystr(path)}): was it '
          f'written with another config?')


def _check_shapes(target, state, step):
  for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(state)):
    if np.shape(a) != np.shape(b):
      raise CheckpointError(
          f'Checkpoint {step} holds an array of shape {np.shape(b)} where the '
          f'config builds {np.shape(a)}: was it written with another config?')
