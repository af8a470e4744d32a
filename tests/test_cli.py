"""The command lines as a user runs them: one `error:` line per user error,
no traceback, exit status 2 (the command must change) or 1 (other failures);
results printed before they are written; the workdir lock between two runs."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ssl_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = '--config=configs/simclr.py:smoke'


def _run(module, *flags, timeout=600):
  return subprocess.run([sys.executable, '-m', module, *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _one_error_line(out, code):
  """Asserts exit status `code` and exactly one `error:` line, no traceback."""
  assert out.returncode == code, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, out.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 4-step smoke run, and a second run started while it held the lock."""
  workdir = tmp_path_factory.mktemp('cli') / 'run'
  flags = [SMOKE, f'--workdir={workdir}', '--config.num_steps=4',
           '--config.training.checkpoint_every=2', '--config.eval.baselines=False']
  first = subprocess.Popen([sys.executable, '-m', 'ssl_jax.main', *flags],
                           cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (workdir / 'lock').exists():
    assert first.poll() is None, first.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.1)
  start = time.time()
  second = _run('ssl_jax.main', *flags)
  second_seconds = time.time() - start
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  return workdir, first.pid, second, second_seconds


def test_second_run_in_a_locked_workdir_is_refused_naming_the_owner(trained):
  workdir, pid, second, seconds = trained
  line = _one_error_line(second, 1)
  assert f'{workdir} is in use by another training run' in line
  assert f'host {socket.gethostname()}, PID {pid}' in line
  assert seconds < 60  # at once: before any data is read or compiled
  # The first run was not disturbed and released the lock.
  assert not (workdir / 'lock').exists()
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [2, 4]


def test_misspelled_field_missing_file_unknown_flag(tmp_path):
  line = _one_error_line(_run('ssl_jax.main', SMOKE, f'--workdir={tmp_path}',
                              '--config.optimzer.lr=1'), 2)
  assert 'no such field' in line and 'Did you mean "optimizer"' in line
  line = _one_error_line(_run('ssl_jax.main', '--config=configs/nope.py',
                              f'--workdir={tmp_path}'), 2)
  assert 'configs/nope.py' in line and 'No such file' in line
  line = _one_error_line(_run('ssl_jax.main', SMOKE, '--workdr=x'), 2)
  assert "Unknown command line flag 'workdr'" in line
  line = _one_error_line(_run('ssl_jax.main', SMOKE, f'--workdir={tmp_path}',
                              '--config.optimizer.lr=-1'), 2)
  assert 'optimizer.lr=-1.0 must be > 0' in line
  blocker = tmp_path / 'file'
  blocker.write_text('')
  line = _one_error_line(_run('ssl_jax.main', SMOKE,
                              f'--workdir={blocker}/run'), 2)
  assert 'is not writable' in line
  assert os.listdir(tmp_path) == ['file']


def test_unreachable_coordinator_is_named_with_its_timeout(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  out = _run('ssl_jax.main', SMOKE, f'--workdir={tmp_path}',
             '--config.distributed.enabled=True',
             f'--config.distributed.coordinator_address=127.0.0.1:{port}',
             '--config.distributed.num_processes=2',
             '--config.distributed.process_id=1',
             '--config.distributed.initialization_timeout_s=2', timeout=120)
  line = _one_error_line(out, 1)
  assert f'coordinator 127.0.0.1:{port} could not be reached within 2 s' in line


def test_missing_step_is_one_line_for_evaluate_and_export(trained):
  workdir = trained[0]
  for module in ('ssl_jax.evaluate', 'ssl_jax.export'):
    line = _one_error_line(_run(module, f'--workdir={workdir}', '--step=999'), 2)
    assert 'has no checkpoint at step 999; it has steps 2, 4' in line
  line = _one_error_line(_run('ssl_jax.evaluate', f'--workdir={workdir}/nope'), 2)
  assert 'config.json not found' in line


def test_evaluate_prints_results_before_a_failed_write(trained):
  workdir = trained[0]
  # Root ignores permissions: a folder where the file should go makes the
  # write fail for any user.
  (workdir / 'eval_knn.json').mkdir()
  # Evaluation reads a workdir without its lock: a training run may hold it.
  lock = workdir_lib.WorkdirLock(workdir).acquire()
  try:
    out = _run('ssl_jax.evaluate', f'--workdir={workdir}', '--protocol=knn')
  finally:
    lock.release()
    (workdir / 'eval_knn.json').rmdir()
  line = _one_error_line(out, 1)
  assert 'pretrained encoder   top-1' in out.stdout
  assert 'the results above could not be written' in line
  assert 'eval_knn.json' in line


def test_resume_with_changed_config_then_allowed_with_torn_metrics(trained):
  workdir = trained[0]
  before = (workdir / 'config.json').read_bytes()
  flags = [SMOKE, f'--workdir={workdir}', '--config.num_steps=6',
           '--config.training.checkpoint_every=2', '--config.eval.baselines=False']
  line = _one_error_line(_run('ssl_jax.main', *flags,
                              '--config.batch_size=32'), 2)
  assert 'batch_size: 64 -> 32' in line and 'num_steps: 4 -> 6' in line
  assert 'use a new --workdir' in line
  assert '--allow_config_change=num_steps' in line
  assert (workdir / 'config.json').read_bytes() == before
  # A kill mid-write left half a line; the allowed resume repairs it.
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "lo')
  out = _run('ssl_jax.main', *flags, '--allow_config_change=num_steps')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'torn last line 3' in out.stderr
  assert json.loads((workdir / 'config.json').read_text())['num_steps'] == 6
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [2, 4, 6]
