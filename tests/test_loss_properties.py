"""Property tests for every registered loss, driven by one table.

LOSS_CASES maps each name in `ssl_jax.losses.LOSSES` to a
`ssl_jax.testing.LossCase`; `test_every_registered_loss_is_in_the_table`
fails when a registered loss has no entry. An entry is usually three lines:

    # Collapse: all 2N - 1 logits of a query are equal.
    'my_loss': LossCase(strategies.view_pairs, hyper={'temperature': 0.1},
                        collapse_value=lambda z1, z2: np.log(2 * len(z1) - 1),
                        anti_collapse=True),

The fields (all but the first optional; see LossCase's docstring):
  inputs          a strategy factory called with batch_sizes= and dims=,
                  returning the loss's positional arguments: strategies.
                  view_pairs, functools.partial(strategies.views, 2,
                  shared_rows=(24,)) for a shared queue, strategies.multi_crop,
                  or a builder below (_nce_inputs, _dino_inputs ...).
  hyper           keyword hyper-parameters of the loss (hashable values).
  collapse_value  the loss when every embedding is the same vector (a float or
                  a function of the collapsed inputs); None: no collapse check.
  anti_collapse   True when the loss has an explicit anti-collapse term
                  (negatives, variance, decorrelation): near collapse its
                  gradient must spread the embeddings.
  skip            properties that do not hold by design, with the reason in a
                  comment: 'symmetry' (asymmetric roles), 'scale' (no input
                  normalisation), 'permutation' ...
  batch_axes      per argument, the axis indexing examples, or None for a
                  shared one (queue, bank, prototypes, center): not permuted,
                  not split over devices. Default: axis 0 of everything.
  swap            what 'symmetry' exchanges: (0, 1) by default, pairs such as
                  ((0, 1), (2, 3)), or swap_crops(...) for crop stacks.
  symmetric_gradients, scale_argnums, collapse_argnums, view_argnums,
  tolerances      rarer overrides (LossCase's docstring).

Each (loss, property) pair is one Hypothesis test (`check_property`) over
SHAPES: one shape in CI, so that a loss compiles once per dtype (the checks
cache their jitted functions and run them at XLA optimisation level 0);
'devices' compares 2, 4 and 8 devices with 1. HYPOTHESIS_PROFILE=ci (the
default, 15 examples, a third of that for 'jit' and 'devices') or thorough
(300 examples and more shapes).

Below the table: the strategies' own tests, planted bugs that the toolkit must
catch, and the worked example of the README ("Writing property tests for your
loss").
"""

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssl_jax import losses, parallel
from ssl_jax.losses import clustering
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.testing import (LossCase, check_collapse, check_device_equivalence,
                             check_permutation_invariance, check_property,
                             check_view_symmetry, strategies, swap_crops)

THOROUGH = os.environ.get('HYPOTHESIS_PROFILE') == 'thorough'
# Batches divide by 8 devices; dimension 3 (thorough) is the small-d corner.
SHAPES = ({'batch_sizes': (8, 16), 'dims': (3, 8)} if THOROUGH
          else {'batch_sizes': (16,), 'dims': (8,)})


# ---------------------------------------------------------------------------
# Input builders for losses that take more than views of one batch.


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@st.composite
def _nce_inputs(draw, num_noise=4, **shapes):
  """(features, own bank rows, [b, m, d] bank rows of m noise samples)."""
  features, own = draw(strategies.view_pairs(**shapes))
  rng = np.random.default_rng(draw(strategies.SEEDS))
  b, d = features.shape
  return features, _unit(own), _unit(rng.normal(size=(b, num_noise, d)))


@st.composite
def _bank_inputs(draw, extra_rows=24, **shapes):
  """(features, own bank rows, the bank: own rows plus others), unit rows."""
  features, own = draw(strategies.view_pairs(**shapes))
  rng = np.random.default_rng(draw(strategies.SEEDS))
  own = _unit(own)
  others = _unit(rng.normal(size=(extra_rows, own.shape[1])))
  return features, own, np.concatenate([own, others])


