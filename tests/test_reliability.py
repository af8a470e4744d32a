"""Reliability: preemption, corrupt checkpoints, NaNs, dead hosts, bad config,
bad data, reproducibility.

Runs that must be bit-identical are compared with `assert_array_equal` on CPU.
Subprocess runs go through `python -m ssl_jax.main`, as a user would.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import simclr as simclr_config
from ssl_jax import checkpointing, parallel, train
from ssl_jax.experiment import load_config
from ssl_jax.train_state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
OVERRIDES = [f'--config.num_steps={STEPS}', '--config.training.checkpoint_every=2']


def _main(workdir, *overrides):
  return [sys.executable, '-m', 'ssl_jax.main',
          '--config=configs/simclr.py:smoke', f'--workdir={workdir}', *overrides]


def _template(workdir):
  """The run's state as shapes: all a restore reads into, without compiling
  the initialiser (this file restores a dozen times)."""
  return train.setup(load_config(str(workdir)), abstract=True).state


def _restore(workdir, step=None):
  ckpt = checkpointing.Checkpointer(str(workdir))
  try:
    state, _ = ckpt.restore(_template(workdir), step)
  finally:
    ckpt.close()
  return state


def _assert_same_state(a, b):
  # Typed PRNG keys compare as their key data.
  a, b = parallel.to_numpy(a), parallel.to_numpy(b)
  assert int(a.step) == int(b.step)
  # Same leaves (structure and keys) before comparing them pairwise: zip
  # would stop at the shorter list and hide a missing or extra leaf.
  paths_a = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(a)]
  paths_b = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(b)]
  assert paths_a == paths_b
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.shape(x) == np.shape(y)
    np.testing.assert_array_equal(x, y)


def _ckpt_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _smoke(num_steps, **training):
  config = simclr_config.get_config('smoke')
  config.num_steps = num_steps
  config.training.update(training)
  return config


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted subprocess run of STEPS steps (its final state)."""
  workdir = tmp_path_factory.mktemp('reference')
  subprocess.run(_main(workdir, *OVERRIDES), cwd=ROOT, check=True, timeout=600)
  return workdir, _restore(workdir)


# ---------------------------------------------------------------------------
# Preemption and checkpoints.


def test_sigterm_then_restart_equals_uninterrupted(tmp_path, reference):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(_main(workdir, *OVERRIDES), cwd=ROOT,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not _ckpt_steps(workdir):
    time.sleep(0.02)
  assert proc.poll() is None, 'run ended before it could be signalled'
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == train.PREEMPTED_EXIT_CODE, stderr
  preempted_at = max(_ckpt_steps(workdir))
  assert preempted_at < STEPS
  assert f'Preempted at step {preempted_at}' in stderr
  # Nothing half-written is visible: only committed `<step>` folders.
  assert all(n.isdigit() for n in os.listdir(workdir / 'checkpoints'))

  subprocess.run(_main(workdir, *OVERRIDES), cwd=ROOT, check=True, timeout=600)
  _assert_same_state(_restore(workdir), reference[1])


def _garble(step_dir):
  """Truncates and overwrites every array file of a checkpoint step."""
  n = 0
  for dirpath, _, names in os.walk(os.path.join(step_dir, 'state')):
    for name in names:
      path = os.path.join(dirpath, name)
      size = os.path.getsize(path)
      with open(path, 'r+b') as f:
        f.truncate(size // 2)
        f.seek(0)
        f.write(b'\xde\xad\xbe\xef' * 4)
      n += 1
  return n


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, reference,
                                                          caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  steps = _ckpt_steps(workdir)
  assert steps[-1] == STEPS and len(steps) >= 2
  assert _garble(workdir / 'checkpoints' / str(STEPS)) > 0

  with caplog.at_level(logging.WARNING):
    state = _restore(workdir)
  assert int(state.step) == steps[-2]
  assert f'Checkpoint at step {STEPS} is unreadable' in caplog.text
  assert f'resumed from step {steps[-2]} instead' in caplog.text

  # A restart recomputes the lost steps and ends where the reference did.
  out = subprocess.run(_main(workdir, *OVERRIDES), cwd=ROOT, timeout=600,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert f'Checkpoint at step {STEPS} is unreadable' in out.stderr
  _assert_same_state(_restore(workdir), reference[1])


def _largest_array_file(step_dir):
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, 'state'))
           for n in names]
  return max(files, key=os.path.getsize)


