"""Pretext tasks and the remaining objectives: rotation, jigsaw, relative
position, CPC, Deep InfoMax, AVID+CMA; the synthetic paired data; the
layer-wise probe.

Each label generator and loss is checked against an independent NumPy
derivation of its paper's formula; CPC, Deep InfoMax, AVID and CMA give the
same value and gradients on 8 devices as on one; every method's smoke config
trains through `train_and_evaluate`, and the layer-wise probe script runs on
a smoke checkpoint.
"""

import functools
import importlib
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official_ports import official_port
from ssl_jax import data, losses, models, train
from ssl_jax.data import jigsaw, paired
from ssl_jax.losses import crossmodal, pretext
from ssl_jax.methods import infomax
from ssl_jax.testing import device_equivalence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('rotation', 'jigsaw', 'relative_position', 'cpc', 'deep_infomax',
           'avid_cma')


def _np_log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _softplus(x):
  return np.logaddexp(0.0, x)


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _assert_devices_agree(fn, args, sharded=None, kwargs=None, rtol=1e-4):
  (v1, g1), (v8, g8) = device_equivalence(fn, args, 8, sharded_argnums=sharded,
                                          kwargs=kwargs)
  np.testing.assert_allclose(v8, np.full(8, v1), rtol=rtol, atol=1e-6)
  for a, b in zip(g1, g8):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------
# Rotation.


def test_rotations_are_np_rot90_and_labelled_by_quarter_turns():
  images = np.random.default_rng(0).normal(size=(3, 5, 5, 2)).astype(np.float32)
  rotated, labels = pretext.rotate_images(jnp.asarray(images))
  np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 3))
  for k in range(4):
    for i in range(3):
      np.testing.assert_array_equal(rotated[k * 3 + i], np.rot90(images[i], k))


def test_pretext_classification_is_numpy_cross_entropy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(16, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 16)
  expected = -np.mean(_np_log_softmax(logits)[np.arange(16), labels])
  got = losses.get_loss('pretext_classification')(jnp.asarray(logits),
                                                  jnp.asarray(labels))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# Jigsaw permutation set and tiles.


def test_permutation_set_has_the_maximal_minimal_hamming_distance():
  perms = jigsaw.permutation_set(100)
  assert perms.shape == (100, 9)
  assert len({tuple(p) for p in perms}) == 100
  assert all(sorted(p) == list(range(9)) for p in perms)
  # Measured for this greedy max-min set: 6 of 9 tiles move between any two.
  assert jigsaw.min_hamming_distance(perms) == 6
  np.testing.assert_array_equal(perms, jigsaw.permutation_set(100, seed=0))
  assert not np.array_equal(perms, jigsaw.permutation_set(100, seed=1))


def test_permutation_set_is_greedy_max_min_over_all_permutations():
  perms = jigsaw.permutation_set(12, num_cells=5, seed=3)
  everything = np.array(list(itertools.permutations(range(5))))
  for t in range(1, len(perms)):
    # Independently: the best achievable min distance to the t chosen so far.
    d = (everything[:, None, :] != perms[None, :t, :]).sum(-1).min(1)
    mine = (perms[t] != perms[:t]).sum(-1).min()
    assert mine == d.max(), t
  # 4 cells: a Latin square of 4 orders is at distance 4 from each other.
  assert jigsaw.min_hamming_distance(jigsaw.permutation_set(4, 4)) == 4


def test_jigsaw_tiles_follow_the_labelled_permutation():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 255, (4, 9, 9, 1)).astype(np.float32)
  perms = jigsaw.permutation_set(10)
  # Tiles as large as their cells: no jitter, so each tile is exactly a cell.
  tiles, labels = jigsaw.jigsaw_from_set(jax.random.PRNGKey(0),
                                         jnp.asarray(images), perms,
                                         grid=3, tile_size=3)
  for b in range(4):
    cells = [images[b, r * 3:r * 3 + 3, c * 3:c * 3 + 3]
             for r in range(3) for c in range(3)]
    for j in range(9):
      np.testing.assert_array_equal(tiles[b, j],
                                    cells[perms[int(labels[b])][j]])


# ---------------------------------------------------------------------------
# Relative position.


def _coordinate_image(size):
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  return np.stack([yy, xx], -1).astype(np.int32)


