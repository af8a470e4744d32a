"""Reusable property checks for loss functions.

Each check takes any loss callable `loss_fn(*args, axis_name=None, **hyper)`
returning a scalar, one set of inputs (NumPy or JAX arrays, batch on axis 0),
and raises an AssertionError that says which property broke, by how much and
where. They are plain functions: call them from a Hypothesis test
(`ssl_jax.testing.strategies` draws the inputs), from a pytest parameterisation
or from a notebook.

Gradients are taken with respect to every floating-point argument. Values and
gradients are compared with a tolerance relative to the largest magnitude of
the expected array (`atol + rtol * max|expected|`), because entries of a
gradient that should be 0 come out as 1e-9 rather than 0 and an elementwise
relative test would flag them. Absolute tolerances of gradients are in units
of loss per unit of input (`grad_atol`): dL/dx of a normalised loss scales as
|L|/|x|, and so does its rounding noise at an optimum, where the "largest
entry" is itself noise.

Jitted value-and-gradient functions are cached per (loss, hyper-parameters,
differentiated arguments), so a Hypothesis run compiles a loss once per input
shape and dtype, not once per example.
"""

import dataclasses
import functools
from typing import (Any, Callable, Collection, Dict, FrozenSet, List, Mapping,
                    Optional, Sequence, Tuple, Union)

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.testing.devices import device_equivalence

LossFn = Callable[..., jax.Array]
Args = Sequence[Any]

# The properties a LossCase can be tested for, in the order they are reported.
PROPERTIES = ('finite', 'permutation', 'symmetry', 'scale', 'devices',
              'collapse', 'jit', 'float64', 'bfloat16')


# ---------------------------------------------------------------------------
# Comparisons and cached gradients.


def assert_close(what: str, got: Any, expected: Any, *, rtol: float,
                 atol: float = 0.0) -> None:
  """Raises AssertionError unless |got - expected| <= atol + rtol max|expected|.

  Args:
    what: the quantity, for the message ('value', 'gradient of argument 1').
    got: the array under test.
    expected: the reference array (same shape).
    rtol: tolerance relative to the largest entry of `expected`.
    atol: absolute tolerance.
  """
  got = np.asarray(got, np.float64)
  expected = np.asarray(expected, np.float64)
  if got.shape != expected.shape:
    raise AssertionError(f'{what}: shape {got.shape} != expected {expected.shape}.')
  if not np.all(np.isfinite(got)):
    raise AssertionError(f'{what}: {np.sum(~np.isfinite(got))} non-finite '
                         f'entries (expected {_short(expected)}).')
  scale = float(np.max(np.abs(expected))) if expected.size else 0.0
  tolerance = atol + rtol * scale
  error = np.abs(got - expected)
  if error.size and float(np.max(error)) > tolerance:
    worst = np.unravel_index(np.argmax(error), error.shape)
    raise AssertionError(
        f'{what}: max |difference| {np.max(error):.3g} > tolerance '
        f'{tolerance:.3g} (rtol={rtol:g} of max |expected| {scale:.3g}, '
        f'atol={atol:g}); worst at index {tuple(int(i) for i in worst)}: got '
        f'{got[worst]:.7g}, expected {expected[worst]:.7g}.')


def grad_atol(atol: float, value: Any, arg: Any) -> float:
  """`atol` for the gradient w.r.t. `arg`: atol * max(1, |loss|) / |row of arg|.

  Args:
    atol: absolute tolerance for a loss of order 1 and inputs of norm 1.
    value: the loss value.
    arg: the input the gradient is taken with respect to.

  Returns:
    The absolute tolerance for that gradient.
  """
  a = np.asarray(arg, np.float64)
  rows = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
  norm = float(np.mean(np.linalg.norm(rows, axis=1))) if rows.size else 0.0
  return atol * max(1.0, abs(float(value))) / (norm if norm > 0 else 1.0)


