"""The train step across devices, EMA, resume after SIGKILL, metrics, errors."""

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import byol as byol_config
from configs import simclr as simclr_config
from ssl_jax import checkpointing, parallel, train
from ssl_jax.methods import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _views(setup, n, seed=0):
  rng = np.random.default_rng(seed)
  size = setup.config.augment.views[next(iter(setup.config.augment.views))].size
  c = setup.source.image_shape[-1]
  return [jnp.asarray(rng.normal(size=(n, size, size, c)), jnp.float32)
          for _ in range(setup.method.num_views)]


def _loss_and_grads(setup, views, axis_name):
  state = setup.state
  batch = {'label': jnp.zeros((views[0].shape[0],), jnp.int32)}

  def loss_fn(params):
    return setup.method.loss(params, state, views, batch,
                             jax.random.PRNGKey(0), axis_name)

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = parallel.mean_gradients(grads, axis_name)
  return loss, grads, out.batch_stats


@pytest.mark.parametrize('config_module', [simclr_config, byol_config])
def test_loss_and_gradients_on_eight_devices_equal_one(config_module):
  config = config_module.get_config('smoke')
  setup = train.setup(config)
  views = _views(setup, 32)
  loss_1, grads_1, stats_1 = jax.jit(
      lambda v: _loss_and_grads(setup, v, None))(views)
  sharded = [v.reshape((8, 4) + v.shape[1:]) for v in views]
  loss_8, grads_8, stats_8 = jax.pmap(
      lambda v: _loss_and_grads(setup, v, parallel.AXIS),
      axis_name=parallel.AXIS)(sharded)
  np.testing.assert_allclose(loss_8, np.full(8, loss_1), rtol=1e-5)
  for g1, g8 in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_8)):
    np.testing.assert_allclose(g8[0], g1, rtol=2e-3, atol=1e-5)
  # Global BatchNorm: statistics of the global batch on every device. One
  # device sums 25k activations in one reduction, eight sum partial sums over
  # devices: the orders differ, so near-zero means differ by float32 rounding
  # (1e-6 seen), while per-device statistics would move them by up to 4e-2.
  for s1, s8 in zip(jax.tree.leaves(stats_1), jax.tree.leaves(stats_8)):
    np.testing.assert_allclose(s8[3], s1, rtol=1e-4, atol=1e-5)


def test_ema_update_and_schedule():
  from ssl_jax import optim
  target = {'w': jnp.array([1.0, 2.0])}
  online = {'w': jnp.array([3.0, 6.0])}
  new = common.ema_update(target, online, 0.75)
  np.testing.assert_allclose(new['w'], [1.5, 3.0])
  schedule = optim.ema_momentum_schedule(0.996, 100)
  np.testing.assert_allclose(schedule(0), 0.996, rtol=1e-6)
  np.testing.assert_allclose(schedule(100), 1.0, rtol=1e-6)
  np.testing.assert_allclose(schedule(50), 0.998, rtol=1e-6)


