"""A run built from its config, and a trained run read back from its workdir.

Below the training loop and evaluation, which both need the pieces a config
makes (data source, method, optimiser, initial state): the loop to train
them, evaluation and export as the template a checkpoint is restored into.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections

from ssl_jax import checkpointing, data, interop, methods, models, optim
from ssl_jax import validation
from ssl_jax import workdir as workdir_lib
from ssl_jax.durations import Durations
from ssl_jax.features import backbone_variables
from ssl_jax.linear_probe import init_probe
from ssl_jax.train_state import TrainState


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the first step."""
  config: ml_collections.ConfigDict
  source: data.Source
  method: methods.Method
  tx: Any
  lr_schedule: Any
  durations: Durations
  state: TrainState  # freshly initialised (host)

  @property
  def total_steps(self) -> int:
    return self.durations.total_steps

  @property
  def steps_per_epoch(self) -> int:
    return self.durations.steps_per_epoch


def feature_dim(config, method, params, batch_stats) -> int:
  backbone = models.get_backbone(config.model)
  # Arguments, not a closure: they may be ShapeDtypeStructs (abstract setup).
  out = jax.eval_shape(
      lambda p, s: backbone.apply({'params': p, 'batch_stats': s},
                                  method.sample_input(), train=False),
      params['backbone'], batch_stats.get('backbone', {}))
  return out[0].shape[-1]


def setup(config: ml_collections.ConfigDict,
          source: Optional[data.Source] = None,
          abstract: bool = False) -> Setup:
  """Builds data source, method, optimizer and an initial state (host).

  Args:
    config: the run's config.
    source: the training source; None reads `config.data` (tests pass a
      stand-in that only describes the images, to check a recipe without
      its dataset).
    abstract: if True, the state is `jax.ShapeDtypeStruct`s (jax.eval_shape
      of the initialisation): nothing is computed or compiled.
  """
  if source is None:
    source = data.get_source(config.data, config.data.train_split,
                             config.data.get('max_train_examples', 0))
  validation.validate_data(config, source)
  if not abstract:
    # Decodes a sample of the files now: a folder of unreadable files fails
    # before compiling instead of training on black images.
    data.probe_unreadable(source, config.data.get('max_bad_file_fraction', 1.0))
  run = Durations.of_run(config, len(source), source.name)
  lr_schedule = optim.learning_rate_schedule(
      config.optimizer, config.batch_size, run.total_steps,
      run.warmup_steps(config))
  tx = optim.get_optimizer(config.optimizer, lr_schedule, run.total_steps,
                           global_batch=config.batch_size)
  method = methods.get_method(config, data.DataInfo.of(source), run)
  method.bind_inputs(load_backbone)

  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  if abstract:
    params, batch_stats, method_state = jax.eval_shape(method.init, init_rng)
  else:
    params, batch_stats, method_state = jax.jit(method.init)(init_rng)
    if config.model.get('init_from'):
      # Read before the first step, so a file that does not fit fails now.
      params, batch_stats, method_state = interop.init_backbone(
          config.model, params, batch_stats, method_state)
  probe = {}
  if config.training.get('online_probe', False) and source.num_classes > 0:
    probe = init_probe(feature_dim(config, method, params, batch_stats),
                       source.num_classes)

  def create(params, batch_stats, method_state, probe):
    return TrainState.create(params=params, batch_stats=batch_stats,
                             opt_state=tx.init(params), rng=train_rng,
                             method_state=method_state, probe=probe)

  if abstract:
    state = jax.eval_shape(create, params, batch_stats, method_state, probe)
  else:
    # One program for the optimizer's zeros instead of one eager op per leaf.
    state = jax.device_get(jax.jit(create)(params, batch_stats, method_state,
                                           probe))
  return Setup(config, source, method, tx, lr_schedule, run, state)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (its workdir's config.json)."""
  config = workdir_lib.read_config(workdir)
  if config is None:
    raise FileNotFoundError(
        f'{workdir_lib.join(workdir, workdir_lib.CONFIG_FILE)} not found: is '
        f'{workdir!r} the --workdir of a training run?')
  return ml_collections.ConfigDict(config)


def load_run(workdir: str, step: Optional[int] = None, *,
             with_init: bool = True):
  """Returns (config, setup, trained_state) of the run in `workdir`.

  Args:
    workdir: the --workdir of a training run.
    step: checkpoint step (default: the newest usable one).
    with_init: build `setup.state`, the run's initial state (same seed), i.e.
      the encoder at random initialisation that the trained one is compared
      against. Compiling the initialiser costs ~11 s of CPU for the smoke
      SimCLR model, so without it the checkpoint is restored into a template
      of shapes only and `setup` is None.

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
    ValueError: `step` is not one of its checkpoints.
  """
  config = load_config(workdir)
  checkpointer = checkpointing.Checkpointer(workdir, writer=False)
  try:
    return _load_run(config, checkpointer, workdir, step, with_init)
  finally:
    # Orbax's background threads must stop before the interpreter exits.
    checkpointer.close()


def _load_run(config, checkpointer, workdir, step, with_init):
  steps = checkpointer.all_steps()
  if step is not None and step not in steps:
    raise ValueError(
        f'{workdir} has no checkpoint at step {step}; it has '
        + (f'steps {", ".join(map(str, steps))}: pass one of them as --step, or '
           f'leave --step out for the newest.' if steps else
           'none: train first with python -m ssl_jax.main.'))
  # The checkpoint supersedes the weights the run started from, which need
  # not exist any more; `setup.state` is then the random initialisation.
  init_config = ml_collections.ConfigDict(config.to_dict())
  if init_config.model.get('init_from'):
    init_config.model.init_from = ''
  if with_init:
    s = setup(init_config)
    template = s.state
  else:
    s = None
    # The state's shapes and dtypes (no compilation) are all a restore needs.
    template = setup(init_config, abstract=True).state
  state, _ = checkpointer.restore(template, step)
  if state is None:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints: train '
                            f'first with python -m ssl_jax.main.')
  return config, s, state


def load_backbone(workdir: str) -> Tuple[ml_collections.ConfigDict,
                                         Dict[str, Any]]:
  """(config, backbone variables on the host) of a trained run's newest checkpoint.

  What a method that reads another run (distillation's teacher) is given
  through `Method.bind_inputs`.
  """
  config, _, state = load_run(workdir, with_init=False)
  return config, jax.device_get(backbone_variables(state))
