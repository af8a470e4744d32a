"""SimCLR (Chen et al. 2020): NT-Xent between two views, global BN.

Config (configs/simclr.py): method.temperature; model.projector.
"""

from ssl_jax import losses, models
from ssl_jax.methods import common
from ssl_jax.methods.base import METHODS, Method, StepOutput


@METHODS.register('simclr')
class SimCLR(Method):
  """Backbone + projector trained with NT-Xent; negatives from all devices."""

  def init(self, rng):
    return common.init_without_state(self, rng)

  def loss(self, params, state, views, batch, rng, axis_name):
    del batch, rng
    if len(views) != 2:
      raise ValueError(f'SimCLR uses 2 views, the config makes {len(views)}.')
    network = models.get_network(self.config.model, axis_name)
    out, batch_stats = common.apply_network(network, params, state.batch_stats,
                                            views)
    z = out['projection']
    loss = losses.get_loss('nt_xent')(
        z[0], z[1], temperature=self.config.method.temperature,
        axis_name=axis_name)
    return loss, StepOutput(batch_stats=batch_stats,
                            method_state=state.method_state, metrics={},
                            features=out['features'][0], embeddings=z)
