"""Property tests for every registered loss, driven by one table.

LOSS_CASES maps each name in `ssl_jax.losses.LOSSES` to a
`ssl_jax.testing.LossCase`; `test_every_registered_loss_is_in_the_table`
fails when a registered loss has no entry. An entry is usually three lines:

    'my_loss': LossCase(strategies.view_pairs, hyper={'temperature': 0.1},
                        collapse_value=lambda z1, z2: np.log(2 * len(z1) - 1),
                        anti_collapse=True),

The fields (all but the first optional; see LossCase's docstring):
  inputs          a strategy factory called with batch_sizes= and dims=:
                  strategies.view_pairs, functools.partial(strategies.views, 2,
                  shared_rows=(32,)) for a shared queue, strategies.multi_crop;
                  it returns the loss's positional arguments, batch on axis 0.
  hyper           keyword hyper-parameters of the loss.
  collapse_value  the loss when every embedding is the same vector (a float or
                  a function of the collapsed inputs); None: no collapse check.
  anti_collapse   True when the loss has an explicit anti-collapse term
                  (negatives, variance, decorrelation): near collapse its
                  gradient must spread the embeddings.
  skip            properties that do not hold by design, with the reason in a
                  comment: 'symmetry' (asymmetric roles), 'scale' (no input
                  normalisation), 'bfloat16' ...
  batch_argnums   the per-example arguments (default all); the rest (queues,
                  prototypes) are shared: not permuted, not split over devices.
  symmetric_gradients, swap, collapse_argnums, tolerances: rarer overrides.

Each (loss, property) pair is one Hypothesis test over PROPERTY_SHAPES;
'devices' (2, 4 and 8 devices vs 1) runs on DEVICE_SHAPES only. Both shape
sets are small on purpose: a loss compiles once per shape and dtype (the
checks cache their jitted functions), so the suite stays within its CI budget
(HYPOTHESIS_PROFILE=ci, 15 examples; 'thorough' for 300).

Below the table: planted bugs that the toolkit must catch, and the worked
example of the README ("Writing property tests for your loss").
"""

import functools
from typing import Optional

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssl_jax import losses, parallel
from ssl_jax.losses.contrastive import l2_normalize
from ssl_jax.testing import (LossCase, check_collapse, check_device_equivalence,
                             check_permutation_invariance, check_view_symmetry,
                             run_property, strategies)

LOSS_CASES = {
    # Collapse: all 2N-1 logits of a query are equal, loss = log(2N - 1).
    'nt_xent': LossCase(strategies.view_pairs, hyper={'temperature': 0.2},
                        collapse_value=lambda z1, z2: np.log(2 * len(z1) - 1),
                        anti_collapse=True),
    # Queries and positive keys per example; the negative queue is shared.
    # Asymmetric roles (queries vs a fixed queue): no 'symmetry'.
    'info_nce': LossCase(functools.partial(strategies.views, 2, shared_rows=(24,)),
                         hyper={'temperature': 0.2}, batch_argnums=(0, 1),
                         collapse_value=lambda q, k, neg: np.log(len(neg) + 1),
                         anti_collapse=True, skip=frozenset({'symmetry'})),
    # 2 - 2cos is symmetric in value, but the target is a stop-gradient; no
    # anti-collapse term (BYOL avoids collapse through predictor and EMA).
    'byol': LossCase(strategies.view_pairs, collapse_value=0.0,
                     symmetric_gradients=False),
}

PROPERTY_SHAPES = {'batch_sizes': (8, 16), 'dims': (3, 16)}
# Divisible by 2, 4 and 8 devices.
DEVICE_SHAPES = {'batch_sizes': (16,), 'dims': (8,)}


def test_every_registered_loss_is_in_the_table():
  missing = sorted(set(losses.LOSSES.names()) - set(LOSS_CASES))
  assert not missing, (
      f'Registered losses without a LOSS_CASES entry in {__file__}: {missing}. '
      f'Add one (see the table format at the top of that file).')
  stale = sorted(set(LOSS_CASES) - set(losses.LOSSES.names()))
  assert not stale, f'LOSS_CASES entries for unregistered losses: {stale}.'


_PAIRS = [(name, prop) for name, case in sorted(LOSS_CASES.items())
          for prop in case.properties if prop != 'devices']


@pytest.mark.parametrize('name,prop', _PAIRS)
@given(data=st.data())
def test_loss_property(name, prop, data):
  case = LOSS_CASES[name]
  args = data.draw(case.inputs(**PROPERTY_SHAPES), label='inputs')
  run_property(prop, losses.get_loss(name), args, case)


@pytest.mark.parametrize('name', sorted(n for n, c in LOSS_CASES.items()
                                        if 'devices' in c.properties))
@given(data=st.data())
def test_loss_device_equivalence(name, data):
  case = LOSS_CASES[name]
  args = data.draw(case.inputs(**DEVICE_SHAPES), label='inputs')
  run_property('devices', losses.get_loss(name), args, case)


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


@given(strategies.multi_crop(2, 3, batch_sizes=(4,), dims=(5,), stacked=True))
def test_multi_crop_stack_keeps_batch_first(crops):
  assert len(crops) == 1 and crops[0].shape == (4, 5, 5)


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
  return parallel.pmean(jnp.mean(local), axis_name)


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
  check_device_equivalence(nt_xent_correct, (z1, z2))
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
  check_device_equivalence(swav_correct, args, batch_argnums=(0, 1))
  check_permutation_invariance(swav_correct, args, batch_argnums=(0, 1))
  check_view_symmetry(swav_correct, args)


def test_catches_sinkhorn_without_the_cross_device_sum():
  args = _swav_inputs()
  # On one device the buggy and the correct Sinkhorn are the same function.
  np.testing.assert_allclose(swav_local_sinkhorn(*args), swav_correct(*args),
                             rtol=1e-6)
  with pytest.raises(AssertionError, match='per-device values on 2 devices'):
    check_device_equivalence(swav_local_sinkhorn, args, batch_argnums=(0, 1))


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
@given(data=st.data())
def test_worked_example_align_uniform(prop, data):
  shapes = DEVICE_SHAPES if prop == 'devices' else PROPERTY_SHAPES
  args = data.draw(ALIGN_UNIFORM.inputs(**shapes), label='inputs')
  run_property(prop, align_uniform, args, ALIGN_UNIFORM)
