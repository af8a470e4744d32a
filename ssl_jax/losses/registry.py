"""The registry of loss functions (kept apart to avoid import cycles)."""

from ssl_jax.registry import Registry

LOSSES = Registry('loss')


def get_loss(name: str):
  return LOSSES.get(name)