def _short(x: np.ndarray) -> str:
  return np.array2string(np.asarray(x).ravel()[:6], precision=4) + (
      ' ...' if np.size(x) > 6 else '')


def float_argnums(args: Args) -> Tuple[int, ...]:
  """Indices of the floating-point arguments (the differentiable ones)."""
  return tuple(i for i, a in enumerate(args)
               if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating))


def _hyper_key(hyper: Mapping[str, Any]) -> Any:
  try:
    key = tuple(sorted(hyper.items()))
    hash(key)
    return key
  except TypeError:
    return None


@functools.lru_cache(maxsize=512)
def _cached_value_and_grad(loss_fn: LossFn, hyper_key: Tuple, argnums: Tuple[int, ...],
                           axis_name: Optional[str]) -> Callable:
  return _make_value_and_grad(loss_fn, dict(hyper_key), argnums, axis_name)


def _make_value_and_grad(loss_fn, hyper, argnums, axis_name):
  return jax.jit(jax.value_and_grad(
      lambda *a: loss_fn(*a, axis_name=axis_name, **hyper), argnums=argnums))


def value_and_grads(loss_fn: LossFn, args: Args, hyper: Optional[Mapping[str, Any]] = None,
                    *, jit: bool = True) -> Tuple[np.ndarray, List[np.ndarray]]:
  """The loss and its gradients w.r.t. every floating-point argument.

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: the positional inputs.
    hyper: keyword hyper-parameters.
    jit: compile (cached per loss, hyper-parameters and argument set) or run
      op by op under `jax.disable_jit()`.

  Returns:
    (value, gradients): NumPy scalar and one NumPy array per float argument,
    in argument order, each in the dtype JAX returned.
  """
  hyper = dict(hyper or {})
  argnums = float_argnums(args)
  if not jit:
    with jax.disable_jit():
      value, grads = jax.value_and_grad(
          lambda *a: loss_fn(*a, axis_name=None, **hyper), argnums=argnums)(
              *[jnp.asarray(a) for a in args])
  else:
    key = _hyper_key(hyper)
    fn = (_cached_value_and_grad(loss_fn, key, argnums, None) if key is not None
          else _make_value_and_grad(loss_fn, hyper, argnums, None))
    value, grads = fn(*args)
  return np.asarray(value), [np.asarray(g) for g in grads]


def _check_finite_outputs(what: str, value: np.ndarray, grads: List[np.ndarray],
                          argnums: Sequence[int]) -> None:
  if np.shape(value) != ():
    raise AssertionError(f'{what}: the loss must be a scalar, got shape '
                         f'{np.shape(value)}.')
  if not np.isfinite(np.float64(value)):
    raise AssertionError(f'{what}: the loss is {value}.')
  for i, g in zip(argnums, grads):
    bad = ~np.isfinite(np.asarray(g, np.float64))
    if bad.any():
      raise AssertionError(
          f'{what}: the gradient w.r.t. argument {i} has {bad.sum()} non-finite '
          f'entries of {bad.size} (first at index '
          f'{tuple(int(j) for j in np.argwhere(bad)[0])}); loss value {value}.')


# ---------------------------------------------------------------------------
# The checks.


def check_finite(loss_fn: LossFn, args: Args, *,
                 hyper: Optional[Mapping[str, Any]] = None) -> None:
  """The loss is a finite scalar and every input gradient is finite.

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: valid inputs (the strategies include degenerate but valid batches:
      duplicated, constant, near-collinear rows, tiny and huge scales).
    hyper: keyword hyper-parameters.
  """
  value, grads = value_and_grads(loss_fn, args, hyper)
  _check_finite_outputs('finite', value, grads, float_argnums(args))


