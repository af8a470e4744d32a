"""The train state: everything a step reads and writes, as one pytree."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """State of a self-supervised run.

  Attributes:
    step: number of optimizer steps taken.
    params: trainable parameters (the online / student network, heads).
    batch_stats: BatchNorm statistics of the trainable network.
    opt_state: optimizer state.
    rng: a typed PRNG key (`jax.random.key`), split every step (same on
      every device); checkpoints hold its key data.
    method_state: what the method evolves outside the optimizer: EMA teacher,
      queues, centers, prototypes, memory banks (a dict, possibly empty).
    probe: the online linear probe's params and optimizer state (or empty).
    nonfinite_steps: steps whose loss or gradient was not finite; their update
      was not applied.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  method_state: Any
  probe: Any
  nonfinite_steps: jax.Array

  @classmethod
  def create(cls, *, params, batch_stats, opt_state, rng, method_state=None,
             probe=None) -> 'TrainState':
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats=batch_stats, opt_state=opt_state, rng=rng,
               method_state=method_state if method_state is not None else {},
               probe=probe if probe is not None else {},
               nonfinite_steps=jnp.zeros((), jnp.int32))
