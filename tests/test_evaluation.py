"""Evaluation suite: k-NN, linear probe, collapse, resume, export, plots."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import simclr as simclr_config
from ssl_jax import evaluate, export, train
from ssl_jax.evaluation import features as feats
from ssl_jax.evaluation import knn, linear, monitors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numpy_knn_scores(train_x, train_y, test_x, k, temperature, num_classes):
  """InstDisc/DINO weighted k-NN written out with loops, for reference."""
  bank = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  scores = np.zeros((len(test_x), num_classes))
  for i, q in enumerate(test_x):
    sims = bank @ (q / np.linalg.norm(q))
    for j in np.argsort(-sims, kind='stable')[:k]:
      scores[i, train_y[j]] += np.exp(sims[j] / temperature)
  return scores


@pytest.mark.parametrize('k', [1, 20, 200])
def test_knn_equals_numpy_brute_force_single_and_sharded(k):
  rng = np.random.default_rng(k)
  num_classes, n, m, d = 5, 203, 37, 16
  train_y = rng.integers(0, num_classes, n)
  centers = rng.normal(size=(num_classes, d))
  train_x = centers[train_y] + rng.normal(size=(n, d))
  test_y = rng.integers(0, num_classes, m)
  test_x = centers[test_y] + rng.normal(size=(m, d))
  expected = _numpy_knn_scores(train_x, train_y, test_x, k, 0.07, num_classes)

  single = knn.knn_predict(train_x, train_y, test_x, k=k, temperature=0.07,
                           num_classes=num_classes, chunk=16)
  assert jax.local_device_count() == 8
  # 203 rows over 8 (and 3) devices leaves uneven, padded slices; chunk 16
  # leaves a padded last chunk of queries.
  sharded = knn.knn_predict_sharded(train_x, train_y, test_x, k=k,
                                    temperature=0.07, num_classes=num_classes,
                                    chunk=16)
  sharded3 = knn.knn_predict_sharded(train_x, train_y, test_x, k=k,
                                     temperature=0.07, num_classes=num_classes,
                                     chunk=16, num_devices=3)
  for got in (single, sharded, sharded3):
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
  acc = knn.knn_accuracy(train_x, train_y, test_x, test_y, ks=(k,),
                         num_classes=num_classes)
  assert acc['top1'] == pytest.approx(
      100 * np.mean(expected.argmax(-1) == test_y))


def test_linear_probe_matches_sklearn_logistic_regression():
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  rng = np.random.default_rng(0)
  num_classes, d = 10, 32
  centers = rng.normal(size=(num_classes, d)) * 0.45
  def sample(n):
    y = rng.integers(0, num_classes, n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y
  train_x, train_y = sample(4000)
  test_x, test_y = sample(4000)
  ours = linear.train_linear_probe(train_x, train_y, test_x, test_y,
                                   num_classes=num_classes, epochs=100)
  scaler = StandardScaler().fit(train_x)
  ref = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x), train_y)
  ref_top1 = 100 * ref.score(scaler.transform(test_x), test_y)
  assert 30 < ref_top1 < 95, 'the problem should be neither trivial nor hopeless'
  assert abs(ours['top1'] - ref_top1) <= 1.0, (ours, ref_top1)
  assert ours['top5'] >= ours['top1']


def test_collapsed_encoder_is_detected_and_knn_is_at_chance():
  config = simclr_config.get_config('smoke')
  s = train.setup(config)
  variables = feats.backbone_variables(s.state)
  # Every weight zero and every bias 0.5: the output no longer depends on
  # the input, the constant encoder that complete collapse converges to.
  collapsed = {
      'params': jax.tree_util.tree_map_with_path(
          lambda path, p: np.full_like(p, 0.5 if 'bias' in str(path[-1]) else 0.0),
          variables['params']),
      'batch_stats': variables['batch_stats']}
  train_source, test_source = feats.eval_sources(config)
  fn = feats.make_feature_fn(config.model, feats.view_size(config),
                             train_source.mean, train_source.std)
  train_x, train_y = feats.extract(fn, collapsed, train_source, 256)
  test_x, test_y = feats.extract(fn, collapsed, test_source, 256)
  assert np.ptp(test_x, axis=0).max() < 1e-5 and np.abs(test_x).max() > 0
  assert float(monitors.embedding_std(jnp.asarray(test_x))) < 1e-6
  assert float(monitors.effective_rank(jnp.asarray(test_x))) == pytest.approx(1.0, abs=1e-3)
  acc = knn.knn_accuracy(train_x, train_y, test_x, test_y, ks=(20,),
                         num_classes=10)
  # Ties everywhere: the vote is the same for every query, so accuracy is the
  # frequency of one class (chance is 10%).
  assert acc['top1'] <= 15.0
  majority = 100 * np.bincount(test_y, minlength=10).max() / len(test_y)
  assert acc['top1'] <= majority + 1e-6


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A smoke SimCLR run: 3 steps, evaluated, resumed to 6 (and a copy at 3)."""
  base = tmp_path_factory.mktemp('runs')
  run_a, run_b = str(base / 'run_a'), str(base / 'run_b')
  config = simclr_config.get_config('smoke')
  config.num_steps = 3
  config.training.update(eval_every=3, checkpoint_every=3, log_every=1)
  config.eval.update(baselines=False, periodic_train_examples=128,
                     periodic_test_examples=64, linear_epochs=10)
  train.train_and_evaluate(config, run_a)
  before = {p: evaluate.evaluate(run_a, p) for p in ('knn', 'linear')}
  shutil.copytree(run_a, run_b)
  config.num_steps = 6
  train.train_and_evaluate(config, run_a)
  return {'a': run_a, 'b': run_b, 'before': before}