def check_permutation_invariance(loss_fn: LossFn, args: Args, *,
                                 hyper: Optional[Mapping[str, Any]] = None,
                                 batch_argnums: Optional[Collection[int]] = None,
                                 seed: int = 0, rtol: float = 1e-4,
                                 atol: float = 1e-6) -> None:
  """Permuting the batch (the same way in every view) permutes nothing else.

  The value must not change, and the gradient of each per-example argument
  must be the same permutation of the original gradient (shared arguments,
  such as a negative queue, keep their gradient).

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: inputs whose axis 0 in `batch_argnums` is the batch.
    hyper: keyword hyper-parameters.
    batch_argnums: the per-example arguments (default: all), permuted alike.
    seed: seed of the permutation (a reversal is used when it is the identity).
    rtol, atol: tolerances (float32 sums in another order differ in the last
      bits).
  """
  batch_argnums = _batch_argnums(args, batch_argnums)
  b = np.shape(args[batch_argnums[0]])[0]
  perm = np.random.default_rng(seed).permutation(b)
  if b > 1 and np.all(perm == np.arange(b)):
    perm = perm[::-1]
  permuted = [np.asarray(a)[perm] if i in batch_argnums else a
              for i, a in enumerate(args)]
  value, grads = value_and_grads(loss_fn, args, hyper)
  value_p, grads_p = value_and_grads(loss_fn, permuted, hyper)
  assert_close(f'permutation invariance: value under batch permutation {perm.tolist()}',
               value_p, value, rtol=rtol, atol=atol)
  for i, g, g_p in zip(float_argnums(args), grads, grads_p):
    expected = g[perm] if i in batch_argnums else g
    assert_close(f'permutation invariance: gradient of argument {i} (should be '
                 f'permuted like the batch)', g_p, expected, rtol=rtol,
                 atol=grad_atol(atol, value, args[i]))


def check_view_symmetry(loss_fn: LossFn, args: Args, *,
                        hyper: Optional[Mapping[str, Any]] = None,
                        swap: Tuple[int, int] = (0, 1), gradients: bool = True,
                        rtol: float = 1e-4, atol: float = 1e-6) -> None:
  """Swapping two views gives the same loss (and swapped gradients).

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: inputs.
    hyper: keyword hyper-parameters.
    swap: the two argument positions to exchange.
    gradients: also require grad_i(f)(swapped) == grad_j(f)(original). Off for
      losses symmetric in value only (a stop-gradient on one side).
    rtol, atol: tolerances.
  """
  i, j = swap
  swapped = list(args)
  swapped[i], swapped[j] = args[j], args[i]
  value, grads = value_and_grads(loss_fn, args, hyper)
  value_s, grads_s = value_and_grads(loss_fn, swapped, hyper)
  assert_close(f'view symmetry: value with arguments {i} and {j} swapped',
               value_s, value, rtol=rtol, atol=atol)
  if gradients:
    by_arg = dict(zip(float_argnums(args), grads))
    by_arg_s = dict(zip(float_argnums(swapped), grads_s))
    order = {i: j, j: i}
    for k, g_s in by_arg_s.items():
      assert_close(f'view symmetry: gradient of argument {k} after the swap vs '
                   f'argument {order.get(k, k)} before', g_s,
                   by_arg[order.get(k, k)], rtol=rtol,
                   atol=grad_atol(atol, value, swapped[k]))


