"""SimSiam, DINO, data2vec and distillation: losses against NumPy references,
8 devices against 1, DINO's properties, and a smoke run of every method."""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official_ports import official_port
from ssl_jax import data, losses, methods, parallel, train
from ssl_jax.durations import Durations
from ssl_jax.losses.teacher_student import data2vec_targets, dino_center_update
from ssl_jax.testing import device_equivalence

RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
  return (scale * RNG.normal(size=shape)).astype(np.float32)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _cos(a, b):
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


# ---------------------------------------------------------------------------
# NumPy references, one loop per formula of the papers.


def simsiam_reference(p1, p2, z1, z2):
  n = len(p1)
  d12 = -sum(_cos(p1[i], z2[i]) for i in range(n)) / n
  d21 = -sum(_cos(p2[i], z1[i]) for i in range(n)) / n
  return 0.5 * d12 + 0.5 * d21


def dino_reference(student, teacher, center, tau_s, tau_t):
  """Caron et al. 2021, alg. 1, looping over crop pairs and images."""
  student, teacher = student.astype(np.float64), teacher.astype(np.float64)
  total, pairs = 0.0, 0
  for iq in range(teacher.shape[0]):
    for v in range(student.shape[0]):
      if v == iq:
        continue
      term = 0.0
      for i in range(student.shape[1]):
        t = _softmax((teacher[iq, i] - center) / tau_t)
        s = _softmax(student[v, i] / tau_s)
        term += -np.sum(t * np.log(s))
      total += term / student.shape[1]
      pairs += 1
  return total / pairs


def data2vec_targets_reference(blocks, top_k, eps=1e-5):
  out = 0.0
  for y in blocks[-top_k:]:
    y = y[:, 1:].astype(np.float64)
    normed = np.zeros_like(y)
    for i in range(y.shape[0]):
      for d in range(y.shape[2]):
        col = y[i, :, d]
        normed[i, :, d] = (col - col.mean()) / np.sqrt(col.var() + eps)
    out = out + normed
  return out / top_k


def data2vec_official_targets(blocks, top_k, eps=1e-5):
  """facebookresearch/data2vec_vision@af9a363 beit/engine_for_cyclical.py
  L70-L95 with the ViT-B run's flags (beit/README.md L27, L37): the top-K
  layer results, F.layer_norm(val, (fsz,)) each (target_layer_norm_last),
  averaged, F.layer_norm again (post_target_layer_norm)."""
  def layer_norm(x):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  layer_vals = [layer_norm(y[:, 1:].astype(np.float64)) for y in blocks[-top_k:]]
  return layer_norm(sum(layer_vals) / top_k)


def data2vec_reference(pred, target, mask, beta):
  total, count = 0.0, 0
  for i in range(pred.shape[0]):
    for n in range(pred.shape[1]):
      if not mask[i, n]:
        continue
      d = np.abs(pred[i, n].astype(np.float64) - target[i, n])
      per = np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
      total += per.mean()
      count += 1
  return total / count


def kd_reference(student, teacher, temperature):
  total = 0.0
  for s, t in zip(student.astype(np.float64), teacher.astype(np.float64)):
    p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
    total += np.sum(p_t * np.log(p_t / p_s))
  return temperature ** 2 * total / len(student)


def test_simsiam_matches_reference_and_devices():
  p1, p2, z1, z2 = (_normal(16, 8) for _ in range(4))
  value = losses.get_loss('simsiam')(p1, p2, z1, z2)
  np.testing.assert_allclose(value, simsiam_reference(p1, p2, z1, z2),
                             rtol=1e-5)
  (v1, g1), (vn, gn) = device_equivalence(losses.get_loss('simsiam'),
                                          (p1, p2, z1, z2), 8)
  np.testing.assert_allclose(vn, np.full(8, v1), rtol=1e-5)
  for a, b in zip(g1, gn):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
  # Stop-gradient: the projections receive no gradient.
  assert np.all(g1[2] == 0) and np.all(g1[3] == 0)


