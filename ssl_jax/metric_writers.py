"""Metrics to `workdir/metrics.jsonl`, TensorBoard and a console progress line.

Paths go through `etils.epath` (ssl_jax/workdir.py), so a gs:// workdir gets
its metrics and TensorBoard events in the bucket, not in a local `gs:` folder.
"""

import itertools
import json
import logging
import os
import socket
import struct
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
    self._tb = EventFileWriter(workdir_lib.join(workdir, 'tensorboard'))

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
      self._tb.write_scalars(step, {k: float(v) for k, v in metrics.items()})

  def close(self) -> None:
    if self.enabled:
      if self._file is not None:
        self._file.close()
      if self._tb is not None:
        self._tb.close()


# TensorBoard event files, written here rather than through tensorboardX,
# whose import pulls in PyTorch when it is installed (3-4 s of CPU at the start
# of every run) for the few scalars we log. The format is TensorFlow's
# TFRecord framing of `Event` protocol buffers
# (tensorboard/compat/proto/event.proto, summary.proto), encoded by hand:
# we only need four fields.


def _crc32c_table() -> List[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  # TFRecord stores a rotated and offset CRC, so that a CRC of data that
  # itself holds CRCs does not degenerate.
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, data, masked CRC of it."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', _masked_crc(length)) + data +
          struct.pack('<I', _masked_crc(data)))


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 fields: two's complement, 10 bytes if < 0
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def scalars_event(wall_time: float, step: int,
                  scalars: Dict[str, float]) -> bytes:
  """A serialized `Event` whose `Summary` holds one `simple_value` per tag."""
  # Summary.Value: tag = 1 (string), simple_value = 2 (float32).
  values = b''.join(
      _length_delimited(1, _length_delimited(1, tag.encode()) +
                        b'\x15' + struct.pack('<f', value))
      for tag, value in scalars.items())
  # Event: wall_time = 1 (double), step = 2 (int64), summary = 5.
  return (b'\x09' + struct.pack('<d', wall_time) + b'\x10' + _varint(step) +
          _length_delimited(5, values))


def file_version_event(wall_time: float) -> bytes:
  """The `Event` that opens every event file (file_version = 3)."""
  return b'\x09' + struct.pack('<d', wall_time) + _length_delimited(
      3, b'brain.Event:2')


_event_files = itertools.count()


class EventFileWriter:
  """Scalars to a new TensorBoard event file in `logdir` (local or gs://).

  Locally records are appended and flushed at each write. Object stores
  cannot append: the file is uploaded whole, at most every `upload_secs`
  and at close, so a long run does not rewrite it at every logged step.
  """

  def __init__(self, logdir: str, upload_secs: float = 120.0):
    now = time.time()
    # TensorBoard reads every file with 'tfevents' in its name; the pid and
    # the count keep apart runs started in the same second (one process may
    # train several runs).
    self.path = workdir_lib.join(
        logdir, f'events.out.tfevents.{int(now):010d}.{socket.gethostname()}'
        f'.{os.getpid()}.{next(_event_files)}')
    self._remote = workdir_lib.is_remote(self.path)
    self._upload_secs = upload_secs
    first = tfrecord(file_version_event(now))
    if self._remote:
      self._data = bytearray(first)
      self._upload()
    else:
      workdir_lib.makedirs(logdir)
      self._file = open(self.path, 'wb')
      self._file.write(first)
      self._file.flush()

  def _upload(self) -> None:
    workdir_lib.path(self.path).write_bytes(bytes(self._data))
    self._uploaded = time.monotonic()

  def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
    record = tfrecord(scalars_event(time.time(), step, scalars))
    if self._remote:
      self._data.extend(record)
      if time.monotonic() - self._uploaded >= self._upload_secs:
        self._upload()
    else:
      self._file.write(record)
      self._file.flush()

  def close(self) -> None:
    if self._remote:
      self._upload()
    else:
      self._file.close()


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