def check_scale_invariance(loss_fn: LossFn, args: Args, *,
                           hyper: Optional[Mapping[str, Any]] = None,
                           argnums: Optional[Collection[int]] = None,
                           factors: Sequence[float] = (1e-2, 37.0),
                           rtol: float = 1e-4, atol: float = 1e-6) -> None:
  """Losses that L2-normalise their inputs ignore the inputs' scale.

  L(c x) == L(x), and then grad L(c x) == grad L(x) / c, for positive c.

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: inputs.
    hyper: keyword hyper-parameters.
    argnums: the arguments to rescale (default: every float argument), each
      by the same factor.
    factors: the factors c to try.
    rtol, atol: tolerances.
  """
  argnums = float_argnums(args) if argnums is None else tuple(argnums)
  value, grads = value_and_grads(loss_fn, args, hyper)
  for c in factors:
    scaled = [np.asarray(np.asarray(a, np.float64) * c, np.asarray(a).dtype)
              if i in argnums else a for i, a in enumerate(args)]
    value_c, grads_c = value_and_grads(loss_fn, scaled, hyper)
    assert_close(f'scale invariance: value with arguments {list(argnums)} '
                 f'scaled by {c:g}', value_c, value, rtol=rtol, atol=atol)
    for i, g, g_c in zip(float_argnums(args), grads, grads_c):
      factor = c if i in argnums else 1.0
      assert_close(f'scale invariance: gradient of argument {i} times {factor:g} '
                   f'after scaling by {c:g}', np.asarray(g_c, np.float64) * factor,
                   g, rtol=rtol, atol=grad_atol(atol, value, args[i]))


def check_device_equivalence(loss_fn: LossFn, args: Args, *,
                             hyper: Optional[Mapping[str, Any]] = None,
                             batch_argnums: Optional[Collection[int]] = None,
                             num_devices: Sequence[int] = (2, 4, 8),
                             rtol: float = 1e-5, grad_rtol: float = 1e-4,
                             atol: float = 1e-6) -> None:
  """N devices with axis_name='batch' equal one device on the whole batch.

  Builds on `device_equivalence`: the per-example arguments are split along
  axis 0, shared ones are given whole to every device; every device must
  return the global value, and the per-device input gradients (divided by N,
  the library's pmap convention, see parallel.py) must reassemble into the
  1-device gradient. A gradient off by a factor N (a non-differentiated
  all_gather, a missing or extra psum) or a statistic computed on the local
  batch only (a Sinkhorn without its psum) fails here.

  Args:
    loss_fn: `loss_fn(*args, axis_name=None|'batch', **hyper)`.
    args: global-batch inputs; the batch must divide by every N.
    hyper: keyword hyper-parameters.
    batch_argnums: the per-example (sharded) arguments; default: all.
    num_devices: the device counts to compare with one device.
    rtol: value tolerance; grad_rtol: gradient tolerance (relative to the
      largest entry); atol: absolute floor for both.
  """
  batch_argnums = _batch_argnums(args, batch_argnums)
  float_batch = tuple(i for i in batch_argnums if i in float_argnums(args))
  for n in num_devices:
    (value_1, grads_1), (values_n, grads_n) = device_equivalence(
        loss_fn, list(args), n, sharded_argnums=float_batch,
        kwargs=dict(hyper or {}))
    assert_close(f'device equivalence: per-device values on {n} devices vs the '
                 f'1-device value', values_n, np.full(n, value_1), rtol=rtol,
                 atol=atol)
    for i, g1, gn in zip(float_batch, grads_1, grads_n):
      ratio = _ratio(gn, g1)
      assert_close(f'device equivalence: gradient of argument {i} on {n} devices '
                   f'(divided by {n}) vs 1 device'
                   + (f' [off by a factor ~{ratio:.3g}]' if ratio else ''),
                   gn, g1, rtol=grad_rtol, atol=grad_atol(atol, value_1, args[i]))


def _ratio(got: np.ndarray, expected: np.ndarray) -> Optional[float]:
  """got / expected by least squares, when that explains got well (a hint)."""
  got, expected = np.ravel(got).astype(np.float64), np.ravel(expected).astype(np.float64)
  denominator = float(expected @ expected)
  if denominator == 0.0:
    return None
  ratio = float(got @ expected) / denominator
  residual = np.linalg.norm(got - ratio * expected)
  if abs(ratio - 1.0) > 1e-3 and residual <= 1e-3 * np.linalg.norm(got):
    return ratio
  return None