def _dino_batch_first(student, teacher, center, **kwargs):
  # device_equivalence shards axis 0, DINO's inputs are [views, b, K].
  return losses.get_loss('dino')(jnp.swapaxes(student, 0, 1),
                                 jnp.swapaxes(teacher, 0, 1), center, **kwargs)


def test_dino_matches_reference_and_devices():
  student, teacher, center = _normal(4, 16, 10), _normal(2, 16, 10), _normal(10)
  kwargs = dict(student_temperature=0.1, teacher_temperature=0.05)
  value = losses.get_loss('dino')(student, teacher, center, **kwargs)
  np.testing.assert_allclose(
      value, dino_reference(student, teacher, center, 0.1, 0.05), rtol=1e-5)
  (v1, g1), (vn, gn) = device_equivalence(
      _dino_batch_first, (np.swapaxes(student, 0, 1), np.swapaxes(teacher, 0, 1),
                          center), 8, sharded_argnums=(0, 1), kwargs=kwargs)
  np.testing.assert_allclose(vn, np.full(8, v1), rtol=1e-5)
  np.testing.assert_allclose(gn[0], g1[0], rtol=1e-4, atol=1e-7)
  assert np.all(g1[1] == 0)  # the teacher is not differentiated


# facebookresearch/dino at 7c446df5b9f45747937fb0d72314eb9f7b66930a,
# main_dino.py lines 363-416 (DINOLoss), ported to jax.numpy. `replicas`
# stands for the DDP processes: each holds a slice of every crop's batch,
# dist.all_reduce is a sum over them and DDP averages their gradients.


def dino_official_temp_schedule(warmup_teacher_temp, teacher_temp,
                                warmup_teacher_temp_epochs, nepochs):
  """main_dino.py lines 374-378."""
  return np.concatenate((
      np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
      np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))


def dino_official_forward(student_output, teacher_output, center, temp,
                          ncrops, student_temp=0.1):
  """main_dino.py lines 380-402 on one process: [crops * b, K] inputs."""
  student_out = jnp.split(student_output / student_temp, ncrops)
  teacher_out = jax.nn.softmax((teacher_output - center) / temp, axis=-1)
  teacher_out = jnp.split(jax.lax.stop_gradient(teacher_out), 2)
  total_loss, n_loss_terms = 0.0, 0
  for iq, q in enumerate(teacher_out):
    for v in range(len(student_out)):
      if v == iq:
        continue
      loss = jnp.sum(-q * jax.nn.log_softmax(student_out[v], axis=-1), axis=-1)
      total_loss += loss.mean()
      n_loss_terms += 1
  return total_loss / n_loss_terms


def dino_official_update_center(center, teacher_outputs, center_momentum=0.9):
  """main_dino.py lines 406-416, one [2 * b_r, K] teacher output per process."""
  batch_center = sum(np.sum(t, axis=0, keepdims=True) for t in teacher_outputs)
  batch_center = batch_center / (len(teacher_outputs[0]) * len(teacher_outputs))
  return center * center_momentum + batch_center * (1 - center_momentum)


@official_port('dino', source='facebookresearch/dino at '
               '7c446df5b9f45747937fb0d72314eb9f7b66930a, main_dino.py lines '
               '363-416 (DINOLoss: temperature schedule, loss, center)')