@st.composite
def _swav_inputs(draw, **shapes):
  """([crops, b, d] embeddings, [K, d] unit prototypes).

  Unit prototypes: the loss takes them as stored, and SwAV stores them
  normalised (re-normalised before each step, outside the gradient).
  """
  z, prototypes = draw(strategies.multi_crop(2, 2, stacked=True,
                                             shared_rows=(5,), **shapes))
  return z, _unit(prototypes).astype(prototypes.dtype)


@st.composite
def _mochi_inputs(draw, queue_rows=24, **shapes):
  """(queries, keys, queue, raw PRNG key shared by every device)."""
  q, k, queue = draw(strategies.views(2, shared_rows=(queue_rows,), **shapes))
  # A raw threefry key is uint32 [0, seed], what jax.random.PRNGKey(seed) is.
  key = np.array([0, draw(strategies.SEEDS)], np.uint32)
  return q, k, queue, key


@st.composite
def _dino_inputs(draw, **shapes):
  """(student [4, b, K] crops, teacher [2, b, K] global crops, center [K])."""
  student, = draw(strategies.multi_crop(2, 2, stacked=True, **shapes))
  rng = np.random.default_rng(draw(strategies.SEEDS))
  s = np.asarray(student, np.float64)
  teacher = s[:2] + 0.1 * np.std(s) * rng.normal(size=s[:2].shape)
  center = np.mean(teacher, axis=(0, 1))
  return student, teacher.astype(np.float32), center.astype(np.float32)


@st.composite
def _deepcluster_inputs(draw, **shapes):
  """(logits [b, K], pseudo-labels [b], cluster weights 1/|cluster| [K])."""
  logits = draw(strategies.embeddings(**shapes))
  rng = np.random.default_rng(draw(strategies.SEEDS))
  b, k = logits.shape
  labels = rng.integers(0, k, size=b)
  weights = 1.0 / np.maximum(np.bincount(labels, minlength=k), 1)
  return logits, labels.astype(np.int32), weights.astype(np.float32)


@st.composite
def _deepclusterv2_inputs(draw, num_prototypes=5, **shapes):
  """(embeddings [2, b, d], prototypes [2, K, d], k-means labels [2, b])."""
  z, protos = draw(strategies.multi_crop(
      2, 0, stacked=True, shared_rows=(2 * num_prototypes,), **shapes))
  protos = protos.reshape(2, num_prototypes, -1)
  labels = np.argmax(np.einsum('vbd,vkd->vbk', _unit(z), _unit(protos)), -1)
  return z, protos, labels.astype(np.int32)


@st.composite
def _data2vec_inputs(draw, batch_sizes, dims, tokens=4):
  """(predictions [b, N, D], targets [b, N, D], mask [b, N] bool)."""
  pred, target = draw(strategies.view_pairs(
      batch_sizes=batch_sizes, dims=tuple(tokens * d for d in dims)))
  rng = np.random.default_rng(draw(strategies.SEEDS))
  b = pred.shape[0]
  mask = rng.random((b, tokens)) < 0.5
  return pred.reshape(b, tokens, -1), target.reshape(b, tokens, -1), mask


@st.composite
def _pretext_inputs(draw, **shapes):
  """(logits [b, C], pretext labels [b] int), C = the drawn dimension."""
  logits = draw(strategies.embeddings(**shapes))
  rng = np.random.default_rng(draw(strategies.SEEDS))
  labels = rng.integers(0, logits.shape[1], size=logits.shape[0])
  return logits, labels.astype(np.int32)


@st.composite
def _cpc_inputs(draw, batch_sizes, dims, rows=3, cols=2, offsets=(1, 2)):
  """(predictions [b, K, rows, cols, d], targets [b, rows, cols, d]).

  Prediction k at row i is a noisy view of the target `offsets[k]` rows
  below (rolled, so rows past the grid's end hold unused values).
  """
  target, *preds = draw(strategies.views(
      1 + len(offsets), batch_sizes=batch_sizes,
      dims=tuple(rows * cols * d for d in dims)))
  b = target.shape[0]
  grid = lambda x: x.reshape(b, rows, cols, -1)
  preds = [np.roll(grid(p), -o, axis=1) for p, o in zip(preds, offsets)]
  return np.stack(preds, axis=1), grid(target)


