"""Loading a run's checkpoint and computing frozen features of a dataset."""

import functools
import json
from typing import Iterator, Optional, Tuple

import jax
import ml_collections
import numpy as np

from ssl_jax import checkpointing, data, models, parallel
from ssl_jax import workdir as workdir_lib
from ssl_jax.data import augment


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
  checkpointer = checkpointing.Checkpointer(workdir)
  try:
    return _load_run(config, checkpointer, workdir, step, with_init)
  finally:
    # Orbax's background threads must stop before the interpreter exits.
    checkpointer.close()


def _load_run(config, checkpointer, workdir, step, with_init):
  from ssl_jax import train  # pylint: disable=g-import-not-at-top
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
    s = train.setup(init_config)
    template = s.state
  else:
    s = None
    # Tracing setup (no compilation) gives the state's shapes and dtypes,
    # which is all a restore needs.
    template = jax.eval_shape(lambda: train.setup(init_config).state)
  state, _ = checkpointer.restore(template, step)
  if state is None:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints: train '
                            f'first with python -m ssl_jax.main.')
  return config, s, state


def make_feature_fn(model_config: ml_collections.ConfigDict, size: int,
                    mean, std):
  """A mesh function: uint8 images -> pooled backbone features (eval mode).

  The same model, size and normalisation give the same (already compiled)
  function, so the evaluations during training and the ones after it compile
  the backbone once per process.

  Args:
    model_config: `config.model` of the run.
    size: input resolution (the centre view's size).
    mean, std: per-channel normalisation of the inputs.

  Returns:
    `fn(variables, images [B, h, w, c]) -> [B, d]` on global arrays
    (`parallel.data_parallel` on the default mesh): the variables replicated,
    the images and features split over the devices.
  """
  key = json.dumps(ml_collections.ConfigDict(model_config).to_dict(),
                   sort_keys=True, default=str)
  return _feature_fn(key, int(size), tuple(float(m) for m in mean),
                     tuple(float(s) for s in std))


@functools.lru_cache(maxsize=8)
def _feature_fn(model_json: str, size: int, mean: Tuple[float, ...],
                std: Tuple[float, ...]):
  backbone = models.get_backbone(
      ml_collections.ConfigDict(json.loads(model_json)), axis_name=None)

  def features(variables, images):
    x = augment.eval_view(images, size, mean, std)
    return backbone.apply(variables, x, train=False)[0]

  return parallel.data_parallel(features, in_specs=(parallel.P(),
                                                    parallel.P(parallel.AXIS)),
                                out_specs=parallel.P(parallel.AXIS))


def batches(feature_fn, variables, source: data.Source, batch_size: int
            ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """(features, labels) of `source`, one batch at a time (padding removed).

  Args:
    feature_fn: from `make_feature_fn`.
    variables: the backbone's {'params', 'batch_stats'} (host arrays, or
      global arrays replicated on the mesh).
    source: the examples (every process reads all of them; the devices of
      every process share the work, and every process gets all features).
    batch_size: examples per call (rounded down to a multiple of the devices).
  """
  n_dev = parallel.default_mesh().size
  batch_size = max(n_dev, batch_size // n_dev * n_dev)
  rvars = parallel.put_replicated(variables)
  for batch in data.eval_batches(source, batch_size):
    out = feature_fn(rvars, parallel.put_global_batch(batch['image']))
    out = parallel.to_host(out).reshape(batch_size, -1)
    yield out[batch['mask']], batch['label'][batch['mask']]


def extract(feature_fn, variables, source: data.Source,
            batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Features [n, d] and labels [n] of every example of `source`."""
  feats, labels = zip(*batches(feature_fn, variables, source, batch_size))
  return np.concatenate(feats), np.concatenate(labels)


def moments(feature_fn, variables, source: data.Source,
            batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Per-dimension mean and std of the features of `source`, streamed (the
  features of an ImageNet-sized source would not fit in host memory)."""
  count, total, squares = 0, 0.0, 0.0
  for f, _ in batches(feature_fn, variables, source, batch_size):
    f = f.astype(np.float64)
    count += len(f)
    total = total + f.sum(0)
    squares = squares + (f ** 2).sum(0)
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
  return mean.astype(np.float32), std.astype(np.float32)


def backbone_variables(state) -> dict:
  return {'params': state.params['backbone'],
          'batch_stats': state.batch_stats.get('backbone', {})}


def raw_pixels(source: data.Source) -> Tuple[np.ndarray, np.ndarray]:
  batch = source.get(np.arange(len(source)))
  x = batch['image'].reshape(len(source), -1).astype(np.float32) / 255.0
  return x, batch['label']


def eval_sources(config) -> Tuple[data.Source, data.Source]:
  """Train and test splits, subsampled as `config.eval` says."""
  train_source = data.get_source(config.data, config.data.train_split,
                                 config.eval.get('max_train_examples', 0))
  test_source = data.get_source(config.data, config.data.eval_split,
                                config.eval.get('max_test_examples', 0))
  return train_source, test_source


def view_size(config) -> int:
  views = config.augment.views
  return views[next(iter(views))].size
