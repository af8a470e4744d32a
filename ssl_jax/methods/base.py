"""What a method is, and the train step every method family shares.

A method owns its networks, its loss and its extra state. It implements:

  init(rng)                      -> (params, batch_stats, method_state)
  loss(params, state, views, batch, rng, axis_name)
                                 -> (loss, StepOutput)
  after_update(params, method_state, step) -> method_state
                                    (EMA teacher, prototype normalisation ...)
  project_params(params, step)   -> params (optional constraint, e.g. unit
                                    prototypes)
  on_epoch_start(state, context) -> state (optional host hook, e.g.
                                    DeepCluster's k-means; `EpochContext`)
  bind_inputs(load_backbone)     (optional: read-only inputs of the run, e.g.
                                    distillation's teacher)

and the shared `train_step` below does the rest: per-device randomness,
on-device augmentation, gradients averaged over devices, the optimizer, the
non-finite guard and the online probe. All of it is pure, so the step can be
jit-compiled, pmapped over devices or run on one device in a test.
"""

import abc
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax import linear_probe, models, monitors, parallel
from ssl_jax.data import augment
from ssl_jax.data.info import DataInfo
from ssl_jax.durations import Durations
from ssl_jax.features import EmbeddedDataset
from ssl_jax.methods import memory
from ssl_jax.registry import Registry
from ssl_jax.train_state import TrainState

METHODS = Registry('method')


