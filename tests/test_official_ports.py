"""Our losses and updates against ports of the official code, on 1 and 8 devices.

Each port below is the official function rewritten in jax.numpy (so that its
gradient can be taken) or NumPy, line by line, with the repository, commit,
file and lines it comes from. `replicas` in a port stands for the official
code's data-parallel processes (DDP in PyTorch, pmap in JAX): each holds a
contiguous slice of the global batch, exactly as our 8 CPU devices do, and
its cross-process operations (all_gather, all_reduce, DDP's gradient mean)
are written out. Ports of the other methods live next to their other tests
(test_losses, test_contrastive, test_clustering, test_distill, test_pretext);
`official_ports.PORTS` lists them all and the last test here fails when a
config in configs/ has none on 1 and 8 devices.
"""

import importlib
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official_ports import (CITATION, NO_OFFICIAL_CODE, PORTS,
                            official_port, port_modules)
from ssl_jax import data, losses, methods, parallel
from ssl_jax.durations import Durations
from ssl_jax.losses import crossmodal, teacher_student
from ssl_jax.methods import memory
from ssl_jax.testing import device_equivalence

N_DEV = 8


def _normal(*shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


def _slices(x, replicas):
  """The replicas' contiguous slices of a global batch (axis 0)."""
  return jnp.split(x, replicas)


def _check(ours, port, args, *, sharded=None, grad_argnums=None, kwargs=None,
           port_kwargs=None, rtol=1e-5, grad_rtol=1e-4, atol=1e-6,
           value_of=None, jit_port=True):
  """Our loss on 1 and N_DEV devices against `port(*args, replicas=R)`.

  `port` returns the scalar whose gradient the official code applies (the
  replicas' mean, DDP's gradient average); `value_of` (default: the same)
  the value our loss should report on every device. `jit_port=False` runs
  a port that reads its arguments' values (NumPy indexing) op by op.
  """
  sharded = tuple(range(len(args))) if sharded is None else tuple(sharded)
  grad_argnums = sharded if grad_argnums is None else tuple(grad_argnums)
  (v1, g1), (vn, gn) = device_equivalence(
      ours, args, N_DEV, sharded_argnums=sharded, grad_argnums=grad_argnums,
      kwargs=kwargs)
  for replicas, value, grads in ((1, v1, g1), (N_DEV, vn, gn)):
    fn = lambda *a: port(*a, replicas=replicas, **(port_kwargs or {}))
    # One compiled program: op by op, the port's per-replica loops and their
    # transposes compile hundreds of small programs.
    value_and_grad = jax.value_and_grad(fn, argnums=grad_argnums)
    want, want_grads = (jax.jit(value_and_grad) if jit_port
                        else value_and_grad)(*args)
    if value_of is not None:
      want = value_of(*args, replicas=replicas, **(port_kwargs or {}))
    np.testing.assert_allclose(
        value, np.broadcast_to(want, np.shape(value)), rtol=rtol, atol=1e-6,
        err_msg=f'value, {replicas} devices')
    for i, got, w in zip(grad_argnums, grads, want_grads):
      np.testing.assert_allclose(got, w, rtol=grad_rtol, atol=atol,
                                 err_msg=f'gradient {i}, {replicas} devices')
  return g1


# ---------------------------------------------------------------------------
# BYOL: google-deepmind/deepmind-research, JAX, pmap over replicas.

BYOL_SOURCE = ('deepmind/deepmind-research at '
               'd8df4155dc72fc3dfff9f857412168993348ca23, '
               'byol/utils/helpers.py lines 74-82 and 109-112, '
               'byol/byol_experiment.py lines 243-250 and 325')


def byol_official_l2_normalize(x, axis=None, epsilon=1e-12):
  """helpers.py lines 74-82."""
  square_sum = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(square_sum, epsilon))


def byol_official_regression_loss(x, y):
  """helpers.py lines 109-112."""
  normed_x = byol_official_l2_normalize(x, axis=-1)
  normed_y = byol_official_l2_normalize(y, axis=-1)
  return jnp.sum((normed_x - normed_y) ** 2, axis=-1)


def byol_official_loss(p1, p2, z1, z2, replicas=1):
  """byol_experiment.py lines 243-250 per replica; line 325 pmeans the
  gradients, so the applied gradient is that of the replicas' mean."""
  total = 0.0
  for p1r, p2r, z1r, z2r in zip(*(_slices(a, replicas)
                                  for a in (p1, p2, z1, z2))):
    repr_loss = byol_official_regression_loss(p1r, jax.lax.stop_gradient(z2r))
    repr_loss = repr_loss + byol_official_regression_loss(
        p2r, jax.lax.stop_gradient(z1r))
    total += jnp.mean(repr_loss) / replicas
  return total


@official_port('byol', source=BYOL_SOURCE)
def test_byol_loss_and_gradient_match_official_code():
  """BYOL's symmetric loss as methods/byol.py sums it, against
  deepmind-research byol (see BYOL_SOURCE); the target EMA is compared in
  test_distill.py::test_ema_teacher_pairs_m_t_with_the_stepped_parameters_as_official."""
  byol = losses.get_loss('byol')

  def ours(p1, p2, z1, z2, *, axis_name):
    return byol(p1, z2, axis_name=axis_name) + byol(p2, z1, axis_name=axis_name)

  args = tuple(_normal(32, 8, seed=s) for s in range(4))
  grads = _check(ours, byol_official_loss, args)
  np.testing.assert_array_equal(grads[2], 0.0)  # the target: stop-gradient


# ---------------------------------------------------------------------------
# SimSiam: facebookresearch/simsiam, PyTorch DDP.

SIMSIAM_SOURCE = ('facebookresearch/simsiam at '
                  'a7bc1772896d0dad0806c51f0bb6f3b16d290468, '
                  'main_simsiam.py lines 191 and 295, '
                  'simsiam/builder.py lines 44-61')


def simsiam_official_cosine(x1, x2, eps=1e-8):
  """nn.CosineSimilarity(dim=1) (main_simsiam.py line 191), eps 1e-8."""
  n1 = jnp.maximum(jnp.linalg.norm(x1, axis=1), eps)
  n2 = jnp.maximum(jnp.linalg.norm(x2, axis=1), eps)
  return jnp.sum(x1 * x2, axis=1) / (n1 * n2)


def simsiam_official_loss(p1, p2, z1, z2, replicas=1):
  """main_simsiam.py line 295 per DDP process; builder.py line 61 detaches
  z; DDP averages the processes' gradients."""
  total = 0.0
  for p1r, p2r, z1r, z2r in zip(*(_slices(a, replicas)
                                  for a in (p1, p2, z1, z2))):
    z1r, z2r = jax.lax.stop_gradient(z1r), jax.lax.stop_gradient(z2r)
    total += -(simsiam_official_cosine(p1r, z2r).mean() +
               simsiam_official_cosine(p2r, z1r).mean()) * 0.5 / replicas
  return total


@official_port('simsiam', source=SIMSIAM_SOURCE)
def test_simsiam_loss_and_gradient_match_official_code():
  """SimSiam's loss against facebookresearch/simsiam (SIMSIAM_SOURCE)."""
  args = tuple(_normal(32, 8, seed=10 + s) for s in range(4))
  grads = _check(losses.get_loss('simsiam'), simsiam_official_loss, args)
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)


# ---------------------------------------------------------------------------
# MoCo v2: facebookresearch/moco, PyTorch DDP. The queue is [dim, K] there,
# [K, dim] here.

MOCO_COMMIT = '7397dfe146c7ca6bbb58e9c382498069178ba764'
MOCO_SOURCE = (f'facebookresearch/moco at {MOCO_COMMIT}, moco/builder.py '
               f'lines 55-79 and 137-173, main_moco.py lines 164, 289 and 418')