def collapsed_inputs(args: Args, *, argnums: Optional[Collection[int]] = None,
                     seed: int = 0) -> List[Any]:
  """Every row of the chosen arguments replaced by one shared vector.

  Args:
    args: inputs; the chosen ones must share their last dimension d.
    argnums: the arguments to collapse (default: every float argument).
    seed: seed of the shared direction.

  Returns:
    The inputs with each chosen argument filled with the same vector of d
    entries (norm: the mean row norm of the first chosen argument), dtypes
    unchanged.
  """
  argnums = float_argnums(args) if argnums is None else tuple(argnums)
  first = np.asarray(args[argnums[0]], np.float64)
  d = first.shape[-1]
  norm = float(np.mean(np.linalg.norm(first.reshape(-1, d), axis=1))) or 1.0
  c = np.random.default_rng(seed).normal(size=d)
  c *= norm / np.linalg.norm(c)
  out = list(args)
  for i in argnums:
    a = np.asarray(args[i])
    if a.shape[-1] != d:
      raise AssertionError(f'collapse: argument {i} has last dimension '
                           f'{a.shape[-1]}, not {d}; pass collapse_argnums.')
    out[i] = np.broadcast_to(c, a.shape).astype(a.dtype)
  return out


def check_collapse(loss_fn: LossFn, args: Args, *,
                   collapse_value: Union[float, Callable[..., float]],
                   hyper: Optional[Mapping[str, Any]] = None,
                   anti_collapse: bool = False,
                   collapse_argnums: Optional[Collection[int]] = None,
                   batch_argnums: Optional[Collection[int]] = None,
                   spread: float = 0.05, min_cosine: float = 0.1,
                   seed: int = 0, rtol: float = 1e-4, atol: float = 1e-5) -> None:
  """The loss of constant embeddings is the collapse value; anti-collapse terms
  push away from it.

  1. Every row of every collapsed argument is set to one vector: the value
     must equal `collapse_value` and be finite with finite gradients.
  2. With `anti_collapse`, each example i is moved off that vector by a small
     offset e_i (the same e_i in every per-example argument, so positives stay
     aligned and only the anti-collapse term acts; shared arguments get their
     own offsets). A loss with an explicit anti-collapse term (negatives, a
     variance or decorrelation term) must then decrease when the offsets grow:
     cos(grad, e) < -min_cosine over all collapsed arguments together, i.e. a
     gradient step spreads the embeddings.
     Exactly at collapse the gradient of a normalised loss is 0 by symmetry,
     which is why this is checked next to collapse, not at it.

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: example inputs (their shapes, dtypes and scale are used).
    collapse_value: the expected loss at collapse, or a function of the
      collapsed inputs returning it (e.g. log(2N - 1) for NT-Xent).
    hyper: keyword hyper-parameters.
    anti_collapse: also check the direction of the gradient near collapse.
    collapse_argnums: the arguments to collapse (default: every float one).
    batch_argnums: the per-example arguments (default: all).
    spread: size of the offsets e_i relative to the collapsed vector's norm.
    min_cosine: how clearly the descent direction must point outwards.
    seed: seed of the collapsed vector and of the offsets.
    rtol, atol: tolerances for the collapse value.
  """
  collapse_argnums = (float_argnums(args) if collapse_argnums is None
                      else tuple(collapse_argnums))
  batch_argnums = _batch_argnums(args, batch_argnums)
  collapsed = collapsed_inputs(args, argnums=collapse_argnums, seed=seed)
  value, grads = value_and_grads(loss_fn, collapsed, hyper)
  _check_finite_outputs('collapse', value, grads, float_argnums(args))
  expected = (collapse_value(*collapsed) if callable(collapse_value)
              else collapse_value)
  assert_close('collapse: the loss of constant embeddings vs the collapse value',
               value, expected, rtol=rtol, atol=atol)
  if not anti_collapse:
    return
  rng = np.random.default_rng(seed + 1)
  d = np.shape(collapsed[collapse_argnums[0]])[-1]
  norm = float(np.linalg.norm(np.asarray(collapsed[collapse_argnums[0]],
                                         np.float64).reshape(-1, d)[0]))
  b = np.shape(args[batch_argnums[0]])[0]
  per_example = rng.normal(size=(b, d)) * spread * norm / np.sqrt(d)
  near, offsets = list(collapsed), {}
  for i in collapse_argnums:
    a = np.asarray(collapsed[i], np.float64)
    if i in batch_argnums:
      e = np.broadcast_to(per_example.reshape((b,) + (1,) * (a.ndim - 2) + (d,)),
                          a.shape)
    else:
      e = rng.normal(size=a.shape) * spread * norm / np.sqrt(d)
    near[i] = (a + e).astype(np.asarray(collapsed[i]).dtype)
    offsets[i] = np.asarray(near[i], np.float64) - a
  value_near, grads_near = value_and_grads(loss_fn, near, hyper)
  _check_finite_outputs('collapse (near)', value_near, grads_near,
                        float_argnums(args))
  by_arg = dict(zip(float_argnums(args), grads_near))
  slope = sum(float(np.sum(np.asarray(by_arg[i], np.float64) * offsets[i]))
              for i in collapse_argnums)
  grad_norm = np.sqrt(sum(float(np.sum(np.square(np.asarray(by_arg[i], np.float64))))
                          for i in collapse_argnums))
  offset_norm = np.sqrt(sum(float(np.sum(np.square(offsets[i])))
                            for i in collapse_argnums))
  # A cosine, not a sign: a loss with no anti-collapse force has a gradient
  # of rounding noise here, whose sign is a coin flip.
  cosine = slope / (grad_norm * offset_norm) if grad_norm > 0 else 0.0
  if not cosine < -min_cosine:
    raise AssertionError(
        f'collapse: near collapse (offsets of relative size {spread:g}) a '
        f'gradient step does not spread the embeddings: the cosine between '
        f'the gradient and the spreading offsets is {cosine:.3g} (should be '
        f'< -{min_cosine:g}; gradient norm {grad_norm:.3g}). The anti-collapse '
        f'term does not push away from collapse. Loss {value_near:.6g} vs '
        f'{value:.6g} at collapse.')


