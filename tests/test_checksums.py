"""Checkpoint checksums: per-process lists, the split of the verification
across processes, and the single list of older checkpoints.

The multi-process layout is simulated (files named as orbax names them),
and one test runs the real thing: two processes save, a byte of the second
one's shards changes, and both fall back together. (The 2-process FSDP run of
tests/test_multihost.py also checks what each process listed.)
"""

import json
import logging
import os
import socket
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from ssl_jax import checkpointing, parallel
from ssl_jax.train_state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What orbax 0.12.8 writes for two processes (OCDBT): per-process data and
# array metadata, and the primary process's shared files.
SHARED = ['_CHECKPOINT_METADATA', 'commit_success.txt', 'meta/metadata',
          'state/_METADATA', 'state/_sharding', 'state/manifest.ocdbt',
          'state/d/root']
OWN = {i: [f'state/ocdbt.process_{i}/manifest.ocdbt',
           f'state/ocdbt.process_{i}/d/data{i}a',
           f'state/ocdbt.process_{i}/d/data{i}b',
           f'state/array_metadatas/process_{i}'] for i in range(2)}


def _two_process_step(tmp_path):
  step = tmp_path / '7'
  for n, name in enumerate(SHARED + OWN[0] + OWN[1]):
    (step / name).parent.mkdir(parents=True, exist_ok=True)
    (step / name).write_bytes(name.encode() * (n + 1))
  return step


def _listed(step, i):
  return json.loads((step / checkpointing.checksum_file(i)).read_text())


def _shares(step, count):
  """Which share of `count` found each changed file (by ChecksumMismatch)."""
  failed = []
  for i in range(count):
    try:
      checkpointing.verify_checksums(step, i, count)
    except checkpointing.ChecksumMismatch:
      failed.append(i)
  return failed


def test_each_process_lists_the_files_it_wrote(tmp_path):
  step = _two_process_step(tmp_path)
  for i in range(2):
    checkpointing.write_checksums(step, i, 2)
  zero, one = _listed(step, 0), _listed(step, 1)
  assert sorted(zero['files']) == sorted(SHARED + OWN[0])
  assert sorted(one['files']) == sorted(OWN[1])
  assert zero['process_count'] == one['process_count'] == 2
  assert sorted(os.listdir(step / checkpointing.CHECKSUM_DIR)) == [
      'process_0.json', 'process_1.json']  # no temporary files left
  # Verified by 1, 2 or 3 restoring processes, whatever wrote it.
  for count in (1, 2, 3):
    assert all(checkpointing.verify_checksums(step, i, count) == []
               for i in range(count))


