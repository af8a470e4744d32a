"""2 processes x 4 devices (jax.distributed on 127.0.0.1) == 1 process x 8.

One test over the methods whose state or collectives differ in kind: global
BN and all-gathered negatives (SimCLR), a feature queue and Sinkhorn (SwAV),
an EMA teacher and a center on a ViT (DINO), a key queue (MoCo v2), a memory
bank scattered by dataset index (InstDisc), and k-means over the whole
dataset before the first step (DeepCluster).

The 8-device reference runs in the test's own process (one interpreter and
its start-up fewer per config than a subprocess); it is replicated, while the
2-process runs of SimCLR and DINO use FSDP (`MULTI_FLAGS`): SimCLR's state
sharded over all 8 devices, so that every parameter's shards span both
processes and each process checkpoints its own half; DINO's over 2 devices
(shards within a process, replicated across them). The SimCLR run is then
resumed, in this process on one 8-device FSDP mesh, from the step-2 checkpoint
the two processes wrote, and must end where the reference does.
"""

import importlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ssl_jax import checkpointing, parallel, train
from ssl_jax.experiment import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('simclr', 'swav', 'dino', 'mocov2', 'instdisc', 'deepcluster')


# Steps per config: where it can, as many as another test trains the same
# smoke config for on 8 devices (the schedules make the step count part of the
# compiled step), so that the suite compiles the reference's train step once:
# DINO's 3 as tests/test_distill.py, 2 for SwAV, MoCo v2, InstDisc and
# DeepCluster as tests/test_contrastive.py and tests/test_clustering.py
# (SwAV's smoke config freezes, trains, fills and reads its queue in 2
# steps). SimCLR keeps 3 (it resumes from step 2): after the 4 steps of
# tests/test_train.py its FSDP run ended 6e-4 (relative) off the reference.
STEPS = {'simclr': 3, 'dino': 3}


def _steps(name):
  return STEPS.get(name, 2)


def _config(name):
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.num_steps = _steps(name)
  config.training.update(log_every=1, checkpoint_every=_steps(name))
  return config


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices):
  """The test session's XLA flags (optimisation level included, so both runs
  compile alike) with `devices` CPU devices."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = env.get('XLA_FLAGS', '').replace(
      '--xla_force_host_platform_device_count=8',
      f'--xla_force_host_platform_device_count={devices}')
  assert f'device_count={devices}' in env['XLA_FLAGS']
  # No persistent compilation cache across processes: with a warm cache
  # shared by other checkouts, SwAV's 2-process step aborted with a gloo
  # collective mismatch (a fresh cache passed); both processes compile anyway.
  env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  return env


def _final(workdir):
  # Restored into the state's shapes: the initialiser is not compiled.
  template = train.setup(load_config(workdir), abstract=True).state
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    state, _ = ckpt.restore(template)
  finally:
    ckpt.close()
  return state, _losses(workdir)


def _losses(workdir):
  return [json.loads(l)['loss']
          for l in open(os.path.join(workdir, 'metrics.jsonl'))]


# FSDP in the 2-process run only (the reference is replicated); small leaves
# sharded too (the smoke models have few large ones). SimCLR also saves at
# step 2, the checkpoint its resume starts from.
MULTI_FLAGS = {
    'simclr': ['--config.mesh.fsdp=8', '--config.mesh.fsdp_min_size=1',
               '--config.training.checkpoint_every=2'],
    'dino': ['--config.mesh.fsdp=2', '--config.mesh.fsdp_min_size=1'],
}


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(parallel.to_numpy(a)),
                  jax.tree.leaves(parallel.to_numpy(b))):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', CONFIGS)
def test_two_processes_equal_one(tmp_path, name):
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  # The reference first, not while the pair runs: run meanwhile, SwAV's
  # 2-process step aborted in gloo ("Received data size doesn't match
  # expected size ... collective mismatch") in 2 tries of 2; not understood.
  train.train_and_evaluate(_config(name), single)
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'ssl_jax.main', f'--workdir={multi}',
       f'--config=configs/{name}.py:smoke',
       f'--config.num_steps={_steps(name)}', '--config.training.log_every=1',
       f'--config.training.checkpoint_every={_steps(name)}',
       '--config.distributed.enabled=True',
       f'--config.distributed.coordinator_address=127.0.0.1:{port}',
       '--config.distributed.num_processes=2',
       f'--config.distributed.process_id={i}', *MULTI_FLAGS.get(name, ())],
      cwd=ROOT, env=_env(4))
           for i in range(2)]
  try:
    for p in procs:
      assert p.wait(timeout=600) == 0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  (a, losses_a), (b, losses_b) = _final(single), _final(multi)
  assert len(losses_a) == len(losses_b) == _steps(name)
  np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)
  assert int(a.step) == int(b.step) == _steps(name)
  _assert_same(a, b)
  if name == 'simclr':
    _resume_fsdp_checkpoint(multi, a, losses_a)


def _resume_fsdp_checkpoint(workdir, reference, reference_losses):
  """Resumes the 2-process FSDP run from its step-2 checkpoint on 1 process x
  8 devices (FSDP over all 8) and checks that it ends as the reference."""
  assert load_config(workdir).mesh.fsdp == 8
  checkpoints = os.path.join(workdir, 'checkpoints')
  # Each process wrote its own shards (orbax's OCDBT layout: a data folder
  # per process) and the checksums of exactly those (process 0 also those of
  # the shared metadata).
  for i in range(2):
    listed = json.load(open(os.path.join(
        checkpoints, '2', checkpointing.checksum_file(i))))
    assert listed['process_count'] == 2
    data = glob.glob(os.path.join(checkpoints, '2', 'state',
                                  f'ocdbt.process_{i}', 'd', '*'))
    assert sum(os.path.getsize(f) for f in data) > 0, (i, data)
    assert all(os.path.relpath(f, os.path.join(checkpoints, '2'))
               in listed['files'] for f in data)
    assert not [f for f in listed['files'] if f'process_{1 - i}' in f]
  shutil.rmtree(os.path.join(checkpoints, str(_steps('simclr'))))
  config = _config('simclr')
  config.training.checkpoint_every = 2
  config.mesh.update(fsdp=8, fsdp_min_size=1)
  state = train.train_and_evaluate(config, workdir)
  assert int(parallel.to_host(state.step)) == _steps('simclr')
  _assert_same(reference, state)
  np.testing.assert_allclose(_losses(workdir), reference_losses, rtol=1e-5)