# `(variables, key, images) -> embeddings`, a mesh function (see
# `features.embed_dataset`).
EmbedFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# A run's workdir -> (its config, its backbone's variables on the host).
BackboneLoader = Callable[[str], Tuple[ml_collections.ConfigDict, Dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class EpochContext:
  """What a method's per-epoch host work may use; built by the training loop.

  Attributes:
    epoch: index of the epoch about to start.
    durations: the run's length and epochs in steps.
    num_examples: size of the training set.
    embed_dataset: `(embed_fn, variables, key) -> EmbeddedDataset`: every
      training example through `embed_fn` on the mesh (eval-mode pass over
      the data, no augmentation but what `embed_fn` applies).
  """
  epoch: int
  durations: Durations
  num_examples: int
  embed_dataset: Callable[[EmbedFn, Any, jax.Array], EmbeddedDataset]


@flax.struct.dataclass
class StepOutput:
  """What a method's loss returns next to the scalar loss.

  Attributes:
    batch_stats: updated BatchNorm statistics of the trainable network.
    method_state: updated method state (queues, centers; the EMA teacher is
      updated later, in `after_update`, from the new parameters).
    metrics: scalars to log (already averaged over devices).
    features: backbone features [b, D] of the first view, for the online
      probe (stop-gradient is applied by the caller).
    embeddings: [b, d] embeddings of the first view, for collapse monitors.
  """
  batch_stats: Any
  method_state: Any
  metrics: Dict[str, jax.Array]
  features: Optional[jax.Array] = None
  embeddings: Optional[jax.Array] = None


class Method(abc.ABC):
  """A self-supervised method configured by a ConfigDict.

  Args:
    config: the full run config (reads `model`, `augment`, `method`).
    data_info: what the method may know of its training data.
    durations: the run's length and epochs in steps, for schedules (EMA
      momentum, temperatures, freezing) and durations given in epochs.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               data_info: DataInfo, durations: Durations):
    self.config = config
    self.data_info = data_info
    self.durations = durations

  @property
  def total_steps(self) -> int:
    return self.durations.total_steps

  # -- views -----------------------------------------------------------------

  @property
  def view_specs(self) -> ml_collections.ConfigDict:
    return self.config.augment.views

  @property
  def num_views(self) -> int:
    return sum(self.view_specs[v].get('count', 1) for v in self.view_specs)

  def make_views(self, rng: jax.Array, images: Optional[jax.Array],
                 crops: Optional[Dict[str, jax.Array]] = None,
                 example_offset: Any = 0) -> List[jax.Array]:
    """The augmented views of `images`, or of the host's `crops` (files).

    `example_offset` is the global index of the first example (per-example
    keys, see `augment.make_views`).
    """
    return augment.make_views(rng, images, self.view_specs,
                              self.data_info.mean, self.data_info.std, crops,
                              example_offset)

  def sample_input(self) -> jax.Array:
    """A normalised dummy batch at the first view's resolution, for init."""
    size = self.view_specs[next(iter(self.view_specs))].size
    return jnp.zeros((2, size, size, self.data_info.image_shape[-1]), jnp.float32)

  # -- the method ------------------------------------------------------------

  @abc.abstractmethod
  def init(self, rng: jax.Array) -> Tuple[Any, Any, Any]:
    """Returns (params, batch_stats, method_state); params['backbone'] exists."""

  @abc.abstractmethod
  def loss(self, params: Any, state: TrainState, views: Sequence[jax.Array],
           batch: Dict[str, jax.Array], rng: jax.Array,
           axis_name: Optional[str]) -> Tuple[jax.Array, StepOutput]:
    """The method's loss on this device's views (global value) and outputs."""

  def whole_view_features(self, params: Any, state: TrainState,
                          view: jax.Array) -> Optional[jax.Array]:
    """Eval-mode backbone features [b, D] of whole views, for the online probe.

    Methods that train the backbone on tiles or patches (Jigsaw, relative
    position, CPC) still have it evaluated on whole images, and so is the
    online probe (`evaluation.periodic`); a probe fitted to pooled patch
    features would be fitted to other inputs, and with `pooling='flatten'`
    to another width. None when the run has no probe, which skips the extra
    forward pass.
    """
    if not state.probe:
      return None
    backbone = models.get_backbone(self.config.model)
    features, _ = backbone.apply(
        {'params': params['backbone'],
         'batch_stats': state.batch_stats.get('backbone', {})},
        view, train=False)
    return jax.lax.stop_gradient(features)

  def after_update(self, params: Any, method_state: Any,
                   step: jax.Array) -> Any:
    """Updates method state from the new parameters (default: unchanged).

    Args:
      params: the parameters after this step's optimizer update, theta(t+1).
      method_state: the state the loss returned.
      step: t, the 0-based index of the step that produced `params`. Official
        codes differ in which momentum they pair with theta(t+1): BYOL and
        DINO use m(t), MoCo v3 m(t+1); each method picks its own.

    Returns:
      The new method state.
    """
    del params, step
    return method_state

  def project_params(self, params: Any, step: jax.Array) -> Any:
    """Maps parameters back onto their constraint set after each update.

    Called in `train_step` right after the optimizer update (default: the
    identity). SwAV re-normalises its prototypes to the unit sphere here.
    """
    del step
    return params

  def on_epoch_start(self, state: TrainState,
                     context: EpochContext) -> TrainState:
    """A host-side hook run by the training loop before each epoch's first step.

    Args:
      state: the train state (global arrays replicated on the mesh).
      context: the epoch and what the hook may do with the training data.

    Returns:
      The state to train on (replicated on the mesh, e.g. through
      `parallel.put_replicated`); the default returns it unchanged.
      DeepCluster extracts features, runs k-means and stores pseudo-labels.
    """
    del context
    return state

  def bind_inputs(self, load_backbone: BackboneLoader) -> None:
    """Loads the run's read-only inputs, once, before `init` (default: none).

    Args:
      load_backbone: reads another run's backbone from its workdir.
    """
    del load_backbone

  def inputs_record(self) -> Dict[str, str]:
    """What the checkpoints record of the read-only inputs (paths, hashes)."""
    return {}

  def check_inputs_record(self, record: Dict[str, Any]) -> None:
    """Raises ValueError if a checkpoint was trained on other inputs."""
    del record


def get_method(config: ml_collections.ConfigDict, data_info: DataInfo,
               durations: Durations) -> Method:
  """The method `config.method.name`, built for this data and run length."""
  return METHODS.get(config.method.name)(config, data_info, durations)


# ---------------------------------------------------------------------------
# The train step.


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.bool_(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _step_is_finite(state: TrainState, loss, grads, params, opt_state,
                    batch_stats, probe, method_state, method: 'Method',
                    axis_name: Optional[str]) -> jax.Array:
  """Whether everything the step would write is finite, on every device.

  Checks the loss, the gradients and the updated parameters, optimizer state,
  BatchNorm statistics, probe and method state: a finite gradient times a NaN
  or huge learning rate gives non-finite parameters (or optimizer moments)
  although the loss and gradients are fine. Pending bank/queue writes are
  checked on the rows they write (the rest of the array is what was accepted
  before), and the teacher on its update recomputed here as a reduction, so
  nothing the size of a bank, queue or teacher is materialised twice. Leaves
  the method returned unchanged are skipped.

  Returns:
    A boolean scalar, the same on every device (a device that sees a
    non-finite value vetoes the step everywhere, so replicas never diverge).
  """
  old = {id(x) for x in jax.tree.leaves(state.method_state)}
  updated_state = method.after_update(
      params, memory.unwritten(state.method_state, method_state), state.step)
  changed = [x for x in jax.tree.leaves(updated_state) if id(x) not in old]
  writes = [x for x in jax.tree.leaves(method_state, is_leaf=memory.is_write)
            if memory.is_write(x)]
  finite = (jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params) &
            _all_finite(opt_state) & _all_finite(batch_stats) &
            _all_finite(probe) & _all_finite(changed) & _all_finite(writes))
  bad_devices = parallel.psum((~finite).astype(jnp.int32), axis_name)
  return bad_devices == 0


def global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def _loss_and_grads(state: TrainState, batch: Dict[str, jax.Array],
                    method: Method, axis_name: Optional[str],
                    fsdp: Optional[parallel.FsdpBody] = None):
  """The method's loss on this step's views, its outputs and mean gradients.

  With `fsdp`, `state.params` and `state.method_state` are this device's
  shards: the loss sees them gathered, the gradients come back as shards, and
  the returned method state is a `parallel.Kept` (see `parallel.FsdpBody`).
  """
  rng, _ = jax.random.split(state.rng)
  view_rng, loss_rng = jax.random.split(rng)
  loss_rng = parallel.per_device_rng(loss_rng, axis_name)
  # Views draw per-example keys from the global example index rather than a
  # per-device key, so they do not depend on how many devices share the batch.
  offset = parallel.global_offset(jax.tree.leaves(batch)[0].shape[0], axis_name)
  # Batches of files carry views the host cropped from the original images
  # (data/pipeline.py); in-memory datasets carry images the device crops.
  views = method.make_views(view_rng, batch.get('image'), batch.get('crops'),
                            example_offset=offset)

  inject_at = method.config.get('training', {}).get('inject_nonfinite_at_step', 0)

  def loss_fn(params, state=state):
    loss, out = method.loss(params, state, views, batch, loss_rng, axis_name)
    if inject_at:
      # Test hook (config.training.inject_nonfinite_at_step): a NaN factor on
      # the loss makes the gradients NaN too, as a real blow-up would.
      loss = loss * jnp.where(state.step + 1 == inject_at, jnp.nan, 1.0)
    return loss, out

  if fsdp is None:
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, out, parallel.mean_gradients(grads, axis_name)

  def whole_loss(params, method_state):
    loss, out = loss_fn(params, state.replace(params=params,
                                              method_state=method_state))
    return loss, (out.replace(method_state=None), out.method_state)

  (loss, (out, kept)), grads = jax.value_and_grad(
      fsdp.gathered_loss(whole_loss), has_aux=True)(state.params,
                                                    state.method_state)
  return loss, out.replace(method_state=kept), fsdp.mean_gradients(grads)


def _online_probe(probe, out: StepOutput, batch, axis_name):
  """The probe after its step on this batch, and the method's + its metrics."""
  metrics = dict(out.metrics)
  if probe and out.features is not None:
    probe, probe_metrics = linear_probe.online_step(
        probe, out.features, batch['label'], axis_name)
    metrics.update(probe_metrics)
  return probe, metrics


def _propose_update(state, grads, method, tx):
  """(params, opt_state) after the update, before the guard."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = method.project_params(optax.apply_updates(state.params, updates),
                                 state.step)
  return params, opt_state


def _accept_if_finite(finite, state, method, params, opt_state, batch_stats,
                      probe, proposed_state):
  """The proposed update where `finite`, else the state's current values."""

  def accept(_):
    # Banks and queues are written here, teachers updated here: after the
    # decision, so their old copies are dead and XLA updates them in place.
    method_state = method.after_update(
        params, memory.apply_writes(state.method_state, proposed_state),
        state.step)
    return params, opt_state, batch_stats, probe, method_state

  def reject(_):
    return (state.params, state.opt_state, state.batch_stats, state.probe,
            state.method_state)

  return jax.lax.cond(finite, accept, reject, None)


@flax.struct.dataclass
class DeviceStep:
  """The per-device half of a step (`device_step`): what the update needs.

  Attributes:
    loss: the global loss.
    grads: the mean gradient over every device.
    batch_stats: BatchNorm statistics, the same on every device.
    method_state: the method state the loss returned (pending writes
      included).
    probe: the online probe after its step.
    metrics: the method's, the probe's and the collapse monitors' metrics.
  """
  loss: jax.Array
  grads: Any
  batch_stats: Any
  method_state: Any
  probe: Any
  metrics: Dict[str, jax.Array]


def device_step(state: TrainState, batch: Dict[str, jax.Array], *,
                method: Method, axis_name: Any, monitor: Any = True,
                fsdp: Optional[parallel.FsdpBody] = None) -> DeviceStep:
  """The loss, gradients, probe and monitors on this device's examples.

  Args: see `train_step`; `fsdp`: the state's parameters and method state
  are shards (`_loss_and_grads`).

  Returns:
    The `DeviceStep`, whose values are the same on every device.
  """
  loss, out, grads = _loss_and_grads(state, batch, method, axis_name, fsdp)
  probe, metrics = _online_probe(state.probe, out, batch, axis_name)
  if out.embeddings is not None:
    metrics.update(monitors.collapse_metrics(out.embeddings, axis_name,
                                             enabled=monitor))
  # Statistics are identical across devices with global BN; averaging makes
  # them so for per-device BN too, so that any device's copy can be saved.
  return DeviceStep(loss=loss, grads=grads,
                    batch_stats=parallel.pmean(out.batch_stats, axis_name),
                    method_state=out.method_state, probe=probe,
                    metrics=metrics)


def apply_update(state: TrainState, d: DeviceStep, *,
                 tx: optax.GradientTransformation, method: Method,
                 lr_schedule: Any, axis_name: Optional[str]
                 ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """The optimizer step from `d`, kept only if everything is finite.

  Runs per device (axis_name as `device_step`'s) or on global arrays
  (axis_name None: FSDP's update outside `shard_map`, where norms and
  projections see whole leaves).

  Returns:
    (new state, metrics of this step).
  """
  params, opt_state = _propose_update(state, d.grads, method, tx)
  finite = _step_is_finite(state, d.loss, d.grads, params, opt_state,
                           d.batch_stats, d.probe, d.method_state, method,
                           axis_name)
  # Of the proposed update, accepted or not: what the explosion policy needs.
  param_norm = global_norm(params)

  params, opt_state, batch_stats, probe, method_state = _accept_if_finite(
      finite, state, method, params, opt_state, d.batch_stats, d.probe,
      d.method_state)
  new_state = state.replace(
      params=params, opt_state=opt_state, batch_stats=batch_stats,
      probe=probe, method_state=method_state, step=state.step + 1,
      rng=jax.random.split(state.rng)[1],
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
  metrics = dict(d.metrics)
  metrics.update(
      loss=d.loss, learning_rate=lr_schedule(state.step),
      grad_norm=global_norm(d.grads), param_norm=param_norm,
      finite=finite.astype(jnp.float32),
      # The running count, so the loop needs nothing from the state to check
      # it (the state's buffers are donated to the next step).
      nonfinite_steps=new_state.nonfinite_steps)
  return new_state, metrics


def train_step(state: TrainState, batch: Dict[str, jax.Array], *,
               method: Method, tx: optax.GradientTransformation,
               lr_schedule: Any, axis_name: Optional[str],
               monitor: Any = True
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimisation step of any method (pure, per device).

  The body has pmap semantics: the loop runs it with `parallel.data_parallel`
  (jit of shard_map over the mesh); with axis_name=None it is one device's.
  FSDP runs its two halves, `device_step` and `apply_update`, apart
  (`parallel.fsdp_parallel`).

  A step whose loss, gradients or updated state (parameters, optimizer,
  BatchNorm, probe, method state) are not finite on any device leaves the
  state unchanged (but for the step counter, rng and `nonfinite_steps`), so
  a bad batch or learning rate can never write NaNs into the parameters or a
  checkpoint; the training loop decides whether to go on or stop
  (config.training.nonfinite_policy).
  Args:
    state: the train state (whole on every device).
    batch: this device's examples.
    method, tx, lr_schedule: the run's method, optimizer and its schedule.
    axis_name: None or `parallel.AXIS`.
    monitor: whether to compute the collapse monitors (an all-gather of the
      embeddings, an SVD and a B x B matrix). A Python bool decides at trace
      time; a traced boolean (the loop passes one, True on logging steps)
      skips them with `lax.cond` without a second compilation, and the
      skipped monitors read NaN.

  Returns:
    (new state, metrics of this step).
  """
  d = device_step(state, batch, method=method, axis_name=axis_name,
                  monitor=monitor)
  return apply_update(state, d, tx=tx, method=method,
                      lr_schedule=lr_schedule, axis_name=axis_name)
