"""The registry of loss functions: a plain dict whose lookups fail loudly.

Not `ssl_jax.registry.Registry`: losses import nothing of ours but
`parallel`, so that a loss file can be read, tested and copied on its own.
"""

from typing import Callable, Dict

LOSSES: Dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
  """Decorator that registers a loss function under `name`."""

  def decorator(fn: Callable) -> Callable:
    if name in LOSSES:
      raise ValueError(f'loss {name!r} is registered twice.')
    LOSSES[name] = fn
    return fn

  return decorator


def get_loss(name: str) -> Callable:
  """The loss registered as `name`; a ValueError lists the known names."""
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r}. Known losses: '
                     f'{", ".join(sorted(LOSSES))}.')
  return LOSSES[name]