def test_periodic_eval_is_written_to_metrics(runs):
  rows = [json.loads(l) for l in open(os.path.join(runs['a'], 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  evaluated = [r for r in rows if 'eval_knn_acc' in r]
  assert [r['step'] for r in evaluated] == [3, 6]
  for r in evaluated:
    assert 0.0 <= r['eval_knn_acc'] <= 1.0
    assert 0.0 <= r['eval_online_probe_acc'] <= 1.0


def test_checkpoint_evaluation_is_the_same_after_resume(runs):
  for protocol, before in runs['before'].items():
    after = evaluate.evaluate(runs['a'], protocol, step=3)
    assert after['step'] == before['step'] == 3
    for key in ('top1', 'top5'):
      assert after[key] == before[key], (protocol, key, before, after)
  newest = evaluate.evaluate(runs['a'], 'knn')
  assert newest['step'] == 6


def test_augmented_linear_and_finetune_protocols(runs):
  from ssl_jax.evaluation import supervised
  config = feats.load_config(runs['a'])
  _, s, state = feats.load_run(runs['a'])
  train_source, test_source = feats.eval_sources(config)
  results = {}
  for mode in ('linear', 'finetune'):
    results[mode] = supervised.train_classifier(
        config.model, feats.backbone_variables(state), train_source,
        test_source, mode=mode, size=28, epochs=2, batch_size=64, lr=0.05,
        crop_scale=(0.5, 1.0))
    # 16 steps on 512 images: far from converged, but well above the 10%
    # of chance if gradients reach the head (and the backbone).
    assert results[mode]['top1'] > 25, results
    assert results[mode]['top5'] >= results[mode]['top1']


def test_cli_finetune_and_augmented_linear_write_json(runs, tmp_path):
  run = str(tmp_path / 'run')
  shutil.copytree(runs['b'], run)
  cfg = json.load(open(os.path.join(run, 'config.json')))
  cfg['eval']['linear_mode'] = 'augmented'
  json.dump(cfg, open(os.path.join(run, 'config.json'), 'w'))
  for protocol in ('finetune', 'linear'):
    r = evaluate.evaluate(run, protocol)
    written = json.load(open(os.path.join(run, f'eval_{protocol}.json')))
    assert written['top1'] == r['top1'] and 'top5' in written
  assert written['linear_mode'] == 'augmented'


def test_export_round_trip_gives_the_same_features(runs, tmp_path):
  out = export.export(runs['a'], str(tmp_path / 'export'))
  config, _, state = feats.load_run(runs['a'])
  _, test_source = feats.eval_sources(config)
  images = test_source.get(np.arange(16))['image']
  fn = feats.make_feature_fn(config.model, 28, test_source.mean, test_source.std)
  one_device = jax.tree.map(lambda v: np.asarray(v)[None],
                            feats.backbone_variables(state))
  expected = np.asarray(fn(one_device, images[None]))[0]
  info = json.load(open(os.path.join(out, 'config.json')))
  x = (images.astype(np.float32) / 255 - np.array(info['mean'])) / np.array(info['std'])
  for fmt in ('msgpack', 'npz'):
    module, variables = export.load_backbone(out, fmt)
    got = np.asarray(module.apply(variables, jnp.asarray(x, jnp.float32),
                                  train=False)[0])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_plot_script_draws_two_runs(runs, tmp_path):
  import subprocess
  import sys
  out = tmp_path / 'curves.png'
  subprocess.run([sys.executable, 'experiments/plot_runs.py', runs['a'],
                  runs['b'], f'--out={out}'], cwd=ROOT, check=True)
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert out.stat().st_size > 10000
