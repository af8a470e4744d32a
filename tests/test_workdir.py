"""The workdir: config comparison, the lock, atomic writes, metrics repair,
numeric validation and the unreadable-file share (no compilation here)."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from configs import simclr as simclr_config
from ssl_jax import metric_writers, parallel, train, validation
from ssl_jax import workdir as workdir_lib
from ssl_jax.data import sources
from tensorboard_events import read_tensorboard_events


def _smoke():
  return simclr_config.get_config('smoke')


def _fake_checkpoint(workdir):
  (workdir / 'checkpoints' / '4').mkdir(parents=True)


# ---------------------------------------------------------------------------
# Config comparison.


def test_resume_with_other_config_is_refused_and_changes_nothing(tmp_path):
  config = _smoke()
  workdir_lib.save_config(config, tmp_path)
  _fake_checkpoint(tmp_path)
  before = (tmp_path / 'config.json').read_bytes()
  other = _smoke()
  other.batch_size = 32
  other.model.width = 8
  other.num_steps = 99
  with pytest.raises(workdir_lib.ConfigMismatchError) as e:
    train.train_and_evaluate(other, str(tmp_path))
  message = str(e.value)
  assert '\n' not in message
  assert 'batch_size: 64 -> 32' in message
  assert 'model.width: 64 -> 8' in message
  assert 'num_steps: 4 -> 99' in message or 'num_steps: ' in message
  assert 'use a new --workdir' in message
  assert '--allow_config_change=num_steps ' in message
  assert 'batch_size, model.width cannot change within a run' in message
  assert (tmp_path / 'config.json').read_bytes() == before
  assert not (tmp_path / 'lock').exists()
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_allowed_changes_pass_and_fixed_ones_never_do(tmp_path):
  config = _smoke()
  workdir_lib.save_config(config, tmp_path)
  _fake_checkpoint(tmp_path)
  longer = _smoke()
  longer.num_steps = 99
  longer.training.log_every = 7
  diffs = workdir_lib.check_config(longer, tmp_path,
                                   ('num_steps', 'config.training'))
  assert [d[0] for d in diffs] == ['num_steps', 'training.log_every']
  wider = _smoke()
  wider.batch_size = 32
  with pytest.raises(workdir_lib.ConfigMismatchError,
                     match='batch_size cannot change within a run'):
    workdir_lib.check_config(wider, tmp_path, ('batch_size',))
  # Each process has its own process_id: never a difference.
  other_process = _smoke()
  other_process.distributed.process_id = 3
  assert workdir_lib.check_config(other_process, tmp_path) == []


def test_config_without_checkpoints_is_a_fresh_start(tmp_path):
  workdir_lib.save_config(_smoke(), tmp_path)
  other = _smoke()
  other.batch_size = 32
  assert workdir_lib.check_config(other, tmp_path) == []


def test_fields_added_since_the_run_are_not_differences(tmp_path):
  config = _smoke()
  old = json.loads(config.to_json_best_effort())
  del old['data']['max_bad_file_fraction']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  _fake_checkpoint(tmp_path)
  assert workdir_lib.check_config(config, tmp_path) == []


# ---------------------------------------------------------------------------
# The lock.


def _dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def _write_lock(workdir, host, pid, heartbeat):
  (workdir / 'lock').write_text(json.dumps(
      {'host': host, 'pid': pid, 'token': 'other', 'started': heartbeat,
       'heartbeat': heartbeat}))


def test_second_holder_is_refused_naming_the_owner(tmp_path):
  first = workdir_lib.WorkdirLock(tmp_path).acquire()
  try:
    with pytest.raises(workdir_lib.WorkdirLockedError) as e:
      workdir_lib.WorkdirLock(tmp_path).acquire()
    assert f'host {socket.gethostname()}, PID {os.getpid()}' in str(e.value)
    assert 'in use by another training run' in str(e.value)
    # The training entry point refuses before touching anything.
    with pytest.raises(workdir_lib.WorkdirLockedError):
      train.train_and_evaluate(_smoke(), str(tmp_path))
    assert not (tmp_path / 'config.json').exists()
  finally:
    first.release()
  assert not (tmp_path / 'lock').exists()
  workdir_lib.WorkdirLock(tmp_path).acquire().release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  _write_lock(tmp_path, socket.gethostname(), _dead_pid(), time.time())
  with caplog.at_level(logging.WARNING):
    lock = workdir_lib.WorkdirLock(tmp_path).acquire()
  assert 'Taking over the lock' in caplog.text and 'is not running' in caplog.text
  assert lock.read_owner().token == lock.token
  lock.release()
  assert sorted(os.listdir(tmp_path)) == []


def test_lock_with_stale_heartbeat_is_taken_over_live_one_is_not(tmp_path):
  _write_lock(tmp_path, 'another-host', 1, time.time())
  with pytest.raises(workdir_lib.WorkdirLockedError, match='another-host, PID 1'):
    workdir_lib.WorkdirLock(tmp_path, stale_after_s=60).acquire()
  _write_lock(tmp_path, 'another-host', 1, time.time() - 120)
  lock = workdir_lib.WorkdirLock(tmp_path, stale_after_s=60).acquire()
  assert lock.read_owner().host == socket.gethostname()
  lock.release()


def test_heartbeat_refreshes_the_lock(tmp_path):
  lock = workdir_lib.WorkdirLock(tmp_path, heartbeat_s=0.2).acquire()
  try:
    first = lock.read_owner().heartbeat
    time.sleep(1.0)
    assert lock.read_owner().heartbeat > first
  finally:
    lock.release()


# ---------------------------------------------------------------------------
# Atomic writes and metrics.jsonl.


def test_write_atomic_leaves_no_temporary_and_replaces_whole(tmp_path):
  target = tmp_path / 'sub' / 'x.json'
  workdir_lib.write_json(target, {'a': 1})
  workdir_lib.write_atomic(target, b'{"a": 2}')
  assert json.loads(target.read_text()) == {'a': 2}
  assert os.listdir(tmp_path / 'sub') == ['x.json']


def _rows(path):
  return [json.loads(l) for l in open(path)]


def test_torn_last_metrics_line_is_repaired_with_a_warning(tmp_path, caplog):
  w = metric_writers.MetricWriter(str(tmp_path))
  for step in (2, 4, 6):
    w.write(step, {'loss': 1.0})
  w.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 8, "lo')  # killed mid-write
  with caplog.at_level(logging.WARNING):
    w = metric_writers.MetricWriter(str(tmp_path), resume_step=6)
  assert 'torn last line 4' in caplog.text
  w.write(8, {'loss': 0.5})
  w.close()
  assert [r['step'] for r in _rows(tmp_path / 'metrics.jsonl')] == [2, 4, 6, 8]


def test_deleted_metrics_file_is_recreated(tmp_path, caplog):
  w = metric_writers.MetricWriter(str(tmp_path))
  w.write(2, {'loss': 1.0})
  os.remove(tmp_path / 'metrics.jsonl')
  with caplog.at_level(logging.WARNING):
    w.write(4, {'loss': 1.0})
  w.close()
  assert 'was deleted during the run' in caplog.text
  assert [r['step'] for r in _rows(tmp_path / 'metrics.jsonl')] == [4]
  os.remove(tmp_path / 'metrics.jsonl')
  with caplog.at_level(logging.WARNING):
    w = metric_writers.MetricWriter(str(tmp_path), resume_step=4)
  assert 'metrics.jsonl is missing' in caplog.text
  w.write(6, {'loss': 1.0})
  w.close()
  assert [r['step'] for r in _rows(tmp_path / 'metrics.jsonl')] == [6]


def test_tensorboard_events_read_back_with_an_independent_reader(tmp_path):
  assert metric_writers.crc32c(b'123456789') == 0xE3069283  # RFC 3720's check value
  before = time.time()
  w = metric_writers.MetricWriter(str(tmp_path))
  w.write(2, {'loss': 1.5, 'learning_rate': 0.1})
  w.write(2**40, {'loss': -3.25, 'online_probe_acc': 1e-30})
  w.close()
  files = os.listdir(tmp_path / 'tensorboard')
  assert len(files) == 1 and files[0].startswith('events.out.tfevents.'), files
  events, bad = read_tensorboard_events(
      (tmp_path / 'tensorboard' / files[0]).read_bytes())
  assert bad == 0
  assert events[0].file_version == 'brain.Event:2'
  assert all(before <= e.wall_time <= time.time() for e in events)
  scalars = [(e.step, v.tag, v.simple_value)
             for e in events[1:] for v in e.summary.value]
  assert scalars == [(2, 'loss', 1.5), (2, 'learning_rate', pytest.approx(0.1)),
                     (2**40, 'loss', -3.25),
                     (2**40, 'online_probe_acc', pytest.approx(1e-30))]
  # A resumed run starts a second file; TensorBoard reads both.
  w = metric_writers.MetricWriter(str(tmp_path), resume_step=2)
  w.write(4, {'loss': 1.0})
  w.close()
  assert len(os.listdir(tmp_path / 'tensorboard')) == 2


# ---------------------------------------------------------------------------
# Numeric fields: refused before anything is compiled, with what to change.


def _set(config, path, value):
  *parents, key = path.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[key] = value


@pytest.mark.parametrize('path,value,message', [
    ('training.keep_checkpoints', 0, r'keep_checkpoints=0 must be >= 1'),
    ('optimizer.lr', -0.1, r'optimizer.lr=-0.1 must be > 0 \(a negative rate'),
    ('optimizer.lr', 0.0, r'optimizer.lr=0.0 must be > 0'),
    ('optimizer.lr', float('nan'), r'optimizer.lr=nan is not a finite number'),
    ('optimizer.lr', float('inf'), r'optimizer.lr=inf is not a finite number'),
    ('num_steps', -5, r'num_steps=-5 must be >= 0'),
    ('training.log_every', 0, r'log_every=0 must be >= 1'),
    ('training.checkpoint_every', 0, r'checkpoint_every=0 must be >= 1'),
    ('optimizer.weight_decay', -1.0, r'weight_decay=-1.0 must be >= 0'),
    ('augment.views.global_crops.flip_prob', 1.5, r'flip_prob=1.5 is a probability'),
    ('augment.views.global_crops.crop_scale', (0.5, 0.2), r'crop_scale=\(0.5, 0.2\)'),
    ('data.max_bad_file_fraction', 2.0, r'max_bad_file_fraction=2.0 is a fraction'),
    ('distributed.initialization_timeout_s', 0, r'initialization_timeout_s=0 must be >= 1'),
])
def test_numeric_fields_are_checked(tmp_path, path, value, message):
  config = _smoke()
  _set(config, path, value)
  with pytest.raises(ValueError, match=message):
    validation.validate_config(config, str(tmp_path))
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'config.json').exists()


# ---------------------------------------------------------------------------
# Unreadable files.


def _folder(root, good, bad):
  from PIL import Image
  import numpy as np
  rng = np.random.default_rng(0)
  for i in range(good + bad):
    cls = root / f'class{i % 2}'
    cls.mkdir(parents=True, exist_ok=True)
    if i < good:
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
          cls / f'{i}.png')
    else:
      (cls / f'{i}.jpg').write_bytes(b'not an image')


def _folder_config(root):
  config = _smoke()
  config.data.update(dataset='folder', folder=str(root), image_size=28,
                     channels=1, max_train_examples=0, num_workers=0)
  return config


def test_folder_of_unreadable_files_fails_before_training(tmp_path):
  _folder(tmp_path / 'images', 0, 64)
  with pytest.raises(ValueError) as e:
    with pytest.warns(UserWarning):
      train.train_and_evaluate(_folder_config(tmp_path / 'images'),
                               str(tmp_path / 'run'))
  message = str(e.value)
  assert '64 of 64 image files checked before training' in message
  assert 'max_bad_file_fraction=0.05' in message
  assert '.jpg' in message and '--config.data.max_bad_file_fraction' in message
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_share_of_unreadable_files_is_configurable(tmp_path):
  _folder(tmp_path / 'images', 54, 10)
  source = sources.get_source(_folder_config(tmp_path / 'images').data, 'train')
  with pytest.warns(UserWarning):
    with pytest.raises(ValueError, match='10 of 64 image files'):
      sources.probe_unreadable(source, 0.1)
  sources.probe_unreadable(source, 0.2)
  with pytest.raises(ValueError, match='10 of 64 image files read so far'):
    sources.check_unreadable_share(source, 64, 0.1)
  sources.check_unreadable_share(source, 64, 0.2)


# ---------------------------------------------------------------------------
# Multi-host start-up.


def test_unreachable_coordinator_names_address_and_timeout():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]  # closed again: nothing listens there
  start = time.monotonic()
  with pytest.raises(parallel.DistributedInitError) as e:
    parallel.initialize_distributed(f'127.0.0.1:{port}', 2, 1, 10, 2)
  assert time.monotonic() - start < 10
  assert f'The coordinator 127.0.0.1:{port} could not be reached within 2 s' in str(e.value)
  assert 'initialization_timeout_s' in str(e.value)


_RACER = r'''
import sys, time
sys.path.insert(0, {root!r})
from ssl_jax import workdir as workdir_lib
lock = workdir_lib.WorkdirLock({workdir!r}, heartbeat_s=0)
while time.time() < {start}:
  time.sleep(0.001)
try:
  lock.acquire()
except workdir_lib.WorkdirLockedError:
  print('refused')
else:
  print('held')
  time.sleep(2)  # alive while the others look
'''


@pytest.mark.parametrize('stale', [False, True])
def test_racing_runs_never_both_hold_the_lock(tmp_path, stale):
  if stale:  # all of them race to take over the same dead run's lock
    _write_lock(tmp_path, socket.gethostname(), _dead_pid(), time.time())
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = _RACER.format(root=root, workdir=str(tmp_path), start=time.time() + 3)
  procs = [subprocess.Popen([sys.executable, '-c', script],
                            stdout=subprocess.PIPE, text=True) for _ in range(6)]
  outs = [p.communicate(timeout=60)[0].split() for p in procs]
  assert sorted(o[-1] for o in outs) == ['held'] + ['refused'] * 5, outs

