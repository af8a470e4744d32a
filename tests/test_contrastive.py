"""The contrastive family: MoCo v2/v3, MoCHi, InstDisc, PIRL.

Losses against independent NumPy derivations and across 8 devices; the queue
and the memory bank as pure updates; jigsaw tiling; a few training steps of
every method's smoke config.
"""

import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official_ports import official_port
from ssl_jax import data, losses, methods, parallel, train
from ssl_jax.data import jigsaw
from ssl_jax.losses import instance
from ssl_jax.methods import memory
from ssl_jax.testing import device_equivalence
from ssl_jax.durations import Durations

METHOD_CONFIGS = ('mocov2', 'mochi', 'mocov3', 'instdisc', 'pirl')


def _random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _assert_devices_equal_one(fn, args, sharded, kwargs, rtol=1e-5):
  (v1, g1), (vn, gn) = device_equivalence(fn, args, 8, sharded_argnums=sharded,
                                          kwargs=kwargs)
  np.testing.assert_allclose(vn, np.full(8, v1), rtol=rtol)
  for a, b in zip(g1, gn):
    assert np.abs(a).max() > 0 or np.abs(b).max() == 0
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# NumPy references, written from the papers' formulas with loops.


def info_nce_reference(q, k, negatives, temperature):
  q, k, negatives = _normalize(q), _normalize(k), _normalize(negatives)
  total = 0.0
  for i in range(len(q)):
    logits = np.concatenate([[q[i] @ k[i]], negatives @ q[i]]) / temperature
    total += -logits[0] + np.log(np.sum(np.exp(logits)))
  return total / len(q)


def moco_v3_reference(q1, q2, k1, k2, temperature):
  """ctr(q1, k2) + ctr(q2, k1), each 2*tau*CE with in-batch negatives.

  A port of facebookresearch/moco-v3 at c349e6e24f40d3fedb22d973f92defa4cedf37a7,
  moco/builder.py lines 63-73 (`contrastive_loss`) and 96 (`forward`).
  """
  def ctr(q, k):
    q, k = _normalize(q), _normalize(k)
    total = 0.0
    for i in range(len(q)):
      logits = np.array([q[i] @ k[j] for j in range(len(k))]) / temperature
      total += -(logits[i] - np.log(np.sum(np.exp(logits))))
    return 2 * temperature * total / len(q)
  return ctr(q1, k2) + ctr(q2, k1)


def mochi_reference(q, k, queue, synthetic, temperature):
  """InfoNCE whose negatives for query i are the queue plus synthetic[i]."""
  q, k, queue = _normalize(q), _normalize(k), _normalize(queue)
  total = 0.0
  for i in range(len(q)):
    negatives = np.concatenate([queue, synthetic[i]])
    logits = np.concatenate([[q[i] @ k[i]], negatives @ q[i]]) / temperature
    total += -logits[0] + np.log(np.sum(np.exp(logits)))
  return total / len(q)


def nce_reference(v, positive_rows, negative_rows, temperature, z, n,
                  eps=1e-7):
  """Wu et al. 2018, eq. 6-7: -log h(i, v) - sum_noise log(1 - h(j, v)),
  with the official criterion's eps in h's denominator."""
  v = _normalize(v)
  m = negative_rows.shape[1]
  total = 0.0
  for i in range(len(v)):
    p = np.exp(v[i] @ positive_rows[i] / temperature) / z
    loss = -np.log(p / (p + m / n + eps))
    for j in range(m):
      p_noise = np.exp(v[i] @ negative_rows[i, j] / temperature) / z
      loss -= np.log((m / n) / (p_noise + m / n + eps))
    total += loss
  return total / len(v)


