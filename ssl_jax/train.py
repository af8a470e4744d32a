"""The training loop: set up or resume, step, log, checkpoint, stop cleanly."""

import functools
import itertools
import logging
import signal
import threading
from typing import Dict, Optional, Sequence

import jax
import ml_collections
import numpy as np

from ssl_jax import (checkpointing, data, divergence, features, methods,
                     metric_writers, models, monitors, parallel)
from ssl_jax import validation
from ssl_jax import workdir as workdir_lib
from ssl_jax.evaluation import registry as evaluators
# The pieces a config builds before the loop (also evaluation's restore
# template); re-exported because `train.setup(config)` is how tests and
# experiments build a run.
from ssl_jax.experiment import Setup, setup  # noqa: F401
from ssl_jax.methods.base import (DeviceStep, EpochContext, apply_update,
                                  device_step, global_norm)
from ssl_jax.train_state import TrainState

# Where the loop stops early; re-exported for callers of train_and_evaluate.
PREEMPTED_EXIT_CODE = divergence.PREEMPTED_EXIT_CODE
Preempted = divergence.Preempted

_runs = itertools.count()
# One program: run eagerly, the norm of the initial (host) or restored (global)
# parameters compiles a tiny program per leaf and operation, ~40 for a smoke
# model (about 1 s of CPU at the start of every run).
_param_norm = jax.jit(global_norm)
NonFiniteError = divergence.NonFiniteError
DivergenceError = divergence.DivergenceError


def fsdp_size(config: ml_collections.ConfigDict,
              device_count: Optional[int] = None) -> int:
  """config.mesh's FSDP axis size, checked against the devices (1: off)."""
  mesh = config.get('mesh') or {}
  return parallel.mesh_shape(mesh.get('data', -1), mesh.get('fsdp', 1),
                             device_count)[1]


def state_layout(s: Setup, mesh: Optional[parallel.Mesh] = None):
  """The train state's sharding per leaf between steps (config.mesh):
  replicated, or parameters, optimizer and method state over 'fsdp'."""
  devices = None if mesh is None else list(mesh.devices.flat)
  fsdp = fsdp_size(s.config, None if devices is None else len(devices))
  return parallel.state_shardings(
      s.state, fsdp, devices=devices,
      min_size=(s.config.get('mesh') or {}).get('fsdp_min_size',
                                                parallel.FSDP_MIN_SIZE))


def make_train_step(s: Setup, mesh: Optional[parallel.Mesh] = None,
                    donate_on_cpu: bool = False):
  """The step on every device of the mesh, donating the state (on
  accelerators, or everywhere with `donate_on_cpu`: memory measurements).

  Returns:
    `step(state, batch, monitor) -> (state, metrics)` on global arrays: the
    state laid out as `state_layout` (replicated, or sharded by FSDP), the
    boolean `monitor` replicated, the batch split on the batch axis; the
    metrics come back replicated scalars.
  """
  mesh = mesh or parallel.default_mesh()
  if fsdp_size(s.config, mesh.size) > 1:
    return _make_fsdp_step(s, state_layout(s, mesh), donate_on_cpu)

  def step(state, batch, monitor):
    return methods.train_step(state, batch, method=s.method, tx=s.tx,
                              lr_schedule=s.lr_schedule,
                              axis_name=parallel.AXIS, monitor=monitor)

  return parallel.data_parallel(step, mesh,
                                in_specs=(parallel.P(), parallel.P(parallel.AXIS),
                                          parallel.P()),
                                out_specs=(parallel.P(), parallel.P()),
                                donate_argnums=(0,),
                                donate_on_cpu=donate_on_cpu)