def check_jit_consistency(loss_fn: LossFn, args: Args, *,
                          hyper: Optional[Mapping[str, Any]] = None,
                          rtol: float = 1e-4, atol: float = 1e-6) -> None:
  """jax.jit and op-by-op execution give the same value and gradients.

  Catches Python control flow on traced values that behaves differently
  once traced, and numerics that depend on XLA's fusion (a log of a softmax
  instead of log_softmax shows up here at saturated logits).

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: inputs.
    hyper: keyword hyper-parameters.
    rtol, atol: tolerances.
  """
  value, grads = value_and_grads(loss_fn, args, hyper, jit=True)
  value_e, grads_e = value_and_grads(loss_fn, args, hyper, jit=False)
  assert_close('jit: value under jit vs op by op', value, value_e, rtol=rtol,
               atol=atol)
  for i, g, g_e in zip(float_argnums(args), grads, grads_e):
    assert_close(f'jit: gradient of argument {i} under jit vs op by op', g, g_e,
                 rtol=rtol, atol=grad_atol(atol, value, args[i]))


def check_float64_agreement(loss_fn: LossFn, args: Args, *,
                            hyper: Optional[Mapping[str, Any]] = None,
                            rtol: float = 1e-3, atol: float = 1e-5) -> None:
  """float32 inputs give the value and gradients of float64 inputs.

  The float64 run happens inside `jax.enable_x64(True)`, so that JAX keeps
  the inputs in float64 and any computation the loss does not pin to float32
  runs in double precision. A loss that casts to float32 by design (as the
  library's losses do) passes trivially on that part; what this catches is
  float32 arithmetic that loses the answer (exp without max-subtraction,
  1 - cos at near-identical vectors, variances by E[x^2] - E[x]^2).

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: inputs (float arguments are cast to float32 and to float64).
    hyper: keyword hyper-parameters.
    rtol, atol: tolerances (relative to the largest float64 entry).
  """
  argnums = float_argnums(args)
  as32 = [np.asarray(a, np.float32) if i in argnums else a
          for i, a in enumerate(args)]
  value, grads = value_and_grads(loss_fn, as32, hyper)
  with jax.enable_x64(True):
    as64 = [np.asarray(a, np.float64) if i in argnums else a
            for i, a in enumerate(as32)]
    value_64, grads_64 = value_and_grads(loss_fn, as64, hyper)
  assert_close('float64: float32 value vs float64 value', value, value_64,
               rtol=rtol, atol=atol)
  for i, g, g64 in zip(argnums, grads, grads_64):
    assert_close(f'float64: float32 gradient of argument {i} vs float64', g,
                 g64, rtol=rtol, atol=grad_atol(atol, value_64, as64[i]))