# zhirongw/lemniscate.pytorch at f7cfe298357cb2b169cd59eb540aca24bed1f9b8,
# ported to jax.numpy: lib/NCEAverage.py lines 9-40 (NCEFunction.forward; its
# hand-written backward, lines 43-60, is the gradient of exp(w.x/T)/Z with Z
# a constant, which jax.grad gives with Z stop-gradient) and lines 62-68
# (the memory update), lib/NCECriterion.py lines 12-37. The features arrive
# L2-normalised (models/resnet.py: `self.l2norm = Normalize(2)`). One process
# (DataParallel): the batch is the global batch.
def lemniscate_nce(features, memory, y, noise_idx, T, nce_eps=1e-7):
  x = features / jnp.linalg.norm(features, axis=1, keepdims=True)
  idx = jnp.concatenate([y[:, None], noise_idx], axis=1)  # idx[:, 0] = y
  output_size = memory.shape[0]
  weight = memory[idx]  # [batchSize, K+1, inputSize]
  out = jnp.exp(jnp.einsum('bkd,bd->bk', weight, x) / T)
  Z = jax.lax.stop_gradient(jnp.mean(out)) * output_size  # params[2] < 0
  out = out / Z
  batch_size, K = out.shape[0], out.shape[1] - 1
  Pnt = Pns = 1 / float(output_size)
  Pmt = out[:, 0]
  lnPmt = jnp.log(Pmt / (Pmt + K * Pnt + nce_eps))
  lnPon = jnp.log((K * Pns) / (out[:, 1:] + K * Pns + nce_eps))
  return -(jnp.sum(lnPmt) + jnp.sum(lnPon)) / batch_size, Z


def lemniscate_memory_update(memory, x, y, momentum):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  weight_pos = memory[y] * momentum + x * (1 - momentum)
  memory = np.array(memory)
  memory[y] = weight_pos / np.linalg.norm(weight_pos, axis=1, keepdims=True)
  return memory


def bank_softmax_reference(v, indices, bank, temperature):
  v = _normalize(v)
  total = 0.0
  for i in range(len(v)):
    scores = np.exp(bank @ v[i] / temperature)
    total += -np.log(scores[indices[i]] / scores.sum())
  return total / len(v)


# ---------------------------------------------------------------------------
# Losses: NumPy and 8 devices == 1.


def test_info_nce_with_queue_eight_devices_equal_one():
  q, k, queue = _random((32, 8), 0), _random((32, 8), 1), _random((64, 8), 2)
  np.testing.assert_allclose(
      losses.get_loss('info_nce')(q, k, queue, temperature=0.2),
      info_nce_reference(q, k, queue, 0.2), rtol=1e-5)
  # The queue is passed whole to every device, as the train step holds it.
  _assert_devices_equal_one(losses.get_loss('info_nce'), (q, k, queue), (0, 1),
                            {'temperature': 0.2})


def test_moco_v3_matches_numpy_and_eight_devices():
  q1, q2, k1, k2 = (_random((16, 8), s) for s in range(4))
  np.testing.assert_allclose(
      losses.get_loss('moco_v3')(q1, q2, k1, k2, temperature=0.2),
      moco_v3_reference(q1, q2, k1, k2, 0.2), rtol=1e-5)
  (v1, g1), (vn, gn) = device_equivalence(
      losses.get_loss('moco_v3'), (q1, q2, k1, k2), 8,
      kwargs={'temperature': 0.2})
  np.testing.assert_allclose(vn, np.full(8, v1), rtol=1e-5)
  for a, b in zip(g1[:2], gn[:2]):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # Keys come from the momentum encoder: no gradient reaches them.
  for g in g1[2:] + gn[2:]:
    np.testing.assert_array_equal(g, 0.0)


def adjust_moco_momentum(epoch, epochs, moco_m):
  """facebookresearch/moco-v3 at c349e6e24f40d3fedb22d973f92defa4cedf37a7,
  main_moco.py lines 431-434."""
  return 1. - 0.5 * (1. + np.cos(np.pi * epoch / epochs)) * (1. - moco_m)


@official_port('mocov3', source='facebookresearch/moco-v3 at '
               'c349e6e24f40d3fedb22d973f92defa4cedf37a7, main_moco.py lines '
               '337-362 and 431-434, moco/builder.py lines 57-61 and 89-94')