def test_byol_target_follows_online_after_a_step(tmp_path):
  config = byol_config.get_config('smoke')
  config.num_steps = 1
  state = train.train_and_evaluate(config, str(tmp_path))
  setup = train.setup(config)
  m = float(setup.method.ema_momentum(0))
  init_target = setup.state.method_state['target_params']
  expected = jax.tree.map(lambda t, o: m * t + (1 - m) * o, init_target,
                          common.teacher_subset(state.params))
  for a, b in zip(jax.tree.leaves(expected),
                  jax.tree.leaves(state.method_state['target_params'])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def _main(workdir, *overrides, env=None):
  return [sys.executable, '-m', 'ssl_jax.main',
          '--config=configs/simclr.py:smoke', f'--workdir={workdir}',
          *overrides]


def _params(workdir):
  # Restored into the state's shapes: the initialiser is not compiled.
  template = train.setup(_config_of(workdir), abstract=True).state
  state, _ = checkpointing.Checkpointer(workdir).restore(template)
  return state


def _config_of(workdir):
  from ssl_jax.experiment import load_config
  return load_config(workdir)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  # tests/test_reliability.py's command line (12 steps; the step count is
  # part of the compiled step): the suite compiles this train step once.
  overrides = ['--config.num_steps=12', '--config.training.checkpoint_every=2']
  full, killed = tmp_path / 'full', tmp_path / 'killed'
  subprocess.run(_main(full, *overrides), cwd=ROOT, check=True)

  proc = subprocess.Popen(_main(killed, *overrides), cwd=ROOT)
  ckpt_dir = killed / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in (os.listdir(ckpt_dir) if ckpt_dir.exists() else [])
            if d.isdigit()]
    if any(int(d) >= 4 for d in done):
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed_from = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert resumed_from < 12
  subprocess.run(_main(killed, *overrides), cwd=ROOT, check=True)

  a, b = _params(str(full)), _params(str(killed))
  assert int(a.step) == int(b.step) == 12
  for x, y in zip(jax.tree.leaves(parallel.to_numpy(a)),
                  jax.tree.leaves(parallel.to_numpy(b))):
    np.testing.assert_array_equal(x, y)
  steps = [json.loads(l)['step'] for l in open(killed / 'metrics.jsonl')]
  assert steps == sorted(set(steps)), 'a step was logged twice after resume'


def test_metrics_jsonl_has_step_and_loss(tmp_path):
  config = simclr_config.get_config('smoke')
  config.num_steps = 4
  train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [2, 4]
  for r in rows:
    assert np.isfinite(r['loss'])
    assert {'learning_rate', 'images_per_sec', 'embedding_std',
            'effective_rank'} <= set(r)


@pytest.mark.parametrize('field,value,known', [
    ('method.name', 'simclrr', 'byol, .*simclr'),
    ('model.backbone', 'resnet81', 'convnet, .*resnet18'),
    ('data.dataset', 'mnist', 'fashion_mnist, folder, .*tfds'),
    ('optimizer.name', 'adam', 'adamw, lars, sgd'),
])
def test_unknown_names_fail_with_known_names(tmp_path, field, value, known):
  config = simclr_config.get_config('smoke')
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(ValueError, match=f'Unknown .*{value}.*Known.*{known}'):
    train.train_and_evaluate(config, str(tmp_path))


def test_batch_not_divisible_by_devices_says_what_to_do(tmp_path):
  config = simclr_config.get_config('smoke')
  config.batch_size = 60
  with pytest.raises(ValueError, match='not divisible by the 8 devices.*multiple of 8'):
    train.train_and_evaluate(config, str(tmp_path))


def test_cli_reports_unknown_name_without_traceback(tmp_path):
  out = subprocess.run(
      _main(tmp_path, '--config.model.backbone=resnet81'), cwd=ROOT,
      capture_output=True, text=True)
  assert out.returncode == 2
  assert 'Known backbones: convnet, ' in out.stderr
  assert 'resnet18, resnet34, resnet50' in out.stderr
  assert 'Traceback' not in out.stderr


def test_pmap_of_the_train_step_equals_the_mesh_engine():
  """The per-device step keeps pmap semantics: `jax.pmap(train_step)` and the
  loop's jit(shard_map) over the mesh take the same step; the monitors the
  loop skips on non-logging steps are the same values when it computes them."""
  from ssl_jax import methods  # pylint: disable=g-import-not-at-top
  config = simclr_config.get_config('smoke')
  s = train.setup(config)
  batch = s.source.get(np.arange(config.batch_size))
  step = functools.partial(methods.train_step, method=s.method, tx=s.tx,
                           lr_schedule=s.lr_schedule, axis_name=parallel.AXIS)
  replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (8,) + np.shape(x)),
                            s.state)
  split = jax.tree.map(lambda x: x.reshape((8, -1) + x.shape[1:]), batch)
  p_state, p_metrics = jax.pmap(step, axis_name=parallel.AXIS)(replicated,
                                                               split)
  mesh_step = train.make_train_step(s)
  state = parallel.put_replicated(s.state)
  global_batch = parallel.put_batch(batch)
  m_state, m_metrics = mesh_step(state, global_batch,
                                 parallel.put_replicated(np.bool_(True)))
  _, quiet = mesh_step(state, global_batch,
                       parallel.put_replicated(np.bool_(False)))
  assert set(m_metrics) == set(p_metrics)
  for name, value in p_metrics.items():
    np.testing.assert_allclose(np.asarray(m_metrics[name]), value[0],
                               rtol=1e-5, atol=1e-6, err_msg=name)
  for x, y in zip(jax.tree.leaves(parallel.to_numpy(p_state)),
                  jax.tree.leaves(m_state)):
    assert y.sharding.is_fully_replicated
    np.testing.assert_allclose(parallel.to_numpy(y), x[0], rtol=1e-5, atol=1e-6)
  assert np.isnan(float(quiet['embedding_std']))
  np.testing.assert_allclose(float(quiet['loss']), float(m_metrics['loss']),
                             rtol=1e-6)