@pytest.mark.parametrize('name', [OWN[1][1], SHARED[-1]])
def test_a_changed_file_is_found_by_exactly_one_share(tmp_path, name):
  step = _two_process_step(tmp_path)
  for i in range(2):
    checkpointing.write_checksums(step, i, 2)
  data = bytearray((step / name).read_bytes())
  data[len(data) // 2] ^= 1
  (step / name).write_bytes(bytes(data))
  for count in (1, 2, 3):
    assert len(_shares(step, count)) == 1, count


def test_a_missing_process_list_leaves_only_its_files_unverified(tmp_path):
  # Killed between the commit and process 1's checksums: process 0's files
  # are still checked, and the missing list is named.
  step = _two_process_step(tmp_path)
  checkpointing.write_checksums(step, 0, 2)
  assert checkpointing.verify_checksums(step) == [
      checkpointing.checksum_file(1)]
  (step / OWN[0][1]).write_bytes(b'other bytes')
  with pytest.raises(checkpointing.ChecksumMismatch, match='has 11 bytes'):
    checkpointing.verify_checksums(step)


def test_no_checksums_at_all_restores_unverified(tmp_path):
  step = _two_process_step(tmp_path)
  assert checkpointing.verify_checksums(step) == [checkpointing.CHECKSUM_DIR]


def test_the_single_list_of_older_checkpoints_still_verifies(tmp_path):
  step = _two_process_step(tmp_path)
  # The format written before per-process lists: one file, every file.
  checkpointing.write_checksums(step, 0, 1)
  listed = _listed(step, 0)['files']
  assert sorted(listed) == sorted(SHARED + OWN[0] + OWN[1])
  (step / checkpointing.CHECKSUM_DIR / 'process_0.json').unlink()
  (step / checkpointing.CHECKSUM_DIR).rmdir()
  (step / checkpointing.CHECKSUM_FILE).write_text(
      json.dumps({'algorithm': 'sha256', 'files': listed}))
  assert _shares(step, 2) == []
  assert checkpointing.verify_checksums(step, 0, 1) == []
  (step / OWN[1][2]).write_bytes(b'x' * (step / OWN[1][2]).stat().st_size)
  assert len(_shares(step, 2)) == 1
  with pytest.raises(checkpointing.ChecksumMismatch, match='changed since'):
    checkpointing.verify_checksums(step)


@hypothesis.given(
    sizes=st.dictionaries(st.text('abc/.', min_size=1, max_size=6),
                          st.integers(0, 10**12), max_size=40),
    count=st.integers(1, 9))
def test_the_split_covers_every_file_once_the_same_way_everywhere(sizes,
                                                                  count):
  files = {n: {'size': s, 'sha256': ''} for n, s in sizes.items()}
  shares = checkpointing.split_files(files, count)
  assert len(shares) == count
  names = [n for share in shares for n in share]
  assert sorted(names) == sorted(files)  # all of them, none twice
  # The same on every process: from the names and sizes only, not the order.
  assert checkpointing.split_files(dict(reversed(files.items())),
                                   count) == shares
  # Balanced by bytes: no share exceeds the even split by more than one file.
  loads = [sum(files[n]['size'] for n in share) for share in shares]
  biggest = max((f['size'] for f in files.values()), default=0)
  assert max(loads) <= sum(loads) / count + biggest


def _state(step):
  return TrainState.create(
      params={'w': np.full(4096, step, np.float32)}, batch_stats={},
      opt_state={}, rng=jax.random.PRNGKey(0)).replace(step=step)


def _two_steps(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save(_state(step), {})
  ckpt.close()
  return tmp_path / 'checkpoints'


def test_a_changed_data_file_falls_back_to_the_previous_step(tmp_path,
                                                             caplog):
  checkpoints = _two_steps(tmp_path)
  data = sorted((checkpoints / '2' / 'state' / 'ocdbt.process_0' / 'd').iterdir(),
                key=lambda p: p.stat().st_size)[-1]
  assert str(data.relative_to(checkpoints / '2')) in _listed(
      checkpoints / '2', 0)['files']
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xff
  data.write_bytes(bytes(raw))
  state = _restore_logging_warnings(tmp_path, caplog)
  assert int(state.step) == 1
  np.testing.assert_array_equal(np.asarray(state.params['w']), 1.0)
  assert 'changed since it was written' in caplog.text


def _restore_logging_warnings(tmp_path, caplog):
  """The newest good state of the run in `tmp_path`, warnings in `caplog`."""
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    try:
      return ckpt.restore(_state(0))[0]
    finally:
      ckpt.close()


def test_every_process_falls_back_when_another_one_found_a_bad_file(
    tmp_path, monkeypatch, caplog):
  # Process 1 of 2 verifies its share of step 2 and finds nothing wrong, but
  # process 0's vote is "bad": process 1 too restores step 1.
  _two_steps(tmp_path)
  votes = []
  monkeypatch.setattr(parallel, 'process_count', lambda: 2)
  monkeypatch.setattr(parallel, 'process_index', lambda: 1)
  monkeypatch.setattr(parallel, 'all_processes_agree',
                      lambda ok: votes.append(ok) or len(votes) > 1)
  state = _restore_logging_warnings(tmp_path, caplog)
  assert votes == [True, True]
  assert int(state.step) == 1
  assert 'another process found files' in caplog.text


def test_all_processes_agree_alone_is_the_identity():
  assert parallel.all_processes_agree(True) is True
  assert parallel.all_processes_agree(False) is False


def _two_process_worker(process_id, port, workdir):
  """One of the two processes of the test below (run as a script)."""
  logging.basicConfig(level=logging.WARNING)  # the warnings, on stderr
  parallel.initialize_distributed(f'127.0.0.1:{port}', 2, process_id)
  mesh = parallel.make_mesh()
  # Sharded over the 8 devices of both processes: each writes its half.
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), _state(0))
  shardings = shardings.replace(params={'w': parallel.batch_sharded(mesh)})
  ckpt = checkpointing.Checkpointer(workdir)
  for step in (1, 2):
    ckpt.save(parallel.put_sharded(_state(step), shardings), {})
  ckpt.close()
  parallel.wait_for_all_processes('saved')
  if process_id == 0:
    folder = os.path.join(workdir, 'checkpoints', '2', 'state',
                          'ocdbt.process_1', 'd')
    data = max((os.path.join(folder, n) for n in os.listdir(folder)),
               key=os.path.getsize)
    with open(data, 'r+b') as f:
      f.seek(os.path.getsize(data) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0xff]))
  parallel.wait_for_all_processes('changed')
  ckpt = checkpointing.Checkpointer(workdir)
  # As a resuming run does: the main process moves step 2 aside, and both
  # reload only after it has.
  state, _ = ckpt.restore(_state(0), sharding=shardings,
                          set_aside_unreadable=True)
  print('restored step', int(parallel.to_host(state.step)),
        'steps left', ckpt.all_steps(), flush=True)
  ckpt.close()


def test_two_processes_verify_their_shares_and_fall_back_together(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_ENABLE_COMPILATION_CACHE='false')
  env['XLA_FLAGS'] = env['XLA_FLAGS'].replace(
      '--xla_force_host_platform_device_count=8',
      '--xla_force_host_platform_device_count=4')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(i), str(port),
       str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
    assert 'restored step 1 steps left [1]' in out, err
  assert (tmp_path / 'checkpoints' / '2.unreadable').is_dir()
  for i in range(2):
    listed = _listed(tmp_path / 'checkpoints' / '1', i)['files']
    assert listed and all(f'process_{1 - i}' not in n for n in listed), i
  # One process found the changed bytes; the other agreed with it.
  errs = [err for _, err in outs]
  assert sum('changed since it was written' in e for e in errs) == 1
  assert sum('another process found files' in e for e in errs) == 1


if __name__ == '__main__':
  _two_process_worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