def test_moco_v3_momentum_encoder_follows_the_official_loop():
  # main_moco.py lines 337-362 and moco/builder.py lines 57-61, 89-94: at
  # iteration t, m(t) is computed, the momentum encoder moves towards the
  # current (not yet stepped) parameters theta(t), then keys, loss, SGD step.
  # Here: the real train step (what base.train_step passes to after_update
  # included), against that loop fed with the parameters our steps produced.
  # A base momentum of 0.5 over 3 steps makes m(t) and m(t+1) differ by 0.03
  # (0.99 over 6 steps: by 7e-4).
  config = importlib.import_module('configs.mocov3').get_config('smoke')
  config.method.ema_momentum_base = 0.5
  config.num_steps = 3
  config.batch_size = 16
  config.training.online_probe = False
  setup = train.setup(config)
  iters_per_epoch, epochs = setup.total_steps, 1  # one "epoch" of 3 steps
  batch = setup.source.get(np.arange(16))
  step = jax.jit(functools.partial(
      methods.train_step, method=setup.method, tx=setup.tx,
      lr_schedule=setup.lr_schedule, axis_name=None))
  # The update on 8 devices: replicated inputs, no collective, equal copies.
  after_update_8 = parallel.data_parallel(setup.method.after_update,
                                         in_specs=(parallel.P(),) * 3)

  state = setup.state
  xi = state.method_state['key_params']  # a copy of theta(0), builder.py l. 32-34
  for t in range(2):
    previous = state
    state, _ = step(state, batch)
    # Iteration t+1 of the official loop, on the parameters of step t.
    m = adjust_moco_momentum((t + 1) / iters_per_epoch, epochs, 0.5)
    theta = {k: state.params[k] for k in xi}
    xi = jax.tree.map(lambda k, q: k * m + q * (1. - m), xi, theta)
    replicated = parallel.put_replicated((state.params, previous.method_state,
                                          previous.step))
    on_8 = after_update_8(*replicated)['key_params']
    for run, got in (('1 device', state.method_state['key_params']),
                     ('8 devices', on_8)):
      jax.tree.map(lambda g, w: np.testing.assert_allclose(
          g, np.broadcast_to(w, np.shape(g)), rtol=1e-5, atol=1e-6,
          err_msg=f'{run}, step {t}'), got, xi)


MOCHI = dict(temperature=0.2, num_hard=6, num_mix_negatives=5,
             num_mix_queries=4, max_query_weight=0.5)


@official_port('mochi', devices=(1,), source='Kalantidis et al. 2020 '
               'released no code; mochi_reference ports sec. 4, eq. 1 with '
               'the mixed negatives')
def test_mochi_matches_numpy_given_its_synthetic_negatives():
  q, k, queue = _random((16, 8), 0), _random((16, 8), 1), _random((24, 8), 2)
  rng = jax.random.PRNGKey(3)
  synthetic = np.asarray(instance.synthesize_hard_negatives(
      rng, jnp.asarray(_normalize(q), jnp.float32),
      jnp.asarray(_normalize(queue), jnp.float32), jnp.arange(16),
      num_hard=6, num_mix_negatives=5, num_mix_queries=4))
  assert synthetic.shape == (16, 9, 8)
  np.testing.assert_allclose(np.linalg.norm(synthetic, axis=-1), 1.0, rtol=1e-5)
  got = losses.get_loss('mochi')(q, k, queue, rng, **MOCHI)
  np.testing.assert_allclose(got, mochi_reference(q, k, queue, synthetic, 0.2),
                             rtol=1e-5)
  # Harder negatives than the queue: the loss is above plain InfoNCE.
  assert got > info_nce_reference(q, k, queue, 0.2)


def test_mochi_mixes_only_the_hardest_negatives():
  q, queue = _normalize(_random((4, 8), 0)), _normalize(_random((10, 8), 1))
  synthetic = np.asarray(instance.synthesize_hard_negatives(
      jax.random.PRNGKey(0), jnp.asarray(q, jnp.float32),
      jnp.asarray(queue, jnp.float32), jnp.arange(4), num_hard=2,
      num_mix_negatives=6, num_mix_queries=6, max_query_weight=0.5))
  for i in range(4):
    hard = queue[np.argsort(-(queue @ q[i]))[:2]]
    for h in synthetic[i, :6]:  # a * n_i + (1 - a) * n_j, normalised
      coef, residual, *_ = np.linalg.lstsq(hard.T, h, rcond=None)
      np.testing.assert_allclose(hard.T @ coef, h, atol=1e-5)
      assert (coef >= -1e-5).all()
    for h in synthetic[i, 6:]:  # b * q + (1 - b) * n_j with b < 0.5
      basis = np.stack([q[i], *hard])
      coef = np.linalg.lstsq(basis.T, h, rcond=None)[0]
      np.testing.assert_allclose(basis.T @ coef, h, atol=1e-5)
      assert (coef >= -1e-5).all() and 0 < coef[0] < coef[1:].sum()


