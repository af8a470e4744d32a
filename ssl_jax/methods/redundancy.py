"""Barlow Twins (Zbontar et al. 2021) and VICReg (Bardes et al. 2022).

Both train a backbone + a wide projector on two views with a loss on the
statistics of the global batch; neither needs negatives, a teacher or a
predictor. Config (configs/barlow_twins.py, configs/vicreg.py):
model.projector and the loss weights in `method` (and `loss_scale`, a
factor on the loss, 1 by default).
"""

from ssl_jax import losses, models
from ssl_jax.methods import common
from ssl_jax.methods.base import METHODS, Method, StepOutput


class _TwoViewStatistics(Method):
  """Backbone + projector, a loss on the two views' projections."""

  loss_name = ''

  def loss_kwargs(self) -> dict:
    """The loss's hyper-parameters, read from `config.method`."""
    return {}

  def init(self, rng):
    return common.init_without_state(self, rng)

  def loss(self, params, state, views, batch, rng, axis_name):
    del batch, rng
    if len(views) != 2:
      raise ValueError(f'{self.loss_name} uses 2 views, the config makes '
                       f'{len(views)}.')
    network = models.get_network(self.config.model, axis_name)
    out, batch_stats = common.apply_network(network, params, state.batch_stats,
                                            views)
    z = out['projection']
    loss = losses.get_loss(self.loss_name)(z[0], z[1], axis_name=axis_name,
                                           **self.loss_kwargs())
    # solo-learn's `scale_loss` (0.1 in its Barlow Twins CIFAR recipe): with
    # LARS it changes the step of the parameters LARS does not adapt.
    loss = loss * self.config.method.get('loss_scale', 1.0)
    return loss, StepOutput(batch_stats=batch_stats,
                            method_state=state.method_state, metrics={},
                            features=out['features'][0], embeddings=z[0])


@METHODS.register('barlow_twins')
class BarlowTwins(_TwoViewStatistics):
  """Cross-correlation of the two views' standardised projections -> I."""

  loss_name = 'barlow_twins'

  def loss_kwargs(self):
    return {'lambda_offdiag': self.config.method.lambda_offdiag}


@METHODS.register('vicreg')
class VICReg(_TwoViewStatistics):
  """Invariance + variance hinge + covariance decorrelation."""

  loss_name = 'vicreg'

  def loss_kwargs(self):
    m = self.config.method
    return {'invariance_weight': m.invariance_weight,
            'variance_weight': m.variance_weight,
            'covariance_weight': m.covariance_weight}