def test_relative_position_labels_for_all_eight_neighbours():
  p, gap, jit = 4, 2, 1
  image = jnp.asarray(_coordinate_image(pretext.relative_position_span(p, gap, jit) + 3))
  # Independent table: raster order of the 3x3 grid without its centre.
  cells = [(r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1)]
  origin = jnp.array([2, 1])
  for label, (r, c) in enumerate(cells):
    centre, neighbour = pretext.relative_position_pair(
        image, jnp.int32(label), origin, jnp.zeros(2, jnp.int32),
        jnp.zeros(2, jnp.int32), patch_size=p, gap=gap, jitter=jit)
    centre_yx = np.asarray(centre[0, 0])
    neighbour_yx = np.asarray(neighbour[0, 0])
    np.testing.assert_array_equal(centre_yx, [2 + jit + p + gap, 1 + jit + p + gap])
    np.testing.assert_array_equal(neighbour_yx - centre_yx,
                                  [(r - 1) * (p + gap), (c - 1) * (p + gap)])
    assert pretext.NEIGHBOUR_OFFSETS[label] == (r - 1, c - 1)


def test_relative_position_pairs_have_gaps_jitter_and_all_labels():
  p, gap, jit = 4, 2, 1
  size = 24
  images = jnp.asarray(np.repeat(_coordinate_image(size)[None], 256, 0))
  centres, neighbours, labels = pretext.relative_position_pairs(
      jax.random.PRNGKey(0), images, patch_size=p, gap=gap, jitter=jit)
  assert set(np.asarray(labels).tolist()) == set(range(8))
  step = np.asarray(pretext.NEIGHBOUR_OFFSETS)[np.asarray(labels)]
  shift = np.asarray(neighbours[:, 0, 0]) - np.asarray(centres[:, 0, 0])
  residual = shift - step * (p + gap)
  assert np.abs(residual).max() <= 2 * jit and np.abs(residual).max() > 0
  # Patches never touch: at least gap - 2*jitter pixels between them.
  assert np.all(np.abs(shift).max(1) >= p + gap - 2 * jit)


# ---------------------------------------------------------------------------
# CPC.


def test_patch_grid_is_raster_order_of_overlapping_patches():
  images = np.random.default_rng(3).normal(size=(2, 12, 12, 1)).astype(np.float32)
  grid = pretext.patch_grid(jnp.asarray(images), patch_size=4, stride=2)
  assert grid.shape == (2, 5, 5, 4, 4, 1)
  np.testing.assert_array_equal(grid[1, 3, 2], images[1, 6:10, 4:8])


def _np_cpc(pred, z, offsets):
  b, _, rows, cols, d = pred.shape
  keys = z.reshape(-1, d)
  terms = []
  for k, o in enumerate(offsets):
    for n in range(b):
      for i in range(rows - o):
        for j in range(cols):
          scores = keys @ pred[n, k, i, j]
          target = (n * rows + i + o) * cols + j
          terms.append(-_np_log_softmax(scores)[target])
  return np.mean(terms)


def _cpc_inputs(b=8, rows=4, cols=3, d=5, offsets=(1, 2)):
  rng = np.random.default_rng(4)
  pred = rng.normal(size=(b, len(offsets), rows, cols, d)).astype(np.float32)
  z = rng.normal(size=(b, rows, cols, d)).astype(np.float32)
  return pred, z


@official_port('cpc', source='Henaff et al. 2020 (CPC v2) released no '
               'code; _np_cpc ports sec. 2, eq. 1-2')
def test_cpc_infonce_matches_numpy_and_eight_devices():
  pred, z = _cpc_inputs()
  got = losses.get_loss('cpc_infonce')(jnp.asarray(pred), jnp.asarray(z),
                                       offsets=(1, 2))
  np.testing.assert_allclose(got, _np_cpc(pred, z, (1, 2)), rtol=1e-5)
  _assert_devices_agree(losses.get_loss('cpc_infonce'),
                        (jnp.asarray(pred), jnp.asarray(z)),
                        kwargs={'offsets': (1, 2)})