def check_bfloat16_agreement(loss_fn: LossFn, args: Args, *,
                             hyper: Optional[Mapping[str, Any]] = None,
                             rtol: float = 1e-2, atol: float = 1e-2,
                             grad_rtol: float = 5e-2,
                             grad_atol_bf16: float = 1e-2) -> None:
  """bfloat16 inputs give (nearly) the float32 result on the same numbers.

  Inputs are rounded to bfloat16 once; the float32 reference is computed on
  those rounded numbers, so the difference measures the loss's own arithmetic
  in bfloat16 (mixed-precision training feeds it bfloat16 activations), not
  the rounding of the inputs. A loss that upcasts before its softmax or its
  normalisation agrees to ~1e-6; one that takes a logsumexp of
  logits/temperature in bfloat16 is off by ~1e-1. Gradients must be finite,
  come back in bfloat16 and agree to `grad_rtol` of their largest entry.

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: inputs.
    hyper: keyword hyper-parameters.
    rtol, atol: value tolerances; grad_rtol, grad_atol_bf16: gradient
      tolerances (the latter in the units of `grad_atol`).
  """
  argnums = float_argnums(args)
  as16 = [np.asarray(a).astype(jnp.bfloat16) if i in argnums else a
          for i, a in enumerate(args)]
  as32 = [np.asarray(a, np.float32) if i in argnums else a
          for i, a in enumerate(as16)]
  value_16, grads_16 = value_and_grads(loss_fn, as16, hyper)
  value_32, grads_32 = value_and_grads(loss_fn, as32, hyper)
  _check_finite_outputs('bfloat16', value_16, grads_16, argnums)
  assert_close('bfloat16: value on bfloat16 inputs vs float32 on the same '
               'numbers', value_16, value_32, rtol=rtol, atol=atol)
  for i, g16, g32 in zip(argnums, grads_16, grads_32):
    if g16.dtype != jnp.bfloat16:
      raise AssertionError(f'bfloat16: the gradient of argument {i} is '
                           f'{g16.dtype}, not the input dtype bfloat16.')
    assert_close(f'bfloat16: gradient of argument {i} vs float32', g16, g32,
                 rtol=grad_rtol, atol=grad_atol(grad_atol_bf16, value_32, as32[i]))


def _batch_argnums(args: Args, batch_argnums: Optional[Collection[int]]
                   ) -> Tuple[int, ...]:
  if batch_argnums is None:
    return tuple(range(len(args)))
  return tuple(batch_argnums)


# ---------------------------------------------------------------------------
# A table entry: how to call one loss, which properties it has.


