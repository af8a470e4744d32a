"""Reusable property checks for loss functions.

Each check takes any loss callable `loss_fn(*args, axis_name=None, **hyper)`
returning a scalar, one set of inputs (NumPy or JAX arrays), and raises an
AssertionError that says which property broke, by how much and where. They
are plain functions: call them from a Hypothesis test (`check_property` runs
one over a `LossCase`'s input strategy), from a pytest parameterisation or
from a notebook.

Batch axes. By default axis 0 of every argument is the batch. Losses that
take stacks of crops ([views, batch, dim]) or shared arrays (a queue,
prototypes, a center) say so with `batch_axes`: one entry per positional
argument, the axis that indexes examples, or None for an argument shared by
the whole batch (not permuted, given whole to every device).

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
import os
from typing import (Any, Callable, Collection, Dict, FrozenSet, List, Mapping,
                    Optional, Sequence, Tuple, Union)

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.testing.devices import COMPILER_OPTIONS, device_equivalence

LossFn = Callable[..., jax.Array]
Args = Sequence[Any]
BatchAxes = Optional[Sequence[Optional[int]]]
# Two argument positions, several pairs exchanged together, or a function
# mapping the argument tuple to its view-swapped version.
Swap = Union[Tuple[int, int], Sequence[Tuple[int, int]],
             Callable[[Sequence[Any]], Sequence[Any]]]

# The properties a LossCase can be tested for, in the order they are reported.
PROPERTIES = ('finite', 'permutation', 'symmetry', 'scale', 'devices',
              'collapse', 'jit', 'float64', 'bfloat16')

# `check_property` draws SSL_JAX_EXAMPLES examples per property (default 15,
# sized for CI; 300 is a thorough run). Its own setting rather than the
# Hypothesis profile's `max_examples`: a project's profile is sized for its
# own tests (Hypothesis's default is 100, with a 200 ms deadline), while every
# new shape here costs a compile.
EXAMPLES_ENV = 'SSL_JAX_EXAMPLES'
DEFAULT_EXAMPLES = 15

# Share of those examples given to each property: an op-by-op 'jit' run costs
# ~100x a compiled example and the 2/4/8-device runs ~10x, and their failures
# depend on the loss's code more than on the values drawn ('finite' covers
# the degenerate inputs). CI (15 examples): 2 for 'jit', 5 for 'devices';
# thorough (300): 45 and 100.
EXAMPLE_SHARE = {'jit': 0.15, 'devices': 1 / 3}


def example_budget() -> int:
  """Examples per property: $SSL_JAX_EXAMPLES, or DEFAULT_EXAMPLES if unset.

  Raises:
    ValueError: the variable is set to something other than a positive integer.
  """
  raw = os.environ.get(EXAMPLES_ENV, '').strip()
  if not raw:
    return DEFAULT_EXAMPLES
  try:
    budget = int(raw)
  except ValueError:
    budget = 0
  if budget < 1:
    raise ValueError(f'{EXAMPLES_ENV}={raw!r}: give a positive number of '
                     f'examples per property (default {DEFAULT_EXAMPLES}).')
  return budget


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
               if jnp.issubdtype(np.asarray(a).dtype, jnp.floating))


def _hyper_key(hyper: Mapping[str, Any]) -> Any:
  try:
    key = tuple(sorted(hyper.items()))
    hash(key)
    return key
  except TypeError:
    return None


@functools.lru_cache(maxsize=512)
def _cached_value_and_grad(loss_fn: LossFn, hyper_key: Tuple,
                           argnums: Tuple[int, ...]) -> Callable:
  return _make_value_and_grad(loss_fn, dict(hyper_key), argnums)


def _make_value_and_grad(loss_fn, hyper, argnums):
  # Level-0 compiles (COMPILER_OPTIONS): measured 1.2 s -> 0.3 s of CPU for
  # NT-Xent's value and gradient, which a check then runs a few times.
  return jax.jit(jax.value_and_grad(
      lambda *a: loss_fn(*a, axis_name=None, **hyper), argnums=argnums),
                 compiler_options=COMPILER_OPTIONS)


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
    fn = (_cached_value_and_grad(loss_fn, key, argnums) if key is not None
          else _make_value_and_grad(loss_fn, hyper, argnums))
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
# Batch axes: every check works on a batch-first view of the arguments.


def _batch_axes(args: Args, batch_axes: BatchAxes) -> Tuple[Optional[int], ...]:
  if batch_axes is None:
    return (0,) * len(args)
  batch_axes = tuple(batch_axes)
  if len(batch_axes) != len(args):
    raise ValueError(f'batch_axes {batch_axes} has {len(batch_axes)} entries '
                     f'for {len(args)} arguments.')
  if all(a is None for a in batch_axes):
    raise ValueError('batch_axes: at least one argument must hold the batch.')
  return batch_axes


@functools.lru_cache(maxsize=256)
def _batch_first_loss(loss_fn: LossFn, batch_axes: Tuple[Optional[int], ...]
                      ) -> LossFn:
  """`loss_fn` taking its per-example arguments with the batch on axis 0.

  Cached so that the wrapper, and with it every jit and pmap cache keyed on
  the function, is the same object on every call.
  """
  if all(a in (0, None) for a in batch_axes):
    return loss_fn

  @functools.wraps(loss_fn)
  def batch_first(*args, **kwargs):
    return loss_fn(*[x if a in (0, None) else jnp.moveaxis(x, 0, a)
                     for x, a in zip(args, batch_axes)], **kwargs)

  return batch_first


def _canonical(loss_fn: LossFn, args: Args, batch_axes: BatchAxes
               ) -> Tuple[LossFn, List[Any], Tuple[int, ...]]:
  """(batch-first loss, batch-first args, indices of per-example args)."""
  axes = _batch_axes(args, batch_axes)
  moved = [a if ax in (0, None) else np.moveaxis(np.asarray(a), ax, 0)
           for a, ax in zip(args, axes)]
  batch = tuple(i for i, ax in enumerate(axes) if ax is not None)
  sizes = {np.shape(moved[i])[0] for i in batch}
  if len(sizes) != 1:
    raise ValueError(f'The per-example arguments {batch} have different batch '
                     f'sizes {sorted(sizes)} along their batch_axes {axes}.')
  return _batch_first_loss(loss_fn, axes), moved, batch


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
                                 batch_axes: BatchAxes = None,
                                 seed: int = 0, rtol: float = 1e-4,
                                 atol: float = 1e-6) -> None:
  """Permuting the batch (the same way in every view) permutes nothing else.

  The value must not change, and the gradient of each per-example argument
  must be the same permutation of the original gradient (shared arguments,
  such as a negative queue, keep their gradient).

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: inputs.
    hyper: keyword hyper-parameters.
    batch_axes: per argument, its batch axis or None if shared (default:
      axis 0 of every argument); all per-example arguments, integer labels
      and masks included, are permuted alike.
    seed: seed of the permutation (a reversal is used when it is the identity).
    rtol, atol: tolerances (float32 sums in another order differ in the last
      bits).
  """
  loss_fn, args, batch = _canonical(loss_fn, args, batch_axes)
  b = np.shape(args[batch[0]])[0]
  perm = np.random.default_rng(seed).permutation(b)
  if b > 1 and np.all(perm == np.arange(b)):
    perm = perm[::-1]
  permuted = [np.asarray(a)[perm] if i in batch else a
              for i, a in enumerate(args)]
  value, grads = value_and_grads(loss_fn, args, hyper)
  value_p, grads_p = value_and_grads(loss_fn, permuted, hyper)
  assert_close(f'permutation invariance: value under batch permutation {perm.tolist()}',
               value_p, value, rtol=rtol, atol=atol)
  for i, g, g_p in zip(float_argnums(args), grads, grads_p):
    expected = g[perm] if i in batch else g
    assert_close(f'permutation invariance: gradient of argument {i} (should be '
                 f'{"permuted like the batch" if i in batch else "unchanged"})',
                 g_p, expected, rtol=rtol, atol=grad_atol(atol, value, args[i]))


def _swapper(swap: Swap) -> Callable[[Sequence[Any]], List[Any]]:
  if callable(swap):
    return lambda args: list(swap(tuple(args)))
  pairs = [tuple(swap)] if np.ndim(swap) == 1 else [tuple(p) for p in swap]

  def exchange(args):
    out = list(args)
    for i, j in pairs:
      out[i], out[j] = args[j], args[i]
    return out

  return exchange


def swap_crops(*argnums: int, first: int = 0, second: int = 1) -> Callable:
  """A `swap` for crop stacks: exchanges crops `first` and `second` (axis 0)
  of each argument in `argnums`, e.g. both global crops of SwAV or DINO.

  Args:
    *argnums: the stacked arguments ([crops, ...]) to reorder together.
    first, second: the crop indices to exchange.

  Returns:
    A function mapping the argument tuple to its view-swapped version.
  """

  def swap(args):
    out = list(args)
    for i in argnums:
      a = np.asarray(args[i])
      order = np.arange(a.shape[0])
      order[[first, second]] = order[[second, first]]
      out[i] = a[order]
    return tuple(out)

  return swap


def check_view_symmetry(loss_fn: LossFn, args: Args, *,
                        hyper: Optional[Mapping[str, Any]] = None,
                        swap: Swap = (0, 1), gradients: bool = True,
                        rtol: float = 1e-4, atol: float = 1e-6) -> None:
  """Swapping the views gives the same loss (and swapped gradients).

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: inputs.
    hyper: keyword hyper-parameters.
    swap: what swapping the views means: two argument positions, a sequence
      of such pairs exchanged together (MoCo v3's (q1, q2, k1, k2) is
      ((0, 1), (2, 3))), or a function of the argument tuple (`swap_crops`).
    gradients: also require grad f(S x) == S grad f(x). Off for losses
      symmetric in value only (a stop-gradient on one side).
    rtol, atol: tolerances.
  """
  exchange = _swapper(swap)
  swapped = exchange(args)
  value, grads = value_and_grads(loss_fn, args, hyper)
  value_s, grads_s = value_and_grads(loss_fn, swapped, hyper)
  assert_close('view symmetry: value with the views swapped', value_s, value,
               rtol=rtol, atol=atol)
  if not gradients:
    return
  by_arg = dict(zip(float_argnums(args), grads))
  # The swap is linear and its own inverse, so grad f(S x) = S grad f(x):
  # apply S to the gradients laid out like the arguments.
  expected = exchange([by_arg.get(k, a) for k, a in enumerate(args)])
  for k, g_s in zip(float_argnums(swapped), grads_s):
    assert_close(f'view symmetry: gradient of argument {k} with the views '
                 f'swapped vs the swapped gradient', g_s, expected[k],
                 rtol=rtol, atol=grad_atol(atol, value, swapped[k]))


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
                             batch_axes: BatchAxes = None,
                             num_devices: Sequence[int] = (2, 4, 8),
                             rtol: float = 1e-5, grad_rtol: float = 1e-4,
                             atol: float = 1e-6) -> None:
  """N devices with axis_name='batch' equal one device on the whole batch.

  Builds on `device_equivalence`: the per-example arguments are split along
  their batch axis, shared ones are given whole to every device; every
  device must return the global value, the per-device gradients of the
  per-example inputs (divided by N, the library's pmap convention, see
  parallel.py) must reassemble into the 1-device gradient, and those of
  shared inputs, averaged over devices as the train step does, must equal
  it. A gradient off by a factor N (a non-differentiated all_gather, a
  missing or extra psum) or a statistic computed on the local batch only (a
  Sinkhorn without its psum) fails here.

  Args:
    loss_fn: `loss_fn(*args, axis_name=None|'batch', **hyper)`.
    args: global-batch inputs; the batch must divide by every N.
    hyper: keyword hyper-parameters.
    batch_axes: per argument, its batch axis or None if shared (default: 0).
    num_devices: the device counts to compare with one device.
    rtol: value tolerance; grad_rtol: gradient tolerance (relative to the
      largest entry); atol: absolute floor for both.
  """
  loss_fn, args, batch = _canonical(loss_fn, args, batch_axes)
  floats = float_argnums(args)
  for n in num_devices:
    (value_1, grads_1), (values_n, grads_n) = device_equivalence(
        loss_fn, list(args), n, sharded_argnums=batch, grad_argnums=floats,
        kwargs=dict(hyper or {}))
    assert_close(f'device equivalence: per-device values on {n} devices vs the '
                 f'1-device value', values_n, np.full(n, value_1), rtol=rtol,
                 atol=atol)
    for i, g1, gn in zip(floats, grads_1, grads_n):
      ratio = _ratio(gn, g1)
      how = (f'(divided by {n})' if i in batch
             else '(shared argument, mean over devices)')
      assert_close(f'device equivalence: gradient of argument {i} on {n} devices '
                   f'{how} vs 1 device'
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
  """Every row of the chosen arguments replaced by one shared unit vector.

  Unit norm rather than the inputs' scale: at collapse a loss on raw
  embeddings (VICReg, Barlow Twins) or on unnormalised bank rows would
  otherwise measure float32 cancellation at norms of 1e3 (a batch mean of
  identical rows is not exactly that row), which is the business of the
  dtype checks, not of the collapse value.

  Args:
    args: inputs; the chosen ones must share their last dimension d.
    argnums: the arguments to collapse (default: every float argument).
    seed: seed of the shared direction.

  Returns:
    The inputs with each chosen argument filled with the same unit vector of
    d entries, dtypes unchanged.
  """
  argnums = float_argnums(args) if argnums is None else tuple(argnums)
  d = np.shape(args[argnums[0]])[-1]
  c = np.random.default_rng(seed).normal(size=d)
  c /= np.linalg.norm(c)
  out = list(args)
  for i in argnums:
    a = np.asarray(args[i])
    if a.shape[-1] != d:
      raise AssertionError(f'collapse: argument {i} has last dimension '
                           f'{a.shape[-1]}, not {d}; pass collapse_argnums.')
    out[i] = np.broadcast_to(c, a.shape).astype(a.dtype)
  return out


def _tangential(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """x without its component along each row of `rows` (same shape [..., d])."""
  unit = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-30)
  return x - np.sum(x * unit, axis=-1, keepdims=True) * unit


def _check_spreads(loss_c, args, args_c, batch, collapsed, value, hyper,
                   collapse_argnums, view_argnums, spread, min_cosine, seed):
  """Step 2 of `check_collapse`: near collapse, descent spreads the views."""
  rng = np.random.default_rng(seed + 1)
  d = np.shape(collapsed[collapse_argnums[0]])[-1]
  b = np.shape(args_c[batch[0]])[0]
  per_example = rng.normal(size=(b, d)) * spread / np.sqrt(d)
  near, offsets = list(collapsed), {}
  for i in collapse_argnums:
    a = np.asarray(collapsed[i], np.float64)
    if i in view_argnums:
      e = np.broadcast_to(per_example.reshape((b,) + (1,) * (a.ndim - 2) + (d,)),
                          a.shape)
    else:
      e = rng.normal(size=a.shape) * spread / np.sqrt(d)
    near[i] = (a + e).astype(np.asarray(collapsed[i]).dtype)
    offsets[i] = np.asarray(near[i], np.float64) - a
  value_near, grads_near = value_and_grads(loss_c, near, hyper)
  _check_finite_outputs('collapse (near)', value_near, grads_near,
                        float_argnums(args))
  by_arg = dict(zip(float_argnums(args), grads_near))
  rows = {i: np.asarray(near[i], np.float64) for i in view_argnums}
  grad = {i: _tangential(np.asarray(by_arg[i], np.float64), rows[i])
          for i in view_argnums}
  offset = {i: _tangential(offsets[i], rows[i]) for i in view_argnums}
  slope = sum(float(np.sum(grad[i] * offset[i])) for i in view_argnums)
  grad_norm = np.sqrt(sum(float(np.sum(np.square(grad[i]))) for i in view_argnums))
  offset_norm = np.sqrt(sum(float(np.sum(np.square(offset[i])))
                            for i in view_argnums))
  # A cosine, not a sign: a loss with no anti-collapse force has a gradient
  # of rounding noise here, whose sign is a coin flip.
  cosine = slope / (grad_norm * offset_norm) if grad_norm > 0 else 0.0
  if not cosine < -min_cosine:
    raise AssertionError(
        f'collapse: near collapse (offsets of norm {spread:g}) a '
        f'gradient step does not spread the embeddings: the cosine between '
        f'the gradient and the spreading offsets is {cosine:.3g} (should be '
        f'< -{min_cosine:g}; gradient norm {grad_norm:.3g}). The anti-collapse '
        f'term does not push away from collapse. Loss {value_near:.6g} vs '
        f'{value:.6g} at collapse.')


def _check_collapse_value(loss_c, args, axes, collapsed, collapse_value,
                          hyper, rtol, atol) -> float:
  """Step 1 of `check_collapse`; returns the loss at collapse."""
  value, grads = value_and_grads(loss_c, collapsed, hyper)
  _check_finite_outputs('collapse', value, grads, float_argnums(args))
  if callable(collapse_value):
    original_layout = [a if ax in (0, None) else np.moveaxis(a, 0, ax)
                       for a, ax in zip(collapsed, axes)]
    expected = collapse_value(*original_layout)
  else:
    expected = collapse_value
  assert_close('collapse: the loss of constant embeddings vs the collapse value',
               value, expected, rtol=rtol, atol=atol)
  return value


def check_collapse(loss_fn: LossFn, args: Args, *,
                   collapse_value: Union[float, Callable[..., float]],
                   hyper: Optional[Mapping[str, Any]] = None,
                   anti_collapse: bool = False,
                   collapse_argnums: Optional[Collection[int]] = None,
                   view_argnums: Optional[Collection[int]] = None,
                   batch_axes: BatchAxes = None,
                   spread: float = 0.05, min_cosine: float = 0.1,
                   seed: int = 0, rtol: float = 1e-4, atol: float = 1e-5) -> None:
  """The loss of constant embeddings is the collapse value; anti-collapse terms
  push away from it.

  1. Every row of every collapsed argument is set to one vector: the value
     must equal `collapse_value` and be finite with finite gradients.
  2. With `anti_collapse`, each example i is moved off that vector by a small
     offset e_i, the same e_i in every view argument (so positives stay
     aligned and only the anti-collapse term acts); the other collapsed
     arguments (a queue, prototypes, noise samples) get independent offsets.
     A loss with an explicit anti-collapse term (negatives, a variance or
     decorrelation term) must then decrease when the offsets grow:
     cos(grad, e) < -min_cosine over the view arguments together, i.e. a
     gradient step spreads the embeddings. Only the part of the gradient
     and of the offsets orthogonal to each row counts: spreading is a change
     of direction, and a loss that does not normalise an input (bank rows,
     VICReg's embeddings) also pulls on its norm, which says nothing about
     collapse. Exactly at collapse the gradient of a normalised loss is 0 by
     symmetry, which is why this is checked next to collapse, not at it.

  Args:
    loss_fn: `loss_fn(*args, axis_name=None, **hyper)`.
    args: example inputs (their shapes, dtypes and scale are used).
    collapse_value: the expected loss at collapse, or a function of the
      collapsed inputs (in the loss's own layout) returning it, e.g.
      2 log(2N - 1) for NT-Xent (two queries per image).
    hyper: keyword hyper-parameters.
    anti_collapse: also check the direction of the gradient near collapse.
    collapse_argnums: the arguments to collapse (default: every float one).
    view_argnums: the collapsed arguments holding views of the batch's
      examples, which share e_i (default: the collapsed per-example ones).
    batch_axes: per argument, its batch axis or None if shared (default: 0).
    spread: norm of the offsets e_i (the collapsed rows have norm 1).
    min_cosine: how clearly the descent direction must point outwards.
    seed: seed of the collapsed vector and of the offsets.
    rtol, atol: tolerances for the collapse value.
  """
  axes = _batch_axes(args, batch_axes)
  loss_c, args_c, batch = _canonical(loss_fn, args, axes)
  collapse_argnums = (float_argnums(args) if collapse_argnums is None
                      else tuple(collapse_argnums))
  view_argnums = (tuple(i for i in collapse_argnums if i in batch)
                  if view_argnums is None else tuple(view_argnums))
  collapsed = collapsed_inputs(args_c, argnums=collapse_argnums, seed=seed)
  value = _check_collapse_value(loss_c, args, axes, collapsed, collapse_value,
                                hyper, rtol, atol)
  if not anti_collapse:
    return
  if not view_argnums:
    raise ValueError('anti_collapse needs at least one view argument.')
  _check_spreads(loss_c, args, args_c, batch, collapsed, value, hyper,
                 collapse_argnums, view_argnums, spread, min_cosine, seed)


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

  The float64 run happens inside `jax.enable_x64(True)` (this JAX's name for
  the former `jax.experimental.enable_x64`), so that JAX keeps the inputs in
  float64 and any computation the loss does not pin to float32 runs in
  double precision. A loss that casts to float32 by design (as the library's
  losses do) passes trivially on that part; what this catches is float32
  arithmetic that loses the answer (exp without max-subtraction, 1 - cos at
  near-identical vectors, variances by E[x^2] - E[x]^2) and results that
  depend on the x64 mode (random draws in the default float dtype).

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


# ---------------------------------------------------------------------------
# A table entry: how to call one loss, which properties it has.


@dataclasses.dataclass(frozen=True)
class LossCase:
  """How to call one loss in a property suite, and which properties apply.

  Attributes:
    inputs: a strategy factory, called as `inputs(batch_sizes=..., dims=...)`
      and returning a Hypothesis strategy of argument tuples in the loss's
      own layout (e.g. `strategies.view_pairs`, or
      `functools.partial(strategies.views, 2, shared_rows=(32,))`).
    hyper: keyword hyper-parameters passed to the loss.
    collapse_value: the loss at collapse (float or function of the collapsed
      inputs); None leaves 'collapse' out of the properties.
    anti_collapse: the loss has an explicit anti-collapse term (negatives,
      variance, decorrelation): check its gradient spreads the embeddings.
    skip: properties that do not hold for this loss by design (say why in a
      comment next to the entry), e.g. {'symmetry'}, {'scale'}.
    batch_axes: per argument, the axis indexing examples, or None for an
      argument shared by the batch (a queue, prototypes, a center): not
      permuted, not split over devices. Default: axis 0 of every argument.
    swap: what the 'symmetry' check exchanges (see `check_view_symmetry`).
    symmetric_gradients: 'symmetry' also compares gradients (off when one
      side is a stop-gradient target).
    scale_argnums: the arguments the loss normalises, rescaled by 'scale'
      (default: every float argument).
    collapse_argnums: the arguments set constant by 'collapse' (default: all
      float arguments).
    view_argnums: the collapsed arguments that are views of the batch's
      examples (default: the per-example ones); see `check_collapse`.
    tolerances: per-property keyword overrides for the check functions, e.g.
      {'bfloat16': {'rtol': 3e-2}}.
  """
  inputs: Callable[..., Any]
  hyper: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  collapse_value: Union[None, float, Callable[..., float]] = None
  anti_collapse: bool = False
  skip: FrozenSet[str] = frozenset()
  batch_axes: BatchAxes = None
  swap: Swap = (0, 1)
  symmetric_gradients: bool = True
  scale_argnums: Optional[Tuple[int, ...]] = None
  collapse_argnums: Optional[Tuple[int, ...]] = None
  view_argnums: Optional[Tuple[int, ...]] = None
  tolerances: Mapping[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    unknown = (set(self.skip) | set(self.tolerances)) - set(PROPERTIES)
    if unknown:
      raise ValueError(f'Unknown properties {sorted(unknown)} in skip or '
                       f'tolerances; known: {", ".join(PROPERTIES)}.')

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
                                 batch_axes=case.batch_axes, **extra)
  elif prop == 'symmetry':
    check_view_symmetry(loss_fn, args, hyper=hyper, swap=case.swap,
                        gradients=case.symmetric_gradients, **extra)
  elif prop == 'scale':
    check_scale_invariance(loss_fn, args, hyper=hyper,
                           argnums=case.scale_argnums, **extra)
  elif prop == 'devices':
    check_device_equivalence(loss_fn, args, hyper=hyper,
                             batch_axes=case.batch_axes, **extra)
  elif prop == 'collapse':
    check_collapse(loss_fn, args, hyper=hyper,
                   collapse_value=case.collapse_value,
                   anti_collapse=case.anti_collapse,
                   collapse_argnums=case.collapse_argnums,
                   view_argnums=case.view_argnums,
                   batch_axes=case.batch_axes, **extra)
  elif prop == 'jit':
    check_jit_consistency(loss_fn, args, hyper=hyper, **extra)
  elif prop == 'float64':
    check_float64_agreement(loss_fn, args, hyper=hyper, **extra)
  elif prop == 'bfloat16':
    check_bfloat16_agreement(loss_fn, args, hyper=hyper, **extra)
  else:
    raise ValueError(f'Unknown property {prop!r}; known: {", ".join(PROPERTIES)}.')


def check_property(prop: str, loss_fn: LossFn, case: LossCase, *,
                   batch_sizes: Sequence[int] = (16,), dims: Sequence[int] = (8,),
                   max_examples: Optional[int] = None) -> None:
  """Runs one property as a Hypothesis test over `case.inputs`.

  Call it from a test function (a pytest parameterisation over
  `case.properties` covers them all). Inputs are drawn with the given shape
  choices; every distinct shape is one more compilation of the loss, so keep
  them few. The default batch of 16 splits over 2, 4 and 8 devices.

  Args:
    prop: one of `case.properties`.
    loss_fn: the loss.
    case: how to call it.
    batch_sizes, dims: shape choices passed to `case.inputs`.
    max_examples: examples to draw; default: `example_budget()` times
      `EXAMPLE_SHARE` of the property (at least 2).

  Raises:
    AssertionError: "property 'devices' fails: ..." and the check's message;
      Hypothesis reports the smallest failing input it found.
  """
  if max_examples is None:
    max_examples = max(2, round(example_budget() * EXAMPLE_SHARE.get(prop, 1.0)))

  # No deadline: the first example of each shape compiles the loss (0.1-1 s),
  # which Hypothesis's default 200 ms deadline would report as a failure.
  @hypothesis.settings(max_examples=max_examples, deadline=None)
  @hypothesis.given(args=case.inputs(batch_sizes=tuple(batch_sizes),
                                     dims=tuple(dims)))
  def property_holds(args):
    try:
      run_property(prop, loss_fn, args, case)
    except AssertionError as e:
      # The table's name first: it is what `LossCase.skip`, `tolerances` and
      # a parameterised test id call the property.
      raise AssertionError(f'property {prop!r} fails: {e}') from None

  property_holds()
