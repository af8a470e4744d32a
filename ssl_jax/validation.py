"""Config checks that run before any data is read or anything is compiled.

Each failure is a ValueError that names the field and says what to change.
"""

import os
import tempfile

import ml_collections


def _known(registry, name, field):
  if name not in registry:
    raise ValueError(f'Unknown {registry.kind} {name!r} ({field}). Known '
                     f'{registry.kind}s: {", ".join(registry.names())}.')


def _walk(config, prefix=''):
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      yield from _walk(value, path + '.')
    else:
      yield path, key, value


def validate_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks names, ranges and the workdir; raises ValueError with a fix."""
  from ssl_jax import methods, models, optim  # pylint: disable=g-import-not-at-top
  from ssl_jax.data import DATASETS  # pylint: disable=g-import-not-at-top
  _known(methods.METHODS, config.method.name, 'config.method.name')
  _known(models.BACKBONES, config.model.backbone, 'config.model.backbone')
  _known(DATASETS, config.data.dataset, 'config.data.dataset')
  _known(optim.OPTIMIZERS, config.optimizer.name, 'config.optimizer.name')
  if config.training.get('nonfinite_policy', 'stop') not in ('stop', 'skip'):
    raise ValueError('config.training.nonfinite_policy must be "stop" or '
                     f'"skip", not {config.training.nonfinite_policy!r}.')
  workers = config.data.get('num_workers', 0)
  if not isinstance(workers, int) or workers < -1:
    raise ValueError(f'config.data.num_workers must be -1 (one per CPU core), '
                     f'0 (in-process) or a number of processes, not {workers!r}.')
  if config.batch_size <= 0:
    raise ValueError(f'config.batch_size must be positive, got {config.batch_size}.')
  if config.num_steps <= 0 and config.num_epochs <= 0:
    raise ValueError('Set config.num_epochs or config.num_steps to a positive '
                     'number.')
  for path, key, value in _walk(config.method, 'method.'):
    # A queue (MoCo, SwAV, NNCLR) is filled a global batch at a time; any
    # remainder would leave stale or never-written slots.
    if key == 'queue_size' and isinstance(value, int) and value > 0 and (
        value % config.batch_size):
      fit = max(config.batch_size, value // config.batch_size * config.batch_size)
      raise ValueError(
          f'config.{path}={value} is not a multiple of the global batch size '
          f'{config.batch_size}; set it to a multiple such as {fit} (or change '
          f'--config.batch_size).')
  for path, key, value in _walk(config):
    if 'temperature' in key and isinstance(value, (int, float)) and value <= 0:
      raise ValueError(f'config.{path} must be > 0 (a softmax temperature), '
                       f'got {value}.')
    if ('momentum' in key and 'ema' in key and isinstance(value, (int, float))
        and not 0.0 <= value <= 1.0):
      raise ValueError(f'config.{path} is an EMA momentum and must be in '
                       f'[0, 1], got {value}.')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f'The workdir {workdir!r} is not writable ({e}); pass '
                     f'--workdir=DIR with a directory you can write.') from e


def validate_data(config: ml_collections.ConfigDict, source) -> None:
  """Checks the views against the images the source serves."""
  if source.crops_on_host:
    return  # views are cropped from the original images, of any size
  height, width = source.image_shape[0], source.image_shape[1]
  for name in config.augment.views:
    size = config.augment.views[name].size
    if size > min(height, width):
      raise ValueError(
          f'config.augment.views.{name}.size={size} is larger than the '
          f'{height}x{width} images of {source.name}; use a crop size of at '
          f'most {min(height, width)} or a larger config.data.image_size.')