@st.composite
def _infomax_inputs(draw, h=2, w=2, **shapes):
  """(global [b, e], local [b, h, w, e]): views of one image per example."""
  g, *local = draw(strategies.views(1 + h * w, **shapes))
  local = np.stack(local, axis=1)
  return g, local.reshape(local.shape[0], h, w, -1)


@st.composite
def _cma_inputs(draw, num_candidates=12, **shapes):
  """(video, audio [b, d], video/audio candidate rows [K, d], mask [b, K]).

  Positive rates up to 1: a query whose candidates are all positives has
  no negatives (num_neighbours >= K), a query with none adds nothing.
  """
  v, a, vc, ac = draw(strategies.views(
      2, shared_rows=(num_candidates, num_candidates), **shapes))
  rng = np.random.default_rng(draw(strategies.SEEDS))
  rate = draw(st.sampled_from((0.1, 0.4, 1.0)))
  return v, a, vc, ac, rng.random((len(v), num_candidates)) < rate


def _nce_collapse(features, own, noise, *, temperature, normalizer, num_data):
  # Every row is c: v.m = |c| for all rows (v normalised, bank rows not), so
  # the positive and the m noise samples share one logit s (Wu et al. eq. 6-7).
  m = noise.shape[1]
  # The official criterion's eps (lemniscate.pytorch NCECriterion.py) sits in
  # both denominators.
  s = np.linalg.norm(np.asarray(own[0], np.float64)) / temperature - np.log(normalizer)
  log_noise = np.log(m / num_data)
  log_noise_eps = np.log(m / num_data + 1e-7)
  return (-(s - np.logaddexp(s, log_noise_eps)) -
          m * (log_noise - np.logaddexp(s, log_noise_eps)))


def _dino_collapse(student, teacher, center, *, student_temperature):
  # Centred teacher = 0: a uniform target; the student is softmax(c / tau_s).
  s = np.asarray(student[0, 0], np.float64) / student_temperature
  return float(np.log(np.sum(np.exp(s - s.max()))) + s.max() - np.mean(s))


def _swav_collapse(z, prototypes, *, temperature):
  # Identical rows get uniform codes from Sinkhorn; every crop predicts
  # softmax(s / tau) with s the cosines of the shared row to the prototypes.
  s = np.asarray(prototypes, np.float64) @ _unit(z[0, 0]).astype(np.float64)
  s = s / temperature
  return float(np.log(np.sum(np.exp(s - s.max()))) + s.max() - np.mean(s))


def _pretext_collapse(logits, labels):
  # Every row is the same logit vector c: the cross entropy of a constant
  # prediction, averaged over the labels.
  c = np.asarray(logits[0], np.float64)
  lse = np.log(np.sum(np.exp(c - c.max()))) + c.max()
  return float(np.mean(lse - c[np.asarray(labels)]))


def _cma_collapse(v, a, vc, ac, mask):
  # All logits equal: each positive against M_i negatives gives log(1 + M_i);
  # video and audio terms, over the queries with a positive.
  mask = np.asarray(mask)
  has = mask.any(axis=1)
  if not has.any():
    return 0.0
  negatives = np.sum(~mask, axis=1)[has]
  return float(2 * np.mean(np.log1p(negatives)))


NCE_HYPER = {'temperature': 0.07, 'normalizer': 1e3, 'num_data': 100}
MOCHI_HYPER = {'temperature': 0.2, 'num_hard': 8, 'num_mix_negatives': 4,
               'num_mix_queries': 2}
DINO_HYPER = {'student_temperature': 0.1, 'teacher_temperature': 0.04}
SWAV_HYPER = {'temperature': 0.1, 'epsilon': 0.05, 'sinkhorn_iterations': 3,
              'num_global_crops': 2}
FOUR_VIEWS = functools.partial(strategies.views, 4)
# (q1, q2, k1, k2) and (p1, p2, z1, z2): swapping the views swaps both pairs.
SWAP_PAIRS = ((0, 1), (2, 3))


# ---------------------------------------------------------------------------
# The table.


