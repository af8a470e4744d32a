"""Metrics to `workdir/metrics.jsonl`, TensorBoard and a console progress line."""

import json
import os
import sys
import time
from typing import Dict, Optional



class MetricWriter:
  """JSON lines (one object per logged step) plus TensorBoard event files.

  Only process 0 writes. On resume at step s, lines of steps > s (logged by a
  run killed before its next checkpoint) are dropped, so the file never
  holds a step twice.
  """

  def __init__(self, workdir: str, enabled: bool = True,
               resume_step: Optional[int] = None):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if resume_step is not None and os.path.exists(self.path):
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and json.loads(l)['step'] <= resume_step]
      with open(self.path, 'w') as f:
        f.writelines(kept)
    elif resume_step is None and os.path.exists(self.path):
      os.remove(self.path)
    self._file = open(self.path, 'a')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:  # TensorBoard output is optional.
      self._tb = None

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


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