def test_cpc_context_never_sees_rows_below():
  config = importlib.import_module('configs.cpc').get_config('smoke')
  net = infomax.CPCNetwork(backbone=models.get_backbone(config.model),
                           context_dim=16, context_layers=2, num_predictions=2)
  patches = pretext.patch_grid(
      jnp.asarray(np.random.default_rng(5).normal(size=(2, 28, 28, 1)),
                  jnp.float32), patch_size=8, stride=4)
  variables = jax.jit(lambda x: net.init(jax.random.PRNGKey(0), x,
                                         train=False))(patches)
  row = 2

  @jax.jit
  def grads_of_row(x):
    return jax.grad(lambda y: jnp.sum(
        net.apply(variables, y, train=False)['predictions'][:, :, row]))(x)

  # 16 context channels: with very few, a random init can leave every
  # context ReLU dead and all gradients zero.
  per_row = np.abs(np.asarray(grads_of_row(patches))).sum(axis=(0, 2, 3, 4, 5))
  # Two (2, 3) layers: rows row-2 .. row feed row's context, nothing below.
  assert np.all(per_row[:row + 1] > 0)
  np.testing.assert_array_equal(per_row[row + 1:], 0.0)


# ---------------------------------------------------------------------------
# Deep InfoMax.


def _np_dim(g, l, estimator):
  b, h, w, e = l.shape
  local = l.reshape(b, h * w, e)
  scores = np.einsum('npe,me->mnp', local, g)  # [global m, image n, pos p]
  pos = np.stack([scores[m, m] for m in range(b)])  # [b, P]
  if estimator == 'infonce':
    terms = []
    for m in range(b):
      # The image's own h*w positions stay in the denominator at -10, as in
      # the official infonce_loss (tests/test_official_ports.py).
      neg = np.concatenate([scores[m, n] for n in range(b) if n != m] +
                           [np.full(h * w, -10.0)])
      for p in range(h * w):
        logits = np.concatenate([[pos[m, p]], neg])
        terms.append(-_np_log_softmax(logits)[0])
    return np.mean(terms)
  neg = np.concatenate([scores[m, n] for m in range(b) for n in range(b)
                        if n != m])
  # JSD dual (Hjelm et al. eq. 4): E_P[-sp(-T)] - E_N[sp(T)], negated, shifted
  # by log 4 as in the DIM code's log-2 terms.
  return (np.mean(_softplus(neg)) + np.mean(_softplus(-pos)) -
          2 * np.log(2.0))


@pytest.mark.parametrize('estimator', ['infonce', 'jsd'])
def test_deep_infomax_matches_numpy_and_eight_devices(estimator):
  rng = np.random.default_rng(6)
  g = rng.normal(size=(8, 4)).astype(np.float32)
  l = rng.normal(size=(8, 3, 2, 4)).astype(np.float32)
  loss = losses.get_loss('deep_infomax')
  got = loss(jnp.asarray(g), jnp.asarray(l), estimator=estimator)
  np.testing.assert_allclose(got, _np_dim(g, l, estimator), rtol=1e-5)
  _assert_devices_agree(loss, (jnp.asarray(g), jnp.asarray(l)),
                        kwargs={'estimator': estimator})


@functools.lru_cache(maxsize=None)
def _dim_loss_fn(cross_view, num_views):
  """Deep InfoMax's smoke loss at initialisation, as a function of the views:
  one setup and one compiled program per view count (op by op, each call ran
  the network one small program at a time)."""
  config = importlib.import_module('configs.deep_infomax').get_config('smoke')
  config.method.cross_view = cross_view
  config.augment.views.image.count = num_views
  setup = train.setup(config)

  def loss(state, views):
    batch = {'label': jnp.zeros((views[0].shape[0],), jnp.int32)}
    return setup.method.loss(state.params, state, views, batch,
                             jax.random.PRNGKey(0), None)[0]

  return functools.partial(jax.jit(loss), setup.state)


def _dim_loss(cross_view, views):
  return float(_dim_loss_fn(cross_view, len(views))(views))


def test_deep_infomax_cross_view_scores_each_global_against_the_other_view():
  rng = np.random.default_rng(8)
  x, y = (jnp.asarray(rng.uniform(size=(16, 28, 28, 1)), jnp.float32)
          for _ in range(2))
  single = _dim_loss(False, [x])
  # Two copies of one view: BatchNorm sees the same statistics and each
  # global feature meets its own local map, so this is the one-view loss.
  np.testing.assert_allclose(_dim_loss(True, [x, x]), single, rtol=1e-5)
  crossed = _dim_loss(True, [x, y])
  np.testing.assert_allclose(_dim_loss(True, [y, x]), crossed, rtol=1e-5)
  assert abs(crossed - single) > 1e-3
  with pytest.raises(ValueError, match='cross_view=True uses 2 view'):
    _dim_loss(True, [x])