def test_checkpoint_of_eight_devices_resumes_on_four_and_on_two_processes(
    tmp_path):
  """Elastic resume: a checkpoint saved on 8 devices restores onto a mesh of
  4 (a subprocess) and onto 2 processes x 2 devices (jax.distributed on
  127.0.0.1), each of which sees the same data and logs the next steps'
  losses of the uninterrupted 8-device run."""
  config = simclr_config.get_config('smoke')
  config.num_steps = 4
  config.training.update(checkpoint_every=2, log_every=1, keep_checkpoints=3)
  full, elastic = tmp_path / 'full', tmp_path / 'elastic'
  train.train_and_evaluate(config, str(full))
  os.makedirs(elastic / 'checkpoints')
  shutil.copytree(full / 'checkpoints' / '2', elastic / 'checkpoints' / '2')
  shutil.copy(full / 'config.json', elastic / 'config.json')
  env = dict(os.environ)
  env['XLA_FLAGS'] = env['XLA_FLAGS'].replace(
      'device_count=8', 'device_count=4')
  subprocess.run(_main(elastic, '--config.num_steps=4',
                       '--config.training.checkpoint_every=2',
                       '--config.training.log_every=1',
                       '--config.training.keep_checkpoints=3'),
                 cwd=ROOT, env=env, check=True, timeout=600)
  rows = {r['step']: r for r in map(json.loads, open(full / 'metrics.jsonl'))}
  resumed = [json.loads(l) for l in open(elastic / 'metrics.jsonl')]
  assert [r['step'] for r in resumed] == [3, 4]
  for r in resumed:
    np.testing.assert_allclose(r['loss'], rows[r['step']]['loss'], rtol=1e-4)
  a, b = _params(str(full)), _params(str(elastic))
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-5)

  # The same checkpoint on 2 processes of 2 devices: each process reads its
  # half of every global batch (the data order of the 8-device run).
  pod = tmp_path / 'pod'
  os.makedirs(pod / 'checkpoints')
  shutil.copytree(full / 'checkpoints' / '2', pod / 'checkpoints' / '2')
  shutil.copy(full / 'config.json', pod / 'config.json')
  env['XLA_FLAGS'] = env['XLA_FLAGS'].replace(
      'device_count=4', 'device_count=2')
  env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'  # as tests/test_multihost.py
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen(_main(
      pod, '--config.num_steps=4', '--config.training.checkpoint_every=2',
      '--config.training.log_every=1', '--config.training.keep_checkpoints=3',
      '--config.distributed.enabled=True',
      f'--config.distributed.coordinator_address=127.0.0.1:{port}',
      '--config.distributed.num_processes=2',
      f'--config.distributed.process_id={i}'), cwd=ROOT, env=env)
           for i in range(2)]
  try:
    for p in procs:
      assert p.wait(timeout=600) == 0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  resumed = [json.loads(l) for l in open(pod / 'metrics.jsonl')]
  assert [r['step'] for r in resumed] == [3, 4]
  for r in resumed:
    np.testing.assert_allclose(r['loss'], rows[r['step']]['loss'], rtol=1e-4)
  c = _params(str(pod))
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(c.params)):
    np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-5)
