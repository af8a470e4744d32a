"""Metrics to `workdir/metrics.jsonl`, TensorBoard and a console progress line.

Paths go through `etils.epath` (ssl_jax/workdir.py), so a gs:// workdir gets
its metrics and TensorBoard events in the bucket, not in a local `gs:` folder.
"""

import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional

from ssl_jax import workdir as workdir_lib


class MetricWriter:
  """JSON lines (one object per logged step) plus TensorBoard event files.

  Only process 0 writes. On resume at step s, lines of steps > s (logged by a
  run killed before its next checkpoint) are dropped, so the file never
  holds a step twice; a line torn by a kill mid-write is dropped with a
  warning, and a deleted file is recreated (with a warning) rather than lost.

  Locally rows are appended and flushed one by one. Object stores (gs://)
  cannot append: the whole file is rewritten at every logged step, each
  upload replacing the object atomically (a few hundred kB for a long run).
  """

  def __init__(self, workdir: str, enabled: bool = True,
               resume_step: Optional[int] = None):
    self.enabled = enabled
    self._tb = None
    self._file = None
    if not enabled:
      return
    workdir_lib.makedirs(workdir)
    self.path = workdir_lib.join(workdir, 'metrics.jsonl')
    self._remote = workdir_lib.is_remote(self.path)
    self._rows: List[str] = []
    p = workdir_lib.path(self.path)
    if resume_step is not None:
      if p.exists():
        self._rows = self._repair(p.read_text(), resume_step)
      else:
        logging.warning('%s is missing; a new one is started at step %d (the '
                        'earlier rows are lost).', self.path, resume_step)
    # One atomic write: the repaired rows, or an empty file for a new run.
    workdir_lib.write_atomic(self.path, ''.join(self._rows))
    if not self._remote:
      self._file = open(self.path, 'a')
      self._rows = []  # appended from here on; no copy kept in memory
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      _register_epath_event_writer()
      self._tb = SummaryWriter(workdir_lib.join(workdir, 'tensorboard'))
    except ImportError:  # TensorBoard output is optional.
      self._tb = None

  def _repair(self, text: str, resume_step: int) -> List[str]:
    """The lines to keep at a resume at `resume_step`, warning about bad ones."""
    kept, bad = [], []
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step = int(row['step'])
      except (ValueError, KeyError, TypeError):
        bad.append(i + 1)
        continue
      if step <= resume_step:
        kept.append(line if line.endswith('\n') else line + '\n')
    if bad:
      torn = bad == [len(lines)] and not lines[-1].endswith('\n')
      logging.warning(
          'Dropped %s of %s (%s) while resuming at step %d.',
          f'{len(bad)} unreadable line(s) ({", ".join(map(str, bad[:5]))})'
          if not torn else f'the torn last line {bad[0]}', self.path,
          'written when the previous run was killed' if torn else
          'not JSON', resume_step)
    return kept

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    line = json.dumps(row) + '\n'
    if self._remote:
      self._rows.append(line)
      workdir_lib.write_atomic(self.path, ''.join(self._rows))
    else:
      if not os.path.exists(self.path):
        # Deleted under a running job: recreate it rather than write into
        # the unlinked inode.
        logging.warning('%s was deleted during the run; recreated from step '
                        '%d on.', self.path, step)
        self._file.close()
        self._file = open(self.path, 'a')
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self.enabled:
      if self._file is not None:
        self._file.close()
      if self._tb is not None:
        self._tb.close()


class _EpathEventFile:
  """A TensorBoard event file on an object store, uploaded whole at flush.

  tensorboardX's own gs:// writer needs google-cloud-storage credentials of
  its own; this one goes through epath like every other file of the run.
  """

  def __init__(self, path: str):
    self._path = workdir_lib.path(path)
    self._data = bytearray()

  def write(self, data: bytes) -> None:
    self._data.extend(data)

  def flush(self) -> None:
    self._path.write_bytes(bytes(self._data))

  def close(self) -> None:
    self.flush()


class _EpathEventFileFactory:

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no folders to create


def _register_epath_event_writer() -> None:
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for scheme in ('gs', 's3'):
    record_writer.register_writer_factory(scheme, _EpathEventFileFactory())


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class Progress:
  """A one-line console report: step, loss, lr, images/s and ETA."""

  def __init__(self, total_steps: int, images_per_step: int,
               enabled: bool = True, stream=sys.stderr):
    self.total, self.images_per_step = total_steps, images_per_step
    self.enabled, self.stream = enabled, stream
    self._last_time, self._last_step = None, None

  def start(self, step: int) -> None:
    self._last_time, self._last_step = time.perf_counter(), step

  def images_per_second(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self._last_step) * self.images_per_step / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    return rate

  def report(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.enabled:
      return
    rate = metrics.get('images_per_sec', 0.0)
    eta = (self.total - step) * self.images_per_step / rate if rate else 0
    width = 20
    done = int(width * step / max(self.total, 1))
    bar = '#' * done + '.' * (width - done)
    extra = ''
    if 'online_probe_acc' in metrics:
      extra = f' | probe {metrics["online_probe_acc"]:.3f}'
    self.stream.write(
        f'[{bar}] step {step}/{self.total} | loss {metrics["loss"]:.4f} | '
        f'lr {metrics.get("learning_rate", 0):.4g} | {rate:.0f} img/s | '
        f'ETA {_duration(eta)}{extra}\n')
    self.stream.flush()
