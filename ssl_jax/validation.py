"""Config checks that run before any data is read or anything is compiled.

Each failure is a ValueError that names the field and says what to change.
"""

import math
import numbers

import ml_collections

from ssl_jax import methods, models, optim
from ssl_jax import workdir as workdir_lib
from ssl_jax.data import DATASETS


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
  _known(methods.METHODS, config.method.name, 'config.method.name')
  _known(models.BACKBONES, config.model.backbone, 'config.model.backbone')
  _known(DATASETS, config.data.dataset, 'config.data.dataset')
  _known(optim.OPTIMIZERS, config.optimizer.name, 'config.optimizer.name')
  validate_numbers(config)
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
  workdir_lib.check_writable(workdir)


# (field, lowest allowed, whether the lowest is allowed, what it is): the
# numeric fields every run reads. Fields of one method are checked by name
# patterns in `validate_numbers`.
_RANGES = (
    ('batch_size', 1, True, 'the global batch size'),
    ('num_steps', 0, True, 'the number of steps (0: use num_epochs)'),
    ('num_epochs', 0, True, 'the number of epochs'),
    ('warmup_epochs', 0, True, 'the warm-up length in epochs'),
    ('warmup_steps', 0, True, 'the warm-up length in steps'),
    ('optimizer.lr', 0, False, 'the learning rate'),
    ('optimizer.weight_decay', 0, True, 'the weight decay'),
    ('optimizer.clip_grad_norm', 0, True, 'the gradient clipping norm (0: off)'),
    ('optimizer.final_lr_fraction', 0, True, 'the final learning rate fraction'),
    ('optimizer.bias_norm_lr', 0, True, "the biases' learning rate (0: same)"),
    ('optimizer.warmup_start_lr', 0, True, 'the first warm-up learning rate'),
    ('training.log_every', 1, True, 'steps between metric lines'),
    ('training.checkpoint_every', 1, True, 'steps between checkpoints'),
    ('training.keep_checkpoints', 1, True, 'checkpoints kept (at least one)'),
    ('training.eval_every', 0, True, 'steps between evaluations (0: off)'),
    ('training.prefetch', 0, True, 'batches prefetched'),
    ('training.collapse_std_threshold', 0, True, 'the collapse warning level'),
    ('data.max_train_examples', 0, True, 'a training subset size (0: all)'),
    ('data.max_eval_examples', 0, True, 'an evaluation subset size (0: all)'),
    ('distributed.heartbeat_timeout_s', 1, True, 'a timeout in seconds'),
    ('distributed.initialization_timeout_s', 1, True, 'a timeout in seconds'),
    ('eval.batch_size', 1, True, 'the evaluation batch size'),
)
_INTEGERS = ('batch_size', 'num_steps', 'warmup_steps', 'training.log_every',
             'training.checkpoint_every', 'training.keep_checkpoints',
             'training.eval_every', 'training.prefetch',
             'data.max_train_examples', 'data.max_eval_examples',
             'eval.batch_size')
_FRACTIONS = ('optimizer.final_lr_fraction', 'data.max_bad_file_fraction')


def _get(config, dotted):
  node = config
  for key in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      return None
    node = node[key]
  return node


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_numbers(config: ml_collections.ConfigDict) -> None:
  """Checks every numeric field's range (before anything is compiled).

  Raises:
    ValueError: naming the field, the value and what to set instead.
  """
  for path, key, value in _walk(config):
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if _is_number(v) and not math.isfinite(v):
        raise ValueError(f'config.{path}={value} is not a finite number; set '
                         f'--config.{path} to a finite value.')
    if _is_number(value) and key.endswith('_prob') and not 0 <= value <= 1:
      raise ValueError(f'config.{path}={value} is a probability; set it in '
                       f'[0, 1].')
    if key == 'crop_scale' and isinstance(value, (tuple, list)) and (
        len(value) != 2 or not 0 < value[0] <= value[1] <= 1):
      raise ValueError(f'config.{path}={tuple(value)} must be (min, max) '
                       f'area fractions with 0 < min <= max <= 1.')
    if key in ('count', 'size') and path.startswith('augment.views.') and (
        not isinstance(value, int) or value < 1):
      raise ValueError(f'config.{path}={value!r} must be a positive integer.')
  for path, lowest, inclusive, what in _RANGES:
    value = _get(config, path)
    if value is None:
      continue
    if not _is_number(value):
      raise ValueError(f'config.{path}={value!r} must be a number ({what}).')
    if path in _INTEGERS and int(value) != value:
      raise ValueError(f'config.{path}={value} must be a whole number ({what}).')
    if value < lowest or (value == lowest and not inclusive):
      bound = f'>= {lowest}' if inclusive else f'> {lowest}'
      hint = ''
      if path == 'optimizer.lr' and value < 0:
        hint = ' (a negative rate would climb the loss)'
      raise ValueError(f'config.{path}={value} must be {bound}{hint}: it is '
                       f'{what}; set --config.{path} accordingly.')
  for path in _FRACTIONS:
    value = _get(config, path)
    if value is not None and (not _is_number(value) or not 0 <= value <= 1):
      raise ValueError(f'config.{path}={value!r} is a fraction; set it in '
                       f'[0, 1].')
  momentum = _get(config, 'optimizer.momentum')
  if _is_number(momentum) and not 0 <= momentum < 1:
    raise ValueError(f'config.optimizer.momentum={momentum} must be in [0, 1).')


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