def _make_fsdp_step(s: Setup, layout, donate_on_cpu: bool):
  """`make_train_step` for a state stored as FSDP shards (`layout`): the
  per-device half on the shards, gathering them where used, and the update
  on the sharded global arrays (`parallel.fsdp_parallel`)."""
  specs = jax.tree.map(lambda sharding: sharding.spec, layout)
  # Leaves no fsdp size divides are stored padded; everything in the step
  # but the stored shards sees them cut to their logical shapes (s.state's).
  padded = parallel.has_padding(s.state, layout)
  like = s.state if padded else None
  body = parallel.FsdpBody(
      params=specs.params, state=specs.method_state,
      param_shapes=like.params if padded else None,
      state_shapes=like.method_state if padded else None,
      blocks=(models.FSDP_BLOCKS
              if (s.config.get('mesh') or {}).get('fsdp_per_block', True)
              else ()))

  def per_device(state, batch, monitor):
    return device_step(state, batch, method=s.method,
                       axis_name=parallel.BATCH_AXES, monitor=monitor,
                       fsdp=body)

  def update(state, d):
    return apply_update(state, d, tx=s.tx, method=s.method,
                        lr_schedule=s.lr_schedule, axis_name=None)

  P = parallel.P  # pylint: disable=invalid-name
  out_specs = DeviceStep(loss=P(), grads=specs.params, batch_stats=P(),
                         method_state=parallel.Kept(specs.method_state, P()),
                         probe=P(), metrics=P())
  def logical_out(d):
    kept = d.method_state
    return d.replace(
        grads=parallel.logical(d.grads, like.params),
        method_state=parallel.Kept(
            parallel.logical(kept.stored, like.method_state), kept.whole))

  return parallel.fsdp_parallel(
      per_device, update, layout,
      in_specs=(P(parallel.BATCH_AXES), P()), out_specs=out_specs,
      like=like, logical_out=logical_out if padded else None,
      donate_on_cpu=donate_on_cpu)


def logical_state(s: Setup, state, layout):
  """`state` (stored as `layout`) with its FSDP padding cut off, as readers
  outside the step (evaluation, epoch hooks, callers) must see it; itself
  when nothing is padded."""
  if not parallel.has_padding(s.state, layout):
    return state
  return parallel.logical(state, s.state)