@dataclasses.dataclass(frozen=True)
class LossCase:
  """How to call one loss in a property suite, and which properties apply.

  Attributes:
    inputs: a strategy factory, called as `inputs(batch_sizes=..., dims=...)`
      and returning a Hypothesis strategy of argument tuples (e.g.
      `strategies.view_pairs`, or `functools.partial(strategies.views, 2,
      shared_rows=(32,))`).
    hyper: keyword hyper-parameters passed to the loss.
    collapse_value: the loss at collapse (float or function of the collapsed
      inputs); None leaves 'collapse' out of the properties.
    anti_collapse: the loss has an explicit anti-collapse term (negatives,
      variance, decorrelation): check its gradient spreads the embeddings.
    skip: properties that do not hold for this loss by design (say why in a
      comment next to the entry), e.g. {'symmetry'}, {'scale'}.
    batch_argnums: the per-example arguments (default: all); the others are
      shared (a queue, prototypes): not permuted, not split over devices.
    swap: the two arguments exchanged by the 'symmetry' check.
    symmetric_gradients: 'symmetry' also compares gradients (off when one
      side is a stop-gradient target).
    collapse_argnums: the arguments set constant by 'collapse' (default: all
      float arguments).
    tolerances: per-property keyword overrides for the check functions, e.g.
      {'bfloat16': {'rtol': 3e-2}}.
  """
  inputs: Callable[..., Any]
  hyper: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  collapse_value: Union[None, float, Callable[..., float]] = None
  anti_collapse: bool = False
  skip: FrozenSet[str] = frozenset()
  batch_argnums: Optional[Tuple[int, ...]] = None
  swap: Tuple[int, int] = (0, 1)
  symmetric_gradients: bool = True
  collapse_argnums: Optional[Tuple[int, ...]] = None
  tolerances: Mapping[str, Dict[str, float]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    unknown = set(self.skip) - set(PROPERTIES)
    if unknown:
      raise ValueError(f'Unknown properties {sorted(unknown)} in skip; known: '
                       f'{", ".join(PROPERTIES)}.')

  @property
  def properties(self) -> Tuple[str, ...]:
    """The properties this case is tested for."""
    return tuple(p for p in PROPERTIES if p not in self.skip and
                 (p != 'collapse' or self.collapse_value is not None))


def run_property(prop: str, loss_fn: LossFn, args: Args, case: LossCase) -> None:
  """Runs the check named `prop` on `args` with the options of `case`.

  Args:
    prop: one of PROPERTIES.
    loss_fn: the loss.
    args: inputs drawn from `case.inputs`.
    case: the table entry.
  """
  extra = dict(case.tolerances.get(prop, {}))
  hyper = dict(case.hyper)
  if prop == 'finite':
    check_finite(loss_fn, args, hyper=hyper, **extra)
  elif prop == 'permutation':
    check_permutation_invariance(loss_fn, args, hyper=hyper,
                                 batch_argnums=case.batch_argnums, **extra)
  elif prop == 'symmetry':
    check_view_symmetry(loss_fn, args, hyper=hyper, swap=case.swap,
                        gradients=case.symmetric_gradients, **extra)
  elif prop == 'scale':
    check_scale_invariance(loss_fn, args, hyper=hyper, **extra)
  elif prop == 'devices':
    check_device_equivalence(loss_fn, args, hyper=hyper,
                             batch_argnums=case.batch_argnums, **extra)
  elif prop == 'collapse':
    check_collapse(loss_fn, args, hyper=hyper,
                   collapse_value=case.collapse_value,
                   anti_collapse=case.anti_collapse,
                   collapse_argnums=case.collapse_argnums,
                   batch_argnums=case.batch_argnums, **extra)
  elif prop == 'jit':
    check_jit_consistency(loss_fn, args, hyper=hyper, **extra)
  elif prop == 'float64':
    check_float64_agreement(loss_fn, args, hyper=hyper, **extra)
  elif prop == 'bfloat16':
    check_bfloat16_agreement(loss_fn, args, hyper=hyper, **extra)
  else:
    raise ValueError(f'Unknown property {prop!r}; known: {", ".join(PROPERTIES)}.')