def test_dino_teacher_temperature_loss_and_center_match_official_code():
  config = importlib.import_module('configs.dino').get_config('smoke')
  config.num_epochs, config.num_steps = 6, 0
  config.method.update(teacher_temperature_start=0.04, teacher_temperature=0.07,
                       teacher_temperature_warmup_epochs=4)
  epoch_steps, total_steps = 16, 96
  method = methods.get_method(
      config, data.DataInfo(1024, (28, 28, 1), 10, (0.5,), (0.5,)),
      Durations(total_steps, epoch_steps, config.batch_size))
  official = dino_official_temp_schedule(0.04, 0.07, 4, 6)
  steps = np.arange(total_steps)
  ours = np.asarray(jax.vmap(method.teacher_temperature)(steps))
  # Once per epoch: schedule[epoch] for every step of the epoch.
  np.testing.assert_allclose(ours, official[steps // epoch_steps], rtol=1e-6)

  step = 37  # epoch 2
  temp = float(method.teacher_temperature(step))
  crops, b, k = 4, 16, 10
  student, teacher, center = _normal(crops, b, k), _normal(2, b, k), _normal(k)
  kwargs = dict(student_temperature=0.1, teacher_temperature=temp)
  (v1, g1), (vn, gn) = device_equivalence(
      _dino_batch_first, (np.swapaxes(student, 0, 1),
                          np.swapaxes(teacher, 0, 1), center), 8,
      sharded_argnums=(0, 1), kwargs=kwargs)
  for replicas, value, grad in ((1, v1, g1[0]), (8, vn, gn[0])):
    def official_loss(s):
      per = b // replicas
      return sum(dino_official_forward(
          s[:, r * per:(r + 1) * per].reshape(-1, k),
          teacher[:, r * per:(r + 1) * per].reshape(-1, k), center,
          official[step // epoch_steps], crops)
                 for r in range(replicas)) / replicas
    want, want_grad = jax.value_and_grad(official_loss)(student)
    np.testing.assert_allclose(value, np.broadcast_to(want, np.shape(value)),
                               rtol=1e-5)
    np.testing.assert_allclose(np.swapaxes(grad, 0, 1), want_grad, rtol=1e-4,
                               atol=1e-7)
    per = b // replicas
    want_center = dino_official_update_center(
        center[None], [teacher[:, r * per:(r + 1) * per].reshape(-1, k)
                       for r in range(replicas)])[0]
    if replicas == 1:
      got = [dino_center_update(center, teacher, momentum=0.9)]
    else:
      got = jax.pmap(lambda t: dino_center_update(
          center, t, momentum=0.9, axis_name=parallel.AXIS),
                     axis_name=parallel.AXIS)(
          np.swapaxes(teacher.reshape(2, 8, per, k), 0, 1))
    for c in got:
      np.testing.assert_allclose(c, want_center, rtol=1e-5, atol=1e-7)


def byol_official_target_ema(global_step, base_ema, max_steps):
  """google-deepmind/deepmind-research at 8457046b2c2ec259158efff7e238d006a9e6a224,
  byol/utils/schedules.py, target_ema and _cosine_decay."""
  decay = 0.5 * 1. * (1. + np.cos(np.pi * global_step / max_steps))
  return 1. - (1. - base_ema) * decay


def dino_official_momentum_schedule(momentum_teacher, epochs, niter_per_ep):
  """facebookresearch/dino at 7c446df5b9f45747937fb0d72314eb9f7b66930a,
  utils.py lines 187-198 (cosine_scheduler, no warm-up) as called by
  main_dino.py lines 250-251."""
  iters = np.arange(epochs * niter_per_ep)
  return 1 + 0.5 * (momentum_teacher - 1) * (1 + np.cos(np.pi * iters / len(iters)))


@official_port('byol', 'dino', source='deepmind/deepmind-research at '
               '8457046b2c2ec259158efff7e238d006a9e6a224, '
               'byol/utils/schedules.py lines 20-24 and 46-53 (target_ema); '
               'facebookresearch/dino at '
               '7c446df5b9f45747937fb0d72314eb9f7b66930a, utils.py lines '
               '187-198, main_dino.py lines 335-350')
@pytest.mark.parametrize('name', ['byol', 'dino'])
def test_ema_teacher_pairs_m_t_with_the_stepped_parameters_as_official(name):
  # BYOL: byol_experiment.py (deepmind-research at 4822a45504cb05042841a358f
  # 070bba35c6fbc24), _update_fn: the optimizer update, then
  # tau = target_ema(global_step), target += (1 - tau) (online - target) with
  # the updated online parameters. DINO: main_dino.py lines 335-350, the
  # optimizer step, then m = momentum_schedule[it]. Both: m(t) on theta(t+1),
  # unlike MoCo v3's m(t+1) (tests/test_contrastive.py). base.train_step
  # passes t, the index of the step just taken.
  total_steps, t = 10, 3
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.num_epochs, config.num_steps = 1, 0
  config.method.ema_momentum_base = 0.5  # m(3) and m(4) differ by 0.07
  method = methods.get_method(
      config, data.DataInfo(640, (28, 28, 1), 10, (0.5,), (0.5,)),
      Durations(total_steps, 640 // config.batch_size, config.batch_size))
  if name == 'byol':
    m = byol_official_target_ema(t, 0.5, total_steps)
    key, online_keys = 'target_params', ('backbone', 'projector')
  else:
    m = dino_official_momentum_schedule(0.5, 1, total_steps)[t]
    key, online_keys = 'teacher_params', ('backbone', 'head')
  teacher = {k: {'w': _normal(3, 2)} for k in online_keys}
  online = {k: {'w': _normal(3, 2)} for k in online_keys}
  if name == 'byol':
    online['predictor'] = {'w': _normal(3, 2)}  # not mirrored by the target
  want = {k: {'w': teacher[k]['w'] * m + online[k]['w'] * (1 - m)}
          for k in online_keys}
  step = jnp.asarray(t, jnp.int32)
  one = method.after_update(online, {key: teacher}, step)[key]
  eight = parallel.data_parallel(method.after_update,
                                 in_specs=(parallel.P(),) * 3)(
      *parallel.put_replicated((online, {key: teacher}, step)))[key]
  for got in (one, parallel.to_host(eight)):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6),
                 got, want)


def test_dino_center_update_across_devices():
  teacher, center = _normal(2, 16, 10), _normal(10)
  expected = 0.9 * center + 0.1 * teacher.reshape(-1, 10).mean(0)
  np.testing.assert_allclose(
      dino_center_update(center, teacher, momentum=0.9), expected, rtol=1e-5)
  sharded = np.swapaxes(teacher, 0, 1).reshape(8, 2, 2, 10).swapaxes(1, 2)
  per_device = jax.pmap(
      lambda t: dino_center_update(center, t, momentum=0.9,
                                   axis_name=parallel.AXIS),
      axis_name=parallel.AXIS)(sharded)
  np.testing.assert_allclose(per_device, np.tile(expected, (8, 1)), rtol=1e-5)


def test_dino_center_converges_to_mean_of_constant_teacher_outputs():
  teacher = _normal(2, 8, 6, scale=3.0)
  center = jnp.zeros(6)
  update = jax.jit(lambda c: dino_center_update(c, teacher, momentum=0.9))
  for _ in range(200):
    center = update(center)
  np.testing.assert_allclose(center, teacher.reshape(-1, 6).mean(0),
                             rtol=1e-4, atol=1e-5)


def test_dino_loss_is_teacher_entropy_for_identical_crops():
  logits = _normal(8, 12, scale=2.0)
  tau = 0.2
  student = np.stack([logits] * 4)
  teacher = np.stack([logits] * 2)
  value = losses.get_loss('dino')(student, teacher, np.zeros(12, np.float32),
                                  student_temperature=tau,
                                  teacher_temperature=tau)
  p = _softmax(logits.astype(np.float64) / tau)
  entropy = np.mean(-np.sum(p * np.log(p), axis=-1))
  np.testing.assert_allclose(value, entropy, rtol=1e-5)


def test_data2vec_targets_and_loss_match_reference_and_devices():
  blocks = [_normal(4, 6, 5) for _ in range(3)]
  targets = data2vec_targets(blocks, top_k=2, norm='instance', post_norm='none')
  np.testing.assert_allclose(targets, data2vec_targets_reference(blocks, 2),
                             rtol=1e-4, atol=1e-5)
  pred, target = _normal(16, 6, 5, scale=2.0), _normal(16, 6, 5)
  mask = np.zeros((16, 6), bool)
  mask[:, :3] = True
  mask = np.stack([RNG.permutation(row) for row in mask])
  value = losses.get_loss('data2vec')(pred, target, mask, beta=1.0)
  np.testing.assert_allclose(value, data2vec_reference(pred, target, mask, 1.0),
                             rtol=1e-5)

  def loss_fn(p, t, m, axis_name=None):
    return losses.get_loss('data2vec')(p, t, m > 0.5, beta=1.0,
                                       axis_name=axis_name)

  (v1, g1), (vn, gn) = device_equivalence(
      loss_fn, (pred, target, mask.astype(np.float32)), 8)
  np.testing.assert_allclose(vn, np.full(8, v1), rtol=1e-5)
  np.testing.assert_allclose(gn[0], g1[0], rtol=1e-4, atol=1e-7)
  # Unmasked positions get no gradient.
  assert np.all(g1[0][~mask] == 0)


def test_data2vec_default_targets_are_the_official_ones():
  blocks = [_normal(4, 7, 6, scale=3.0) for _ in range(4)]
  np.testing.assert_allclose(data2vec_targets(blocks, top_k=3),
                             data2vec_official_targets(blocks, 3),
                             rtol=1e-4, atol=1e-5)
  # Without the second layer norm the targets differ: the test can tell.
  assert not np.allclose(data2vec_targets(blocks, top_k=3, post_norm='none'),
                         data2vec_official_targets(blocks, 3), atol=1e-3)


def test_kd_and_feature_losses_match_references_and_devices():
  student, teacher = _normal(16, 7, scale=3.0), _normal(16, 7, scale=3.0)
  kd = losses.get_loss('kd')
  np.testing.assert_allclose(kd(student, teacher, temperature=4.0),
                             kd_reference(student, teacher, 4.0), rtol=1e-5)
  np.testing.assert_allclose(kd(teacher, teacher, temperature=4.0), 0.0,
                             atol=1e-6)
  (v1, g1), (vn, gn) = device_equivalence(kd, (student, teacher), 8,
                                          kwargs={'temperature': 4.0})
  np.testing.assert_allclose(vn, np.full(8, v1), rtol=1e-5)
  np.testing.assert_allclose(gn[0], g1[0], rtol=1e-4, atol=1e-7)

  feat = losses.get_loss('feature_distillation')
  s, t = _normal(16, 5), _normal(16, 5)
  cos_ref = np.mean([1 - _cos(a, b) for a, b in zip(s, t)])
  np.testing.assert_allclose(feat(s, t, kind='cosine'), cos_ref, rtol=1e-5)
  np.testing.assert_allclose(feat(s, t, kind='mse'),
                             np.mean((s - t) ** 2), rtol=1e-5)
  for kind in ('cosine', 'mse'):
    (v1, g1), (vn, gn) = device_equivalence(feat, (s, t), 8,
                                            kwargs={'kind': kind})
    np.testing.assert_allclose(vn, np.full(8, v1), rtol=1e-5)
    np.testing.assert_allclose(gn[0], g1[0], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------
# Every method trains a few steps from its smoke config.

_RUNS = {}


def _smoke(name, tmp_path_factory):
  if name in _RUNS:
    return _RUNS[name]
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.num_steps = 3
  if name == 'distill':
    # Self-distillation of the SimSiam smoke encoder (same tiny ConvNet).
    config.method.teacher_workdir = _smoke('simsiam', tmp_path_factory)[0]
  workdir = str(tmp_path_factory.mktemp(name))
  state = train.train_and_evaluate(config, workdir)
  _RUNS[name] = (workdir, state)
  return _RUNS[name]


@pytest.mark.parametrize('name', ['simsiam', 'dino', 'data2vec', 'distill'])
def test_smoke_variant_trains(name, tmp_path_factory):
  workdir, state = _smoke(name, tmp_path_factory)
  assert int(state.step) == 3 and int(state.nonfinite_steps) == 0
  rows = [json.loads(l) for l in open(f'{workdir}/metrics.jsonl')]
  assert rows and all(np.isfinite(r['loss']) for r in rows)
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(leaf))