LOSS_CASES = {
    # --- contrastive -------------------------------------------------------
    # Collapse: all 2N - 1 logits of a query are equal, each query's loss is
    # log(2N - 1), and an image's loss sums its two queries (official code).
    'nt_xent': LossCase(strategies.view_pairs, hyper={'temperature': 0.2},
                        collapse_value=lambda z1, z2: 2 * np.log(2 * len(z1) - 1),
                        anti_collapse=True),
    # Queries and positive keys per example; the negative queue is shared.
    # Asymmetric roles (queries vs a fixed queue): no 'symmetry'.
    'info_nce': LossCase(functools.partial(strategies.views, 2, shared_rows=(24,)),
                         hyper={'temperature': 0.2}, batch_axes=(0, 0, None),
                         collapse_value=lambda q, k, neg: np.log(len(neg) + 1),
                         anti_collapse=True, skip=frozenset({'symmetry'})),
    # ctr(q1, k2) + ctr(q2, k1), each 2 tau log N at collapse.
    'moco_v3': LossCase(FOUR_VIEWS, hyper={'temperature': 0.2}, swap=SWAP_PAIRS,
                        collapse_value=lambda q1, q2, k1, k2: 0.8 * np.log(len(q1)),
                        anti_collapse=True),
    # Synthetic negatives draw their randomness from fold_in(key, position in
    # the global batch): a permuted batch mixes other negatives, by design.
    # Its mixing weights are drawn in the default float dtype, so x64 mode
    # draws other weights: the float64 check cannot compare the two runs.
    'mochi': LossCase(_mochi_inputs, hyper=MOCHI_HYPER,
                      batch_axes=(0, 0, None, None),
                      collapse_value=lambda q, k, queue, key: np.log(1 + len(queue) + 6),
                      anti_collapse=True,
                      skip=frozenset({'permutation', 'symmetry', 'float64'})),
    # Only the features are normalised (bank rows are used as stored).
    'nce': LossCase(_nce_inputs, hyper=NCE_HYPER, scale_argnums=(0,),
                    collapse_value=functools.partial(_nce_collapse, **NCE_HYPER),
                    anti_collapse=True, view_argnums=(0, 1),
                    skip=frozenset({'symmetry'})),
    # The bank is shared; at collapse all n logits are equal: log n.
    'bank_softmax': LossCase(_bank_inputs, hyper={'temperature': 0.07},
                             batch_axes=(0, 0, None), scale_argnums=(0,),
                             collapse_value=lambda f, own, bank: np.log(len(bank)),
                             anti_collapse=True, skip=frozenset({'symmetry'})),
    # --- clustering --------------------------------------------------------
    # [crops, b, d] embeddings and shared unit prototypes, used as given (no
    # 'scale' for them). Only the embeddings collapse: uniform codes, and the
    # cross entropy of softmax(cosines / tau) against them. No anti-collapse
    # check: SwAV's defence is the equipartition of the codes, a stop-gradient
    # target (tests/test_sinkhorn.py); near collapse, with distinct prototypes
    # held fixed, the gradient is the pull towards the likeliest prototype.
    'swav': LossCase(_swav_inputs, hyper=SWAV_HYPER, batch_axes=(1, None),
                     swap=swap_crops(0), scale_argnums=(0,),
                     collapse_argnums=(0,),
                     collapse_value=functools.partial(_swav_collapse,
                                                      temperature=0.1)),
    # Classification of fixed pseudo-labels: no collapse, symmetry or scale.
    'deepcluster': LossCase(_deepcluster_inputs, batch_axes=(0, 0, None),
                            skip=frozenset({'symmetry', 'scale'})),
    # The centroids are the prototype layer's weights, used as given (as in
    # swav's main_deepclusterv2.py): 'scale' covers the embeddings only.
    'deepclusterv2': LossCase(_deepclusterv2_inputs, hyper={'temperature': 0.1},
                              batch_axes=(1, None, 1), swap=swap_crops(0, 1, 2),
                              scale_argnums=(0,),
                              # Drawn inputs whose loss is near 0 lose its
                              # float32 digits to cancellation (seen: 1e-4;
                              # jit vs op by op: 2.3e-5 on embeddings ~2e3).
                              tolerances={'scale': {'atol': 3e-4},
                                          'devices': {'atol': 3e-4},
                                          'jit': {'atol': 3e-4}},
                              collapse_value=lambda z, c, a: np.log(c.shape[1])),
    # --- redundancy reduction ---------------------------------------------
    # Standardised constant embeddings are 0: C = 0, loss = d. No gradient
    # check near collapse: standardisation makes the loss blind to the size
    # of the offsets (above sqrt(eps)), so it has no gradient along them; its
    # defence against collapse is the normalisation itself. Nor 'scale': the
    # BatchNorm eps (1e-5, torch's) dominates variances of inputs at 1e-3.
    'barlow_twins': LossCase(strategies.view_pairs,
                             collapse_value=lambda z1, z2: float(z1.shape[1]),
                             skip=frozenset({'scale'})),
    # The variance hinge at std sqrt(eps) = 0.01 on both branches: 25 * 0.99.
    # Raw embeddings, not normalised: no 'scale'.
    'vicreg': LossCase(strategies.view_pairs, collapse_value=25.0 * (1 - 1e-2),
                       anti_collapse=True, skip=frozenset({'scale'})),
    # --- distillation -------------------------------------------------------
    # 2 - 2 cos is symmetric in value, but the target is a stop-gradient; no
    # anti-collapse term (BYOL avoids collapse through predictor and EMA).
    'byol': LossCase(strategies.view_pairs, collapse_value=0.0,
                     symmetric_gradients=False),
    'simsiam': LossCase(FOUR_VIEWS, swap=SWAP_PAIRS, collapse_value=-1.0),
    # Student [4, b, K] and teacher [2, b, K] crops, shared center; logits
    # over temperatures, not normalised: no 'scale'.
    'dino': LossCase(_dino_inputs, hyper=DINO_HYPER, batch_axes=(1, 1, None),
                     swap=swap_crops(0, 1),
                     collapse_value=functools.partial(
                         _dino_collapse, student_temperature=0.1),
                     skip=frozenset({'scale'})),
    # A masked regression: |p - t| is symmetric in value only.
    'data2vec': LossCase(_data2vec_inputs, collapse_value=0.0,
                         symmetric_gradients=False, skip=frozenset({'scale'})),
    # KL(teacher || student) is not symmetric; logits, not normalised.
    'kd': LossCase(strategies.view_pairs, hyper={'temperature': 4.0},
                   collapse_value=0.0, skip=frozenset({'symmetry', 'scale'})),
    'feature_distillation': LossCase(strategies.view_pairs, hyper={'kind': 'cosine'},
                                     collapse_value=0.0, symmetric_gradients=False),
    # --- pretext tasks -------------------------------------------------------
    # One classifier output and integer labels: no second view ('symmetry');
    # logits, not normalised ('scale'). Collapse: a constant prediction.
    'pretext_classification': LossCase(_pretext_inputs, collapse_value=_pretext_collapse,
                                       skip=frozenset({'symmetry', 'scale'})),
    # Predictions vs patch embeddings: asymmetric roles ('symmetry'); raw dot
    # products ('scale'). Collapse: all N * rows * cols keys score alike.
    'cpc_infonce': LossCase(_cpc_inputs, hyper={'offsets': (1, 2)},
                            collapse_value=lambda p, z: np.log(z[..., 0].size),
                            anti_collapse=True, skip=frozenset({'symmetry', 'scale'})),
    # Global vs local features: asymmetric roles ('symmetry'); raw dot
    # products ('scale'). Collapse: the positive and (N - 1) h w negatives.
    'deep_infomax': LossCase(_infomax_inputs, hyper={'estimator': 'infonce'},
                             collapse_value=lambda g, l: np.log1p(
                                 (len(g) - 1) * l.shape[1] * l.shape[2]),
                             anti_collapse=True, skip=frozenset({'symmetry', 'scale'})),
    # --- cross-modal ---------------------------------------------------------
    # (video, audio, video rows, audio rows): swapping the modalities swaps
    # both pairs. Collapse: N batch + K bank logits alike, in both directions.
    'avid': LossCase(functools.partial(strategies.views, 2, shared_rows=(12, 12)),
                     hyper={'temperature': 0.07}, batch_axes=(0, 0, None, None),
                     swap=SWAP_PAIRS,
                     collapse_value=lambda v, a, vn, an: 2 * np.log(len(v) + len(an)),
                     anti_collapse=True),
    # Positives and negatives are candidate bank rows, not the batch's other
    # examples: spreading the queries alone has no preferred direction, so
    # no anti-collapse check.
    'cma': LossCase(_cma_inputs, hyper={'temperature': 0.07},
                    batch_axes=(0, 0, None, None, 0), swap=SWAP_PAIRS,
                    collapse_value=_cma_collapse),
}


