"""Orbax checkpoints under `workdir/checkpoints`, with automatic resume.

Orbax writes each step to a temporary folder and renames it when complete, so
a run killed mid-save leaves the previous checkpoint intact. On restore the
newest step is tried first; if its files are truncated or corrupted, the
previous ones are tried in turn, with a warning, so one bad write costs only
the steps since the checkpoint before it.

Orbax only notices corruption that breaks its file formats; bytes changed in
the middle of an array file restore silently (measured: an optimizer entry
came back as 2.2e38). So once each save is committed, the main process writes
`<step>/ssl_jax_checksums.json`, the SHA-256 and size of every file of the
step, and a restore checks them first: a checkpoint whose bytes changed is
treated as unreadable (set aside, the previous one used). A checkpoint without
the file (written before checksums existed, or killed in the moment between
its commit and its checksums) is restored unverified, with a warning.
"""

import hashlib
import json
import logging
import os
import threading
from typing import Any, Dict, Optional, Tuple

from etils import epath
import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

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


def _files(step_dir: epath.Path):
  # A walk with iterdir: epath's rglob refuses '**' on gs:// paths.
  found, pending = [], [step_dir]
  while pending:
    for p in pending.pop().iterdir():
      if p.is_dir():
        pending.append(p)
      elif p.name != CHECKSUM_FILE:
        found.append(p)
  return sorted(found)


def write_checksums(step_dir: Any) -> None:
  """Writes `<step_dir>/ssl_jax_checksums.json` for every file under it.

  Args:
    step_dir: a committed checkpoint step folder (str or epath.Path, local or
      gs://).
  """
  step_dir = epath.Path(step_dir)
  files = {str(p.relative_to(step_dir)): {'sha256': _sha256(p),
                                          'size': p.stat().length}
           for p in _files(step_dir)}
  # Atomic: a local rename, or one object upload on gs:// (where a rename is a
  # copy and a delete, and took tens of seconds against the emulator).
  workdir_lib.write_atomic(step_dir / CHECKSUM_FILE,
                           json.dumps({'algorithm': 'sha256', 'files': files},
                                      indent=1))


def verify_checksums(step_dir: Any) -> bool:
  """Checks a step's files against its checksum file.

  Args:
    step_dir: a checkpoint step folder.

  Returns:
    True if verified, False if the step has no checksum file.

  Raises:
    ChecksumMismatch: a listed file is missing, has another size, or other
      bytes.
  """
  step_dir = epath.Path(step_dir)
  listing = step_dir / CHECKSUM_FILE
  if not listing.exists():
    return False
  expected = json.loads(listing.read_text())['files']
  for name, want in expected.items():
    path = step_dir / name
    if not path.exists():
      raise ChecksumMismatch(f'{path} is missing (listed in {listing})')
    size = path.stat().length
    if size != want['size']:
      raise ChecksumMismatch(f'{path} has {size} bytes, {want["size"]} when '
                             f'written')
    if _sha256(path) != want['sha256']:
      raise ChecksumMismatch(f'the bytes of {path} changed since it was '
                             f'written (SHA-256 mismatch)')
  return True


class Checkpointer:
  """Saves and restores (TrainState, metadata) pairs by step.

  Args:
    workdir: run directory; checkpoints go to `workdir/checkpoints`.
    keep: number of most recent checkpoints to keep.
  """

  def __init__(self, workdir: str, keep: int = 3):
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
        # committed, so a good checkpoint always exists.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True),
        item_names=('state', 'meta'))

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, state: TrainState, meta: Dict[str, Any]) -> None:
    """Saves `state` (all processes must call this).

    Global `jax.Array`s are written from the devices, each process its own
    shards (a replicated array by one of them), without a host copy of the
    whole state; host (NumPy) trees work too. The save is asynchronous; its
    checksums are written by a background thread once orbax has committed it
    (`wait` waits for both).
    """
    step = int(parallel.to_host(state.step))
    # Typed PRNG keys are saved as their key data (uint32), the format of the
    # raw keys of older checkpoints, which therefore still restore.
    tree = jax.tree.map(
        lambda x: jax.random.key_data(x) if parallel.is_key(x) else x,
        flax.serialization.to_state_dict(state))
    self._join_checksummer()
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree),
        meta=ocp.args.JsonSave(dict(meta, step=step))))
    if saved and parallel.is_main_process():
      # Process 0 only, after its wait: orbax commits (renames) the step on
      # the primary process once every process has written its files, so
      # the checksums cover the files of all processes.
      self._checksummer = threading.Thread(
          target=self._checksum_when_committed, args=(step,),
          name=f'ssl_jax_checksums_{step}', daemon=True)
      self._checksummer.start()

  def _checksum_when_committed(self, step: int) -> None:
    try:
      self._manager.wait_until_finished()
      step_dir = epath.Path(self.directory) / str(step)
      if step_dir.is_dir():
        write_checksums(step_dir)
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
        if not verify_checksums(epath.Path(self.directory) / str(s)):
          logging.warning('Checkpoint at step %d has no %s (written before '
                          'checksums, or killed just after its commit); '
                          'restoring it without verifying its bytes.', s,
                          CHECKSUM_FILE)
        # Shapes may differ from the saved ones only by FSDP padding (a
        # checkpoint written with another fsdp size, or read into logical
        # shapes); orbax then pads with zeros or cuts at the end.
        saved = self._saved_shapes(s)
        _check_saved_shapes(target_dict, saved, s)
        strict = all(saved.get(jax.tree_util.keystr(path), x.shape) == x.shape
                     for path, x in
                     jax.tree_util.tree_flatten_with_path(abstract)[0])
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract, strict=strict),
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
    if parallel.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('ssl_jax_checkpoint_set_aside')
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
