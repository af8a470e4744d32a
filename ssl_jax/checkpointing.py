"""Orbax checkpoints under `workdir/checkpoints`, with automatic resume.

Orbax writes each step to a temporary folder and renames it when complete, so
a run killed mid-save leaves the previous checkpoint intact. On restore the
newest step is tried first; if its files are truncated or corrupted, the
previous ones are tried in turn, with a warning, so one bad write costs only
the steps since the checkpoint before it.
"""

import logging
import os
from typing import Any, Dict, Optional, Tuple

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from ssl_jax import parallel
from ssl_jax.train_state import TrainState


class CheckpointError(RuntimeError):
  """No usable checkpoint although some exist."""


class Checkpointer:
  """Saves and restores (TrainState, metadata) pairs by step.

  Args:
    workdir: run directory; checkpoints go to `workdir/checkpoints`.
    keep: number of most recent checkpoints to keep.
  """

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
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
    whole state; host (NumPy) trees work too.
    """
    step = int(parallel.to_host(state.step))
    tree = flax.serialization.to_state_dict(state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree),
        meta=ocp.args.JsonSave(dict(meta, step=step))))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, target: TrainState, step: Optional[int] = None,
              set_aside_unreadable: bool = False,
              sharding: Optional[jax.sharding.Sharding] = None
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
      sharding: the restored arrays' sharding.

    Returns:
      (state, meta), or (None, {}) when the directory holds no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none can be read.
    """
    steps = self.all_steps() if step is None else [step]
    if not steps:
      return None, {}
    sharding = sharding or parallel.replicated()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            np.shape(x), x.dtype if hasattr(x, 'dtype') else np.result_type(x),
            sharding=sharding),
        flax.serialization.to_state_dict(target))
    errors = []
    for s in reversed(steps):
      try:
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            meta=ocp.args.JsonRestore()))
        state = flax.serialization.from_state_dict(target, restored['state'])
        _check_shapes(target, state, s)
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

  def _set_aside(self, steps) -> None:
    """Renames unreadable checkpoints to `<step>.unreadable` (kept, not deleted).

    Otherwise the resumed run could not write its own checkpoint at those
    steps (orbax does not overwrite a step) and would fall back again.
    """
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        target = f'{path}.unreadable'
        n = 1
        while os.path.exists(target):
          target, n = f'{path}.unreadable{n}', n + 1
        if os.path.isdir(path):
          os.rename(path, target)
          logging.warning('Moved the unreadable checkpoint %s to %s.', path,
                          target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('ssl_jax_checkpoint_set_aside')
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _check_shapes(target, state, step):
  for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(state)):
    if np.shape(a) != np.shape(b):
      raise CheckpointError(
          f'Checkpoint {step} holds an array of shape {np.shape(b)} where the '
          f'config builds {np.shape(a)}: was it written with another config?')
