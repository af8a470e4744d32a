"""What keeps the hot loop fast: one trace, no host wait, bf16, benchmark parts.

Throughput itself is measured by experiments/benchmark.py, never asserted here.
"""

import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import simclr as simclr_config
from ssl_jax import data, methods, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top


def test_loop_traces_once_and_fetches_logged_metrics_after_the_next_step(
    tmp_path, monkeypatch):
  config = simclr_config.get_config('smoke')
  config.num_steps = 4  # logs at 2 and 4, checkpoints at 3 and 4
  dispatched, fetched = [], []
  monkeypatch.setattr(methods, 'train_step',
                      chex.assert_max_traces(methods.train_step, n=1))
  make_step = train.make_train_step

  def counting_make_train_step(s):
    step = make_step(s)

    def counted(*args):
      out = step(*args)
      dispatched.append(len(dispatched) + 1)
      return out
    return counted

  host_metrics = train._host_metrics

  def recording_host_metrics(metrics):
    host = host_metrics(metrics)
    fetched.append((len(dispatched), int(host['nonfinite_steps'])))
    return host

  monkeypatch.setattr(train, 'make_train_step', counting_make_train_step)
  monkeypatch.setattr(train, '_host_metrics', recording_host_metrics)
  chex.clear_trace_counter()
  train.train_and_evaluate(config, str(tmp_path))
  # Step 2 (log only) is read once step 3 is dispatched; step 3 (checkpoint)
  # and step 4 (last) are read at once, before their checkpoints are written.
  assert [n for n, _ in fetched] == [3, 3, 4]
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [2, 4]
  assert all(r['nonfinite_steps'] == 0 for r in rows)


def test_bfloat16_computes_in_bfloat16_with_float32_weights_and_loss():
  config = simclr_config.get_config('smoke')
  config.model.dtype = 'bfloat16'
  setup = train.setup(config)
  size = config.augment.views['global_crops'].size
  views = [jnp.asarray(np.random.default_rng(i).normal(size=(16, size, size, 1)),
                       jnp.float32) for i in range(2)]
  batch = {'label': jnp.zeros((16,), jnp.int32)}

  def loss_fn(params):
    loss, _ = setup.method.loss(params, setup.state, views, batch,
                                jax.random.PRNGKey(0), None)
    return loss

  jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn))(setup.state.params))
  assert 'dot_general' in jaxpr and 'bf16' in jaxpr
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(setup.state.params)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  for p, g in zip(jax.tree.leaves(setup.state.params), jax.tree.leaves(grads)):
    assert p.dtype == jnp.float32 and g.dtype == jnp.float32
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_synthetic_images_are_deterministic_and_shaped():
  config = simclr_config.get_config('smoke').data
  config.update(dataset='synthetic_images', image_size=20, channels=3,
                num_examples=64)
  a = data.get_source(config, 'train').get(np.arange(8))
  b = data.get_source(config, 'train').get(np.arange(8))
  assert a['image'].shape == (8, 20, 20, 3) and a['image'].dtype == np.uint8
  np.testing.assert_array_equal(a['image'], b['image'])
  c = data.get_source(config, 'test').get(np.arange(8))
  assert not np.array_equal(a['image'], c['image'])


def test_benchmark_measures_a_folder_pipeline():
  args = type('Args', (), dict(pipeline_dataset='folder', pipeline_files=64,
                               batch_size=16, pipeline_seconds=0.3))()
  result = benchmark.measure_pipeline(args)
  assert result['source_examples'] == 64
  assert result['examples'] >= 16 and result['examples_per_s'] > 0


def test_benchmark_row_times_steps_in_a_live_worker():
  # The end-to-end protocol: a worker process compiles, says ready, then runs
  # one timed step per request (torch rows need torch and ResNet; none here).
  args = type('Args', (), dict(steps=2, warmup=1, conv_impl='auto', torch=1,
                               torch_both_layouts=False, image_size=28))()
  row = benchmark._row('simclr', 'convnet', 16, 'float32', args)
  assert row['views'] == 2 and row['images_per_step'] == 32
  assert len(row['jax_step_times_s']) == 2 and row['jax_images_per_s'] > 0
  assert row['compile_s'] > 0 and row['peak_memory_gb'] > 0
  assert row['flops_per_step'] > 0  # XLA's count of the compiled step
  assert 'ratio_vs_torch' not in row


def test_a_failing_benchmark_worker_reports_its_error():
  args = type('Args', (), dict(warmup=1, conv_impl='auto'))()
  worker = benchmark._StepWorker('jax', ['--_method=no_such_method',
                                         '--_backbone=resnet18',
                                         '--_batch_size=8'], args)
  with pytest.raises(RuntimeError, match='no_such_method'):
    worker.ready()


def test_benchmark_config_is_the_method_recipe_on_cifar_sized_images():
  config = benchmark.benchmark_config('byol', 'resnet18', 256, 32, 'bfloat16')
  assert config.model.backbone == 'resnet18' and config.model.stem == 'cifar'
  assert config.model.projector.hidden_dims == (4096,)  # BYOL's own head
  assert all(v.size == 32 for v in config.augment.views.values())
  assert config.batch_size == 256 and config.model.dtype == 'bfloat16'