def moco_official_loss(q, k, queue, replicas=1, T=0.2):
  """builder.py lines 137-168 and CrossEntropyLoss (main_moco.py line 289,
  418) per process; keys and queue carry no gradient (lines 142, 159)."""
  total = 0.0
  queue = jax.lax.stop_gradient(queue).T  # [dim, K], the official layout
  for qr, kr in zip(_slices(q, replicas), _slices(k, replicas)):
    qr = qr / jnp.linalg.norm(qr, axis=1, keepdims=True)
    kr = jax.lax.stop_gradient(kr / jnp.linalg.norm(kr, axis=1, keepdims=True))
    l_pos = jnp.einsum('nc,nc->n', qr, kr)[:, None]
    l_neg = jnp.einsum('nc,ck->nk', qr, queue)
    logits = jnp.concatenate([l_pos, l_neg], axis=1) / T
    total += -jnp.mean(jax.nn.log_softmax(logits, axis=1)[:, 0]) / replicas
  return total


def moco_official_dequeue_and_enqueue(queue, queue_ptr, keys_per_process):
  """builder.py lines 65-79: concat_all_gather, then write at the pointer.
  The keys were normalised by the key encoder's forward (line 149)."""
  keys = np.concatenate(keys_per_process)
  keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
  queue = np.array(queue.T)  # [dim, K]
  batch_size = keys.shape[0]
  ptr = int(queue_ptr)
  assert queue.shape[1] % batch_size == 0
  queue[:, ptr:ptr + batch_size] = keys.T
  ptr = (ptr + batch_size) % queue.shape[1]
  return queue.T, ptr


def moco_official_momentum_update(param_k, param_q, m):
  """builder.py lines 55-63."""
  return param_k * m + param_q * (1.0 - m)


@official_port('mocov2', source=MOCO_SOURCE)
def test_mocov2_loss_queue_and_key_encoder_match_official_code():
  """MoCo v2's InfoNCE (loss and gradient), its queue update and its key
  encoder's momentum update, against facebookresearch/moco (MOCO_SOURCE)."""
  q, k = _normal(32, 8, seed=20), _normal(32, 8, seed=21)
  queue = np.asarray(memory.init_queue(jax.random.PRNGKey(0), 64, 8)['queue'])
  grads = _check(losses.get_loss('info_nce'), moco_official_loss,
                 (q, k, queue), sharded=(0, 1), grad_argnums=(0,),
                 kwargs={'temperature': 0.2})
  assert np.abs(grads[0]).max() > 0

  # The queue: a global batch of 32 written at pointer 32 of 64.
  ptr = jnp.asarray(32, jnp.int32)
  want_queue, want_ptr = moco_official_dequeue_and_enqueue(
      queue, 32, np.split(k, N_DEV))
  one = memory.enqueue(jnp.asarray(queue), ptr, k)
  eight = jax.pmap(lambda kk: memory.enqueue(jnp.asarray(queue), ptr, kk,
                                             parallel.AXIS),
                   axis_name=parallel.AXIS)(k.reshape(N_DEV, -1, 8))
  for got_queue, got_ptr in ((one['queue'], one['queue_ptr']),
                             *zip(eight['queue'], eight['queue_ptr'])):
    np.testing.assert_allclose(got_queue, want_queue, rtol=1e-6, atol=1e-7)
    assert int(got_ptr) == want_ptr

  # The key encoder: m = 0.999 (main_moco.py line 164) towards the query
  # encoder's parameters, in the paper recipe.
  config = importlib.import_module('configs.mocov2').get_config()
  method = methods.get_method(
      config, data.DataInfo(640, (28, 28, 1), 10, (0.5,), (0.5,)),
      Durations(10, 640 // config.batch_size, config.batch_size))
  online = {n: {'w': _normal(3, 2, seed=22 + i)}
            for i, n in enumerate(('backbone', 'projector'))}
  keys = {n: {'w': _normal(3, 2, seed=24 + i)}
          for i, n in enumerate(('backbone', 'projector'))}
  m = 0.999
  assert float(method.ema_momentum(jnp.asarray(3))) == pytest.approx(m)
  want = jax.tree.map(lambda pk, pq: moco_official_momentum_update(pk, pq, m),
                      keys, online)
  state = {'key_params': keys}
  step = jnp.asarray(3, jnp.int32)
  one = method.after_update(online, state, step)['key_params']
  eight = parallel.data_parallel(method.after_update,
                                 in_specs=(parallel.P(),) * 3)(
      *parallel.put_replicated((online, state, step)))['key_params']
  for got in (one, parallel.to_host(eight)):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6),
                 got, want)


# ---------------------------------------------------------------------------
# MoCo v3: facebookresearch/moco-v3, PyTorch DDP.

MOCOV3_SOURCE = ('facebookresearch/moco-v3 at '
                 'c349e6e24f40d3fedb22d973f92defa4cedf37a7, moco/builder.py '
                 'lines 63-96')


def mocov3_official_loss(q1, q2, k1, k2, replicas=1, T=0.2):
  """builder.py lines 63-73 (`contrastive_loss`) and 96 per process:
  concat_all_gather of the keys, labels offset by N * rank; DDP averages."""
  def contrastive_loss(q, k, rank):
    q = q / jnp.linalg.norm(q, axis=1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=1, keepdims=True)
    logits = jnp.einsum('nc,mc->nm', q, k) / T
    n = logits.shape[0]
    labels = jnp.arange(n) + n * rank
    log_p = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], 1)) * (2 * T)

  k1, k2 = jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)  # no_grad
  total = 0.0
  for rank, (q1r, q2r) in enumerate(zip(_slices(q1, replicas),
                                        _slices(q2, replicas))):
    total += (contrastive_loss(q1r, k2, rank) +
              contrastive_loss(q2r, k1, rank)) / replicas
  return total


@official_port('mocov3', source=MOCOV3_SOURCE)
def test_mocov3_loss_and_gradient_match_official_code():
  """MoCo v3's symmetric loss and its gradient against moco-v3
  (MOCOV3_SOURCE); the momentum encoder's timing is compared in
  test_contrastive.py::test_moco_v3_momentum_encoder_follows_the_official_loop."""
  args = tuple(_normal(32, 8, seed=30 + s) for s in range(4))
  grads = _check(losses.get_loss('moco_v3'), mocov3_official_loss, args,
                 kwargs={'temperature': 0.2})
  np.testing.assert_array_equal(grads[2], 0.0)


# ---------------------------------------------------------------------------
# Barlow Twins: facebookresearch/barlowtwins, PyTorch DDP + SyncBatchNorm.

BARLOW_SOURCE = ('facebookresearch/barlowtwins at '
                 '8e8d284ca0bc02f88b92328e53f9b901e86b4a3c, main.py lines '
                 '180-221 (off_diagonal, BarlowTwins.forward) and 89 '
                 '(SyncBatchNorm), README.md line 60 (16 GPUs)')


def barlow_official_c(z1, z2, replicas, batch_size):
  """main.py lines 205, 212-216: an affine-free SyncBatchNorm (statistics of
  the global batch, biased variance, eps 1e-5), each process's
  bn(z1).T @ bn(z2) / batch_size, all_reduce-summed. Returns the processes'
  local terms; their sum is c."""
  def bn(z):
    mean = jnp.mean(z, axis=0)
    var = jnp.mean(jnp.square(z - mean), axis=0)
    return (z - mean) / jnp.sqrt(var + 1e-5)
  return [a.T @ b / batch_size
          for a, b in zip(_slices(bn(z1), replicas), _slices(bn(z2), replicas))]


def barlow_official_value(z1, z2, replicas=1, lambd=0.0051):
  """main.py lines 218-220 on the all-reduced c: every process's loss."""
  c = sum(barlow_official_c(z1, z2, replicas, z1.shape[0]))
  off = jnp.sum(jnp.square(c)) - jnp.sum(jnp.square(jnp.diagonal(c)))
  return jnp.sum(jnp.square(jnp.diagonal(c) - 1)) + lambd * off