def evaluation_view(s: Setup, state):
  """What evaluators read of `state` (as stored): the model (params,
  batch_stats, the online probe) in logical shapes, with `opt_state` and
  `method_state` set to None. Cutting a padded FSDP leaf gathers it whole
  onto every device, so an evaluation during training must not cut the
  optimizer's moments, memory banks, queues or teachers it never reads."""
  unread = dict(opt_state=None, method_state=None)
  return parallel.logical(state.replace(**unread), s.state.replace(**unread))


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _host_metrics(metrics) -> Dict[str, float]:
  return {k: float(v) for k, v in parallel.to_host(metrics).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: Sequence[str] = ()) -> TrainState:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  Nothing in the workdir changes before the config is validated, a resume's
  config matches the workdir's `config.json` (up to `allow_config_change`)
  and process 0 holds the workdir's lock (ssl_jax/workdir.py).

  Args:
    config: the run's config.
    workdir: local folder or URI (gs://bucket/run).
    allow_config_change: fields a resume may change (`--allow_config_change`).

  Returns:
    The final state (global arrays on the mesh's devices, in logical
    shapes: FSDP's padding cut off).

  Raises:
    Preempted: after SIGTERM/SIGINT, once the checkpoint is written.
    NonFiniteError: a non-finite loss, gradient or updated state under policy
      'stop' (the message names the last good checkpoint, or says there is
      none); DivergenceError (a NonFiniteError) when the parameter norm grows
      past config.training.param_norm_growth_limit.
    workdir_lib.ConfigMismatchError: a resume with another config.
    workdir_lib.WorkdirLockedError: another live run holds the workdir.
  """
  if config.distributed.get('enabled', False):
    parallel.initialize_distributed(config.distributed.coordinator_address,
                                    config.distributed.num_processes,
                                    config.distributed.process_id,
                                    config.distributed.get('heartbeat_timeout_s', 100),
                                    config.distributed.get('initialization_timeout_s', 300))
  validation.validate_config(config, workdir)
  parallel.check_batch_size(config.batch_size)
  fsdp_size(config)  # fails early on a mesh that does not fit the devices
  workdir_lib.check_config(config, workdir, allow_config_change)
  lock = None
  if parallel.is_main_process():
    lock = workdir_lib.WorkdirLock(workdir).acquire()
  try:
    if lock is not None:
      workdir_lib.save_config(config, workdir)
    return _train_and_evaluate(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict,
                        workdir: str) -> TrainState:
  """The run itself, once the workdir is checked, locked and its config saved."""
  is_main = parallel.is_main_process()
  s = setup(config)
  # Per-epoch passes over the training set (DeepCluster's k-means).
  embed_dataset = functools.partial(features.embed_dataset, s.source,
                                    config.eval.batch_size)
  checkpointer = checkpointing.Checkpointer(
      workdir, config.training.get('keep_checkpoints', 3))
  mesh = parallel.default_mesh()
  layout = state_layout(s)
  # Read straight into the run's layout (replicated or FSDP shards), whatever
  # the topology or mesh that wrote the checkpoint.
  state, meta = checkpointer.restore(s.state, set_aside_unreadable=True,
                                     sharding=layout)
  resumed = state is not None
  if resumed:
    s.method.check_inputs_record(meta.get('inputs', {}))
  else:
    state = s.state
  start_step = int(state.step)
  if resumed:
    logging.info('Resumed from step %d (%s).', start_step, workdir)

  writer = metric_writers.MetricWriter(
      workdir, enabled=is_main, resume_step=start_step if resumed else None)
  progress = metric_writers.Progress(
      s.total_steps, config.batch_size,
      enabled=is_main and config.training.get('progress', True))
  batches = data.TrainBatches(
      s.source, config.batch_size, config.seed, start_step=start_step,
      process_index=parallel.process_index(),
      process_count=parallel.process_count(),
      prefetch=config.training.get('prefetch', 2) + 2,
      crop_specs=data.crop_specs(config.augment.views),
      num_workers=data.resolve_num_workers(config.data.get('num_workers', 0)))
  device_batches = parallel.global_batches(
      batches, mesh, config.training.get('prefetch', 2))
  p_train_step = make_train_step(s)
  evaluator = evaluators.make_evaluations(config, s.durations)
  # The state lives on the devices from here on: global arrays, replicated
  # or FSDP-sharded (config.mesh).
  rstate = parallel.put_sharded(state, layout)
  padded = parallel.has_padding(s.state, layout)
  logical = functools.partial(logical_state, s, layout=layout)
  # Only methods that override the epoch hook get it: its view of a padded
  # FSDP leaf is the whole (replicated) leaf, which the others never need.
  has_epoch_hook = (type(s.method).on_epoch_start
                    is not methods.Method.on_epoch_start)
  # Collapse monitors run on the steps whose metrics are read (a traced flag,
  # so both kinds of step share one compilation).
  monitor_flags = {f: parallel.put_replicated(np.bool_(f), mesh)
                   for f in (False, True)}
  # Unique per run of this process: one process may train several runs.
  parallel.wait_for_all_processes(
      f'ssl_jax_train_start_{start_step}_{next(_runs)}')
  stop = _StopSignal()

  def save(rstate):
    # Orbax writes the global arrays from the devices (each process its own
    # shards); no host copy of the whole state.
    checkpointer.save(rstate, {'data_position': int(parallel.to_host(rstate.step)),
                               'steps_per_epoch': s.steps_per_epoch,
                               'inputs': s.method.inputs_record()})

  log_every = config.training.log_every
  checkpoint_every = config.training.checkpoint_every
  policy = config.training.get('nonfinite_policy', 'stop')
  collapse_threshold = config.training.get('collapse_std_threshold', 0.0)
  seen_nonfinite = int(state.nonfinite_steps)
  norm_watch = divergence.ParamNormWatch(
      config.training.get('param_norm_growth_limit', 0.0),
      float(_param_norm(state.params)))
  last_checked_step = start_step
  progress.start(start_step)

  def last_good():
    # Saves are asynchronous: name only a step whose checkpoint is committed.
    # Every save follows a synchronous check of its step, so it is good.
    checkpointer.wait()
    return divergence.last_good_checkpoint(checkpointer.latest_step())

  def record(step, metrics, evaluating, write, monitored=True):
    """Checks one step's metrics and writes them (blocks until on host)."""
    nonlocal seen_nonfinite, last_checked_step
    host = _host_metrics(metrics)
    if not monitored:  # skipped in the step: NaN placeholders
      for name in monitors.METRICS:
        host.pop(name, None)
    nonfinite = int(host['nonfinite_steps'])
    if nonfinite > seen_nonfinite:
      where = (f'at step {step}' if last_checked_step + 1 == step else
               f'between steps {last_checked_step + 1} and {step}')
      message = (f'The loss, gradients or updated state became non-finite '
                 f'{nonfinite - seen_nonfinite} time(s) {where} '
                 f'(last loss {host["loss"]}, grad_norm {host["grad_norm"]}, '
                 f'param_norm {host["param_norm"]}); '
                 f'those updates were not applied.')
      if policy == 'stop':
        raise NonFiniteError(
            message + f' Stopping (nonfinite_policy=stop); {last_good()}. '
            f'Lower the learning rate or set '
            f'--config.training.nonfinite_policy=skip.')
      logging.warning('%s Skipping them (nonfinite_policy=skip).', message)
      seen_nonfinite = nonfinite
    last_checked_step = step
    diverging = norm_watch.check(step, host['param_norm'])
    if diverging:
      raise DivergenceError(f'{diverging} Stopping; {last_good()}.')
    host['nonfinite_steps'] = nonfinite
    host['epoch'] = step / s.steps_per_epoch
    host['bad_files'] = s.source.bad_files
    data.check_unreadable_share(
        s.source, step * config.batch_size // parallel.process_count(),
        config.data.get('max_bad_file_fraction', 1.0))
    if host.get('embedding_std', np.inf) < collapse_threshold:
      logging.warning(
          'Possible collapse at step %d: embedding_std %.4g is below '
          'config.training.collapse_std_threshold=%g (about 1/sqrt(d) '
          'when healthy, 0 when every embedding is the same).', step,
          host['embedding_std'], collapse_threshold)
    if evaluating:
      host.update(evaluator(evaluation_view(s, rstate), step,
                            last=step == s.total_steps))
    if write:
      host['images_per_sec'] = progress.images_per_second(step)
      writer.write(step, host)
      progress.report(step, host)

  # A plain logging step does not wait for its metrics: they are copied to
  # the host in the background and recorded after the next step has been
  # dispatched, so the device never idles on the host. Steps that checkpoint,
  # evaluate, end or stop the run record synchronously, after any pending
  # record, so a non-finite step always stops the run before the next save.
  pending = None  # (step, metrics) of a logging step not yet recorded
  try:
    for step in range(start_step + 1, s.total_steps + 1):
      if (step - 1) % s.steps_per_epoch == 0 and has_epoch_hook:
        rstate = s.method.on_epoch_start(logical(rstate), EpochContext(
            epoch=(step - 1) // s.steps_per_epoch, durations=s.durations,
            num_examples=len(s.source), embed_dataset=embed_dataset))
        if padded:
          rstate = parallel.put_sharded(rstate, layout)
      last = step == s.total_steps
      evaluating = evaluator is not None and (evaluator.due(step) or last)
      monitored = (step % log_every == 0 or last or evaluating or
                   step % checkpoint_every == 0)
      rstate, metrics = p_train_step(rstate, next(device_batches),
                                     monitor_flags[monitored])
      if pending is not None:
        record(*pending, evaluating=False, write=True)
        pending = None
      preempted = stop.received is not None
      saving = step % checkpoint_every == 0 or last or preempted
      if saving or evaluating:
        record(step, metrics, evaluating,
               write=step % log_every == 0 or last or evaluating,
               monitored=monitored)
      elif step % log_every == 0:
        for x in jax.tree.leaves(metrics):
          x.copy_to_host_async()
        pending = (step, metrics)
      if saving:
        save(rstate)
        if preempted and not last:
          checkpointer.wait()
          raise Preempted(step)
  finally:
    stop.restore()
    batches.close()
    checkpointer.close()
    writer.close()
  if s.source.bad_files:
    logging.warning('%d unreadable image file(s) were skipped (replaced by '
                    'black images).', s.source.bad_files)
  return logical(rstate)