def test_every_registered_loss_is_in_the_table():
  missing = sorted(set(losses.LOSSES) - set(LOSS_CASES))
  assert not missing, (
      f'Registered losses without a LOSS_CASES entry in {__file__}: {missing}. '
      f'Add one (see the table format at the top of that file).')
  stale = sorted(set(LOSS_CASES) - set(losses.LOSSES))
  assert not stale, f'LOSS_CASES entries for unregistered losses: {stale}.'


@pytest.mark.parametrize('name,prop', [
    (name, prop) for name, case in sorted(LOSS_CASES.items())
    for prop in case.properties])
def test_loss_property(name, prop):
  check_property(prop, losses.get_loss(name), LOSS_CASES[name], **SHAPES)


# ---------------------------------------------------------------------------
# The strategies produce what they promise.


@given(strategies.embeddings(kinds=('duplicated',), batch_sizes=(8,)))
def test_duplicated_rows_strategy_repeats_rows(x):
  assert len(np.unique(np.asarray(x, np.float64), axis=0)) < len(x)


@given(strategies.embeddings(kinds=('constant_rows',), dtypes=('bfloat16',)))
def test_constant_rows_strategy(x):
  assert x.dtype == jnp.bfloat16
  x = np.asarray(x, np.float64)
  np.testing.assert_array_equal(x, np.repeat(x[:, :1], x.shape[1], axis=1))