def test_changed_bytes_are_caught_and_the_previous_checkpoint_used(
    tmp_path, reference, caplog):
  # What orbax alone restores without a word: 64 random bytes over the middle
  # of an array file, the size unchanged.
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  steps = _ckpt_steps(workdir)
  for step in steps:
    assert (workdir / 'checkpoints' / str(step) /
            checkpointing.checksum_file(0)).exists()
  newest = workdir / 'checkpoints' / str(STEPS)
  path = _largest_array_file(newest)
  size = os.path.getsize(path)
  assert size > 256
  with open(path, 'r+b') as f:
    f.seek(size // 2 - 32)
    f.write(np.random.default_rng(0).bytes(64))
  assert os.path.getsize(path) == size

  ckpt = checkpointing.Checkpointer(str(workdir))
  with caplog.at_level(logging.WARNING):
    try:
      state, _ = ckpt.restore(_template(workdir), set_aside_unreadable=True)
    finally:
      ckpt.close()
  assert int(state.step) == steps[-2]
  assert f'Checkpoint at step {STEPS} is unreadable' in caplog.text
  assert 'changed since it was written' in caplog.text
  _assert_same_state(state, _restore(reference[0], steps[-2]))
  # Set aside like an unreadable checkpoint, so the run can write its own.
  assert not newest.exists()
  assert (workdir / 'checkpoints' / f'{STEPS}.unreadable').is_dir()
  assert _ckpt_steps(workdir) == steps[:-1]


def test_checkpoint_without_checksums_restores_with_a_warning(
    tmp_path, reference, caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  shutil.rmtree(workdir / 'checkpoints' / str(STEPS) / checkpointing.CHECKSUM_DIR)
  with caplog.at_level(logging.WARNING):
    state = _restore(workdir)
  assert f'Checkpoint at step {STEPS} has no {checkpointing.CHECKSUM_DIR}' in caplog.text
  _assert_same_state(state, reference[1])


def test_all_checkpoints_corrupt_says_what_to_do(tmp_path, reference):
  workdir = tmp_path / 'run'
  shutil.copytree(reference[0], workdir)
  for step in _ckpt_steps(workdir):
    _garble(workdir / 'checkpoints' / str(step))
  with pytest.raises(checkpointing.CheckpointError, match='Move the folder away'):
    _restore(workdir)


def test_leftover_tmp_checkpoint_is_removed_not_restored(tmp_path):
  # What a save killed before its final rename leaves behind.
  tmp = tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp-1700000000000000'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'junk').write_bytes(b'half written')
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == []
  tiny = TrainState.create(params={'w': np.ones(3, np.float32)}, batch_stats={},
                           opt_state={}, rng=jax.random.PRNGKey(0))
  assert ckpt.restore(tiny) == (None, {})
  # Orbax removes such leftovers before its first save.
  ckpt.save(tiny, {})
  ckpt.close()
  assert not tmp.exists()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['0']


def test_a_reader_leaves_a_live_runs_save_in_progress_alone(tmp_path):
  # Evaluation or export of a run that is still training: the folder of the
  # run's save in progress must survive the reader.
  tmp = tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp-1700000000000000'
  (tmp / 'state').mkdir(parents=True)
  reader = checkpointing.Checkpointer(str(tmp_path), writer=False)
  assert reader.all_steps() == []
  reader.close()
  # Orbax cleans up in a thread its close does not wait for: watch a while.
  for _ in range(20):
    assert tmp.is_dir()
    time.sleep(0.05)


def test_same_seed_same_devices_gives_bit_identical_params(tmp_path, reference):
  # In this process (8 simulated devices) vs. the reference subprocess run.
  config = _smoke(STEPS, checkpoint_every=2)
  state = train.train_and_evaluate(config, str(tmp_path))
  _assert_same_state(state, reference[1])


# ---------------------------------------------------------------------------
# Numerical faults.


def test_nan_with_policy_skip_continues_counts_and_stays_finite(tmp_path, caplog):
  # embedding_std of a healthy d=16 run is ~0.25; a threshold of 10 must warn.
  config = _smoke(6, inject_nonfinite_at_step=3, nonfinite_policy='skip',
                  collapse_std_threshold=10.0)
  with caplog.at_level(logging.WARNING):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 6 and int(state.nonfinite_steps) == 1
  for leaf in jax.tree.leaves(parallel.to_numpy(state)):
    assert np.all(np.isfinite(leaf))
  assert 'non-finite 1 time(s) at step 3 ' in caplog.text
  assert 'nonfinite_policy=skip' in caplog.text
  assert 'Possible collapse at step 2: embedding_std' in caplog.text
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['nonfinite_steps'] for r in rows] == [0, 1, 1]
  assert all(np.isfinite(r['loss']) for r in rows)


def test_nan_with_policy_stop_exits_and_keeps_last_good_checkpoint(tmp_path):
  out = subprocess.run(
      _main(tmp_path, '--config.num_steps=8', '--config.training.checkpoint_every=2',
            '--config.training.inject_nonfinite_at_step=4'),
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr
  assert 'Traceback' not in out.stderr
  assert ('The loss, gradients or updated state became non-finite 1 time(s) '
          'between steps 3 '
          'and 4') in out.stderr
  assert 'the newest checkpoint (step 2) is the last good one' in out.stderr
  assert 'nonfinite_policy=skip' in out.stderr
  assert _ckpt_steps(tmp_path) == [2]
  state = _restore(tmp_path)
  assert int(state.step) == 2 and int(state.nonfinite_steps) == 0
  for leaf in jax.tree.leaves(parallel.to_numpy(state)):
    assert np.all(np.isfinite(leaf))


# ---------------------------------------------------------------------------
# Config validation: every check fails before compilation with what to change.


def _set(config, path, value):
  *parents, key = path.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[key] = value


@pytest.mark.parametrize('path,value,message', [
    ('batch_size', 60, r'not divisible by the 8 devices.*multiple of 8'),
    ('method.queue_size', 100,
     r'config.method.queue_size=100 is not a multiple of the global batch size '
     r'64; set it to a multiple such as 64'),
    ('augment.views.global_crops.size', 32,
     r'views.global_crops.size=32 is larger than the 28x28 images.*at most 28'),
    ('method.temperature', 0.0, r'config.method.temperature must be > 0'),
    ('method.ema_momentum_base', 1.5,
     r'config.method.ema_momentum_base is an EMA momentum and must be in \[0, 1\]'),
    ('training.nonfinite_policy', 'ignore',
     r'nonfinite_policy must be "stop" or "skip", not \'ignore\''),
])
def test_bad_config_fails_with_what_to_change(tmp_path, path, value, message):
  config = simclr_config.get_config('smoke')
  _set(config, path, value)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


def test_batch_not_divisible_by_processes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  config = simclr_config.get_config('smoke')
  with pytest.raises(ValueError, match='not divisible by the 3 processes.*'
                     'multiple of 3'):
    train.train_and_evaluate(config, str(tmp_path))


def test_missing_dataset_says_where(tmp_path):
  config = simclr_config.get_config('smoke')
  config.data.dataset = 'folder'
  config.data.folder = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere.*does not exist; set '
                     '--config.data.folder'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  config = simclr_config.get_config('smoke')
  with pytest.raises(ValueError, match='is not writable.*--workdir=DIR'):
    train.train_and_evaluate(config, str(blocker / 'run'))


# ---------------------------------------------------------------------------
# Bad data.


def _plant_folder(root, n_good):
  from PIL import Image
  rng = np.random.default_rng(0)
  for i in range(n_good):
    cls = root / f'class{i % 2}'
    cls.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(cls / f'{i}.png')
  bad = root / 'class0'
  (bad / 'unreadable.jpg').write_bytes(b'this is not an image')
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(bad / 'full.png')
  data = (bad / 'full.png').read_bytes()
  (bad / 'full.png').unlink()
  (bad / 'truncated.png').write_bytes(data[:len(data) // 2])
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).convert('CMYK').save(
      bad / 'cmyk.jpg')
  Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).convert('P').save(
      bad / 'palette.png')
  Image.fromarray(rng.integers(0, 65535, (32, 32), np.uint16)).save(bad / 'sixteen.png')
  Image.fromarray(rng.integers(0, 255, (2, 2, 3), np.uint8)).save(bad / 'tiny.png')
  return 2  # unreadable + truncated; the others are converted


def test_folder_with_bad_files_trains_and_reports_them(tmp_path, caplog):
  n_bad = _plant_folder(tmp_path / 'images', 64 - 6)
  # 64 files, batch 64: one step reads every file.
  assert sum(len(f) for _, _, f in os.walk(tmp_path / 'images')) == 64
  config = _smoke(2)
  config.data.update(dataset='folder', folder=str(tmp_path / 'images'),
                     image_size=28, channels=1, max_train_examples=0)
  with caplog.at_level(logging.WARNING), pytest.warns(UserWarning,
                                                      match='Skipping unreadable'):
    state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2 and int(state.nonfinite_steps) == 0
  assert f'{n_bad} unreadable image file(s) were skipped' in caplog.text
  rows = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert rows[-1]['bad_files'] == n_bad


# ---------------------------------------------------------------------------
# Multi-host: a dead peer makes the survivor exit, a restart resumes.


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_two(workdir, overrides):
  env = dict(os.environ)
  # The session's XLA flags with 4 devices: its optimisation level halves
  # each process's compile (all three pairs run with the same flags).
  env['XLA_FLAGS'] = env['XLA_FLAGS'].replace(
      '--xla_force_host_platform_device_count=8',
      '--xla_force_host_platform_device_count=4')
  assert 'device_count=4' in env['XLA_FLAGS']
  # Only programs that compile for long are cached, as before the suite
  # cached every program: a 2-process run that loads from the cache a small
  # program its peer has just compiled is untried (a warm cache shared with
  # other checkouts once aborted a 2-process step, tests/test_multihost.py).
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
  port = _free_port()
  return [subprocess.Popen(
      _main(workdir, *overrides, '--config.distributed.enabled=True',
            f'--config.distributed.coordinator_address=127.0.0.1:{port}',
            '--config.distributed.num_processes=2',
            f'--config.distributed.process_id={i}',
            '--config.distributed.heartbeat_timeout_s=10'),
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True) for i in range(2)]


@pytest.mark.parametrize('victim', [1])
def test_killed_peer_makes_survivor_exit_and_restart_resumes(tmp_path, victim):
  steps = 400
  # A constant learning rate (cosine from the peak to the peak): the restart
  # ends the run early, and its parameters must equal those of an
  # uninterrupted run of that length, whose schedule then is the same.
  overrides = [f'--config.num_steps={steps}', '--config.training.log_every=1',
               '--config.training.checkpoint_every=4',
               '--config.optimizer.final_lr_fraction=1.0']
  run = tmp_path / 'run'
  procs = _start_two(run, overrides)
  try:
    metrics = run / 'metrics.jsonl'
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if 8 in _ckpt_steps(run) and metrics.exists() and len(
          metrics.read_text().splitlines()) >= 10:
        break
      time.sleep(0.05)
    assert all(p.poll() is None for p in procs), 'a process ended early'
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.time()
    survivor = procs[1 - victim]
    rc = survivor.wait(timeout=300)
    waited = time.time() - killed_at
    assert rc != 0
    # heartbeat_timeout_s=10; JAX's default (100 s) would take longer.
    assert waited < 90, f'survivor took {waited:.0f} s to exit'
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.communicate()

  last = max(_ckpt_steps(run))
  assert 8 <= last < steps
  # A restart of both processes resumes from the newest checkpoint ...
  overrides[0] = f'--config.num_steps={last + 2}'
  # A shorter run than the killed one: a change a resume must name.
  procs = _start_two(run, overrides + ['--allow_config_change=num_steps'])
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
  rows = [json.loads(l) for l in open(run / 'metrics.jsonl')]
  assert rows[-1]['step'] == last + 2
  assert [r['step'] for r in rows] == sorted({r['step'] for r in rows})
  # ... and ends where an uninterrupted two-process run of that length does.
  reference = tmp_path / 'reference'
  procs = _start_two(reference, overrides)
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err
  _assert_same_state(_restore(run), _restore(reference))
