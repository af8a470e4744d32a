"""2 processes x 4 devices (jax.distributed on 127.0.0.1) == 1 process x 8.

One test over the methods whose state or collectives differ in kind: global
BN and all-gathered negatives (SimCLR), a feature queue and Sinkhorn (SwAV),
an EMA teacher and a center on a ViT (DINO), a key queue (MoCo v2), a memory
bank scattered by dataset index (InstDisc), and k-means over the whole
dataset before the first step (DeepCluster).

The two processes are started once and train every config in turn (as
`ssl_jax.main` would, one workdir each); the 8-device reference runs in the
test's own process. Starting a pair of processes per config cost a minute
of interpreter start-up and coordination per config.
"""

import importlib
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from ssl_jax import checkpointing, parallel, train
from ssl_jax.evaluation.features import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('simclr', 'swav', 'dino', 'mocov2', 'instdisc', 'deepcluster')

# One process of the pair: joins the run, then trains each config (argv:
# port, process id, root folder, config names).
_WORKER = '''
import importlib, os, sys
from ssl_jax import cpu, parallel, train
cpu.configure_xla_flags()
port, process_id, root, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
parallel.initialize_distributed(f'127.0.0.1:{port}', 2, process_id)
sys.path.insert(0, os.getcwd())
for name in names:
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.num_steps = 3
  config.training.update(log_every=1, checkpoint_every=3)
  train.train_and_evaluate(config, os.path.join(root, name))
'''


def _config(name):
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.num_steps = 3
  config.training.update(log_every=1, checkpoint_every=3)
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
  return env


def _final(workdir):
  setup = train.setup(load_config(workdir))
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    state, _ = ckpt.restore(setup.state)
  finally:
    ckpt.close()
  losses = [json.loads(l)['loss'] for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return state, losses


def test_two_processes_equal_one(tmp_path):
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-c', _WORKER, str(port), str(i), str(multi), *CONFIGS],
      cwd=ROOT, env=_env(4)) for i in range(2)]
  try:
    # The reference meanwhile, in this process (8 devices).
    for name in CONFIGS:
      train.train_and_evaluate(_config(name), str(single / name))
    for p in procs:
      assert p.wait(timeout=900) == 0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for name in CONFIGS:
    (a, losses_a), (b, losses_b) = (_final(str(single / name)),
                                    _final(str(multi / name)))
    assert len(losses_a) == len(losses_b) == 3, name
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5, err_msg=name)
    assert int(a.step) == int(b.step) == 3
    for x, y in zip(jax.tree.leaves(parallel.to_numpy(a)),
                    jax.tree.leaves(parallel.to_numpy(b))):
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=name)