# ---------------------------------------------------------------------------
# AVID + CMA.


def _avid_inputs(b=8, k=12, d=6):
  rng = np.random.default_rng(7)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  return f(b, d), f(b, d), f(b, d), f(b, d), f(k, d), f(k, d)


def _np_info_nce(q, pos, neg, tau):
  q, pos, neg = _normalize(q), _normalize(pos), _normalize(neg)
  logits = np.concatenate([np.sum(q * pos, -1, keepdims=True), q @ neg.T], 1)
  return -np.mean(_np_log_softmax(logits / tau)[:, 0])


def _np_cross_modal(q, k, bank, tau):
  q, k, bank = _normalize(q), _normalize(k), _normalize(bank)
  logits = np.concatenate([q @ k.T, q @ bank.T], 1) / tau
  return -np.mean(np.diag(_np_log_softmax(logits)[:, :len(q)]))


def test_avid_matches_numpy_and_eight_devices():
  v, a, _, _, vn, an = _avid_inputs()
  expected = _np_cross_modal(v, a, an, 0.1) + _np_cross_modal(a, v, vn, 0.1)
  args = tuple(map(jnp.asarray, (v, a, vn, an)))
  got = losses.get_loss('avid')(*args, temperature=0.1)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  _assert_devices_agree(losses.get_loss('avid'), args, sharded=(0, 1),
                        kwargs={'temperature': 0.1})


def test_agreement_positives_are_neighbours_in_both_modalities():
  v, a, vr, ar, vn, an = _avid_inputs()
  mask = np.asarray(crossmodal.agreement_positives(
      jnp.asarray(vr), jnp.asarray(ar), jnp.asarray(vn), jnp.asarray(an),
      num_neighbours=5))
  for i in range(len(vr)):
    video_nn = set(np.argsort(-(_normalize(vn) @ _normalize(vr[i])))[:5])
    audio_nn = set(np.argsort(-(_normalize(an) @ _normalize(ar[i])))[:5])
    assert set(np.flatnonzero(mask[i])) == video_nn & audio_nn


def _np_cma(v, a, vc, ac, mask, tau):
  def part(q, c):
    logits = _normalize(q) @ _normalize(c).T / tau
    total, count = 0.0, 0
    for i in range(len(q)):
      pos = np.flatnonzero(mask[i])
      if not len(pos):
        continue
      neg = logits[i, ~mask[i]]
      total += np.mean([-_np_log_softmax(np.concatenate([[logits[i, j]], neg]))[0]
                        for j in pos])
      count += 1
    return total, count
  vt, count = part(v, vc)
  at, _ = part(a, ac)
  return (vt + at) / count


def test_cma_matches_numpy_and_eight_devices():
  v, a, vr, ar, vn, an = _avid_inputs()
  mask = np.zeros((8, 12), bool)
  mask[0, [1, 4]] = mask[2, 3] = mask[5, [0, 7, 11]] = mask[7, 2] = True
  args = tuple(map(jnp.asarray, (v, a, vn, an, mask)))
  got = losses.get_loss('cma')(*args, temperature=0.2)
  np.testing.assert_allclose(got, _np_cma(v, a, vn, an, mask, 0.2), rtol=1e-5)
  # The mask travels as floats: device_equivalence differentiates every
  # sharded argument, and booleans have no gradient.
  cma_float_mask = lambda v, a, vc, ac, m, **kw: losses.get_loss('cma')(
      v, a, vc, ac, m > 0.5, **kw)
  _assert_devices_agree(cma_float_mask, args[:4] + (args[4].astype(jnp.float32),),
                        sharded=(0, 1, 4), kwargs={'temperature': 0.2})