def barlow_official_loss(z1, z2, replicas=1, lambd=0.0051):
  """The scalar whose gradient the official step applies.
  torch.distributed.all_reduce (line 216) is outside autograd: a process's
  backward reaches only its own term c_r of c; SyncBatchNorm's backward
  (line 89) sums the processes' gradients through the batch statistics; DDP
  then averages over the processes. Net: 1/replicas of the gradient of the
  loss."""
  terms = barlow_official_c(z1, z2, replicas, z1.shape[0])
  c = sum(terms)
  total = 0.0
  for c_r in terms:
    c_seen = c_r + jax.lax.stop_gradient(c - c_r)
    off = (jnp.sum(jnp.square(c_seen)) -
           jnp.sum(jnp.square(jnp.diagonal(c_seen))))
    total += (jnp.sum(jnp.square(jnp.diagonal(c_seen) - 1)) +
              lambd * off) / replicas
  return total


@official_port('barlow_twins', source=BARLOW_SOURCE)
def test_barlow_twins_loss_and_gradient_against_official_code():
  """Barlow Twins' loss against facebookresearch/barlowtwins
  (BARLOW_SOURCE). The value agrees on 1 and 8 devices. The gradient agrees
  on one device; on R processes the official gradient is 1/R of the loss's
  (the all_reduce of c is not differentiated) while the loss function's is
  the loss's on any device count, so the paper recipe scales the loss by
  1/16, the official run's R (README.md line 60)."""
  z1 = _normal(32, 16, seed=40)
  z2 = z1 + 0.5 * _normal(32, 16, seed=41)
  fn = losses.get_loss('barlow_twins')
  (v1, g1), (vn, gn) = device_equivalence(fn, (z1, z2), N_DEV,
                                          kwargs={'lambda_offdiag': 0.0051})
  for replicas, value, grads in ((1, v1, g1), (N_DEV, vn, gn)):
    want = barlow_official_value(z1, z2, replicas)
    np.testing.assert_allclose(value, np.broadcast_to(want, np.shape(value)),
                               rtol=1e-5)
    want_grads = jax.grad(barlow_official_loss, argnums=(0, 1))(
        z1, z2, replicas)
    for got, w in zip(grads, want_grads):
      np.testing.assert_allclose(got, replicas * np.asarray(w), rtol=1e-4,
                                 atol=1e-6)
  config = importlib.import_module('configs.barlow_twins').get_config()
  assert config.method.loss_scale == 1.0 / 16


# ---------------------------------------------------------------------------
# VICReg: facebookresearch/vicreg, PyTorch DDP with FullGatherLayer.

VICREG_SOURCE = ('facebookresearch/vicreg at '
                 '4e12602fd495af83efd1631fbe82523e6db092e0, main_vicreg.py '
                 'lines 194-220 (VICReg.forward) and 307-323 (FullGatherLayer)')


def vicreg_official_terms(x, y, replicas, sim=25.0, std=25.0, cov=1.0):
  """main_vicreg.py lines 198-219: the processes' local repr_loss and the
  std and cov terms of the gathered batch (the same on every process)."""
  repr_losses = [jnp.mean(jnp.square(a - b))
                 for a, b in zip(_slices(x, replicas), _slices(y, replicas))]
  batch_size, num_features = x.shape
  x = x - x.mean(axis=0)
  y = y - y.mean(axis=0)
  std_x = jnp.sqrt(jnp.var(x, axis=0, ddof=1) + 0.0001)
  std_y = jnp.sqrt(jnp.var(y, axis=0, ddof=1) + 0.0001)
  std_loss = (jnp.mean(jax.nn.relu(1 - std_x)) / 2 +
              jnp.mean(jax.nn.relu(1 - std_y)) / 2)
  off = lambda m: jnp.sum(jnp.square(m)) - jnp.sum(jnp.square(jnp.diagonal(m)))
  cov_x = (x.T @ x) / (batch_size - 1)
  cov_y = (y.T @ y) / (batch_size - 1)
  cov_loss = off(cov_x) / num_features + off(cov_y) / num_features
  return [sim * r for r in repr_losses], std * std_loss + cov * cov_loss


def vicreg_official_loss(x, y, replicas=1):
  """The applied gradient: FullGatherLayer's backward sums the processes'
  gradients of the gathered terms, DDP averages: the gradient of the mean
  local repr_loss plus the gathered terms."""
  local, shared = vicreg_official_terms(x, y, replicas)
  return sum(local) / replicas + shared