@official_port('mochi', devices=(8,), source='Kalantidis et al. 2020 '
               'released no code; 8 devices equal the 1-device run that '
               'matches the paper (test above)')
def test_mochi_eight_devices_equal_one():
  # Per-example randomness comes from the global index, so splitting the batch
  # over devices synthesises exactly the same negatives.
  q, k, queue = _random((32, 8), 4), _random((32, 8), 5), _random((24, 8), 6)
  rng = np.asarray(jax.random.PRNGKey(7))
  _assert_devices_equal_one(losses.get_loss('mochi'), (q, k, queue, rng),
                            (0, 1), MOCHI)


def test_nce_matches_numpy_and_eight_devices():
  v = _random((16, 8), 0)
  bank = _normalize(_random((50, 8), 1)).astype(np.float32)
  rng = np.random.default_rng(2)
  indices = rng.permutation(50)[:16]
  noise = rng.integers(0, 50, size=(16, 7))
  positive_rows, negative_rows = bank[indices], bank[noise]
  z = float(instance.estimate_normalizer(v, positive_rows, negative_rows,
                                         temperature=0.07, num_data=50))
  kwargs = dict(temperature=0.07, normalizer=z, num_data=50)
  np.testing.assert_allclose(
      losses.get_loss('nce')(v, positive_rows, negative_rows, **kwargs),
      nce_reference(v, positive_rows, negative_rows, 0.07, z, 50), rtol=1e-5)
  _assert_devices_equal_one(losses.get_loss('nce'),
                            (v, positive_rows, negative_rows), (0, 1, 2),
                            kwargs)


@official_port('instdisc', source='zhirongw/lemniscate.pytorch at '
               'f7cfe298357cb2b169cd59eb540aca24bed1f9b8, lib/NCEAverage.py '
               'lines 9-68, lib/NCECriterion.py lines 12-37')
def test_instdisc_nce_normalizer_and_bank_match_official_code():
  n, b, k, d = 200, 16, 7, 8
  v = _random((b, d), 30)
  # NCEAverage's initial memory: uniform in [-stdv, stdv], rows not unit.
  stdv = 1. / np.sqrt(d / 3)
  bank = np.random.default_rng(31).uniform(-stdv, stdv, (n, d)).astype(np.float32)
  rng = np.random.default_rng(32)
  y = rng.permutation(n)[:b]
  noise = rng.integers(0, n, size=(b, k))
  want, want_z = lemniscate_nce(v, bank, y, noise, 0.07)
  want_grad = jax.grad(lambda f: lemniscate_nce(f, bank, y, noise, 0.07)[0])(v)

  def first_step_loss(v, positive_rows, negative_rows, *, axis_name):
    # InstDisc's first step: Z estimated on this batch, then the NCE loss.
    z = instance.estimate_normalizer(v, positive_rows, negative_rows,
                                     temperature=0.07, num_data=n,
                                     axis_name=axis_name)
    return losses.get_loss('nce')(v, positive_rows, negative_rows,
                                  temperature=0.07, normalizer=z, num_data=n,
                                  axis_name=axis_name)

  z = instance.estimate_normalizer(v, bank[y], bank[noise], temperature=0.07,
                                   num_data=n)
  np.testing.assert_allclose(z, want_z, rtol=1e-5)
  (v1, g1), (vn, gn) = device_equivalence(
      first_step_loss, (v, bank[y], bank[noise]), 8, grad_argnums=(0,))
  np.testing.assert_allclose(v1, want, rtol=1e-5)
  np.testing.assert_allclose(vn, np.full(8, want), rtol=1e-5)
  for grads in (g1, gn):
    np.testing.assert_allclose(grads[0], want_grad, rtol=1e-4, atol=1e-6)
  # The memory update, on 1 and 8 devices.
  expected = lemniscate_memory_update(bank, v, y, 0.5)
  one = memory.update_bank(jnp.asarray(bank), y, v, 0.5)
  eight = jax.pmap(lambda i, e: memory.update_bank(jnp.asarray(bank), i, e, 0.5,
                                                   parallel.AXIS),
                   axis_name=parallel.AXIS)(y.reshape(8, -1),
                                            v.reshape(8, -1, d))
  for got in (one, *eight):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bank_softmax_matches_numpy_and_eight_devices():
  v = _random((16, 8), 0)
  bank = _normalize(_random((40, 8), 1)).astype(np.float32)
  indices = np.random.default_rng(2).permutation(40)[:16]
  kwargs = {'temperature': 0.07}
  np.testing.assert_allclose(
      losses.get_loss('bank_softmax')(v, bank[indices], bank, **kwargs),
      bank_softmax_reference(v, indices, bank, 0.07), rtol=1e-5)
  _assert_devices_equal_one(losses.get_loss('bank_softmax'),
                            (v, bank[indices], bank), (0, 1), kwargs)


