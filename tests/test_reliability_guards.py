"""The non-finite guard, the divergence stop and honest stop messages.

The guard is tested on a toy method (a weight vector, a memory bank written
with a pending `RowsWrite`, an EMA teacher) pmapped over the 8 simulated
devices, so each way a step can go wrong is set off directly; the whole loop
is tested on the SimCLR smoke config.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import simclr as simclr_config
from ssl_jax import divergence, parallel, train
from ssl_jax.methods import base, memory
from ssl_jax.durations import Durations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
PER_DEVICE = 2
BANK_ROWS = 32
DIM = 4


class _Toy(base.Method):
  """w . x regression; a bank row per example; an EMA teacher of w."""

  def __init__(self, teacher_gain: float = 1.0):
    super().__init__(ml_collections.ConfigDict({}), None, Durations(10, 1, 1))
    self.teacher_gain = teacher_gain

  def make_views(self, rng, images, crops=None, example_offset=0):
    del rng, crops, example_offset
    return [images]

  def init(self, rng):
    del rng
    params = {'backbone': {'w': jnp.ones((DIM,), jnp.float32)}}
    method_state = {'bank': jnp.zeros((BANK_ROWS, DIM), jnp.float32),
                    'teacher': jnp.ones((DIM,), jnp.float32)}
    return params, {}, method_state

  def loss(self, params, state, views, batch, rng, axis_name):
    x = views[0]
    loss = parallel.pmean(jnp.mean((x @ params['backbone']['w'] - 1.0) ** 2),
                          axis_name)
    # Each device writes its own rows (no all-gather): a bad row on one
    # device must still veto the step on all of them.
    rows = jax.lax.stop_gradient(x) * batch['row_scale'][:, None]
    method_state = dict(state.method_state,
                        bank=memory.RowsWrite(indices=batch['index'], rows=rows))
    return loss, base.StepOutput(batch_stats={}, method_state=method_state,
                                 metrics={})

  def after_update(self, params, method_state, step):
    del step
    # Applied twice so a gain of 1e20 overflows float32 in the step itself.
    teacher = (0.5 * method_state['teacher'] + 0.5 * self.teacher_gain *
               (self.teacher_gain * params['backbone']['w']))
    return dict(method_state, teacher=teacher)


def _toy_state(method, tx):
  params, batch_stats, method_state = method.init(None)
  return train.TrainState.create(
      params=params, batch_stats=batch_stats, opt_state=tx.init(params),
      rng=jax.random.PRNGKey(0), method_state=method_state)


def _toy_batch(row_scale=None):
  n = DEVICES * PER_DEVICE
  x = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
  scale = np.ones(n, np.float32) if row_scale is None else row_scale
  batch = {'image': x, 'index': np.arange(n, dtype=np.int32) * 2,
           'row_scale': scale}
  return jax.tree.map(
      lambda x: x.reshape((DEVICES, PER_DEVICE) + x.shape[1:]), batch)


def _run_toy(method, tx, batch):
  step = jax.pmap(functools.partial(base.train_step, method=method, tx=tx,
                                    lr_schedule=lambda s: 0.0,
                                    axis_name=parallel.AXIS),
                  axis_name=parallel.AXIS)
  state = _toy_state(method, tx)
  stacked = jax.tree.map(
      lambda x: np.broadcast_to(np.asarray(x), (DEVICES,) + np.shape(x)), state)
  new, metrics = step(stacked, batch)
  return state, jax.device_get(new), jax.device_get(metrics)


def _assert_rejected(old, new):
  """Every device kept the old state (but for step, rng, the count)."""
  assert np.all(new.step == 1) and np.all(new.nonfinite_steps == 1)
  for part in ('params', 'opt_state', 'method_state', 'batch_stats', 'probe'):
    a, b = getattr(old, part), getattr(new, part)
    assert jax.tree.structure(a) == jax.tree.structure(b), part
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      for d in range(DEVICES):
        np.testing.assert_array_equal(y[d], x, err_msg=part)


def test_finite_step_writes_bank_rows_and_teacher():
  method, tx = _Toy(), optax.sgd(0.1)
  old, new, metrics = _run_toy(method, tx, _toy_batch())
  assert np.all(new.nonfinite_steps == 0) and np.all(metrics['finite'] == 1)
  x = np.random.default_rng(0).normal(size=(DEVICES * PER_DEVICE, DIM))
  bank = new.method_state['bank']
  # Device d wrote its own examples' rows; the others' rows stay zero there.
  for d in range(DEVICES):
    rows = np.arange(d * PER_DEVICE, (d + 1) * PER_DEVICE)
    np.testing.assert_allclose(bank[d][rows * 2], x[rows], rtol=1e-6)
    assert not np.any(bank[d][1::2])
  w = new.params['backbone']['w'][0]
  assert not np.allclose(w, 1.0)
  np.testing.assert_allclose(new.method_state['teacher'][0], 0.5 + 0.5 * w,
                             rtol=1e-6)


def test_nonfinite_write_on_one_device_vetoes_the_step_everywhere():
  scale = np.ones(DEVICES * PER_DEVICE, np.float32)
  scale[3 * PER_DEVICE] = np.inf  # one row of device 3
  old, new, metrics = _run_toy(_Toy(), optax.sgd(0.1), _toy_batch(scale))
  assert np.all(metrics['finite'] == 0)
  _assert_rejected(old, new)


def test_nan_learning_rate_leaves_params_and_optimizer_unchanged():
  # The loss and gradients are finite; only the updated parameters are not.
  old, new, metrics = _run_toy(_Toy(), optax.sgd(np.nan, momentum=0.9),
                               _toy_batch())
  assert np.all(np.isfinite(metrics['loss'])) and np.all(metrics['finite'] == 0)
  _assert_rejected(old, new)


def test_overflowing_teacher_update_is_not_applied():
  # Finite loss, gradients and parameters; the EMA teacher overflows to inf.
  old, new, _ = _run_toy(_Toy(teacher_gain=1e20), optax.sgd(0.1),
                         _toy_batch())
  _assert_rejected(old, new)


def test_memory_analysis_keeps_no_second_copy_of_the_bank():
  """The guarded step of a 200,000-row InstDisc bank: temps < half the bank."""
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import memory as memory_experiment  # pylint: disable=g-import-not-at-top
  config = memory_experiment.instdisc_config()
  rows = 200_000
  row = memory_experiment.measure(
      config, memory_experiment.DescribedSource(rows), 'instdisc', DEVICES)
  bank = memory_experiment.bank_bytes(config, rows)
  assert row['param_opt_bytes_per_device'] > bank
  assert row['temp_bytes_per_device'] < bank / 2, row


def test_memory_experiment_builds_every_default_row(monkeypatch):
  """`python experiments/memory.py` without flags: every row's config and
  source reach `measure` (faked here: the real rows compile for minutes)."""
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import memory as memory_experiment  # pylint: disable=g-import-not-at-top
  measured = []

  def fake_measure(config, source, model, devices, fsdp=1, **kwargs):
    assert config.batch_size % devices == 0 and len(source) > 0
    measured.append((model, fsdp, kwargs))
    return {'model': model, 'temp_bytes_per_device': 0}

  monkeypatch.setattr(memory_experiment, 'measure', fake_measure)
  args = type('Args', (), dict(devices=DEVICES, bank_size=1000))()
  rows = memory_experiment._rows(args)  # pylint: disable=protected-access
  assert [r['model'] for r in rows] == [
      'instdisc_convnet_bank1000x128', 'mocov2_convnet_queue65536x128'] + [
          'mocov3_vit_large16_224'] * 3 + ['dino_vit_base16_224']
  assert [m[1] for m in measured[2:5]] == [1, DEVICES, DEVICES]
  assert rows[-1]['teacher_bytes'] > 0


# ---------------------------------------------------------------------------
# The loop: stop messages and the divergence policy.


def _smoke(num_steps, **training):
  config = simclr_config.get_config('smoke')
  config.num_steps = num_steps
  config.training.update(training)
  return config


def _ckpt_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_nan_learning_rate_is_refused_before_anything_is_written(tmp_path):
  # The step's guard also rejects it (test_nan_learning_rate_leaves_params_and_optimizer_unchanged
  # above); validation stops it before compiling.
  config = _smoke(3, checkpoint_every=1, log_every=1)
  config.optimizer.lr = float('nan')
  with pytest.raises(ValueError, match='optimizer.lr'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_first_step_non_finite_saves_nothing_and_says_none_was_saved(tmp_path):
  config = _smoke(3, checkpoint_every=1, log_every=1)
  config.training.inject_nonfinite_at_step = 1
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert 'non-finite 1 time(s) at step 1' in message
  assert 'no checkpoint was saved' in message
  assert 'last good' not in message
  assert _ckpt_steps(tmp_path) == []


def test_param_norm_watch_warns_then_stops(caplog):
  watch = divergence.ParamNormWatch(100.0, 2.0)
  assert watch.check(1, 10.0) is None and 'grew' not in caplog.text
  assert watch.check(2, 30.0) is None  # 15x > sqrt(100): warned once
  assert 'grew 15x' in caplog.text
  message = watch.check(3, 500.0)
  assert 'grew 250x' in message and 'param_norm_growth_limit=100' in message
  assert divergence.ParamNormWatch(0.0, 2.0).check(1, 1e30) is None


def test_huge_lars_learning_rate_stops_the_run_with_a_clear_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.main', '--config=configs/simclr.py:smoke',
       f'--workdir={tmp_path}', '--config.num_steps=12',
       '--config.optimizer.lr=1e6', '--config.optimizer.lr_scaling=none',
       '--config.training.log_every=1', '--config.training.checkpoint_every=100'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0, out.stderr
  assert 'Traceback' not in out.stderr
  assert 'The parameter norm grew' in out.stderr
  assert 'param_norm_growth_limit=1000' in out.stderr
  assert 'no checkpoint was saved' in out.stderr