@given(strategies.embeddings(kinds=('near_collinear',), scales=(1.0,)))
def test_near_collinear_strategy(x):
  cosines = _unit(x) @ _unit(x).T
  assert np.min(cosines) > 0.99


@given(strategies.multi_crop(2, 3, batch_sizes=(4,), dims=(6,), stacked=True,
                             shared_rows=(7,)))
def test_multi_crop_stack_is_crops_first(crops):
  stack, prototypes = crops
  assert stack.shape == (5, 4, 6) and prototypes.shape == (7, 6)


# ---------------------------------------------------------------------------
# Planted bugs: the toolkit must fail on each of them.


def _views(batch=16, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(batch, dim))
  return (z.astype(np.float32),
          (z + 0.5 * rng.normal(size=z.shape)).astype(np.float32))


def _nt_xent_with(z1, z2, gather, positive_shift, temperature, axis_name):
  """NT-Xent with a pluggable gather and positive offset, to plant bugs."""
  b = z1.shape[0]
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
  all_z1, all_z2 = gather(z1, axis_name), gather(z2, axis_name)
  n = all_z1.shape[0]
  keys = jnp.concatenate([all_z1, all_z2])
  logits = jnp.concatenate([z1, z2]) @ keys.T / temperature
  first = parallel.global_offset(b, axis_name) + jnp.arange(b)
  self_index = jnp.concatenate([first, first + n])
  shifted = (first + positive_shift) % n
  positive_index = jnp.concatenate([shifted + n, shifted])
  logits = jnp.where(jnp.arange(2 * n)[None] == self_index[:, None], -1e9, logits)
  log_prob = jax.nn.log_softmax(logits)
  local = -jnp.take_along_axis(log_prob, positive_index[:, None], axis=1)
  return parallel.pmean(2 * jnp.mean(local), axis_name)


def _gather_local_gradient_only(x, axis_name):
  # The classic PyTorch-DDP mistake ported to JAX: the gathered copy is a
  # constant and only this device's rows are put back as differentiable.
  if axis_name is None:
    return x
  gathered = parallel.all_gather(jax.lax.stop_gradient(x), axis_name)
  return jax.lax.dynamic_update_slice_in_dim(
      gathered, x, parallel.global_offset(x.shape[0], axis_name), axis=0)


def nt_xent_local_gradient_gather(z1, z2, *, temperature=0.2, axis_name=None):
  return _nt_xent_with(z1, z2, _gather_local_gradient_only, 0, temperature,
                       axis_name)


def nt_xent_shifted_positives(z1, z2, *, temperature=0.2, axis_name=None):
  # Off-by-one positive index: query i is pulled towards image i + 1.
  return _nt_xent_with(z1, z2, parallel.all_gather, 1, temperature, axis_name)