def test_synthetic_pairs_audio_carries_class_and_survives_subsets():
  config = importlib.import_module('configs.avid_cma').get_config('smoke')
  source = data.get_source(config.data, 'train', 2048)
  batch = source.get(np.arange(2048))
  assert batch['audio'].shape == (2048, config.data.audio_length)
  again = data.get_source(config.data, 'train', 2048).get(np.arange(5))
  np.testing.assert_array_equal(again['audio'], batch['audio'][:5])
  # A least-squares read-out of the class from the audio alone.
  x = np.concatenate([batch['audio'], np.ones((2048, 1))], 1)
  onehot = np.eye(10)[batch['label']]
  w = np.linalg.lstsq(x[:1536], onehot[:1536], rcond=None)[0]
  accuracy = np.mean(np.argmax(x[1536:] @ w, 1) == batch['label'][1536:])
  assert accuracy > 0.8, accuracy
  # The instance part: a noisy signal is nearest to its own image's clean
  # signal among the clean signals of the other images of its class.
  images, labels = batch['image'][:256], batch['label'][:256]
  kw = dict(num_classes=10, audio_length=config.data.audio_length)
  clean = paired.make_audio(images, labels, noise_std=0.0, **kw)
  noisy = paired.make_audio(images, labels, noise_std=0.3, noise_seed=9, **kw)
  distance = ((noisy[:, None] - clean[None]) ** 2).sum(-1)
  distance[labels[:, None] != labels[None]] = np.inf
  assert np.mean(np.argmin(distance, 1) == np.arange(256)) > 0.9


# ---------------------------------------------------------------------------
# Every method trains from its smoke config; the layer-wise probe runs.


@pytest.fixture(scope='module')
def smoke_runs(tmp_path_factory):
  runs = {}

  def run(name):
    if name not in runs:
      config = importlib.import_module(f'configs.{name}').get_config('smoke')
      config.num_steps = 2
      config.training.update(log_every=1, checkpoint_every=2)
      workdir = str(tmp_path_factory.mktemp(name))
      state = train.train_and_evaluate(config, workdir)
      runs[name] = (workdir, state)
    return runs[name]

  return run


@pytest.mark.parametrize('name', METHODS)
def test_smoke_config_trains(smoke_runs, name):
  workdir, state = smoke_runs(name)
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['loss']) and r['finite'] == 1.0 for r in rows)
  assert 'backbone' in state.params
  if name == 'avid_cma':
    # The video tower is the backbone that evaluation probes.
    assert set(state.params) == {'backbone', 'audio_encoder',
                                 'video_projector', 'audio_projector'}
    assert rows[-1]['cma_weight'] == 1.0


@pytest.mark.parametrize('name', ['jigsaw', 'relative_position', 'cpc'])
def test_patch_methods_fit_the_online_probe_on_whole_views(name):
  # Evaluation embeds whole images; a probe fitted to pooled tile features
  # would be fitted to other inputs, and with a flattened map to another
  # width (Jigsaw's fmnist recipe flattens: 128 per tile, 2048 per image).
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.model.pooling = 'flatten'
  s = train.setup(config)
  view = jax.random.normal(jax.random.PRNGKey(0), s.method.sample_input().shape)
  _, out = s.method.loss(s.state.params, s.state, [view], {},
                         jax.random.PRNGKey(1), None)
  expected, _ = models.get_backbone(config.model).apply(
      {'params': s.state.params['backbone'],
       'batch_stats': s.state.batch_stats['backbone']}, view, train=False)
  assert out.features.shape == (view.shape[0],
                                s.state.probe['params']['kernel'].shape[0])
  np.testing.assert_allclose(out.features, expected, rtol=1e-5, atol=1e-6)
  _, no_probe = s.method.loss(s.state.params, s.state.replace(probe={}),
                              [view], {}, jax.random.PRNGKey(1), None)
  assert no_probe.features is None


def test_layerwise_probe_script_on_a_smoke_checkpoint(smoke_runs, tmp_path):
  workdir, _ = smoke_runs('rotation')
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  probe = importlib.import_module('layerwise_probe')
  out = tmp_path / 'layers.png'
  result = probe.main(['--workdirs', workdir, '--out', str(out),
                       '--max_train_examples', '128', '--max_test_examples',
                       '128', '--epochs', '2'])
  assert out.exists() and out.stat().st_size > 0
  saved = json.loads((tmp_path / 'layers.json').read_text())
  run = saved['runs'][0]
  assert run['stages'] == ['stage1', 'stage2'] == result['runs'][0]['stages']
  assert run['method'] == 'rotation' and len(run['top1']) == 2
  assert all(0.0 <= t <= 100.0 for t in run['top1'])