# ---------------------------------------------------------------------------
# The queue and the memory bank.


def test_queue_holds_the_last_keys_in_order_across_devices():
  k_size, per_device, steps = 48, 2, 5  # global batch 16; wraps after 3 steps
  keys = _normalize(_random((steps, 8 * per_device, 4), 0)).astype(np.float32)
  state = memory.init_queue(jax.random.PRNGKey(0), k_size, 4)
  step = jax.pmap(lambda s, k: memory.enqueue(s['queue'], s['queue_ptr'], k,
                                              parallel.AXIS),
                  axis_name=parallel.AXIS, in_axes=(None, 0))
  history = []
  for t in range(steps):
    out = step(state, keys[t].reshape(8, per_device, 4))
    for leaf in jax.tree.leaves(out):  # every device holds the same queue
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    state = jax.tree.map(lambda x: x[0], out)
    history.append(keys[t])
    if t == 1:  # before wrapping: rows 0..31 are steps 1 and 2, in order
      np.testing.assert_allclose(state['queue'][:32],
                                 np.concatenate(history), atol=1e-6)
  expected = np.concatenate(history)[-k_size:]
  assert int(state['queue_ptr']) == (steps * 16) % k_size
  # Read from the oldest entry (the pointer) on: the last K keys in order.
  np.testing.assert_allclose(np.roll(state['queue'], -int(state['queue_ptr']),
                                     axis=0), expected, atol=1e-6)


def test_queue_size_not_multiple_of_batch_fails_at_setup(tmp_path):
  config = importlib.import_module('configs.mocov2').get_config('smoke')
  config.method.queue_size = 100
  with pytest.raises(ValueError, match='queue size 100.*multiple of the global '
                     'batch size 64.*queue_size=64'):
    train.setup(config)


def test_bank_rows_change_only_when_seen():
  n, d = 40, 4
  bank = memory.init_bank(jax.random.PRNGKey(0), n, d)
  indices = np.random.default_rng(1).permutation(n)[:16].astype(np.int32)
  emb = _random((16, d), 2)
  new = jax.pmap(lambda i, e: memory.update_bank(bank, i, e, 0.5,
                                                 parallel.AXIS),
                 axis_name=parallel.AXIS)(indices.reshape(8, 2),
                                          emb.reshape(8, 2, d))
  np.testing.assert_array_equal(new, np.broadcast_to(new[0], new.shape))
  new, bank = np.asarray(new[0]), np.asarray(bank)
  unseen = np.setdiff1d(np.arange(n), indices)
  np.testing.assert_array_equal(new[unseen], bank[unseen])
  expected = _normalize(0.5 * bank[indices] + 0.5 * _normalize(emb))
  np.testing.assert_allclose(new[indices], expected, atol=1e-6)


def test_negative_samples_do_not_depend_on_the_split():
  rng = jax.random.PRNGKey(0)
  indices = jnp.arange(16) * 3
  whole = memory.sample_negatives(rng, indices, 5, 100)
  halves = [memory.sample_negatives(rng, indices[i:i + 8], 5, 100)
            for i in (0, 8)]
  np.testing.assert_array_equal(whole, np.concatenate(halves))
  assert whole.min() >= 0 and whole.max() < 100


