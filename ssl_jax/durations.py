"""The one place where durations in epochs, examples or fractions become steps.

Configs give a duration the way its paper does: DINO freezes its last layer
for `freeze_last_layer_epochs`, SwAV starts its queue at `queue_start_epochs`,
AVID starts cross-modal agreement at `cma_start_fraction` of the run, SwAV
freezes prototypes for `freeze_prototypes_steps`. `Durations.steps` turns any
of them into steps of this run (as big_vision's `utils.steps`), and
`Durations.of_config` reads a prefix's `_steps`, `_epochs`, `_examples` or
`_fraction` field from a config.
"""

import dataclasses
from typing import Optional

import ml_collections

# In order of precedence, see `Durations.of_config`.
UNITS = ('steps', 'examples', 'epochs', 'fraction')


@dataclasses.dataclass(frozen=True)
class Durations:
  """The length of a run and the size of its epochs, in steps.

  Attributes:
    total_steps: optimisation steps of the run.
    steps_per_epoch: steps per pass over the training data (the last partial
      batch of an epoch is dropped).
    global_batch: examples per step, over every device of every process.
  """
  total_steps: int
  steps_per_epoch: int
  global_batch: int

  def steps(self, *, steps: Optional[float] = None,
            epochs: Optional[float] = None, examples: Optional[float] = None,
            fraction: Optional[float] = None) -> int:
    """A duration given in exactly one unit, as a whole number of steps.

    Args:
      steps: steps.
      epochs: passes over the training data.
      examples: training examples seen.
      fraction: a fraction of the whole run.

    Returns:
      The number of steps, rounded to the nearest.

    Raises:
      ValueError: not exactly one unit given, or a negative duration.
    """
    given = {k: v for k, v in dict(steps=steps, epochs=epochs,
                                   examples=examples,
                                   fraction=fraction).items() if v is not None}
    if len(given) != 1:
      raise ValueError(f'A duration needs exactly one of {", ".join(UNITS)}; '
                       f'got {sorted(given) or "none"}.')
    (unit, value), = given.items()
    if value < 0:
      raise ValueError(f'A duration cannot be negative: {value} {unit}.')
    per_unit = {'steps': 1.0, 'epochs': self.steps_per_epoch,
                'examples': 1.0 / self.global_batch,
                'fraction': self.total_steps}[unit]
    return int(round(value * per_unit))

  def of_config(self, config: ml_collections.ConfigDict, prefix: str,
                default: int = 0) -> int:
    """Steps of `config.<prefix>_<unit>` for the first unit set there.

    Units are read in the order steps, examples, epochs, fraction, and the
    first non-zero one counts, as `num_steps` overrides `num_epochs`: a
    command-line `--config.warmup_steps=500` overrides a recipe's
    `warmup_epochs`.

    Args:
      config: a ConfigDict holding some of `<prefix>_steps`, `_examples`,
        `_epochs`, `_fraction`.
      prefix: the duration's name, e.g. 'warmup'.
      default: steps when none of them is set.
    """
    for unit in UNITS:
      value = config.get(f'{prefix}_{unit}')
      if value:
        return self.steps(**{unit: value})
    return default

  def epoch(self, step: int) -> int:
    """The epoch (from 0) that step `step` (from 1) belongs to."""
    return (step - 1) // self.steps_per_epoch

  @classmethod
  def of_run(cls, config: ml_collections.ConfigDict, num_examples: int,
               data_name: str = 'The training data') -> 'Durations':
    """The Durations of a run: `num_steps`, else `num_epochs` of the data.

    Args:
      config: the run's config (`batch_size`, `num_steps`, `num_epochs`).
      num_examples: examples in the training split.
      data_name: how the message names the data.

    Raises:
      ValueError: the data holds less than one global batch.
    """
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
      raise ValueError(f'{data_name} has {num_examples} training examples, fewer '
                       f'than one batch of {config.batch_size}; lower '
                       f'--config.batch_size.')
    # A fractional last epoch is cut short, never rounded up past the data.
    total = (config.get('num_steps', 0) or
             int(config.num_epochs * steps_per_epoch))
    if total < 0:
      raise ValueError(f'The run length must not be negative; got num_steps='
                       f'{config.get("num_steps", 0)}, num_epochs='
                       f'{config.num_epochs}.')
    return cls(int(total), steps_per_epoch, config.batch_size)

  def warmup_steps(self, config: ml_collections.ConfigDict) -> int:
    """`warmup_steps`/`_epochs`/..., at most all steps but the last."""
    warmup = self.of_config(config, 'warmup')
    return min(warmup, max(self.total_steps - 1, 0))