def nt_xent_correct(z1, z2, *, temperature=0.2, axis_name=None):
  return _nt_xent_with(z1, z2, parallel.all_gather, 0, temperature, axis_name)


def test_planted_fixture_matches_the_library_loss():
  # The planted bugs differ from a correct loss only by the bug.
  z1, z2 = _views()
  np.testing.assert_allclose(nt_xent_correct(z1, z2),
                             losses.get_loss('nt_xent')(z1, z2, temperature=0.2),
                             rtol=1e-6)
  # On 2 devices, where the planted bugs below are caught.
  check_device_equivalence(nt_xent_correct, (z1, z2), num_devices=(2,))
  check_permutation_invariance(nt_xent_correct, (z1, z2))


def test_catches_gathered_negatives_gradient_off_by_device_count():
  z1, z2 = _views()
  # One device is every device's "local part": the bug is invisible there.
  check_permutation_invariance(nt_xent_local_gradient_gather, (z1, z2))
  with pytest.raises(AssertionError, match='gradient of argument 0 on 2 devices'):
    check_device_equivalence(nt_xent_local_gradient_gather, (z1, z2))


def test_catches_a_loss_that_is_not_permutation_invariant():
  z1, z2 = _views()
  with pytest.raises(AssertionError, match='permutation invariance: value'):
    check_permutation_invariance(nt_xent_shifted_positives, (z1, z2))


def _sinkhorn(scores, *, epsilon, iterations, axis_name, cross_device):
  """SwAV's Sinkhorn-Knopp codes (Caron et al. 2020, alg. 1), batch on axis 0.

  `cross_device=False` plants the bug: the prototype marginals and the batch
  size are the local ones, so each device balances its own shard.
  """
  reduce = ((lambda x: parallel.psum(x, axis_name)) if cross_device
            else (lambda x: x))
  num_prototypes = scores.shape[1]
  batch = scores.shape[0] * (parallel.axis_size(axis_name) if cross_device else 1)
  # Cosine scores lie in [-1, 1]: exp(score / 0.05) cannot overflow float32.
  q = jnp.exp(scores / epsilon)
  q = q / reduce(jnp.sum(q))
  for _ in range(iterations):
    q = q / reduce(jnp.sum(q, axis=0, keepdims=True)) / num_prototypes
    q = q / jnp.sum(q, axis=1, keepdims=True) / batch
  return q * batch


def _swapped_prediction(z1, z2, prototypes, temperature, axis_name, cross_device):
  c = l2_normalize(prototypes)
  s1, s2 = l2_normalize(z1) @ c.T, l2_normalize(z2) @ c.T
  codes = functools.partial(_sinkhorn, epsilon=0.05, iterations=3,
                            axis_name=axis_name, cross_device=cross_device)
  q1, q2 = jax.lax.stop_gradient(codes(s1)), jax.lax.stop_gradient(codes(s2))
  local = -0.5 * (jnp.sum(q1 * jax.nn.log_softmax(s2 / temperature), -1) +
                  jnp.sum(q2 * jax.nn.log_softmax(s1 / temperature), -1))
  return parallel.pmean(jnp.mean(local), axis_name)


def swav_correct(z1, z2, prototypes, *, temperature=0.1, axis_name=None):
  return _swapped_prediction(z1, z2, prototypes, temperature, axis_name, True)


def swav_local_sinkhorn(z1, z2, prototypes, *, temperature=0.1, axis_name=None):
  return _swapped_prediction(z1, z2, prototypes, temperature, axis_name, False)


def _swav_inputs():
  z1, z2 = _views()
  prototypes = np.random.default_rng(7).normal(size=(5, 8)).astype(np.float32)
  return z1, z2, prototypes


def test_sinkhorn_fixture_balances_the_global_batch():
  z1, _, prototypes = _swav_inputs()
  scores = l2_normalize(z1) @ l2_normalize(prototypes).T
  q = _sinkhorn(scores, epsilon=0.05, iterations=50, axis_name=None,
                cross_device=True)
  np.testing.assert_allclose(np.sum(q, axis=1), 1.0, rtol=1e-5)
  # Sinkhorn ends on the per-example step: prototype sums are approximate.
  np.testing.assert_allclose(np.sum(q, axis=0), len(q) / 5, rtol=1e-2)