# ---------------------------------------------------------------------------
# Jigsaw.


def test_jigsaw_tiles_come_from_their_cells_and_are_shuffled():
  size, grid, tile = 12, 3, 3
  # Pixel value = its flat position, so a tile tells where it was cut.
  image = np.arange(size * size, dtype=np.float32).reshape(1, size, size, 1)
  images = np.repeat(image, 6, axis=0)
  tiles, perms = jigsaw.jigsaw(jax.random.PRNGKey(0), jnp.asarray(images),
                               grid=grid, tile_size=tile)
  assert tiles.shape == (6, 9, tile, tile, 1)
  cell = size // grid
  for b in range(6):
    assert sorted(np.asarray(perms[b]).tolist()) == list(range(9))
    for j in range(9):
      cell_index = int(perms[b, j])
      y0, x0 = divmod(int(tiles[b, j, 0, 0, 0]), size)
      assert cell_index // grid * cell <= y0 <= cell_index // grid * cell + cell - tile
      assert cell_index % grid * cell <= x0 <= cell_index % grid * cell + cell - tile
      np.testing.assert_array_equal(tiles[b, j, ..., 0],
                                    image[0, y0:y0 + tile, x0:x0 + tile, 0])
  # Different examples get different orders (per-example keys).
  assert len({tuple(np.asarray(p).tolist()) for p in perms}) > 1


def test_jigsaw_without_jitter_reassembles_the_image():
  images = _random((2, 9, 9, 2), 0)
  tiles, perms = jigsaw.jigsaw(jax.random.PRNGKey(1), jnp.asarray(images),
                               grid=3, tile_size=3)
  for b in range(2):
    ordered = np.empty_like(np.asarray(tiles[b]))
    ordered[np.asarray(perms[b])] = tiles[b]
    rebuilt = ordered.reshape(3, 3, 3, 3, 2).transpose(0, 2, 1, 3, 4)
    np.testing.assert_array_equal(rebuilt.reshape(9, 9, 2), images[b])


# ---------------------------------------------------------------------------
# Every method trains a few steps from its smoke config.


@pytest.mark.parametrize('name', METHOD_CONFIGS)
def test_smoke_config_trains(tmp_path, name):
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.num_steps = 2
  config.training.update(log_every=1, checkpoint_every=2)
  state = train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['loss']) and r['finite'] == 1.0 for r in rows)
  ms = state.method_state
  if 'queue' in ms:  # two global batches of 64 were enqueued
    assert int(ms['queue_ptr']) == 128
  if 'bank' in ms:
    # Only the rows of the examples of the two batches changed.
    setup = train.setup(config)
    batches = data.TrainBatches(setup.source, config.batch_size, config.seed)
    seen = np.concatenate([batches.indices(0), batches.indices(1)])
    batches.close()
    changed = np.nonzero(np.any(ms['bank'] != setup.state.method_state['bank'],
                                axis=1))[0]
    np.testing.assert_array_equal(changed, np.sort(seen))


def test_mocov2_key_momentum_constant_or_cosine():
  """MoCo v2's m is constant (facebookresearch/moco main_moco.py --moco-m);
  solo-learn's CIFAR recipe raises it by a cosine (mocov2plus.yaml L23-L25,
  base_tau 0.99 -> final_tau 0.999)."""
  from ssl_jax.methods import moco  # pylint: disable=g-import-not-at-top
  config = importlib.import_module('configs.mocov2').get_config('smoke')
  constant = moco.MoCoV2(config, None, Durations(100, 10, config.batch_size))
  assert [float(constant.ema_momentum(t)) for t in (0, 50, 100)] == [
      np.float32(0.99)] * 3
  config.method.ema_momentum_final = 0.999
  cosine = moco.MoCoV2(config, None, Durations(100, 10, config.batch_size))
  np.testing.assert_allclose(
      [float(cosine.ema_momentum(t)) for t in (0, 50, 100)],
      [0.99, 0.9945, 0.999], rtol=1e-6)
