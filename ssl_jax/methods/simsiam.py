"""SimSiam (Chen & He 2021): a Siamese network with a predictor and stop-grad.

No negatives, no momentum encoder: the predictor and the stop-gradient on the
projection branch are enough to avoid collapse (sec. 4). The predictor's
learning rate is not decayed (sec. 4.2, "lr of the predictor is fixed"):
the config names the predictor in `optimizer.constant_lr_params`.

Config (configs/simsiam.py): model.projector (3 layers with BN, output BN
without affine), model.predictor (2048 -> 512 -> 2048), optimizer.constant_lr_params.
"""

from ssl_jax import losses, models
from ssl_jax.methods import common
from ssl_jax.methods.base import METHODS, Method, StepOutput


@METHODS.register('simsiam')
class SimSiam(Method):
  """Shared encoder + projector, predictor on one branch, symmetric loss."""

  def init(self, rng):
    return common.init_without_state(self, rng)

  def loss(self, params, state, views, batch, rng, axis_name):
    del batch, rng
    if len(views) != 2:
      raise ValueError(f'SimSiam uses 2 views, the config makes {len(views)}.')
    if self.config.model.get('predictor') is None:
      raise ValueError('SimSiam needs config.model.predictor.')
    network = models.get_network(self.config.model, axis_name)
    out, batch_stats = common.apply_network(network, params, state.batch_stats,
                                            views)
    p, z = out['prediction'], out['projection']
    loss = losses.get_loss('simsiam')(p[0], p[1], z[0], z[1],
                                      axis_name=axis_name)
    return loss, StepOutput(batch_stats=batch_stats,
                            method_state=state.method_state, metrics={},
                            features=out['features'][0], embeddings=z)
