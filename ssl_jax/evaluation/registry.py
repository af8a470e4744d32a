"""Evaluators by name, and the ones a run's config schedules during training.

Every protocol (`linear`, `knn`, `finetune`, `periodic`) is a class registered
here: `cls(config)` builds it (data, compiled functions) once, and
`evaluator(state) -> {metric: value}` scores a train state's model: its
`params`, `batch_stats` and `probe` (during training it gets
`train.evaluation_view`, whose `opt_state` and `method_state` are None). They
are configured as big_vision's `config.evals`:

  config.evals.probe = ml_collections.ConfigDict(dict(
      type='periodic', every_steps=200))     # or every_epochs, _examples, _fraction

and each runs on its own schedule (`Durations.of_config(entry, 'every')`) and
at the last step. A config without `evals` keeps the older
`config.training.eval_every`: a `periodic` evaluator every that many steps.
`python -m ssl_jax.evaluate --protocol=NAME` runs one of them on a checkpoint.
"""

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import ml_collections

from ssl_jax.durations import Durations

EVALUATORS: Dict[str, Callable[[ml_collections.ConfigDict], Any]] = {}


def register(name: str):
  """Class decorator: registers an evaluator type under `name`."""

  def decorator(cls):
    if name in EVALUATORS:
      raise ValueError(f'evaluator {name!r} is registered twice.')
    EVALUATORS[name] = cls
    return cls

  return decorator


def get_evaluator(name: str) -> Callable[[ml_collections.ConfigDict], Any]:
  """The evaluator type `name`; a ValueError lists the known ones."""
  if name not in EVALUATORS:
    raise ValueError(f'Unknown evaluator {name!r}. Known evaluators: '
                     f'{", ".join(sorted(EVALUATORS))}.')
  return EVALUATORS[name]


@dataclasses.dataclass
class _Scheduled:
  name: str
  every: int
  evaluate: Any
  prefix: str


class Evaluations:
  """The evaluators of a run's `config.evals`, each on its own schedule."""

  def __init__(self, scheduled: List[_Scheduled]):
    self.scheduled = scheduled

  def due(self, step: int) -> bool:
    """Whether any evaluator runs at `step`."""
    return any(e.every > 0 and step % e.every == 0 for e in self.scheduled)

  def __call__(self, state: Any, step: int, last: bool = False
               ) -> Dict[str, float]:
    """Metrics of every evaluator due at `step` (all of them when `last`)."""
    metrics = {}
    for e in self.scheduled:
      if last or (e.every > 0 and step % e.every == 0):
        metrics.update({e.prefix + k: v for k, v in e.evaluate(state).items()})
    return metrics


def _entries(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  evals = config.get('evals')
  if evals is not None:
    return {name: evals[name] for name in evals}
  every = int(config.training.get('eval_every', 0))
  if every <= 0:
    return {}
  return {'periodic': ml_collections.ConfigDict(
      dict(type='periodic', every_steps=every))}


def make_evaluations(config: ml_collections.ConfigDict,
                     durations: Durations) -> Optional[Evaluations]:
  """The run's scheduled evaluators, or None when there are none to run.

  Args:
    config: the run config (`evals`, or `training.eval_every`).
    durations: the run's, to turn `every_epochs` (...) into steps.

  Returns:
    None without evaluators (or when the data has no labels).
  """
  scheduled = []
  for name, entry in _entries(config).items():
    evaluator = get_evaluator(entry.get('type', name))(config)
    if not getattr(evaluator, 'enabled', True):
      continue
    # The periodic evaluator's metrics keep their names (eval_knn_acc, ...).
    prefix = '' if entry.get('type', name) == 'periodic' else f'eval_{name}_'
    scheduled.append(_Scheduled(name, durations.of_config(entry, 'every'),
                                evaluator, prefix))
  return Evaluations(scheduled) if scheduled else None