def test_correct_sinkhorn_passes_the_device_check():
  args = _swav_inputs()
  check_device_equivalence(swav_correct, args, batch_axes=(0, 0, None),
                           num_devices=(2,))
  check_permutation_invariance(swav_correct, args, batch_axes=(0, 0, None))
  check_view_symmetry(swav_correct, args)


def swav_library_sinkhorn(z1, z2, prototypes, *, temperature=0.1, axis_name=None):
  """The same swapped prediction with the library's `clustering.sinkhorn`."""
  c = l2_normalize(prototypes)
  s1, s2 = l2_normalize(z1) @ c.T, l2_normalize(z2) @ c.T
  q1 = clustering.sinkhorn(s1, epsilon=0.05, num_iters=3, axis_name=axis_name)
  q2 = clustering.sinkhorn(s2, epsilon=0.05, num_iters=3, axis_name=axis_name)
  local = -0.5 * (jnp.sum(q1 * jax.nn.log_softmax(s2 / temperature), -1) +
                  jnp.sum(q2 * jax.nn.log_softmax(s1 / temperature), -1))
  return parallel.pmean(jnp.mean(local), axis_name)


def test_library_sinkhorn_passes_the_device_check():
  args = _swav_inputs()
  # The library's log-domain Sinkhorn computes the fixture's codes ...
  np.testing.assert_allclose(swav_library_sinkhorn(*args), swav_correct(*args),
                             rtol=1e-5)
  # ... and sums over every device.
  check_device_equivalence(swav_library_sinkhorn, args, batch_axes=(0, 0, None))


def test_catches_sinkhorn_without_the_cross_device_sum():
  args = _swav_inputs()
  # On one device the buggy and the correct Sinkhorn are the same function.
  np.testing.assert_allclose(swav_local_sinkhorn(*args), swav_correct(*args),
                             rtol=1e-6)
  with pytest.raises(AssertionError, match='per-device values on 2 devices'):
    check_device_equivalence(swav_local_sinkhorn, args, batch_axes=(0, 0, None))


def test_catches_a_loss_without_anti_collapse_force():
  z1, z2 = _views()
  # BYOL's regression alone has no force away from collapse.
  with pytest.raises(AssertionError, match='does not spread the embeddings'):
    check_collapse(losses.get_loss('byol'), (z1, z2), collapse_value=0.0,
                   anti_collapse=True)


# ---------------------------------------------------------------------------
# The README's worked example ("Writing property tests for your loss"): a
# user-defined loss, alignment + uniformity (Wang & Isola 2020), checked with
# the same LossCase machinery as the library's losses.


def align_uniform(z1: jax.Array, z2: jax.Array, *, t: float = 2.0,
                  axis_name: Optional[str] = None) -> jax.Array:
  """||f(x) - f(y)||^2 of positives plus log E exp(-t ||f(x) - f(x')||^2)."""
  b = z1.shape[0]
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
  align = jnp.mean(jnp.sum((z1 - z2) ** 2, axis=-1))

  def uniformity(z):
    others = parallel.all_gather(z, axis_name)  # [N, d]
    n = others.shape[0]
    sq_dist = jnp.sum((z[:, None] - others[None]) ** 2, axis=-1)  # [b, N]
    rows = parallel.global_offset(b, axis_name) + jnp.arange(b)
    not_self = jnp.arange(n)[None] != rows[:, None]
    total = parallel.psum(jnp.sum(jnp.where(not_self, jnp.exp(-t * sq_dist), 0.)),
                          axis_name)
    return jnp.log(total / (n * (n - 1)))

  return (parallel.pmean(align, axis_name) +
          0.5 * (uniformity(z1) + uniformity(z2)))


ALIGN_UNIFORM = LossCase(strategies.view_pairs, hyper={'t': 2.0},
                         collapse_value=0.0, anti_collapse=True)


@pytest.mark.parametrize('prop', ALIGN_UNIFORM.properties)
def test_worked_example_align_uniform(prop):
  check_property(prop, align_uniform, ALIGN_UNIFORM, **SHAPES)
