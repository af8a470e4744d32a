"""Stopping a run that diverges: parameter-norm growth and honest stop messages.

The train step never applies a non-finite update (`methods.base.train_step`),
but a finite gradient times a huge learning rate can still blow the
parameters up by orders of magnitude per step (LARS at lr 1e6: norm 7.5e5 ->
1.4e13 in 6 steps) long before anything overflows. `ParamNormWatch` compares
the logged `param_norm` with its value when the run (or its resume) started:
it warns once past sqrt(limit) times that value, and stops the run past
`limit` times (config.training.param_norm_growth_limit; 0 turns it off).
"""

import logging
import math
from typing import Optional


# Exit status after a checkpoint written on SIGTERM/SIGINT: EX_TEMPFAIL, "try
# again"; schedulers can requeue on it.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Raised after the checkpoint written on SIGTERM/SIGINT is complete."""

  def __init__(self, step: int):
    super().__init__(f'Preempted at step {step}; checkpoint saved. Run the same '
                     f'command again to resume.')
    self.step = step


class NonFiniteError(FloatingPointError):
  """The step's loss, gradients or updated state became NaN/inf (policy 'stop')."""


class DivergenceError(NonFiniteError):
  """The parameter norm grew past config.training.param_norm_growth_limit."""


def last_good_checkpoint(step: Optional[int]) -> str:
  """The sentence of a stop message that says where a restart would begin.

  Args:
    step: the newest committed checkpoint, or None when the run has none.

  Returns:
    'the newest checkpoint (step N) is the last good one' or, without one,
    that none was saved and a restart begins from scratch.
  """
  if step is None:
    return ('no checkpoint was saved, so a restart begins from step 0')
  return f'the newest checkpoint (step {step}) is the last good one'


class ParamNormWatch:
  """Warns, then stops, when the parameter norm grows past a limit.

  Args:
    limit: stop when param_norm > limit x the reference norm (0: off).
    reference: the parameter norm at the start of this run or resume.
  """

  def __init__(self, limit: float, reference: float):
    self.limit = float(limit)
    self.reference = float(reference)
    self._warned = False

  def check(self, step: int, param_norm: float) -> Optional[str]:
    """Checks one logged step's norm (host floats).

    Returns:
      None while below the stop threshold (a warning is logged once past
      sqrt(limit) x reference); the stop message past it, for the caller to
      raise once it has named the last good checkpoint.
    """
    if self.limit <= 0 or self.reference <= 0 or not math.isfinite(param_norm):
      return None
    growth = param_norm / self.reference
    if growth > self.limit:
      return (f'The parameter norm grew {growth:.3g}x in this run (from '
              f'{self.reference:.4g} to {param_norm:.4g} at step {step}), past '
              f'config.training.param_norm_growth_limit={self.limit:g}: the '
              f'run is diverging. Lower the learning rate (or raise the limit, '
              f'or set it to 0 to turn this check off).')
    if growth > math.sqrt(self.limit) and not self._warned:
      self._warned = True
      logging.warning(
          'The parameter norm grew %.3gx in this run (from %.4g to %.4g at '
          'step %d); the run stops at %gx '
          '(config.training.param_norm_growth_limit). A learning rate too '
          'large for the optimizer does this.', growth, self.reference,
          param_norm, step, self.limit)
    return None