@official_port('vicreg', source=VICREG_SOURCE)
def test_vicreg_loss_and_gradient_match_official_code():
  """VICReg against facebookresearch/vicreg (VICREG_SOURCE). Each official
  process reports its own local repr_loss; ours reports their mean, the
  global batch's, on every device."""
  x = _normal(32, 16, seed=50)
  y = x + 0.3 * _normal(32, 16, seed=51)
  _check(losses.get_loss('vicreg'), vicreg_official_loss, (x, y),
         grad_rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Knowledge distillation: Hinton et al. 2015 released no code; the loss as in
# HobbitLong/RepDistiller (CRD), the reference implementation of KD baselines.

KD_SOURCE = ('HobbitLong/RepDistiller at '
             'b84f547c5db6a35318d4671d7d5c4de74c822403, distiller_zoo/KD.py '
             'lines 7-17 (DistillKL)')


def kd_official_loss(y_s, y_t, replicas=1, T=4.0):
  """KD.py lines 13-17 on the global batch (RepDistiller trains on one
  GPU): kl_div summed, times T^2, over the batch size."""
  p_s = jax.nn.log_softmax(y_s / T, axis=1)
  p_t = jax.lax.stop_gradient(jax.nn.softmax(y_t / T, axis=1))
  kl = jnp.sum(p_t * (jnp.log(p_t) - p_s))
  return kl * (T ** 2) / y_s.shape[0]


@official_port('distill', source=KD_SOURCE)
def test_kd_loss_and_gradient_match_repdistiller():
  """The distill method's soft loss against RepDistiller's DistillKL."""
  args = (_normal(32, 10, seed=60, scale=3.0), _normal(32, 10, seed=61,
                                                       scale=3.0))
  grads = _check(losses.get_loss('kd'), kd_official_loss, args,
                 kwargs={'temperature': 4.0})
  np.testing.assert_array_equal(grads[1], 0.0)


# ---------------------------------------------------------------------------
# Deep InfoMax: rdevon/DIM (cortex_DIM), one GPU.

DIM_SOURCE = ('rdevon/DIM at bac4765a8126746675f517c7bfa1b04b88044d51, '
              'cortex_DIM/functions/dim_losses.py lines 13-106 '
              '(fenchel_dual_loss, infonce_loss) and '
              'cortex_DIM/functions/gan_losses.py lines 22-95')


def dim_official_infonce(l, m):
  """dim_losses.py lines 62-106; l [N, units, n_locals], m [N, units, 1]."""
  N, units, n_locals = l.shape
  n_multis = m.shape[2]
  l_p = jnp.transpose(l, (0, 2, 1))
  m_p = jnp.transpose(m, (0, 2, 1))
  l_n = l_p.reshape(-1, units)
  m_n = m_p.reshape(-1, units)
  u_p = jnp.matmul(l_p, m)[:, :, None]  # [N, n_locals, 1, n_multis]
  u_n = m_n @ l_n.T
  u_n = jnp.transpose(u_n.reshape(N, n_multis, N, n_locals), (0, 2, 3, 1))
  mask = jnp.eye(N)[:, :, None, None]
  n_mask = 1 - mask
  u_n = (n_mask * u_n) - (10. * (1 - n_mask))  # mask out "self" examples
  u_n = jnp.broadcast_to(u_n.reshape(N, N * n_locals, n_multis)[:, None],
                         (N, n_locals, N * n_locals, n_multis))
  pred_lgt = jnp.concatenate([u_p, u_n], axis=2)
  pred_log = jax.nn.log_softmax(pred_lgt, axis=2)
  return -pred_log[:, :, 0].mean()


def dim_official_jsd(l, m):
  """dim_losses.py lines 13-59 with measure 'JSD' (gan_losses.py lines 39
  and 78)."""
  N, units, n_locals = l.shape
  n_multis = m.shape[2]
  l = jnp.transpose(l, (0, 2, 1)).reshape(-1, units)
  m = jnp.transpose(m, (0, 2, 1)).reshape(-1, units)
  u = m @ l.T
  u = jnp.transpose(u.reshape(N, n_multis, N, n_locals), (0, 2, 3, 1))
  mask = jnp.eye(N)
  n_mask = 1 - mask
  log_2 = np.log(2.)
  E_pos = (log_2 - jax.nn.softplus(-u)).mean(2).mean(2)
  E_neg = (jax.nn.softplus(-u) + u - log_2).mean(2).mean(2)
  E_pos = (E_pos * mask).sum() / mask.sum()
  E_neg = (E_neg * n_mask).sum() / n_mask.sum()
  return E_neg - E_pos


def dim_official_loss(g, local, replicas=1, estimator='infonce'):
  """The official code trains on one GPU: the port sees the global batch."""
  del replicas
  b, h, w, e = local.shape
  l = jnp.transpose(local.reshape(b, h * w, e), (0, 2, 1))
  m = g[:, :, None]
  fn = dim_official_infonce if estimator == 'infonce' else dim_official_jsd
  return fn(l, m)


@official_port('deep_infomax', source=DIM_SOURCE)
@pytest.mark.parametrize('estimator', ['infonce', 'jsd'])
def test_deep_infomax_loss_and_gradient_match_official_code(estimator):
  """DIM(L)'s estimators against cortex_DIM (DIM_SOURCE), the self-image
  entries of infonce's denominator included at the official -10."""
  g = _normal(16, 6, seed=70, scale=0.3)
  local = _normal(16, 2, 3, 6, seed=71, scale=0.3)
  _check(losses.get_loss('deep_infomax'), dim_official_loss, (g, local),
         kwargs={'estimator': estimator},
         port_kwargs={'estimator': estimator})


# ---------------------------------------------------------------------------
# DeepCluster-v2: facebookresearch/swav main_deepclusterv2.py, PyTorch DDP.
# (Its k-means is compared in test_clustering.py.)

DCV2_SOURCE = ('facebookresearch/swav at '
               '06b1b7cbaf6ba2a792300d79c7299db98b93b7f9, '
               'main_deepclusterv2.py lines 249 and 270-276, '
               'src/resnet50.py lines 297-305')


def dcv2_official_loss(emb, assignments, prototypes, replicas=1, T=0.1):
  """resnet50.py lines 301-305 (L2-normalised embedding times each head's
  prototype matrix) and main_deepclusterv2.py lines 270-276 per process
  (targets repeated over the crops); emb [b, crops, d], assignments [b, H],
  prototypes [H, K, d]; DDP averages."""
  total = 0.0
  for e_r, a_r in zip(_slices(emb, replicas), _slices(assignments, replicas)):
    x = jnp.swapaxes(e_r, 0, 1).reshape(-1, e_r.shape[-1])  # crop-major
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    loss = 0.0
    for h in range(prototypes.shape[0]):
      scores = x @ prototypes[h].T / T
      targets = jnp.tile(a_r[:, h], e_r.shape[1])  # .repeat(sum(nmb_crops))
      log_p = jax.nn.log_softmax(scores, axis=1)
      loss += -jnp.mean(jnp.take_along_axis(log_p, targets[:, None], 1))
    total += loss / prototypes.shape[0] / replicas
  return total


@official_port('deepclusterv2', source=DCV2_SOURCE)
def test_deepclusterv2_loss_and_gradient_match_official_code():
  """DeepCluster-v2's loss, against swav's main_deepclusterv2.py, with its
  gradient for the embeddings and the prototypes (DCV2_SOURCE)."""
  b, crops, d, heads, k = 32, 3, 8, 2, 5
  emb = _normal(b, crops, d, seed=80)
  protos = _normal(heads, k, d, seed=81)
  protos = protos / np.linalg.norm(protos, axis=-1, keepdims=True)
  assignments = np.random.default_rng(82).integers(0, k, (b, heads))

  def ours(e, a, p, *, axis_name):
    return losses.get_loss('deepclusterv2')(
        jnp.swapaxes(e, 0, 1), p, a.T, temperature=0.1, axis_name=axis_name)

  _check(ours, dcv2_official_loss, (emb, assignments, protos), sharded=(0, 1),
         grad_argnums=(0, 2))


# ---------------------------------------------------------------------------
# data2vec: facebookresearch/data2vec_vision (BEiT code base), PyTorch DDP.

DATA2VEC_SOURCE = ('facebookresearch/data2vec_vision at '
                   'af9a36349aaed59ae66e69b5dabeef2d62fdc5da, '
                   'beit/engine_for_cyclical.py lines 42-54, 66-124 and '
                   '148-149, beit/run_cyclical.py lines 222-223')


def data2vec_official_targets(layer_results, top_k, eps=1e-5):
  """engine_for_cyclical.py lines 66-99 with the ViT-B run's flags
  (target_layer_norm_last, post_target_layer_norm): the top-K blocks'
  patch tokens, F.layer_norm each, averaged, F.layer_norm again."""
  def layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(jnp.mean(jnp.square(x - mean), -1,
                                          keepdims=True) + eps)
  vals = [layer_norm(y[:, 1:]) for y in layer_results[-top_k:]]
  return layer_norm(sum(vals) / top_k)


def data2vec_official_loss(outputs, targets, mask, replicas=1, beta=2.0):
  """engine_for_cyclical.py lines 97-124 per process (var_w0 = 0): the
  masked positions' features, F.smooth_l1_loss(beta) with mean reduction;
  DDP averages. `mask` is float here, 1 where masked."""
  total = 0.0
  for o, t, m in zip(*(_slices(a, replicas) for a in (outputs, targets, mask))):
    sel = np.asarray(m, bool)
    d = o[sel] - jax.lax.stop_gradient(t[sel])
    per = jnp.where(jnp.abs(d) < beta, 0.5 * d * d / beta,
                    jnp.abs(d) - 0.5 * beta)
    total += jnp.mean(per) / replicas
  return total


@official_port('data2vec', source=DATA2VEC_SOURCE)
def test_data2vec_targets_loss_and_gradient_match_official_code():
  """data2vec's targets (built on each device from its own examples) and its
  masked smooth-L1 against data2vec_vision (DATA2VEC_SOURCE). Every image
  masks the same number of patches, as the official block masking does, so
  each process's mean is the global one."""
  blocks = [_normal(16, 7, 6, seed=90 + i, scale=3.0) for i in range(4)]
  want_targets = data2vec_official_targets(blocks, 3)
  one = teacher_student.data2vec_targets(blocks, top_k=3)
  eight = jax.pmap(lambda *bl: teacher_student.data2vec_targets(bl, top_k=3))(
      *(x.reshape(N_DEV, 2, 7, 6) for x in blocks))
  for got in (one, np.asarray(eight).reshape(16, 6, 6)):
    np.testing.assert_allclose(got, want_targets, rtol=1e-4, atol=1e-5)

  pred = _normal(16, 6, 6, seed=95, scale=2.0)
  targets = np.asarray(want_targets, np.float32)
  rng = np.random.default_rng(96)
  mask = np.stack([rng.permutation(6) < 3 for _ in range(16)]).astype(
      np.float32)

  def ours(p, t, m, *, axis_name):
    return losses.get_loss('data2vec')(p, t, m > 0.5, beta=2.0,
                                       axis_name=axis_name)

  _check(ours, data2vec_official_loss, (pred, targets, mask),
         grad_argnums=(0,), jit_port=False)

  # The teacher: after the optimizer step, e <- d e + (1 - d) m with
  # d = --ema_decay 0.9998 from the first step (ema_start_at 0; lines 42,
  # 148-149), in the paper recipe.
  config = importlib.import_module('configs.data2vec').get_config()
  method = methods.get_method(
      config, data.DataInfo(640, (224, 224, 3), 1000, (0.5,) * 3, (0.5,) * 3),
      Durations(10, 640 // config.batch_size + 1, config.batch_size))
  online = {'backbone': {'w': _normal(3, 2, seed=97)}, 'head': {'w': _normal(2)}}
  state = {'teacher_params': {'w': _normal(3, 2, seed=98)}}
  want = {'w': 0.9998 * state['teacher_params']['w'] +
               (1 - 0.9998) * online['backbone']['w']}
  for t in (0, 7):
    step = jnp.asarray(t, jnp.int32)
    one = method.after_update(online, state, step)['teacher_params']
    eight = parallel.data_parallel(method.after_update,
                                   in_specs=(parallel.P(),) * 3)(
        *parallel.put_replicated((online, state, step)))['teacher_params']
    for got in (one, parallel.to_host(eight)):
      np.testing.assert_allclose(got['w'], want['w'], rtol=1e-6)


# ---------------------------------------------------------------------------
# Rotation: gidariss/FeatureLearningRotNet, one process (DataParallel).

ROTNET_SOURCE = ('gidariss/FeatureLearningRotNet at '
                 'edafaba6561003292017d0a44272414356c959ff, dataloader.py '
                 'lines 216-226 and 266-274 (rotate_img, the four rotations '
                 'labelled 0-3), algorithms/ClassificationModel.py line 77 '
                 '(CrossEntropyLoss)')


def rotnet_official_rotate_img(img, rot):
  """dataloader.py lines 216-226, an HxWxC image."""
  if rot == 0:
    return img
  elif rot == 90:
    return np.flipud(np.transpose(img, (1, 0, 2)))
  elif rot == 180:
    return np.fliplr(np.flipud(img))
  elif rot == 270:
    return np.transpose(np.flipud(img), (1, 0, 2))
  raise ValueError(rot)


def cross_entropy_official(logits, labels, replicas=1):
  """torch.nn.CrossEntropyLoss (mean) per process; DDP averages."""
  total = 0.0
  for lg, lb in zip(_slices(logits, replicas), _slices(labels, replicas)):
    log_p = jax.nn.log_softmax(lg, axis=1)
    total += -jnp.mean(jnp.take_along_axis(log_p, lb[:, None], 1)) / replicas
  return total


@official_port('rotation', source=ROTNET_SOURCE)
def test_rotation_images_labels_loss_and_gradient_match_rotnet():
  """RotNet's four rotations and labels, and its cross entropy (with the
  gradient) on 1 and 8 devices (ROTNET_SOURCE)."""
  images = _normal(4, 5, 5, 2, seed=100)
  rotated, labels = losses.pretext.rotate_images(jnp.asarray(images))
  rotated, labels = np.asarray(rotated), np.asarray(labels)
  for k, rot in enumerate((0, 90, 180, 270)):
    for i in range(4):
      np.testing.assert_array_equal(rotated[k * 4 + i],
                                    rotnet_official_rotate_img(images[i], rot))
      assert labels[k * 4 + i] == k
  logits = _normal(32, 4, seed=101, scale=2.0)
  labels = np.tile(np.arange(4), 8)
  _check(losses.get_loss('pretext_classification'), cross_entropy_official,
         (logits, labels), grad_argnums=(0,))


# ---------------------------------------------------------------------------
# Jigsaw: facebookresearch/vissl (the maintained Noroozi & Favaro port).

JIGSAW_SOURCE = ('facebookresearch/vissl at '
                 '09270ed25a6c2cf71263d955b64cbe076d34ac45, '
                 'vissl/data/ssl_transforms/shuffle_img_patches.py lines 55-72 '
                 '(ShuffleImgPatches) and '
                 'vissl/losses/cross_entropy_multiple_output_single_target.py '
                 'lines 30-38 and 69-117 (cross entropy, mean)')


def vissl_shuffle_img_patches(input_patches, perms, perm_index):
  """shuffle_img_patches.py lines 65-72, the permutation index given."""
  shuffled = [input_patches[i] for i in perms[perm_index]]
  return np.stack(shuffled), perm_index


@official_port('jigsaw', source=JIGSAW_SOURCE)
def test_jigsaw_tiles_labels_loss_and_gradient_match_vissl():
  """Jigsaw's tile order for a labelled permutation against vissl's
  ShuffleImgPatches, and its cross entropy (with the gradient) on 1 and 8
  devices (JIGSAW_SOURCE)."""
  from ssl_jax.data import jigsaw
  rng = np.random.default_rng(110)
  images = rng.integers(0, 255, (4, 9, 9, 1)).astype(np.float32)
  perms = jigsaw.permutation_set(10)
  tiles, labels = jigsaw.jigsaw_from_set(jax.random.PRNGKey(1),
                                         jnp.asarray(images), perms,
                                         grid=3, tile_size=3)
  for b in range(4):
    cells = [images[b, r * 3:r * 3 + 3, c * 3:c * 3 + 3]
             for r in range(3) for c in range(3)]
    want, label = vissl_shuffle_img_patches(cells, np.asarray(perms),
                                            int(labels[b]))
    np.testing.assert_array_equal(np.asarray(tiles[b]), want)
  logits = _normal(32, 10, seed=111, scale=2.0)
  labels = rng.integers(0, 10, 32)
  _check(losses.get_loss('pretext_classification'), cross_entropy_official,
         (logits, labels), grad_argnums=(0,))


# ---------------------------------------------------------------------------
# PIRL: facebookresearch/vissl's NCELossWithMemory (written by PIRL's first
# author), PyTorch DDP.

VISSL_COMMIT = '09270ed25a6c2cf71263d955b64cbe076d34ac45'
PIRL_SOURCE = (f'facebookresearch/vissl at {VISSL_COMMIT}, '
               f'vissl/losses/nce_loss.py lines 122-171 (forward), 237-288 '
               f'(NCEAverage), 331-352 (update_memory), 453-484 '
               f'(NCECriterion); configs/config/pretrain/pirl/'
               f'pirl_jigsaw_4node_resnet50.yaml lines 67-85')


def vissl_nce_criterion(x, n_lem):
  """nce_loss.py lines 453-484 (eps: float32's, lemniscate's is 1e-7)."""
  eps = float(np.finfo('float32').eps)
  batch_size, K = x.shape[0], x.shape[1] - 1
  Pnt = Pns = 1 / float(n_lem)
  lnPmt = jnp.log(x[:, 0] / (x[:, 0] + K * Pnt + eps))
  lnPon = jnp.log((K * Pns) / (x[:, 1:] + K * Pns + eps))
  return -(jnp.sum(lnPmt) + jnp.sum(lnPon)) / batch_size


def vissl_pirl_loss(patches, images, memory_bank, y, noise, replicas=1,
                    T=0.07, loss_weights=(0.5, 0.5)):
  """nce_loss.py lines 122-171 per process with the PIRL config (outputs
  [patches, images], norm_embedding, loss_weights [0.5, 0.5]) and NCEAverage
  lines 237-288 with the negatives `noise` given (do_negative_sampling draws
  them; column 0 is y): one Z, computed on the first output's scores of the
  first step (norm_constant -1) from every process's batch mean. DDP
  averages the processes' gradients."""
  normalize = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
  n_lem = memory_bank.shape[0]

  def scores(emb, idx):
    weight = jax.lax.stop_gradient(memory_bank[idx])  # index_select .detach()
    return jnp.exp(jnp.einsum('bkd,bd->bk', weight, emb) / T)

  slices = list(zip(*(_slices(a, replicas) for a in (patches, images, y, noise))))
  idx = [jnp.concatenate([yr[:, None], nr], 1) for _, _, yr, nr in slices]
  # compute_partition_function (lines 274-288): gather_from_all of the
  # processes' batch means, their mean, times the memory size.
  batch_means = [jnp.mean(scores(normalize(p), i))
                 for (p, _, _, _), i in zip(slices, idx)]
  Z = jax.lax.stop_gradient(sum(batch_means) / replicas * n_lem)
  total = 0.0
  for (p, im, _, _), i in zip(slices, idx):
    loss = 0.0
    for w, out in zip(loss_weights, (p, im)):
      loss += w * vissl_nce_criterion(scores(normalize(out), i) / Z, n_lem)
    total += loss / replicas
  return total, Z


def vissl_update_memory(memory_bank, embedding, y, momentum=0.5):
  """nce_loss.py lines 188-195 and 331-352: the gathered, normalised image
  embeddings (update_mem_with_emb_index 1) moved into their rows."""
  embedding = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
  l_pos = memory_bank[y] * momentum + embedding * (1 - momentum)
  out = np.array(memory_bank)
  out[y] = l_pos / np.linalg.norm(l_pos, axis=1, keepdims=True)
  return out


@official_port('pirl', source=PIRL_SOURCE)
def test_pirl_loss_normalizer_gradient_and_bank_match_vissl():
  """PIRL's first step (Z estimated from the jigsaw term and shared with the
  image term), its gradients and its bank update, against vissl
  (PIRL_SOURCE), on 1 and 8 devices. The negatives are given: vissl draws
  them per term, we share one draw between the terms (same distribution)."""
  n, b, k, d = 200, 16, 7, 8
  config = importlib.import_module('configs.pirl').get_config()
  config.method.num_negatives = k
  method = methods.get_method(
      config, data.DataInfo(n, (28, 28, 1), 10, (0.5,), (0.5,)),
      Durations(10, n // config.batch_size + 1, config.batch_size))
  bank = np.asarray(memory.init_bank(jax.random.PRNGKey(3), n, d))
  rng = np.random.default_rng(120)
  y = rng.permutation(n)[:b]
  noise = rng.integers(0, n, (b, k))
  patches, images = _normal(b, d, seed=121), _normal(b, d, seed=122)

  def ours(p, im, yy, nz, *, axis_name):
    loss, z, _ = method.contrast(p, im, jnp.asarray(bank), yy, nz,
                                 jnp.zeros(()), axis_name)
    return loss

  def port(p, im, yy, nz, replicas=1):
    return vissl_pirl_loss(p, im, bank, yy, nz, replicas)[0]

  _check(ours, port, (patches, images, y, noise), grad_argnums=(0, 1),
         jit_port=False)
  _, z_one, _ = method.contrast(patches, images, jnp.asarray(bank), y, noise,
                                jnp.zeros(()), None)
  np.testing.assert_allclose(z_one, vissl_pirl_loss(patches, images, bank, y,
                                                    noise)[1], rtol=1e-5)
  # Once estimated, Z stays.
  _, z_kept, _ = method.contrast(patches, images, jnp.asarray(bank), y, noise,
                                 jnp.asarray(3.0), None)
  assert float(z_kept) == 3.0

  want = vissl_update_memory(bank, images, y, config.method.bank_momentum)
  one = memory.update_bank(jnp.asarray(bank), y, images,
                           config.method.bank_momentum)
  eight = jax.pmap(lambda i, e: memory.update_bank(
      jnp.asarray(bank), i, e, config.method.bank_momentum, parallel.AXIS),
                   axis_name=parallel.AXIS)(y.reshape(N_DEV, -1),
                                            images.reshape(N_DEV, -1, d))
  for got in (one, *eight):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# DeepCluster: facebookresearch/deepcluster, one sampler per epoch.

DEEPCLUSTER_SOURCE = ('facebookresearch/deepcluster at '
                      '2d1927e8e3dd272329e879e510fbbdf1b1d02d17, util.py lines '
                      '49-86 (UnifLabelSampler), main.py lines 92 and 164 '
                      '(CrossEntropyLoss)')


def deepcluster_official_indexes(N, images_lists, rs):
  """util.py lines 61-86 (generate_indexes_epoch), np.random as `rs`."""
  nmb_non_empty_clusters = sum(len(l) != 0 for l in images_lists)
  size_per_pseudolabel = int(N / nmb_non_empty_clusters) + 1
  res = np.array([])
  for i in range(len(images_lists)):
    if len(images_lists[i]) == 0:
      continue
    indexes = rs.choice(images_lists[i], size_per_pseudolabel,
                        replace=(len(images_lists[i]) <= size_per_pseudolabel))
    res = np.concatenate((res, indexes))
  rs.shuffle(res)
  res = list(res.astype('int'))
  if len(res) >= N:
    return res[:N]
  res += res[: (N - len(res))]
  return res


@official_port('deepcluster', source=DEEPCLUSTER_SOURCE,
               differs='an epoch of the official uniform-over-clusters '
                       'sampler is replaced by its expectation: every image '
                       'once, weighted 1/|cluster| (losses/clustering.py)')
def test_deepcluster_loss_is_the_official_sampler_in_expectation():
  """DeepCluster's weighted cross entropy (value and gradient, 1 and 8
  devices) against the official epoch: images drawn by UnifLabelSampler,
  then the mean cross entropy (DEEPCLUSTER_SOURCE). Ours is the sampler's
  expectation: the port's counts, averaged over 3000 epochs, agree to Monte
  Carlo precision."""
  n, k = 32, 4
  labels = np.random.default_rng(130).choice(k, n, p=[0.5, 0.3, 0.2, 0.0])
  logits = _normal(n, k, seed=131, scale=2.0)
  images_lists = [np.flatnonzero(labels == c) for c in range(k)]
  counts = np.bincount(labels, minlength=k).astype(np.float32)
  # The method's weights (methods/deepcluster.py): 1/|c|, 0 for empty ones.
  weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
  rs = np.random.RandomState(132)
  draws = np.zeros(n)
  epochs = 3000
  for _ in range(epochs):
    np.add.at(draws, deepcluster_official_indexes(n, images_lists, rs), 1.0)
  expected_counts = draws / epochs

  def port(lg, lb, replicas=1):
    del replicas  # one process per epoch's CE mean over the sampled images
    ce = -jnp.take_along_axis(jax.nn.log_softmax(lg, 1), lb[:, None], 1)[:, 0]
    return jnp.sum(expected_counts * ce) / n

  def ours(lg, lb, *, axis_name):
    return losses.get_loss('deepcluster')(lg, lb, jnp.asarray(weights),
                                          axis_name=axis_name)

  (v1, g1), (vn, gn) = device_equivalence(ours, (logits, labels), N_DEV,
                                          grad_argnums=(0,))
  want, want_grad = jax.value_and_grad(port)(logits, labels)
  for value, grads in ((v1, g1), (vn, gn)):
    np.testing.assert_allclose(value, np.broadcast_to(want, np.shape(value)),
                               rtol=0.02)
    np.testing.assert_allclose(grads[0], want_grad, rtol=0.1, atol=2e-3)


DEEPCLUSTER_PCA_SOURCE = ('facebookresearch/deepcluster at '
                          '2d1927e8e3dd272329e879e510fbbdf1b1d02d17, '
                          'clustering.py lines 76-88 (preprocess_features)')


def deepcluster_official_preprocess_features(npdata, pca=256):
  """clustering.py lines 76-88 in NumPy (float64): faiss
  PCAMatrix(ndim, pca, eigen_power=-0.5) trained on `npdata` and applied to
  it (mean-centre, eigenvectors of the scatter matrix, largest first, each
  output scaled by eigenvalue ** -0.5), then each row divided by its norm."""
  x = npdata.astype(np.float64)
  mean = x.mean(0)
  xc = x - mean
  scatter = xc.T @ xc  # faiss: sum over the points, not divided by n
  eigenvalues, eigenvectors = np.linalg.eigh(scatter)
  order = np.argsort(eigenvalues)[::-1][:pca]
  out = xc @ (eigenvectors[:, order] * eigenvalues[order] ** -0.5)
  row_sums = np.linalg.norm(out, axis=1)
  return out / row_sums[:, np.newaxis]


@official_port('deepcluster', source=DEEPCLUSTER_PCA_SOURCE)
@pytest.mark.parametrize('dim', [256, 24])
def test_deepcluster_feature_preprocessing_matches_official_code(dim):
  """PCA-whitening + L2 of the clustered features (losses.clustering
  pca_whiten, used by methods/deepcluster.py) against the official
  preprocess_features, on 1 device and on 8 with padding rows masked out:
  the statistics are those of the global points. Eigenvector signs are
  arbitrary in both, so the Gram matrix of the rows is compared; dim 256 of
  320-d features reduces, dim 24 of 16-d features whitens only (min(dim, d),
  the rule of configs/deepcluster.py)."""
  from ssl_jax.losses import clustering
  d = 320 if dim == 256 else 16
  n = 512
  rng = np.random.default_rng(140)
  # Anisotropic, correlated features with a mean, like a network's outputs.
  basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
  x = (rng.normal(size=(n, d)) * np.linspace(3.0, 0.3, d)) @ basis.T + 2.0
  x = x.astype(np.float32)
  want = deepcluster_official_preprocess_features(x, pca=dim)
  assert want.shape == (n, min(dim, d))

  one = np.asarray(jax.jit(lambda x: clustering.pca_whiten(x, dim))(x))
  # 8 devices, each with 8 padding rows of garbage that the mask drops.
  per = n // N_DEV
  pad = 8
  xs = np.concatenate([x.reshape(N_DEV, per, d),
                       np.full((N_DEV, pad, d), 50.0, np.float32)], 1)
  masks = np.concatenate([np.ones((N_DEV, per)), np.zeros((N_DEV, pad))], 1)
  eight = np.asarray(jax.pmap(
      lambda x, m: clustering.pca_whiten(x, dim, mask=m,
                                         axis_name=parallel.AXIS),
      axis_name=parallel.AXIS)(xs, masks))[:, :per].reshape(n, -1)
  for devices, got in ((1, one), (N_DEV, eight)):
    assert got.shape == want.shape, devices
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got @ got.T, want @ want.T, atol=5e-5,
                               err_msg=f'{devices} devices')


# ---------------------------------------------------------------------------
# Relative position: cdoersch/deepcontext (Caffe, one GPU).

DEEPCONTEXT_SOURCE = ('cdoersch/deepcontext at '
                      '5307282c82fd2aae8e6c2e76ba0573eba7ada784, train.py '
                      'lines 82 (SoftmaxWithLoss, normalization NONE), '
                      '121-131 (sample_patch), 218-249 (pairs, pos2lbl)')


def deepcontext_pos2lbl(pos):
  """train.py lines 240-249: an (x, y) offset to a label in 0..7."""
  posx, posy = pos
  if posy == -1:
    return posx + 1
  elif posy == 0:
    return (posx + 7) // 2
  assert posy == 1
  return posx + 6


def deepcontext_patch_corner(x, y, gridstartx, gridstarty, patch_sz, gap,
                             noise):
  """train.py lines 121-131 with the random jitter `noise` (dx, dy) given."""
  return (gridstartx + x * (patch_sz + gap) + noise[0],
          gridstarty + y * (patch_sz + gap) + noise[1])


def deepcontext_loss(logits, labels, replicas=1):
  """SoftmaxWithLoss with normalization NONE (line 82): the sum over the
  batch of pairs, on one GPU."""
  del replicas
  log_p = jax.nn.log_softmax(logits, 1)
  return -jnp.sum(jnp.take_along_axis(log_p, labels[:, None], 1))


@official_port('relative_position', source=DEEPCONTEXT_SOURCE,
               differs='the cross entropy is averaged over the batch, not '
                       'summed (the learning rate absorbs the batch size; '
                       'configs/relative_position.py)')
def test_relative_position_labels_patches_and_loss_match_deepcontext():
  """The label of each neighbour, where its patch is cut, and the loss
  (value and gradient on 1 and 8 devices, up to the batch-size factor)
  against Doersch et al.'s deepcontext (DEEPCONTEXT_SOURCE)."""
  from ssl_jax.losses import pretext
  patch, gap, jitter = 4, 2, 1
  image = np.arange(20 * 20, dtype=np.float32).reshape(20, 20, 1)
  origin = np.array([1, 2])  # (y, x) of the jitter-margin corner
  for label, (dy, dx) in enumerate(pretext.NEIGHBOUR_OFFSETS):
    # deepcontext's pair [centre j, neighbour] carries pos2lbl of the
    # neighbour's (x, y) offset from the centre (lines 225-231).
    assert deepcontext_pos2lbl((dx, dy)) == label
    jc, jn = np.array([1, -1]), np.array([-1, 0])
    centre, neighbour = pretext.relative_position_pair(
        jnp.asarray(image), label, jnp.asarray(origin), jnp.asarray(jc),
        jnp.asarray(jn), patch_size=patch, gap=gap, jitter=jitter)
    start = origin + jitter  # deepcontext's gridstart (y, x)
    for got, (gx, gy), noise in ((centre, (1, 1), jc),
                                 (neighbour, (1 + dx, 1 + dy), jn)):
      x0, y0 = deepcontext_patch_corner(gx, gy, start[1], start[0], patch,
                                        gap, (noise[1], noise[0]))
      np.testing.assert_array_equal(got, image[y0:y0 + patch, x0:x0 + patch])
  logits = _normal(32, 8, seed=140, scale=2.0)
  labels = np.random.default_rng(141).integers(0, 8, 32)
  fn = losses.get_loss('pretext_classification')
  (v1, g1), (vn, gn) = device_equivalence(fn, (logits, labels), N_DEV,
                                          grad_argnums=(0,))
  want, want_grad = jax.value_and_grad(deepcontext_loss)(logits, labels)
  for value, grads in ((v1, g1), (vn, gn)):
    np.testing.assert_allclose(value * 32, np.broadcast_to(want,
                                                           np.shape(value)),
                               rtol=1e-5)
    np.testing.assert_allclose(grads[0] * 32, want_grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# AVID+CMA: facebookresearch/AVID-CMA, PyTorch DDP.

AVID_COMMIT = '4538e404c79eb1b7459122a31508d918038705fd'
AVID_SOURCE = (f'facebookresearch/AVID-CMA at {AVID_COMMIT}, '
               f'criterions/avid_cma.py lines 51-70 (CMASampler), 150-209 '
               f'(forward, memory_sampling), 297-301 and 325-359 (AVID_CMA); '
               f'criterions/nce.py lines 21-57 (NCECriterion); '
               f'criterions/avid.py lines 82-130 (sample_negatives, '
               f'update_memory)')


def avid_official_update_memory(view1_mem, view2_mem, video_emb, audio_emb,
                                y, momentum=0.5):
  """avid.py lines 103-130: gathered, L2-normalised embeddings (they arrive
  normalised from forward, avid_cma.py lines 152-153) into both banks."""
  out = []
  for mem, emb in ((view1_mem, video_emb), (view2_mem, audio_emb)):
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    l_pos = mem[y] * momentum + emb * (1 - momentum)
    mem = np.array(mem)
    mem[y] = l_pos / np.linalg.norm(l_pos, axis=1, keepdims=True)
    out.append(mem)
  return out


def avid_official_consensus(video_mem, audio_mem, pos_k):
  """avid_cma.py lines 51-70, type 'consensus': min of the two cosine
  similarities, top pos_k + 1, the first (self) dropped, sorted."""
  similarity = np.minimum(video_mem @ video_mem.T, audio_mem @ audio_mem.T)
  pos_idx = np.argsort(-similarity, axis=1, kind='stable')[:, :pos_k + 1]
  return np.sort(pos_idx[:, 1:], axis=1)


def avid_official_memory_sampling(pos_idx, rand_idx):
  """avid_cma.py lines 204-207: draws from memory_size - pos_k rows shifted
  past the (sorted) positives below them."""
  ref = pos_idx - np.arange(pos_idx.shape[1])[None]
  return rand_idx + (rand_idx[:, :, None] >= ref[:, None, :]).sum(2)


def avid_official_scores(video_emb, audio_emb, view1_mem, view2_mem, y,
                         pos_idx, neg_idx, T=0.07, num_negatives_within=None):
  """avid_cma.py lines 150-190 (xModalInst, wModalPos): scores / T."""
  normalize = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
  v, a = normalize(video_emb), normalize(audio_emb)
  mems = lambda mem, idx: jax.lax.stop_gradient(jnp.asarray(mem)[idx])
  compute = lambda ctx, trgs: [jnp.einsum('bkd,bd->bk', t, ctx) / T
                               for t in trgs]
  video_neg, audio_neg = mems(view1_mem, neg_idx), mems(view2_mem, neg_idx)
  return {
      'inst-v2a': compute(v, [mems(view2_mem, y)[:, None], audio_neg]),
      'inst-a2v': compute(a, [mems(view1_mem, y)[:, None], video_neg]),
      'pos-v2v': compute(v, [mems(view1_mem, pos_idx),
                             video_neg[:, :num_negatives_within]]),
      'pos-a2a': compute(a, [mems(view2_mem, pos_idx),
                             audio_neg[:, :num_negatives_within]])}


def avid_official_nce(scores_pos, scores_neg, avg_exp_score):
  """nce.py lines 38-57 with the partition function given."""
  K = scores_neg.shape[1]
  exp_scores_pos, exp_scores_neg = jnp.exp(scores_pos), jnp.exp(scores_neg)
  Pmt = exp_scores_pos / (exp_scores_pos + K * avg_exp_score)
  lnPmtSum = -jnp.log(Pmt).mean(-1)
  Pon = (K * avg_exp_score) / (exp_scores_neg + K * avg_exp_score)
  lnPonSum = -jnp.log(Pon).sum(-1)
  return (lnPmtSum + lnPonSum).mean()


def avid_official_loss(video, audio, view1_mem, view2_mem, y, pos_idx,
                       neg_idx, replicas=1, z=-1.0, num_negatives_within=None,
                       coeffs=(1.0, 1.0)):
  """AVID_CMA.forward (avid_cma.py lines 325-359) per process: one
  NCECriterion whose Z, when unset (avg_exp_score -1), the first scored term
  (inst-v2a) estimates from every process's batch mean (nce.py lines 21-36);
  coefficients normalised to sum 1 (lines 297-301). DDP averages the
  processes' gradients."""
  slices = list(zip(*(_slices(jnp.asarray(x), replicas)
                      for x in (video, audio, y, pos_idx, neg_idx))))
  scores = [avid_official_scores(v, a, view1_mem, view2_mem, yy, p, n,
                                 num_negatives_within=num_negatives_within)
            for v, a, yy, p, n in slices]
  if z <= 0:
    z = jax.lax.stop_gradient(sum(
        jnp.mean(jnp.exp(s['inst-v2a'][1])) for s in scores) / replicas)
  x_coeff, w_coeff = (c / sum(coeffs) for c in coeffs)
  total = 0.0
  for s in scores:
    inst = sum(avid_official_nce(*s[k], z) / 2 for k in ('inst-v2a', 'inst-a2v'))
    pos = sum(avid_official_nce(*s[k], z) / 2 for k in ('pos-v2v', 'pos-a2a'))
    total += (inst * x_coeff + pos * w_coeff) / replicas
  return total, z


@official_port('avid_cma', source=AVID_SOURCE)
def test_avid_cma_loss_sets_negatives_gradients_and_banks_match_official_code():
  """The official AVID+CMA step on 1 and 8 devices (AVID_SOURCE): the
  consensus positive sets, the negative sampler, the NCE loss with Z
  estimated on the first step (then kept), its gradients, and both banks'
  update. The negatives are given to both sides (the official AliasMethod
  draws them; ours draws the same distribution with the step's key)."""
  n, b, k, p, d, within = 64, 16, 12, 4, 6, 5
  rng = np.random.default_rng(150)
  banks = [np.asarray(memory.init_bank(jax.random.PRNGKey(s), n, d))
           for s in (4, 5)]
  y = rng.permutation(n)[:b]
  video, audio = _normal(b, d, seed=151), _normal(b, d, seed=152)

  positive_set = np.asarray(crossmodal.consensus_positives(
      jnp.asarray(banks[0]), jnp.asarray(banks[1]), p, chunk=24))
  np.testing.assert_array_equal(positive_set,
                                avid_official_consensus(*banks, p))
  pos_idx = positive_set[y]
  key = jax.random.PRNGKey(7)
  neg_idx = np.asarray(crossmodal.sample_negatives(key, n, k,
                                                   jnp.asarray(pos_idx)))
  draw = np.asarray(jax.random.randint(key, (b, k), 0, n - p))
  np.testing.assert_array_equal(
      neg_idx, avid_official_memory_sampling(pos_idx, draw))
  assert not (neg_idx[:, :, None] == pos_idx[:, None, :]).any()
  # AVID alone (avid.py lines 82-86): the example itself is skipped.
  avid_neg = np.asarray(crossmodal.sample_negatives(key, n, k,
                                                    jnp.asarray(y)[:, None]))
  draw = np.asarray(jax.random.randint(key, (b, k), 0, n - 1))
  np.testing.assert_array_equal(
      avid_neg, np.where(draw >= y[:, None], draw + 1, draw))

  vb, ab = (jnp.asarray(x) for x in banks)
  for z in (-1.0, 3.0):
    def ours(v, a, yy, pi, ni, *, axis_name, z=z):
      return crossmodal.avid_cma_nce(
          v, a, vb, ab, yy, ni, z, positives=pi, num_negatives_within=within,
          axis_name=axis_name)[0]

    def port(v, a, yy, pi, ni, replicas=1, z=z):
      return avid_official_loss(v, a, banks[0], banks[1], yy, pi, ni,
                                replicas, z, within)[0]

    _check(ours, port, (video, audio, y, pos_idx, neg_idx),
           grad_argnums=(0, 1))
  _, aux = crossmodal.avid_cma_nce(video, audio, vb, ab, y, neg_idx, -1.0,
                                   positives=pos_idx,
                                   num_negatives_within=within)
  np.testing.assert_allclose(aux['z'], avid_official_loss(
      video, audio, *banks, y, pos_idx, neg_idx, 1, -1.0, within)[1],
                             rtol=1e-5)

  want = avid_official_update_memory(*banks, video, audio, y)
  for bank, emb, w in zip(banks, (video, audio), want):
    one = memory.update_bank(jnp.asarray(bank), y, emb, 0.5)
    eight = jax.pmap(lambda i, e: memory.update_bank(
        jnp.asarray(bank), i, e, 0.5, parallel.AXIS),
                     axis_name=parallel.AXIS)(y.reshape(N_DEV, -1),
                                              emb.reshape(N_DEV, -1, d))
    for got in (one, *eight):
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# The registry: every config has an official-port test on 1 and 8 devices.

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')
CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                      if f.endswith('.py') and f not in ('__init__.py',
                                                         'common.py'))


def _registered():
  for name in port_modules():
    importlib.import_module(name)
  return PORTS


def test_every_config_has_an_official_port():
  """Fails if a method is left without a test against its official code
  (or, for NO_OFFICIAL_CODE, its paper) on 1 and on 8 devices, or if a
  registered test's citation cannot be followed to the exact lines."""
  ports = _registered()
  missing = [n for n in CONFIG_NAMES
             if not {1, N_DEV} <= {d for p in ports.get(n, ()) for d in p.devices}]
  assert not missing, (f'No official-port test on 1 and {N_DEV} devices for: '
                       f'{missing}; see tests/official_ports.py.')
  unknown = sorted(set(ports) - set(CONFIG_NAMES))
  assert not unknown, f'Ports registered for unknown configs: {unknown}'
  for name, entries in ports.items():
    for port in entries:
      if name in NO_OFFICIAL_CODE:
        assert 'released no code' in port.source, port
      else:
        assert CITATION.search(port.source), (
            f'{port.test}: cite "owner/repo at <commit>, <file> lines N", '
            f'got {port.source!r}')
      module, fn_name = port.test.split('::')
      fn = getattr(importlib.import_module(module), fn_name)
      if N_DEV in port.devices:
        # The test must run something on several devices.
        assert any(s in inspect.getsource(fn) for s in (
            'device_equivalence', 'pmap', 'data_parallel', '_check(',
            '_kmeans_1_and_8', 'N_DEV', '_assert_devices')), port.test


def test_the_registry_catches_a_method_left_untested():
  ports = {n: v for n, v in _registered().items() if n != 'simclr'}
  missing = [n for n in CONFIG_NAMES
             if not {1, N_DEV} <= {d for p in ports.get(n, ()) for d in p.devices}]
  assert missing == ['simclr']
